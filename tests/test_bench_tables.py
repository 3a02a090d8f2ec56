"""The benchmark tables at their smallest settings (the kernel harness, % of peak, FLOPs from
fastdiff.models.flops), and the tooling's place: CI machinery in tools/, outside the package."""
from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch

import fastdiff
import fastdiff.bench.unet as unet_table
from fastdiff import shapes
from fastdiff.bench.__main__ import main
from fastdiff.bench.kernels import kernel_run, measure
from fastdiff.bench.peak import bandwidth_peak, compute_peak
from fastdiff.bench.timing import median_ms

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(fastdiff.__file__).parent
# the smallest case of each op (odd shapes, already tiny)
TINY_CASES = ["keys1", "3x40x7x13-g8", "f24", "2x40x7x13-to24"]


def test_kernel_table_at_tiny_sizes(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert main(["kernels", "--size", "tiny", "--cases", ",".join(TINY_CASES), "--dtype", "fp32", "--repeats", "1",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "% of peak" in text and "GFLOP/s fp32: fp32 FMA peak: 12 FMA chains" in text and "GB/s: copy of 256 MiB" in text
    report = json.loads(out.read_text())
    assert [r["case"] for r in report["rows"]] == TINY_CASES
    for row in report["rows"]:
        assert row["check"] == "ok" and row["error"] < 1e-5, row
        assert row["rate"] > 0 and row["percent_of_peak"] > 0
        assert all(b["ms"] > 0 for b in row["baselines"].values())
    assert {p["unit"] for p in report["peaks"]} == {"GFLOP/s", "GB/s"}


def test_kernel_table_int8_rows(tmp_path, capsys):
    """An int8 linear row beside torch's and fastdiff's fp32 linear, checked against fp32 (the quantization error)."""
    out = tmp_path / "kernels.json"
    name = "3x77x72-to160"
    assert main(["kernels", "--size", "tiny", "--cases", name, "--dtype", "fp32", "--repeats", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["case"], row["op"], row["unit"], row["dtype"]) == (name, "linear_int8", "GOP/s", "fp32")
    assert row["check"] == "ok" and 1e-4 < row["error"] < 3e-2, row  # int8 against fp32: not exact, not far
    assert row["checked_against"] == "F.linear fp32" and set(row["baselines"]) == {"F.linear fp32", "fastdiff fp32"}
    assert row["rate"] > 0 and row["percent_of_peak"] is None
    assert all(b["ms"] > 0 and b["speedup"] > 0 for b in row["baselines"].values())
    assert "F.linear fp32" in capsys.readouterr().out


def test_kernel_table_refuses_an_unknown_case():
    with pytest.raises(ValueError, match="names: no case named"):
        main(["kernels", "--cases", "no-such-case", "--dtype", "fp32"])


@pytest.mark.parametrize("name", ["sd15-cross-32x32", "md-relu-self-32x32", "md-320to640-32x32"])
def test_kernel_flops_are_counted_by_models_flops(name):
    """The harness's FLOPs (fastdiff.models.flops on meta tensors) are the products' textbook counts."""
    case = next(c for c in shapes.model_cases() if c.name == name).reduced("tiny")
    run = kernel_run(case, torch.float32)
    if case.op == "attention":
        B, Lq, Lk, H, D = case.dims
        assert run.work == 4 * B * H * Lq * Lk * D and run.unit == "GFLOP/s"
    else:
        N, C, H, W = case.shape
        assert run.work == 2 * N * H * W * C * (case.out_channels + 9) and run.unit == "GFLOP/s"


def test_measure_flags_a_wrong_output():
    run = kernel_run(shapes.case("glu", "f24"), torch.float32)
    right = run.fastdiff
    run.fastdiff = lambda: right() * 1.05
    row = measure(run, repeats=1)
    assert row["check"] == "mismatch" and row["error"] == pytest.approx(0.05, rel=1e-3)
    run.fastdiff = lambda: right() * math.nan
    assert measure(run, repeats=1)["problem"] == "output has NaN/inf"
    run.fastdiff = lambda: 1 / 0
    row = measure(run, repeats=1)
    assert row["check"] == "error" and "ZeroDivisionError" in row["problem"]


def test_peaks_are_measured_once_and_say_how():
    peak = compute_peak(torch.float32)
    assert peak.rate > 0 and peak.unit == "GFLOP/s" and peak.how.startswith("fp32 FMA peak: 12 FMA chains")
    assert compute_peak(torch.float32) is peak
    # the ceiling is above what a large product reaches here (torch.mm's rate, the fallback's measure)
    side = 1024
    a, b = torch.randn(side, side), torch.randn(side, side)
    mm_gflops = 2 * side**3 / median_ms(lambda: torch.mm(a, b), warmup=1, repeats=5) / 1e6
    assert peak.rate > 0.9 * mm_gflops, (peak, mm_gflops)
    assert bandwidth_peak().unit == "GB/s" and bandwidth_peak().rate > 0
    assert peak.percent(peak.rate / 4) == "25%"


def test_unet_table_tiny_mobilediffusion(tmp_path, capsys):
    from fastdiff.models.flops import count_macs
    from fastdiff.models.mobilediffusion import MobileDiffusionConfig, MobileDiffusionUNet

    out = tmp_path / "unet.json"
    assert main(["unet", "--model", "mobilediffusion", "--preset", "tiny", "--res", "64", "--dtype", "fp32", "--repeats", "1",
                 "--no-openvino", "--json", str(out)]) == 0
    assert "% of peak" in capsys.readouterr().out
    report = json.loads(out.read_text())
    config = MobileDiffusionConfig.from_preset("tiny", sample_size=8)
    with torch.device("meta"):
        model = MobileDiffusionUNet(config)
        inputs = torch.empty(1, config.in_channels, 8, 8), torch.full((1,), 500), torch.empty(1, 77, config.cross_attention_dim)
    assert report["flops"] == 2 * count_macs(model, *inputs).total > 0
    assert [r["run"] for r in report["rows"]] == ["fastdiff fp32", "fastdiff fp32, reference backend"]
    assert all(r["percent_of_peak"] > 0 for r in report["rows"])
    with pytest.raises(ValueError, match="--preset"):
        main(["unet", "--model", "sd15", "--preset", "tiny"])


TINY_SD = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, attention_head_dim=4)


def test_unet_table_int8_rows(tmp_path, capsys, monkeypatch):
    """--dtype int8: the quantized UNet's row first, fastdiff fp32 beside it, the baselines after;
    under the table the time ratio and the int8 output's PSNR and relative L2 error against fp32 (a
    plausible, finite accuracy; not a timing check). The SD path on a tiny SD-like UNet (the
    table's SD1.5 config swapped for it), MobileDiffusion's tiny preset with the 3x3 convs too."""
    pytest.importorskip("diffusers")
    monkeypatch.setattr(unet_table, "SD15_CONFIG", {**unet_table.SD15_CONFIG, **TINY_SD})
    reports = {}
    for model, extra in (("sd15", []), ("mobilediffusion", ["--preset", "tiny", "--int8-conv3x3"])):
        out = tmp_path / f"{model}.json"
        assert main(["unet", "--model", model, *extra, "--res", "64", "--dtype", "int8", "--repeats", "1", "--no-openvino",
                     "--json", str(out)]) == 0
        text = capsys.readouterr().out
        assert "int8 / fp32 step time: " in text and " dB (peak = max |fp32 output|), relative L2 error " in text
        assert ("issue 21's target for SD1.5: <= 0.6" in text) == (model == "sd15")
        reports[model] = report = json.loads(out.read_text())
        int8_row, fp32_row = report["rows"][:2]
        assert int8_row["run"].startswith("fastdiff int8 (") and int8_row["percent_of_peak"] is None
        assert fp32_row["run"] == "fastdiff fp32" and fp32_row["percent_of_peak"] > 0
        accuracy = report["int8"]
        assert accuracy["time_ratio"] == pytest.approx(int8_row["ms"] / fp32_row["ms"])
        # measured: 61 / 40 dB, 2.9e-3 / 2.9e-2 relative L2 (int8's error, far above float rounding's ~1e-6)
        assert math.isfinite(accuracy["psnr_db"]) and 25 < accuracy["psnr_db"] < 90, accuracy
        assert 1e-4 < accuracy["relative_l2"] < 0.1, accuracy
    assert [r["run"] for r in reports["sd15"]["rows"]] == [
        "fastdiff int8 (linear, 1x1 conv)", "fastdiff fp32", "diffusers eager fp32", "diffusers bf16 autocast channels_last"]
    assert [r["run"] for r in reports["mobilediffusion"]["rows"]] == [
        "fastdiff int8 (linear, 1x1 and 3x3 conv)", "fastdiff fp32", "fastdiff fp32, reference backend"]
    assert reports["mobilediffusion"]["int8"]["conv3x3"] and not reports["sd15"]["int8"]["conv3x3"]
    with pytest.raises(ValueError, match="--int8-conv3x3: only with --dtype int8, got --dtype fp32"):
        main(["unet", "--model", "mobilediffusion", "--preset", "tiny", "--dtype", "fp32", "--int8-conv3x3"])


def test_deepcache_table_at_tiny_settings(tmp_path, capsys, monkeypatch):
    """The step-caching table on the default editor: the uncached edit and each cached one, interleaved,
    each edit with its own cache options."""
    from fastdiff.pipeline import Pipeline

    edit, seen = Pipeline.edit, []
    monkeypatch.setattr(Pipeline, "edit", lambda self, *args, **options: seen.append(
        (options["steps"], options.get("cache_interval"), options.get("cache_depth"))) or edit(self, *args, **options))
    out = tmp_path / "deepcache.json"
    assert main(["deepcache", "--steps", "2", "--rounds", "2", "--cache-interval", "1,2", "--cache-depth", "2",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "speedup >=2x" in text and "uncached" in text and "cache 2/2" in text
    (editor,) = json.loads(out.read_text())["editors"]
    assert editor["editor"] == "default" and editor["size"] == 128
    assert list(editor["seconds"]) == ["uncached", "cache 2/2"]
    assert all(len(rounds) == 2 and min(rounds) > 0 for rounds in editor["seconds"].values())
    runs = [(2, None, None), (2, 2, 2)]  # (steps, cache_interval, cache_depth) of pipe.edit
    assert seen == runs * 3  # a warm-up, then interleaved rounds: every run once per round


@pytest.mark.parametrize("argv, message", [
    (["--editors", "sdxl"], "--editors: expected comma-separated names"),
    (["--cache-interval", "1"], "--cache-interval: expected an interval above 1"),
    (["--steps", "0"], "--steps: expected a positive integer"),
    (["--res", "100"], "--res: expected a positive multiple of 64"),
    (["--cache-depth", "9", "--steps", "1", "--rounds", "1"], "--cache-depth: expected at most 3"),
])
def test_deepcache_table_refuses_bad_options(argv, message):
    with pytest.raises(ValueError, match=message):
        main(["deepcache", *argv])


# ---------------------------------------------------------------------------------------------
# where the tooling lives


def test_ci_tooling_is_outside_the_package():
    tools = {p.stem for p in (REPO / "tools").glob("*.py")}
    assert {"gpu_check", "gpu_rows", "pytest_rows"} <= tools and not (REPO / "tools" / "__init__.py").exists()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in tools | {"tools"} for n in names), f"{path} imports the tooling: {names}"
    assert not any((PACKAGE / "bench" / f"{name}.py").exists() for name in tools)


def test_fma_peak_counts_the_lanes_of_its_simd_level():
    """FASTDIFF_SIMD=avx2 measures the AVX2 ceiling (8 lanes an FMA) even on an AVX-512 CPU."""
    import os
    import subprocess
    import sys

    from fastdiff.ops import cpp

    gflops, lanes, threads = cpp.fma_peak(1_000_000)
    assert gflops > 0 and threads == torch.get_num_threads()
    assert lanes == {"avx512_bf16": 16, "avx512": 16, "avx2": 8}[cpp.simd_level()]
    code = "from fastdiff.ops import cpp; print(cpp.fma_peak(1_000_000)[1])"
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FASTDIFF_SIMD": "avx2"},
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "8"
    with pytest.raises(RuntimeError, match="fma_peak: iterations must be positive, got 0"):
        cpp.fma_peak(0)
