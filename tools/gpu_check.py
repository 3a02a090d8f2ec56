"""`make gpu-check`: everything a CUDA machine should tell us, in one run of under 8 minutes.

    python tools/gpu_check.py [--out gpu-report] [--only tests,kernels,unet] [--skip ...]

Project tooling, not part of the installed package: it checks a checkout (and its fastdiff).

Stages, in order, each with its own time budget (seconds, --budget STAGE=S; the whole run is
also capped by --total-budget-s, 465 by default):
  setup    (45)  versions (device, driver, torch, CUDA, cuDNN, Triton, diffusers); makes fastdiff
                 importable offline: `pip install --no-deps --no-index --no-build-isolation -e .`
                 (nothing compiled: the C++ kernels build on first use) when fastdiff.ops.triton
                 does not import, and unpacks the bundle of pure-Python packages the GPU image lacks
                 (diffusers; made here by --make-bundle, see below). Always runs.
  tests    (200) the GPU test set: `pytest tests -k "(triton or gpu) and not sm90 and not gpu_check"`,
                 i.e. every test marked `gpu` (the Triton kernels against their float64 twins at
                 real sizes, fp32/fp16/bf16) and every Triton-backend test (which on CUDA also
                 runs bf16 tl.dot, wrong in the interpreter). pytest-xdist (-n 4) when installed.
  kernels  (100) gpu_rows.kernel_rows: every model case of fastdiff.shapes in fp16 and
                 bf16, Triton vs SDPA (default, flash, cuDNN, mem-efficient), cuDNN convs,
                 F.group_norm, chunk+act+mul, with an output check per row.
  unet     (100) gpu_rows.unet_rows: SD1.5 (vs diffusers fp16 SDPA) and MobileDiffusion
                 (vs the same module in plain PyTorch + SDPA), batch 1 and 8, fp16, 512x512, with
                 an accuracy check against the fp32 baseline. Half the remaining budget per model.

Each stage but setup runs in its own process group, killed at its budget: a hung kernel costs
that stage, not the run. Results stream to disk row by row, so a stage cut by its budget keeps
its rows and is recorded as "timed out", never as passed. After every stage the report is
rewritten: OUT/report.md and OUT/report.json (+ OUT/stages.log, every stage's output).

Verdict and exit code: PASS (0) when every stage that ran passed; FAIL (1) when a stage failed
(a test failed, a benchmark row's output was wrong, the UNet accuracy check failed) or broke;
INCOMPLETE (2) when nothing failed but a stage timed out or was not reached. A skipped stage
(--skip, or nothing to run) is neither.

Without a CUDA device it prints one line saying so and what it would run, and exits 0.
--device cpu runs the same stages on the CPU at tiny sizes through Triton's interpreter (slow;
used by tests/test_gpu_check.py).

The GPU image has torch, Triton, transformers and pytest but no diffusers and no network. Run
`python tools/gpu_check.py --make-bundle` here first: it zips the pure-Python packages
in BUNDLE (diffusers) from this environment into .gpu-bundle/ (git-ignored), which the device
call must carry; setup unpacks it there when the package is missing.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
STAGES = ("setup", "tests", "kernels", "unet")
SELECTABLE = STAGES[1:]
BUDGET_S = {"setup": 45, "tests": 200, "kernels": 100, "unet": 100}
TOTAL_BUDGET_S = 465  # the 8 minutes, less the report and the interpreter's start
PYTEST_K = "(triton or gpu) and not sm90 and not gpu_check"
BUNDLE = ("diffusers",)  # pure-Python packages the GPU image lacks
BUNDLE_DIR = ".gpu-bundle"
MODELS = ("sd15", "mobilediffusion")
FAILING = ("failed", "error")
UNFINISHED = ("timed out", "not run")


@dataclasses.dataclass
class Stage:
    name: str
    status: str = "not run"  # passed | failed | error | timed out | skipped | not run
    seconds: float = 0.0
    budget_s: float = 0.0
    summary: str = ""
    rows: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    log_tail: str = ""


# ---------------------------------------------------------------------------------------------
# running a stage's process under a budget


def run_budgeted(cmd: list[str], *, budget_s: float, log_path: Path | None = None, env=None, cwd=None) -> tuple[int | None, float, str]:
    """Run cmd in its own process group; kill the group at budget_s. Returns (exit code or None
    when killed, seconds, the output's last 4000 characters); the whole output is appended to log_path."""
    began = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            code = proc.wait(timeout=max(budget_s, 0.1))
        except subprocess.TimeoutExpired:
            code = None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        seconds = time.perf_counter() - began
        out.seek(0)
        text = out.read()
    if log_path is not None:
        with open(log_path, "a") as log:
            log.write(f"\n===== {' '.join(cmd)}\n===== exit {code if code is not None else f'killed at its {budget_s:.0f} s budget'}, {seconds:.1f} s\n")
            log.write(text)
    return code, seconds, text[-4000:]


def read_rows(path: Path) -> list[dict]:
    """JSON lines written so far (a line cut by a kill is dropped)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


# ---------------------------------------------------------------------------------------------
# setup: versions, bundle, fastdiff importable


def make_bundle(names=BUNDLE, folder: Path | str = BUNDLE_DIR) -> list[Path]:
    """Zip each pure-Python package (its folder and its *.dist-info, no __pycache__) from this
    environment into folder/NAME-VERSION.zip. Returns the archives written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"{name}: not installed here as a package; cannot bundle it")
        package = Path(list(spec.submodule_search_locations)[0])
        site = package.parent
        infos = sorted(site.glob(f"{name.replace('-', '_')}-*.dist-info"))
        version = infos[0].name[len(name) + 1:-len(".dist-info")] if infos else "unknown"
        archive = folder / f"{name}-{version}.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for root in [package, *infos]:
                for path in sorted(root.rglob("*")):
                    if path.is_file() and "__pycache__" not in path.parts:
                        zf.write(path, path.relative_to(site).as_posix())
        for old in folder.glob(f"{name}-*.zip"):
            if old != archive:
                old.unlink()
        written.append(archive)
    return written


def unpack_bundle(folder: Path | str, target: Path | str, *, importable=lambda name: importlib.util.find_spec(name) is not None) -> list[str]:
    """Unpack each folder/NAME-VERSION.zip whose package does not import here into target.
    Returns notes (what was unpacked, what was already there)."""
    notes = []
    folder, target = Path(folder), Path(target)
    for archive in sorted(folder.glob("*.zip")) if folder.is_dir() else []:
        name = archive.stem.rsplit("-", 1)[0]
        if importable(name):
            notes.append(f"{name}: already installed; bundle {archive.name} not used")
            continue
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(target)
        notes.append(f"{name}: unpacked from {archive.name}")
    return notes


def child_env(extra_path: list[str], device: str) -> dict:
    """The stages' environment: tools/ importable (the workers, the pytest plugin), the bundle's packages."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TOOLS), *extra_path, *filter(None, [env.get("PYTHONPATH")])])
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    return env


def _probe(env, code: str, timeout: float = 60) -> tuple[bool, str]:
    try:
        run = subprocess.run([sys.executable, "-P", "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    return run.returncode == 0, (run.stdout if run.returncode == 0 else run.stderr).strip()[-1500:]


def versions(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
        with contextlib.suppress(Exception):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            info["driver"] = smi.stdout.strip() or None
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"
    for name in ("triton", "diffusers", "transformers", "pytest"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            info[name] = version(name)
    return info


def stage_setup(args, budget_s: float, ctx: dict) -> Stage:
    stage = Stage("setup", budget_s=budget_s)
    began = time.perf_counter()
    site = Path(tempfile.mkdtemp(prefix="fastdiff-gpu-site-"))
    stage.notes += unpack_bundle(REPO / args.bundle, site)
    extra = [str(site)] if any(site.iterdir()) else []
    sys.path[:0] = extra
    importlib.invalidate_caches()
    ctx["env"] = env = child_env(extra, args.device)
    probe = "import fastdiff, fastdiff.ops.triton; print(fastdiff.__file__)"
    ok, where = _probe(env, probe)
    if ok and Path(where).resolve().parent.parent != REPO:
        stage.notes.append(f"fastdiff imports from {where}, not this checkout ({REPO}): reinstalling")
        ok = False
    if not ok and args.install:
        remaining = budget_s - (time.perf_counter() - began)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation", "-e", str(REPO)]
        code, seconds, tail = run_budgeted(cmd, budget_s=remaining, log_path=ctx["log"], env=env, cwd=REPO)
        stage.notes.append(f"pip install -e .: {'ok' if code == 0 else 'FAILED'} in {seconds:.0f} s")
        if code is None:
            stage.status, stage.summary = "timed out", "pip install ran past the setup budget"
        ok, where = _probe(env, probe)
    elif not ok:
        stage.notes.append("fastdiff.ops.triton does not import and --no-install was given")
    try:
        ctx["versions"] = versions(args.device)
    except Exception as exc:  # noqa: BLE001
        stage.notes.append(f"versions: {type(exc).__name__}: {exc}")
    if "diffusers" not in ctx.get("versions", {}):
        stage.notes.append(f"diffusers is not importable: the SD1.5 UNet rows and diffusers-based tests cannot run "
                           f"(run --make-bundle on a machine with it, and carry {args.bundle}/)")
    stage.seconds = time.perf_counter() - began
    if stage.status == "not run":
        stage.status = "passed" if ok else "error"
        stage.summary = f"fastdiff from {where}" if ok else f"fastdiff.ops.triton does not import: {where[-500:]}"
    return stage


# ---------------------------------------------------------------------------------------------
# tests


def _missing_package(line: dict) -> str | None:
    """The third-party package whose absence made a test module fail to import, if that is why."""
    if line.get("when") != "collect":
        return None
    found = re.search(r"No module named '([\w.]+)'", line.get("message", ""))
    return found.group(1) if found and found.group(1).split(".")[0] != "fastdiff" else None


def consolidate_tests(lines: list[dict]) -> list[dict]:
    """One row per test (nodeid): the worst of its phases (error > failed > skipped > passed).
    A test module that does not import for want of a third-party package the GPU image lacks
    (e.g. ray) counts as skipped, with the reason; any other collection error is an error."""
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    tests: dict[str, dict] = {}
    for line in lines:
        if "nodeid" not in line:
            continue
        missing = _missing_package(line)
        if missing:
            line = dict(line, outcome="skipped", message=f"not collected: no module named {missing!r} on this machine")
        row = tests.setdefault(line["nodeid"], {"nodeid": line["nodeid"], "outcome": "passed", "duration": 0.0})
        if line.get("when") == "collect":
            row["collect"] = True  # a test module, not a test
        row["duration"] = round(row["duration"] + line.get("duration", 0.0), 4)
        if rank.get(line["outcome"], 3) > rank[row["outcome"]]:
            row["outcome"] = line["outcome"] if line["outcome"] in rank else "error"
            row["message"] = line.get("message", "")
    return list(tests.values())


def stage_tests(args, budget_s: float, ctx: dict) -> Stage:
    stage = Stage("tests", budget_s=budget_s)
    rows_path = ctx["work"] / "tests.jsonl"
    cmd = [sys.executable, "-P", "-m", "pytest", *args.test_paths, "-q", "-k", args.pytest_k, "-p", "pytest_rows",
           "-p", "no:cacheprovider", "--continue-on-collection-errors", "-rfE"]
    if args.workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(args.workers)]
    elif args.workers > 1:
        stage.notes.append("pytest-xdist is not installed: tests ran in one process")
    env = dict(ctx["env"], FASTDIFF_PYTEST_ROWS=str(rows_path))
    code, stage.seconds, stage.log_tail = run_budgeted(cmd, budget_s=budget_s, log_path=ctx["log"], env=env, cwd=REPO)
    lines = read_rows(rows_path)
    stage.rows = consolidate_tests(lines)
    for line in lines:
        if "collection" in line:
            selected, marked = set(line["collection"]["selected"]), set(line["collection"]["gpu_marked"])
            stage.notes.append(f"selected {len(selected)} tests: {len(selected & marked)} marked gpu (real sizes), "
                               f"{len(selected - marked)} other Triton-backend tests")
            if marked - selected:
                stage.notes.append(f"{len(marked - selected)} gpu-marked tests NOT selected by -k, e.g. {sorted(marked - selected)[0]}")
    counts = {k: sum(r["outcome"] == k for r in stage.rows) for k in ("passed", "failed", "error", "skipped")}
    stage.summary = ", ".join(f"{n} {k}" for k, n in counts.items()) + f" (pytest -k '{args.pytest_k}')"
    if code is None:
        stage.status = "timed out"
        stage.summary += f"; cut at {budget_s:.0f} s"
    elif counts["failed"] or counts["error"]:
        stage.status = "failed"
    elif code == 5 or not any(not r.get("collect") for r in stage.rows):
        stage.status = "failed"
        stage.summary = f"no test selected by -k '{args.pytest_k}' (pytest exit {code})"
    elif code not in (0, 1):  # 1 with no failed or error row: only modules skipped for a missing package
        stage.status = "error"
        stage.summary += f"; pytest exited {code}"
    else:
        stage.status = "passed"
    return stage


# ---------------------------------------------------------------------------------------------
# benchmarks: worker processes


def _worker_cmd(args, stage: str, rows_path: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-P", str(TOOLS / "gpu_check.py"), "--worker", stage, "--rows", str(rows_path),
           "--device", args.device, "--size", args.size, "--dtypes", ",".join(args.dtypes), "--batches", ",".join(map(str, args.batches)),
           "--rounds", str(args.rounds)]
    if args.cases:
        cmd += ["--cases", ",".join(args.cases)]
    if args.kernel_ops:
        cmd += ["--kernel-ops", ",".join(args.kernel_ops)]
    return cmd + list(extra)


def _fmt_ms(ms) -> str:
    return "-" if ms is None else f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def stage_kernels(args, budget_s: float, ctx: dict) -> Stage:
    stage = Stage("kernels", budget_s=budget_s)
    rows_path = ctx["work"] / "kernels.jsonl"
    code, stage.seconds, stage.log_tail = run_budgeted(_worker_cmd(args, "kernels", rows_path), budget_s=budget_s,
                                                       log_path=ctx["log"], env=ctx["env"], cwd=REPO)
    stage.rows = read_rows(rows_path)
    bad = [r for r in stage.rows if r.get("check") in ("mismatch", "error")]
    stage.summary = f"{len(stage.rows)} rows, {len(bad)} with a wrong output or an error"
    if code is None:
        stage.status, stage.summary = "timed out", stage.summary + f"; cut at {budget_s:.0f} s"
    elif bad:
        stage.status = "failed"
    elif code != 0:
        stage.status, stage.summary = "error", stage.summary + f"; worker exited {code}: {stage.log_tail[-300:]}"
    else:
        stage.status = "passed"
    return stage


def stage_unet(args, budget_s: float, ctx: dict) -> Stage:
    stage = Stage("unet", budget_s=budget_s)
    began = time.perf_counter()
    statuses = []
    for i, model in enumerate(args.models):
        remaining = budget_s - (time.perf_counter() - began)
        share = remaining / (len(args.models) - i)
        rows_path = ctx["work"] / f"unet-{model}.jsonl"
        code, _, tail = run_budgeted(_worker_cmd(args, "unet", rows_path, "--models", model), budget_s=share,
                                     log_path=ctx["log"], env=ctx["env"], cwd=REPO)
        rows = read_rows(rows_path)
        stage.rows += rows
        stage.log_tail = tail
        if code is None:
            statuses.append("timed out")
            stage.notes.append(f"{model}: cut at its {share:.0f} s share of the budget after {len(rows)} rows")
        elif any(r.get("skipped") for r in rows):
            statuses.append("skipped")
            stage.notes += [f"{model}: {r['skipped']}" for r in rows if r.get("skipped")]
        elif code != 0 or any(r.get("problem") for r in rows):
            statuses.append("error")
            stage.notes.append(f"{model}: " + next((r["problem"] for r in rows if r.get("problem")), f"worker exited {code}: {tail[-300:]}"))
        elif any(not r["accuracy"]["passed"] for r in rows if "accuracy" in r):
            statuses.append("failed")
        else:
            statuses.append("passed")
    stage.seconds = time.perf_counter() - began
    stage.summary = ", ".join(f"{m} {s}" for m, s in zip(args.models, statuses))
    for status in ("error", "failed", "timed out", "passed", "skipped"):
        if status in statuses:
            stage.status = status
            break
    return stage


def worker(args) -> int:
    """Runs inside a stage's process: measures, appending each row to args.rows as it comes."""
    import torch

    import gpu_rows
    from fastdiff.bench.kernels import DTYPES

    device = args.device
    if device == "cpu":
        torch.set_num_threads(1)
    with open(args.rows, "a", buffering=1) as out:
        def emit(row):
            out.write(json.dumps(row) + "\n")
            out.flush()

        if args.worker == "kernels":
            dtypes = [DTYPES[d] for d in args.dtypes]
            gpu_rows.kernel_rows(device=device, size=args.size, dtypes=dtypes, names=args.cases, ops_filter=args.kernel_ops,
                            rounds=args.rounds, budget_s=2.0, emit=emit)
        elif args.worker == "unet":
            for model in args.models:
                if model == "sd15" and importlib.util.find_spec("diffusers") is None:
                    emit({"model": model, "skipped": "diffusers is not installed: no baseline, no SD1.5 config to build"})
                    continue
                gpu_rows.unet_rows(model, device=device, batches=args.batches, dtype=torch.float16 if device == "cuda" else torch.float32,
                              tiny=args.size != "full", rounds=args.rounds, warmup=1 if device == "cuda" else 0, emit=emit)
        else:
            raise ValueError(f"--worker: expected kernels or unet, got {args.worker!r}")
    return 0


# ---------------------------------------------------------------------------------------------
# report


def verdict(stages: list[Stage]) -> str:
    statuses = [s.status for s in stages]
    if any(s in FAILING for s in statuses):
        return "FAIL"
    if any(s in UNFINISHED for s in statuses):
        return "INCOMPLETE"
    return "PASS"


EXIT_CODES = {"PASS": 0, "FAIL": 1, "INCOMPLETE": 2}


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(map(_cell, headers)) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(map(_cell, r)) + " |" for r in rows]


def _kernel_tables(rows: list[dict]) -> list[str]:
    lines = []
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in rows if r["op"] == op]
        names = list(dict.fromkeys(n for r in op_rows for n in r["baselines"]))
        headers = ["case", "shape", "dtype", "fastdiff ms", *[f"{n} ms (speedup)" for n in names], "check"]
        body = []
        for r in op_rows:
            cells = [r["case"], r["shape"], r["dtype"], _fmt_ms(r["fastdiff_ms"])]
            for n in names:
                b = r["baselines"].get(n)
                if b is None:
                    cells.append("-")
                elif b.get("ms") is None:
                    cells.append("n/a")
                else:
                    cells.append(f"{_fmt_ms(b['ms'])} ({b['speedup']:.2f}x)")
            check = r.get("check") or "-"
            if r.get("error") is not None and r["error"] == r["error"]:
                check += f" {r['error']:.1e}"
            if r.get("problem"):
                check += f": {r['problem'][:200]}"
            body.append(cells + [check])
        lines += [f"### {op}", "", *_table(headers, body), ""]
    unavailable = {f"{n}: {b['unavailable'][:160]}" for r in rows for n, b in r["baselines"].items() if b.get("unavailable")}
    if unavailable:
        lines += ["n/a: the baseline refused the case:", "", *[f"- {u}" for u in sorted(unavailable)], ""]
    return lines


def _unet_table(rows: list[dict]) -> list[str]:
    body = []
    for r in rows:
        if r.get("skipped"):
            body.append([r["model"], "-", "-", "-", "-", "-", "-", f"skipped: {r['skipped']}"])
            continue
        acc = r.get("accuracy")
        acc_text = "-" if not acc else (f"{'ok' if acc['passed'] else 'FAILED'}: fastdiff {acc['fastdiff_error']:.1e}, "
                                        f"baseline {acc['baseline_error']:.1e}, bound {acc['bound']:.1e}")
        speed = "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
        ips = "-" if r.get("images_per_s") is None else f"{r['images_per_s']:.1f}"
        problem = "; ".join(filter(None, [r.get("problem"), r.get("baseline_problem")]))
        body.append([r["model"], r["batch"], r["dtype"], _fmt_ms(r.get("fastdiff_ms")), f"{_fmt_ms(r.get('baseline_ms'))} ({r['baseline']})",
                     speed, ips, acc_text + (f"; {problem[:200]}" if problem else "")])
    return _table(["model", "batch", "dtype", "fastdiff ms", "baseline ms", "speedup", "fastdiff images/s",
                   "accuracy vs fp32 baseline (rel. L2)"], body)


def render_markdown(report: dict) -> str:
    meta, stages = report["meta"], report["stages"]
    v = meta.get("versions", {})
    lines = [f"# fastdiff GPU check: {report['verdict']}", ""]
    lines.append(f"- device: {v.get('device', '?')}" + (f" (sm {v['capability']}, {v['sms']} SMs, {v['memory_gib']} GiB)" if "sms" in v else "")
                 + (f", driver {v['driver']}" if v.get("driver") else ""))
    lines.append(f"- torch {v.get('torch', '?')} (CUDA {v.get('cuda')}, cuDNN {v.get('cudnn')}), triton {v.get('triton', '-')}, "
                 f"diffusers {v.get('diffusers', 'not installed')}, transformers {v.get('transformers', '-')}, "
                 f"pytest {v.get('pytest', '-')}, python {v.get('python', '?')}")
    lines.append(f"- started {meta['started']}, {meta['seconds']:.0f} s of a {meta['total_budget_s']:.0f} s budget; "
                 f"git {meta.get('git', '?')}; `{meta['command']}`")
    lines.append("- speedup = baseline ms / fastdiff ms (> 1: fastdiff faster); medians, baselines measured in the same run")
    lines += ["", *_table(["stage", "status", "time s", "budget s", "summary"],
                          [[s["name"], s["status"], f"{s['seconds']:.0f}", f"{s['budget_s']:.0f}", s["summary"]] for s in stages]), ""]
    for s in stages:
        if not (s["notes"] or s["rows"] or s["status"] in FAILING + UNFINISHED):
            continue
        lines += [f"## {s['name']}: {s['status']}", ""]
        lines += [f"- {n}" for n in s["notes"]]
        if s["notes"]:
            lines.append("")
        if s["name"] == "tests" and s["rows"]:
            bad = [r for r in s["rows"] if r["outcome"] in FAILING]
            for r in bad:
                lines += [f"- **{r['outcome']}** `{r['nodeid']}`", "", "```", r.get("message", "")[-1500:], "```", ""]
            lines += ["<details><summary>every test</summary>", "",
                      *_table(["test", "outcome", "s"], [[r["nodeid"], r["outcome"], f"{r['duration']:.2f}"] for r in s["rows"]]),
                      "", "</details>", ""]
        elif s["name"] == "kernels" and s["rows"]:
            lines += ["Median ms per call over back-to-back calls (CUDA events); inputs made once per row, so a small "
                      "case's data may stay in L2 for fastdiff and baselines alike. check: fastdiff's output against the "
                      "first baseline's, relative L2 error (gross-error bound; accuracy is the tests' job).", ""]
            lines += _kernel_tables(s["rows"])
        elif s["name"] == "unet" and s["rows"]:
            lines += [*_unet_table(s["rows"]), ""]
        if s["status"] in ("error", "timed out") and s.get("log_tail"):
            lines += ["<details><summary>output tail</summary>", "", "```", s["log_tail"][-3000:], "```", "", "</details>", ""]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "report.md").write_text(render_markdown(report))


# ---------------------------------------------------------------------------------------------
# CLI


def _csv(text: str) -> list[str]:
    return [t for t in (s.strip() for s in text.split(",")) if t]


def _budget(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in STAGES or not seconds:
        raise argparse.ArgumentTypeError(f"expected STAGE=SECONDS with STAGE in {STAGES}, got {text!r}")
    return name, float(seconds)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-report", help="report folder (default gpu-report)")
    p.add_argument("--only", type=_csv, default=None, help=f"stages to run, from {','.join(SELECTABLE)} (setup always runs)")
    p.add_argument("--skip", type=_csv, default=[], help="stages not to run")
    p.add_argument("--budget", type=_budget, action="append", default=[], metavar="STAGE=S", help="a stage's budget in seconds")
    p.add_argument("--total-budget-s", type=float, default=TOTAL_BUDGET_S, help="cap on the whole run")
    p.add_argument("--dtypes", type=_csv, default=None, help="kernel benchmark dtypes (default fp16,bf16; fp32 on the CPU)")
    p.add_argument("--batches", type=lambda t: [int(b) for b in _csv(t)], default=None, help="UNet batches (default 1,8; 1 on the CPU)")
    p.add_argument("--models", type=_csv, default=list(MODELS), help="UNets: sd15,mobilediffusion")
    p.add_argument("--cases", type=_csv, default=None, help="kernel cases by fastdiff.shapes name (default: every model case)")
    p.add_argument("--kernel-ops", type=_csv, default=None, help="only these ops in the kernel benchmark")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per measurement (default 10; 1 on the CPU)")
    p.add_argument("--pytest-k", default=PYTEST_K, help="the GPU test set's -k expression")
    p.add_argument("--test-paths", type=_csv, default=["tests"], help="where pytest collects (default tests)")
    p.add_argument("--workers", type=int, default=None, help="pytest-xdist processes (default 4 on CUDA, 1 on the CPU)")
    p.add_argument("--bundle", default=BUNDLE_DIR, help="folder of bundled packages (default .gpu-bundle)")
    p.add_argument("--make-bundle", action="store_true", help=f"zip {', '.join(BUNDLE)} from this environment into --bundle and exit")
    p.add_argument("--no-install", dest="install", action="store_false", help="never pip-install fastdiff in setup")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="cpu: run anyway, at tiny sizes in Triton's interpreter (for the tests); default cuda if present")
    p.add_argument("--size", choices=["full", "tiny"], default=None, help="kernel and UNet sizes (default full on CUDA, tiny on the CPU)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in [*(args.only or []), *args.skip]:
        if name not in SELECTABLE:
            p.error(f"unknown stage {name!r}: expected one of {', '.join(SELECTABLE)}")
    for model in args.models:
        if model not in MODELS:
            p.error(f"--models: unknown model {model!r}: expected {', '.join(MODELS)}")
    return args


def _plan(args) -> str:
    stages = [s for s in SELECTABLE if (args.only is None or s in args.only) and s not in args.skip]
    what = {"tests": f"the GPU tests (pytest -k '{args.pytest_k}')",
            "kernels": f"the kernel benchmark (Triton vs SDPA flash/cuDNN/mem-efficient, cuDNN convs, torch norms, {'+'.join(args.dtypes or ['fp16', 'bf16'])})",
            "unet": f"the UNet step ({'+'.join(args.models)} vs diffusers-style SDPA, batch {','.join(map(str, args.batches or [1, 8]))})"}
    return "; ".join(["setup (versions; fastdiff made importable offline)"] + [what[s] for s in stages]) + f"; report in {args.out}/"


def _cuda_available() -> tuple[bool, str]:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return False, f"torch does not import ({type(exc).__name__})"
    return torch.cuda.is_available(), f"torch {torch.__version__}"


def _git_head() -> str:
    with contextlib.suppress(Exception):
        run = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10)
        return run.stdout.strip() or "?"
    return "?"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.make_bundle:
        for archive in make_bundle(folder=REPO / args.bundle if not os.path.isabs(args.bundle) else args.bundle):
            print(f"wrote {archive} ({archive.stat().st_size / 2**20:.1f} MiB)")
        return 0
    if args.device is None:
        found, why = _cuda_available()
        if not found:
            print(f"gpu-check: no CUDA device found ({why}); nothing run. On a CUDA machine it would run: {_plan(args)}.")
            return 0
        args.device = "cuda"
    cuda = args.device == "cuda"
    args.size = args.size or ("full" if cuda else "tiny")
    args.dtypes = args.dtypes or (["fp16", "bf16"] if cuda else ["fp32"])
    args.batches = args.batches or ([1, 8] if cuda else [1])
    args.rounds = args.rounds or (10 if cuda else 1)
    args.workers = args.workers if args.workers is not None else (4 if cuda else 1)
    budgets = dict(BUDGET_S, **dict(args.budget))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = {"log": out / "stages.log", "work": Path(tempfile.mkdtemp(prefix="fastdiff-gpu-check-"))}
    ctx["log"].write_text("")
    began = time.perf_counter()
    report = {"verdict": "INCOMPLETE", "meta": {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                               "command": " ".join([Path(sys.executable).name, "tools/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
                                               "git": _git_head(), "total_budget_s": args.total_budget_s, "seconds": 0.0, "device": args.device},
              "stages": []}
    planned = ["setup"] + [s for s in SELECTABLE if (args.only is None or s in args.only) and s not in args.skip]
    stages = [Stage(name, budget_s=budgets[name]) for name in planned] + [
        Stage(name, status="skipped", summary="not selected") for name in SELECTABLE if name not in planned]
    functions = {"setup": stage_setup, "tests": stage_tests, "kernels": stage_kernels, "unet": stage_unet}

    def publish():
        report["meta"]["seconds"] = time.perf_counter() - began
        report["meta"]["versions"] = ctx.get("versions", {})
        report["stages"] = [dataclasses.asdict(s) for s in stages]
        report["verdict"] = verdict(stages)
        write_report(out, report)

    print(f"gpu-check on {args.device}: {_plan(args)}", flush=True)
    for i, name in enumerate(planned):
        left = args.total_budget_s - (time.perf_counter() - began)
        if name != "setup" and stages[0].status in ("error", "timed out"):
            stages[i].summary = "setup failed"
        elif left < 5:
            stages[i].summary = "the total budget was spent before this stage"
        else:
            budget = min(budgets[name], left)
            try:
                stages[i] = functions[name](args, budget, ctx)
            except Exception as exc:  # noqa: BLE001  a broken stage is reported, the next one still runs
                stages[i] = Stage(name, status="error", budget_s=budget, summary=f"{type(exc).__name__}: {exc}"[:500])
        s = stages[i]
        print(f"  {name:8s} {s.status:10s} {s.seconds:5.0f} s  {s.summary}", flush=True)
        publish()
    shutil.rmtree(ctx["work"], ignore_errors=True)
    print(f"gpu-check: {report['verdict']} in {report['meta']['seconds']:.0f} s; report: {out / 'report.md'}")
    return EXIT_CODES[report["verdict"]]


if __name__ == "__main__":
    sys.exit(main())
