"""bf16 on a CPU without BF16 dot products runs, but ~5x slower than fp32: every door that takes a
dtype (from_pretrained, fastdiff.generate/edit, accelerate, the CLI: all through
requests.resolve_dtype) says so once, with the figure and the faster choice; `fastdiff info` names
the fast dtypes. CPUs are simulated by their /proc/cpuinfo flags."""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fastdiff
from fastdiff import hardware
from fastdiff.default_model import WEIGHTS
from fastdiff.pipeline import Pipeline
from fastdiff.requests import SlowDtypeWarning, resolve_dtype

AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})  # AMD Zen 3
SAPPHIRE_RAPIDS = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_bf16", "amx_bf16"}


@pytest.fixture
def cpu(monkeypatch):
    fastdiff.reset_warnings()

    def simulate(flags):
        monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    return simulate


def test_bf16_without_bf16_dot_products_warns_once_at_load_with_the_figure(cpu):
    cpu(AVX2_ONLY)
    assert hardware.fast_dtypes("cpu") == (torch.float32,)
    with pytest.warns(SlowDtypeWarning) as record:
        pipe = Pipeline.from_pretrained(WEIGHTS / "generate", dtype="bf16")
    [warning] = record
    message = str(warning.message)
    assert "dtype: bfloat16 has no fast path" in message and hardware.BF16_SLOWDOWN in message
    assert "use dtype='fp32'" in message
    assert pipe.dtype == torch.bfloat16  # asked for, still given: the warning informs, it does not override
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_dtype(torch.bfloat16)  # once per process
        resolve_dtype("fp32")


@pytest.mark.parametrize("flags", [SAPPHIRE_RAPIDS, AVX2_ONLY], ids=["bf16 dot products", "AVX2 only"])
def test_fp32_never_warns_and_bf16_only_where_slow(cpu, flags):
    cpu(flags)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        resolve_dtype("fp32")
        resolve_dtype("bf16")
    slow = [w for w in record if issubclass(w.category, SlowDtypeWarning)]
    assert len(slow) == (0 if "avx512_bf16" in flags else 1)


def test_cuda_has_no_slow_dtype():
    assert set(hardware.fast_dtypes("cuda")) == {torch.float32, torch.bfloat16, torch.float16}


def test_info_names_the_fast_dtypes_of_this_cpu():
    out = subprocess.run([str(Path(sys.executable).parent / "fastdiff"), "info"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    fast = ", ".join(str(d).removeprefix("torch.") for d in hardware.fast_dtypes("cpu"))
    assert f"CPU fast dtypes: {fast}" in out
    assert hardware.cpu_name() in out
