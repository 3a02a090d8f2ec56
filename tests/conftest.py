import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; it must be chosen before
# any kernel is decorated, so before fastdiff.ops.triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """For tests of tiny models: one thread is as fast, and avoids OpenMP spin-waits on a loaded 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def resolve_calls(monkeypatch):
    """The requests Pipeline.resolve is called with from now on, in order: every entry point must
    resolve a request exactly once."""
    from fastdiff.pipeline import Pipeline

    calls, resolve = [], Pipeline.resolve

    def counting(self, request, **kwargs):
        calls.append(request)
        return resolve(self, request, **kwargs)

    monkeypatch.setattr(Pipeline, "resolve", counting)
    return calls
