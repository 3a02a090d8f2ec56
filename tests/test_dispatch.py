"""Backend choice: by device, forced by name (raises when it cannot run), automatic fallback (warns once)."""
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import fastdiff.ops as ops
from fastdiff.ops import _dispatch, reference


def test_backends_lists_every_backend_with_a_status():
    report = ops.backends()
    assert set(report) == {"reference", "cpp", "triton"}
    assert report["reference"] == "available"
    for status in report.values():
        assert status == "available" or status.startswith("unavailable (")


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="use_backend: name must be one of"):
        with ops.use_backend("cuda"):
            pass


def test_unknown_env_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND"):
        ops.glu(torch.randn(2, 4))


def test_forced_reference_runs_the_twin():
    h = torch.randn(3, 10)
    with ops.use_backend("reference"):
        out = ops.glu(h, activation="silu")
    torch.testing.assert_close(out, reference.glu(h, activation="silu"), rtol=0, atol=0)


def test_use_backend_is_scoped_and_restored():
    assert "forced_backend" in ops.__all__
    with ops.use_backend("reference"):
        assert ops.forced_backend() == "reference"
        with ops.use_backend("triton"):
            assert ops.forced_backend() == "triton"
        assert ops.forced_backend() == "reference"
    assert ops.forced_backend() is None


def test_forced_backend_reads_the_environment(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    assert ops.forced_backend() == "reference"
    with ops.use_backend("cpp"):  # the thread's choice wins over the environment's
        assert ops.forced_backend() == "cpp"
    monkeypatch.setenv("FASTDIFF_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND"):
        ops.forced_backend()


def test_forced_backend_is_per_thread():
    seen = []
    with ops.use_backend("reference"):
        thread = threading.Thread(target=lambda: seen.append(ops.forced_backend()))
        thread.start()
        thread.join()
    assert seen == [None]


def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="backend 'triton' was asked for but cannot run"):
        ops.glu(torch.randn(2, 4))


def test_forced_cpp_on_a_non_cpu_device_raises():
    h = torch.randn(2, 4, device="meta")
    with ops.use_backend("cpp"), pytest.raises(RuntimeError, match="backend 'cpp' was asked for but cannot run"):
        ops.glu(h)


def test_other_devices_use_the_reference():
    h = torch.randn(2, 4, device="meta")
    assert ops.glu(h).shape == (2, 2)
    assert ops.selected_name("meta") == "reference"


@pytest.fixture
def cpp_missing(monkeypatch):
    """Pretend the C++ extension failed to import."""
    monkeypatch.delitem(_dispatch._modules, "cpp", raising=False)
    monkeypatch.setitem(_dispatch._load_errors, "cpp", "ImportError: simulated missing extension")
    monkeypatch.setattr(_dispatch, "_warned", set())


def test_automatic_choice_falls_back_to_reference_and_warns_once(cpp_missing):
    h = torch.randn(2, 8)
    with pytest.warns(RuntimeWarning, match="cpp backend unavailable .*simulated missing extension.*reference"):
        out = ops.glu(h)
    torch.testing.assert_close(out, reference.glu(h), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.glu(h)  # second call: no second warning


def test_backend_asked_for_by_name_raises_instead_of_falling_back(cpp_missing):
    with ops.use_backend("cpp"), pytest.raises(RuntimeError, match="simulated missing extension"):
        ops.glu(torch.randn(2, 8))


def test_env_variable_forces_backend_in_a_fresh_process():
    code = "import torch, fastdiff.ops as o; print(o.selected_name('cpu'))"
    env = {"FASTDIFF_BACKEND": "reference", "PATH": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "reference"


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda: ops.attention(torch.randn(2, 4, 8), torch.randn(2, 4, 1, 8)), ValueError, "q: expected a rank-4"),
        (lambda: ops.attention([1.0], torch.randn(1, 2, 1, 8)), TypeError, "q: expected a torch.Tensor"),
        (lambda: ops.attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 16)), ValueError, "k: expected"),
        (lambda: ops.attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 3, 8)), ValueError, "heads"),
        (lambda: ops.attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 5, 2, 8)), ValueError, "v: expected the shape of k"),
        (lambda: ops.attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8).bfloat16()), TypeError, "k: dtype"),
        (lambda: ops.attention(torch.randn(1, 4, 2, 4), torch.randn(1, 4, 2, 4)), ValueError, "head dim must be in 8..256"),
        (lambda: ops.attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), kind="sigmoid"), ValueError, "kind"),
        (lambda: ops.attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), scale="big"), TypeError, "scale"),
        (lambda: ops.attention(torch.randn(1, 4, 2, 8).long(), torch.randn(1, 4, 2, 8)), TypeError, "q: expected dtype"),
        (lambda: ops.group_norm(torch.randn(1, 6, 2, 2), 4, None, None), ValueError, "num_groups"),
        (lambda: ops.group_norm(torch.randn(1, 6, 2, 2), 3, torch.randn(5), None), ValueError, r"weight: expected shape \(6,\)"),
        (lambda: ops.group_norm(torch.randn(1, 6, 2, 2), 3, None, None, eps=0), ValueError, "eps"),
        (lambda: ops.group_norm(torch.randn(6, 2, 2), 3, None, None), ValueError, "x: expected a rank-4"),
        (lambda: ops.glu(torch.randn(2, 5)), ValueError, "h: expected a last dimension of even"),
        (lambda: ops.glu(torch.randn(2, 4), activation="relu"), ValueError, "activation"),
        (lambda: ops.separable_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 5, 5), None, torch.randn(8, 4), None), ValueError, r"dw_weight: expected shape \(4, 1, 3, 3\)"),
        (lambda: ops.separable_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), None, torch.randn(8, 3), None), ValueError, "pw_weight"),
        (lambda: ops.separable_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), torch.randn(3), torch.randn(8, 4), None), ValueError, "dw_bias"),
        (lambda: ops.separable_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), None, torch.randn(8, 4), torch.randn(7)), ValueError, "pw_bias"),
    ],
)
def test_bad_arguments_are_named(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
