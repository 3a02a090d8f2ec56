"""`make gpu-check` (tools/gpu_check.py) without a GPU: the clean no-CUDA exit, the report
from fake stage results, the time budget, the GPU test selection, and each stage's function run in
Triton's interpreter at tiny sizes on the CPU (fp32/fp16: the interpreter's bf16 tl.dot is wrong)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import fastdiff.ops as ops
from fastdiff.bench.kernels import dtype_name, kernel_cases

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
sys.path.insert(0, str(TOOLS))  # project tooling, not part of the package

import gpu_check  # noqa: E402
import gpu_rows  # noqa: E402

GPU_CHECK = [sys.executable, str(TOOLS / "gpu_check.py")]
NO_CUDA = dict(os.environ, CUDA_VISIBLE_DEVICES="")
# the stage functions on device="cpu" need Triton's interpreter (conftest sets it without CUDA)
needs_triton = pytest.mark.skipif(ops.backends()["triton"] != "available" or os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="needs Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest without CUDA)")


# ---------------------------------------------------------------------------------------------
# no CUDA: one line, exit 0, nothing written


def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "report"
    run = subprocess.run([*GPU_CHECK, "--out", str(out)], cwd=tmp_path, env=NO_CUDA,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device found" in lines[0], run.stdout
    for planned in ("GPU tests", "kernel benchmark", "UNet step", str(out)):
        assert planned in lines[0]
    assert not out.exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_target_without_cuda(tmp_path):
    run = subprocess.run(["make", "-s", "gpu-check", f"GPU_CHECK_ARGS=--out {tmp_path / 'r'} --only tests"], cwd=REPO, env=NO_CUDA,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no CUDA device found" in run.stdout and "GPU tests" in run.stdout and "UNet" not in run.stdout


def test_stage_choice_is_checked():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "tests,benchmarks"])
    args = gpu_check.parse_args(["--only", "kernels", "--budget", "kernels=30"])
    assert args.only == ["kernels"] and args.budget == [("kernels", 30.0)]


# ---------------------------------------------------------------------------------------------
# report from fake stage results


def _fake_stages():
    S = gpu_check.Stage
    kernel_row = {"op": "attention", "case": "sd15-self-64x64", "model": "sd15", "shape": "2x4096x8x40", "dtype": "fp16",
                  "fastdiff_ms": 0.5, "error": 1e-3, "bound": 1e-2, "check": "ok",
                  "baselines": {"SDPA flash": {"ms": 0.6, "speedup": 1.2},
                                "SDPA cuDNN": {"ms": None, "speedup": None, "unavailable": "RuntimeError: no kernel | here"}}}
    unet_rows = [{"model": "sd15", "batch": 1, "dtype": "fp16", "baseline": "diffusers fp16 SDPA", "fastdiff_ms": 20.0,
                  "baseline_ms": 25.0, "speedup": 1.25, "images_per_s": 50.0,
                  "accuracy": {"fastdiff_error": 2e-3, "baseline_error": 1.5e-3, "bound": 1e-2, "passed": True, "batch": 1}},
                 {"model": "mobilediffusion", "skipped": "no reason at all"}]
    return [S("setup", "passed", 3.0, 45, "fastdiff from here", notes=["diffusers: unpacked"]),
            S("tests", "failed", 100.0, 200, "1 passed, 1 failed", rows=[
                {"nodeid": "tests/test_a.py::test_ok[x|y]", "outcome": "passed", "duration": 0.1},
                {"nodeid": "tests/test_a.py::test_bad", "outcome": "failed", "duration": 0.2, "message": "assert 1 == 2"}]),
            S("kernels", "timed out", 100.0, 100, "1 rows", rows=[kernel_row]),
            S("unet", "passed", 50.0, 100, "sd15 passed", rows=unet_rows)]


def _check_tables(markdown: str):
    """Every markdown table has a separator line and the same number of cells on each line."""
    tables, current = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    assert tables
    for table in tables:
        cells = [len(line.replace("\\|", "").split("|")) for line in table]
        assert len(set(cells)) == 1, table
        assert set(table[1]) <= set("|-"), table
    return tables


def test_report_from_fake_results(tmp_path):
    stages = _fake_stages()
    report = {"verdict": gpu_check.verdict(stages), "stages": [gpu_check.dataclasses.asdict(s) for s in stages],
              "meta": {"started": "2026-01-01T00:00:00+00:00", "seconds": 253.0, "total_budget_s": 465, "command": "python -m x",
                       "git": "abc", "versions": {"device": "NVIDIA H200", "capability": "9.0", "sms": 132, "memory_gib": 139.8,
                                                  "torch": "2.11.0", "cuda": "13.0", "cudnn": 91000, "triton": "3.6.0"}}}
    gpu_check.write_report(tmp_path, report)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# fastdiff GPU check: FAIL\n")
    assert "NVIDIA H200" in md and "torch 2.11.0" in md and "triton 3.6.0" in md
    tables = _check_tables(md)
    assert len(tables) == 4  # stages, every test, attention, unet
    stage_table = "\n".join(tables[0])
    for name, status in (("tests", "failed"), ("kernels", "timed out"), ("unet", "passed")):
        assert f"| {name} | {status} |" in stage_table
    assert "**failed** `tests/test_a.py::test_bad`" in md and "assert 1 == 2" in md
    assert "| 0.600 (1.20x) | n/a |" in md and "- SDPA cuDNN: RuntimeError: no kernel | here" in md
    assert "1.25x" in md and "ok: fastdiff 2.0e-03" in md and "skipped: no reason at all" in md


def test_verdict_and_exit_codes():
    S = gpu_check.Stage
    assert gpu_check.verdict([S("setup", "passed"), S("tests", "passed"), S("unet", "skipped")]) == "PASS"
    assert gpu_check.verdict([S("setup", "passed"), S("tests", "timed out")]) == "INCOMPLETE"
    assert gpu_check.verdict([S("setup", "passed"), S("tests", "not run")]) == "INCOMPLETE"
    assert gpu_check.verdict([S("setup", "passed"), S("tests", "timed out"), S("kernels", "error")]) == "FAIL"
    assert gpu_check.EXIT_CODES == {"PASS": 0, "FAIL": 1, "INCOMPLETE": 2}


# ---------------------------------------------------------------------------------------------
# time budget


def test_budget_kills_the_process_group_and_keeps_its_output(tmp_path):
    rows = tmp_path / "rows.jsonl"
    child = ("import json, subprocess, sys, time\n"
             f"open({str(rows)!r}, 'a').write(json.dumps({{'n': 1}}) + '\\n')\n"
             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
             "print('started', flush=True); time.sleep(120)\n")
    began = time.perf_counter()
    code, seconds, tail = gpu_check.run_budgeted([sys.executable, "-c", child], budget_s=3, log_path=tmp_path / "log")
    assert code is None and seconds < 30 and time.perf_counter() - began < 30
    assert "started" in tail and gpu_check.read_rows(rows) == [{"n": 1}]
    assert "killed at its 3 s budget" in (tmp_path / "log").read_text()


def test_a_stage_past_its_budget_is_timed_out_not_passed(tmp_path):
    out = tmp_path / "r"
    code = subprocess.run([*GPU_CHECK, "--device", "cpu", "--only", "kernels",
                           "--budget", "kernels=0.5", "--cases", "f24", "--no-install", "--out", str(out)],
                          env=NO_CUDA, capture_output=True, text=True, timeout=300)
    assert code.returncode == 2, code.stdout + code.stderr
    report = json.loads((out / "report.json").read_text())
    status = {s["name"]: s["status"] for s in report["stages"]}
    assert status == {"setup": "passed", "kernels": "timed out", "tests": "skipped", "unet": "skipped"}
    assert report["verdict"] == "INCOMPLETE" and "INCOMPLETE" in code.stdout
    assert "| kernels | timed out |" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# tests stage: per-test rows streamed by the pytest plugin


FAKE_TESTS = '''
import time
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")

def test_fake_pass():
    pass

def test_fake_fail():
    assert 1 == 2, "one is not two"

def test_fake_skip():
    pytest.skip("not here")

def test_fake_fixture_error(broken):
    pass

def test_other_not_selected():
    pass
'''


def _tests_stage(tmp_path, source, budget_s, pytest_k="fake", **more_files):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test_sample.py").write_text(source)
    for name, text in more_files.items():
        (tmp_path / "t" / f"{name}.py").write_text(text)
    args = gpu_check.parse_args(["--device", "cpu", "--test-paths", str(tmp_path / "t"), "--pytest-k", pytest_k])
    args.workers = 1
    ctx = {"env": gpu_check.child_env([], "cpu"), "log": tmp_path / "log", "work": tmp_path}
    return gpu_check.stage_tests(args, budget_s, ctx)


def test_tests_stage_records_each_test(tmp_path):
    """Each test's outcome and message; a module that does not import for want of a third-party
    package is skipped with the reason, one that does not import for another reason is an error."""
    stage = _tests_stage(tmp_path, FAKE_TESTS, budget_s=240, test_missing_package="import no_such_package_gc\n",
                         test_broken_import="import fastdiff.no_such_module_gc\n")
    outcomes = {r["nodeid"].rsplit("::", 1)[-1].rsplit("/", 1)[-1]: r["outcome"] for r in stage.rows}
    assert outcomes == {"test_fake_pass": "passed", "test_fake_fail": "failed", "test_fake_skip": "skipped",
                        "test_fake_fixture_error": "error", "test_missing_package.py": "skipped", "test_broken_import.py": "error"}
    assert stage.status == "failed" and stage.summary.startswith("1 passed, 1 failed, 2 error, 2 skipped")
    messages = {r["nodeid"].rsplit("::", 1)[-1].rsplit("/", 1)[-1]: r.get("message", "") for r in stage.rows}
    assert messages["test_missing_package.py"] == "not collected: no module named 'no_such_package_gc' on this machine"
    assert "fastdiff.no_such_module_gc" in messages["test_broken_import.py"]
    assert "one is not two" in messages["test_fake_fail"] and "fixture broke" in messages["test_fake_fixture_error"]
    assert messages["test_fake_skip"] == "Skipped: not here"


def test_tests_stage_cut_by_its_budget_keeps_finished_tests(tmp_path):
    source = "import time\n\ndef test_fake_a():\n    pass\n\ndef test_fake_b():\n    time.sleep(300)\n"
    stage = _tests_stage(tmp_path, source, budget_s=45)
    assert stage.status == "timed out" and stage.seconds < 100
    assert [(r["nodeid"].rsplit("::", 1)[1], r["outcome"]) for r in stage.rows] == [("test_fake_a", "passed")]


def test_a_module_missing_a_package_does_not_fail_the_stage(tmp_path):
    stage = _tests_stage(tmp_path, "def test_fake_ok():\n    pass\n", budget_s=240, test_missing_package="import no_such_package_gc\n")
    assert stage.status == "passed", stage.summary
    assert sorted(r["outcome"] for r in stage.rows) == ["passed", "skipped"]


def test_no_selected_test_is_a_failure(tmp_path):
    stage = _tests_stage(tmp_path, FAKE_TESTS, budget_s=240, pytest_k="no_such_test")
    assert stage.status == "failed" and "no test selected" in stage.summary


def test_gpu_test_set_selects_every_gpu_test(tmp_path):
    """The -k expression picks every `gpu`-marked test of tests/, Triton-backend tests besides,
    and neither this file nor the sm_90 compile check (one collection, read by the rows plugin)."""
    rows = tmp_path / "rows.jsonl"
    run = subprocess.run([sys.executable, "-P", "-m", "pytest", "tests", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-p", "pytest_rows", "-k", gpu_check.PYTEST_K],
                         cwd=REPO, env=dict(NO_CUDA, FASTDIFF_PYTEST_ROWS=str(rows), PYTHONPATH=str(TOOLS)), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:]
    [collection] = [line["collection"] for line in gpu_check.read_rows(rows) if "collection" in line]
    selected, gpu_marked = set(collection["selected"]), set(collection["gpu_marked"])
    assert gpu_marked and gpu_marked <= selected
    assert any("triton" in t for t in selected - gpu_marked)
    assert not any("test_gpu_check" in t or "sm90" in t for t in selected)


# ---------------------------------------------------------------------------------------------
# setup: the bundle of pure-Python packages


def test_bundle_round_trip(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "fakepkg_gc" / "__pycache__").mkdir(parents=True)
    (site / "fakepkg_gc" / "__init__.py").write_text("VALUE = 7\n")
    (site / "fakepkg_gc" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    (site / "fakepkg_gc-1.2.dist-info").mkdir()
    (site / "fakepkg_gc-1.2.dist-info" / "METADATA").write_text("Name: fakepkg_gc\nVersion: 1.2\n")
    monkeypatch.syspath_prepend(str(site))
    [archive] = gpu_check.make_bundle(["fakepkg_gc"], tmp_path / "bundle")
    assert archive.name == "fakepkg_gc-1.2.zip"
    assert sorted(zipfile.ZipFile(archive).namelist()) == ["fakepkg_gc-1.2.dist-info/METADATA", "fakepkg_gc/__init__.py"]

    target = tmp_path / "target"
    assert gpu_check.unpack_bundle(tmp_path / "bundle", target, importable=lambda name: True) == [
        "fakepkg_gc: already installed; bundle fakepkg_gc-1.2.zip not used"]
    assert not target.exists()
    notes = gpu_check.unpack_bundle(tmp_path / "bundle", target, importable=lambda name: False)
    assert notes == ["fakepkg_gc: unpacked from fakepkg_gc-1.2.zip"]
    assert (target / "fakepkg_gc" / "__init__.py").read_text() == "VALUE = 7\n"


# ---------------------------------------------------------------------------------------------
# the stage functions in Triton's interpreter, tiny sizes

# the smallest case of each op in fastdiff.shapes (odd shapes; the model cases are FULL-only here)
TINY_CASES = ["keys1", "3x40x7x13-g8", "f24", "2x40x7x13-to24"]


@needs_triton
def test_kernel_rows_in_the_interpreter(one_thread):
    rows = gpu_rows.kernel_rows(device="cpu", size="tiny", dtypes=[torch.float32, torch.float16], names=TINY_CASES, rounds=1)
    assert [(r["case"], r["dtype"]) for r in rows] == [(c, d) for d in ("fp32", "fp16") for c in TINY_CASES]
    for r in rows:
        assert r["check"] == "ok", r
        assert r["fastdiff_ms"] > 0 and r["baselines"]
        for b in r["baselines"].values():
            assert b["ms"] > 0 and b["speedup"] == pytest.approx(b["ms"] / r["fastdiff_ms"])


@needs_triton
def test_kernel_row_catches_a_wrong_kernel(monkeypatch, one_thread):
    import fastdiff.ops.triton

    real = fastdiff.ops.triton.glu
    monkeypatch.setattr(fastdiff.ops.triton, "glu", lambda h, **kw: real(h, **kw) * 1.05)
    [row] = gpu_rows.kernel_rows(device="cpu", size="tiny", dtypes=[torch.float32], names=["f24"], rounds=1)
    assert row["check"] == "mismatch" and row["error"] == pytest.approx(0.05, rel=1e-3)
    monkeypatch.setattr(fastdiff.ops.triton, "glu", lambda h, **kw: real(h, **kw) * float("nan"))
    [row] = gpu_rows.kernel_rows(device="cpu", size="tiny", dtypes=[torch.float32], names=["f24"], rounds=1)
    assert row["check"] == "mismatch" and row["problem"] == "output has NaN/inf"


def test_kernel_order_lets_every_op_take_turns(monkeypatch):
    """dtype by dtype, one case of each op in turn: a run cut short still has every op."""
    monkeypatch.setattr(gpu_rows, "kernel_run", lambda case, dtype, device, **kw: (case, dtype))
    monkeypatch.setattr(gpu_rows, "measure", lambda run, **kw: {"case": run[0].name, "dtype": dtype_name(run[1])})
    names = ["keys1", "d8", "3x40x7x13-g8", "f24", "f3"]  # table order: attention x2, group_norm, glu x2
    rows = gpu_rows.kernel_rows(device="cpu", size="tiny", dtypes=[torch.float16, torch.float32], names=names)
    order = ["keys1", "3x40x7x13-g8", "f24", "d8", "f3"]
    assert [(r["dtype"], r["case"]) for r in rows] == [(d, c) for d in ("fp16", "fp32") for c in order]


def test_kernel_cases_are_the_models_cases_of_shapes():
    from fastdiff import shapes

    assert [c.name for c in kernel_cases(size="full")] == [c.name for c in shapes.model_cases()]
    assert {c.op for c in kernel_cases(size="full", ops_filter=["glu"])} == {"glu"}
    with pytest.raises(ValueError, match="no case named"):
        kernel_cases(size="tiny", names=["no-such-case"])


@needs_triton
def test_unet_step_mobilediffusion_in_the_interpreter(one_thread):
    [row] = gpu_rows.unet_rows("mobilediffusion", device="cpu", batches=(1,), dtype=torch.float32, tiny=True, side=8, rounds=1, warmup=0)
    assert row["res"] == 64 and row["accuracy"]["passed"] and row["accuracy"]["fastdiff_error"] < 1e-4
    assert row["fastdiff_ms"] > 0 and row["baseline_ms"] > 0 and row["speedup"] == pytest.approx(row["baseline_ms"] / row["fastdiff_ms"])


@needs_triton
def test_unet_accuracy_check_fails_for_a_wrong_kernel(monkeypatch, one_thread):
    import fastdiff.ops.triton

    real = fastdiff.ops.triton.group_norm
    monkeypatch.setattr(fastdiff.ops.triton, "group_norm", lambda *a, **kw: real(*a, **kw) * 1.1)  # every resnet's norm
    monkeypatch.setattr(gpu_rows, "median_ms", lambda *a, **kw: 1.0)  # only the accuracy check matters here
    [row] = gpu_rows.unet_rows("mobilediffusion", device="cpu", batches=(1,), dtype=torch.float32, tiny=True, side=8, rounds=1, warmup=0)
    assert not row["accuracy"]["passed"] and row["accuracy"]["fastdiff_error"] > row["accuracy"]["bound"]


@needs_triton
def test_unet_step_sd15_against_diffusers_in_the_interpreter(one_thread):
    pytest.importorskip("diffusers")
    [row] = gpu_rows.unet_rows("sd15", device="cpu", batches=(1,), dtype=torch.float32, tiny=True, rounds=1, warmup=0)
    assert row["baseline"] == "diffusers fp32 SDPA"
    assert row["accuracy"]["passed"] and row["accuracy"]["fastdiff_error"] < 1e-4
    assert row["fastdiff_ms"] > 0 and row["baseline_ms"] > 0
