"""Holes a new user found (issue 19, part 4), each closed with a clear error naming the argument."""
import json
import subprocess
import sys

import pytest

from fastdiff.default_model import WEIGHTS
from fastdiff.engine import Engine
from fastdiff.pipeline import Pipeline
from fastdiff.requests import PipelineError


@pytest.mark.parametrize("device, expected", [
    ("banana", "device: expected a device such as 'cpu', 'cuda' or 'cuda:1', got 'banana'"),
    ("meta", "device: 'meta' tensors hold no data"),
    (42, "device: expected a torch.device or a name such as 'cpu' or 'cuda', got"),
])
def test_a_device_that_cannot_hold_weights_is_refused_at_load(device, expected):
    with pytest.raises(PipelineError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
        Pipeline.from_pretrained(WEIGHTS / "generate", device=device)


def test_engine_of_something_else_than_a_pipeline():
    with pytest.raises(TypeError, match="^pipe: expected a fastdiff.Pipeline, got str$"):
        Engine("str")


def test_first_calls_from_three_threads_build_one_pipeline_and_all_succeed():
    """In a fresh interpreter (nothing imported or cached yet), three threads call
    fastdiff.generate at the same moment: one pipeline is built, every call succeeds, and each
    image is the one a lone call gives."""
    code = """
import json, threading
import numpy as np
import fastdiff
from fastdiff.pipeline import Pipeline
built = []
init = Pipeline.__init__
def counting_init(self, *args, **kwargs):
    built.append(kwargs.get("name"))
    init(self, *args, **kwargs)
Pipeline.__init__ = counting_init
barrier, images, errors = threading.Barrier(3), {}, []
def call(i):
    barrier.wait()
    try:
        images[i] = np.asarray(fastdiff.generate("a big red circle at the top left on a white background", seed=i, steps=2))
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
[t.start() for t in threads]; [t.join(300) for t in threads]
alone = [np.asarray(fastdiff.generate("a big red circle at the top left on a white background", seed=i, steps=2)) for i in range(3)]
print(json.dumps({"built": built, "errors": errors, "same": [bool(np.array_equal(images.get(i), alone[i])) for i in range(3)]}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["errors"] == [] and len(report["built"]) == 1 and report["same"] == [True] * 3, report
