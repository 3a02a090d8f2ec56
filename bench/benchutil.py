"""Pieces shared by the pytest-benchmark files (bench/ is on sys.path under pytest)."""
import pytest
import torch

import fastdiff.ops as ops

needs_cpp = pytest.mark.skipif(ops.backends()["cpp"] != "available", reason=f"cpp backend: {ops.backends()['cpp']}")


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
