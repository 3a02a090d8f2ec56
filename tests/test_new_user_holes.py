"""Holes a new user found (issue 19, part 4), each closed with a clear error naming the argument."""
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
