"""Backend choice: by device, forced by name (raises when it cannot run), automatic fallback (warns once)."""
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import fastdiff.ops as ops
from fastdiff.ops import reference
from helpers import backend_param, device_for


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
    with ops.use_backend("cpp"):
        with pytest.raises(RuntimeError, match="backend 'cpp' was asked for but cannot run"):
            ops.glu(torch.randn(2, 4, device="meta"))
        with pytest.raises(RuntimeError, match="backend 'cpp' was asked for but cannot run"):
            ops.select("glu", "cuda")  # the choice the registered op makes for CUDA tensors


def test_other_devices_use_the_reference():
    h = torch.randn(2, 4, device="meta")
    assert ops.glu(h).shape == (2, 2)
    assert ops.selected_name("meta") == "reference"


@pytest.fixture
def cpp_missing():
    """Pretend the C++ extension failed to import."""
    ops.reset_warnings()
    with ops.simulate_unavailable("cpp", "ImportError: simulated missing extension"):
        yield


def test_simulated_unavailability_ends_with_the_block_and_spares_the_reference():
    before = ops.backends()
    with ops.simulate_unavailable("cpp", "ImportError: simulated"):
        assert ops.backends()["cpp"] == "unavailable (ImportError: simulated)"
    assert ops.backends() == before
    with pytest.raises(ValueError, match=r"simulate_unavailable: name must be one of \('cpp', 'triton'\), got 'reference'"):
        with ops.simulate_unavailable("reference"):
            pass


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


@pytest.mark.parametrize("backend", [backend_param("cpp"), backend_param("triton")])
@pytest.mark.parametrize("kind", ["softmax", "relu"])
@pytest.mark.parametrize("head_dim", [1, 4, 7, 257, 320])
def test_head_dims_the_kernels_do_not_cover_run_on_the_reference(backend, kind, head_dim):
    """Even on a backend asked for by name: one warning per head dim, then the reference's result."""
    ops.reset_warnings()
    g = torch.Generator().manual_seed(0)
    device = device_for(backend)
    q, k, v = (torch.randn(2, L, 3, head_dim, generator=g).to(device) for L in (5, 6, 6))
    with ops.use_backend(backend):
        with pytest.warns(RuntimeWarning, match=f"head dim {head_dim} is outside the fast kernels' 8..256") as record:
            out = ops.attention(q, k, v, kind=kind)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = ops.attention(q, k, kind=kind)  # same head dim: no second warning
    assert len(record) == 1
    torch.testing.assert_close(out, reference.attention(q, k, v, kind=kind), rtol=0, atol=0)
    torch.testing.assert_close(again, reference.attention(q, k, kind=kind), rtol=0, atol=0)


@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_head_dims_in_range_run_on_the_kernel_without_warning(monkeypatch, backend):
    ops.reset_warnings()
    monkeypatch.setattr(reference, "attention", None)  # any fallback would fail to call it
    with warnings.catch_warnings(), ops.use_backend(backend):
        warnings.simplefilter("error")
        for d in (8, 256):
            q = torch.randn(1, 4, 2, d)
            assert ops.attention(q, q).shape == q.shape


def test_env_variable_forces_backend_in_a_fresh_process():
    code = "import torch, fastdiff.ops as o; print(o.selected_name('cpu'))"
    env = {"FASTDIFF_BACKEND": "reference", "PATH": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "reference"


GRAD_CASES = {  # op call with the argument named `grad` requiring grad
    "attention-q": (lambda g: ops.attention(g(torch.randn(1, 4, 2, 8)), torch.randn(1, 4, 2, 8)), "q"),
    "attention-v": (lambda g: ops.attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), g(torch.randn(1, 4, 2, 8))), "v"),
    "group_norm-weight": (lambda g: ops.group_norm(torch.randn(1, 4, 2, 2), 2, g(torch.ones(4)), None), "weight"),
    "glu-h": (lambda g: ops.glu(g(torch.randn(2, 4))), "h"),
    "separable_conv2d-pw_bias": (lambda g: ops.separable_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), None,
                                                                torch.randn(8, 4), g(torch.zeros(8))), "pw_bias"),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_arguments_requiring_grad_get_gradients_in_grad_mode(case):
    """Never a result that silently cuts the graph: the ops register a backward (the reference
    twin's, tests/test_torch_ops.py checks its values), so the argument gets a gradient; the same
    call under no_grad / inference_mode records nothing."""
    call, name = GRAD_CASES[case]
    leaf = None

    def needs_grad(t):
        nonlocal leaf
        leaf = t.requires_grad_()
        return leaf

    out = call(needs_grad)
    assert out.requires_grad, name
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    assert grad.shape == leaf.shape and torch.isfinite(grad).all(), name
    with torch.no_grad():
        assert not call(lambda t: t.requires_grad_()).requires_grad
    with torch.inference_mode():
        call(lambda t: t)


def _run_with_env(code, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("FASTDIFF_BACKEND", "FASTDIFF_SIMD")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**environ, **env}, timeout=120)


SIMD_ERROR = "FASTDIFF_SIMD='bogus': expected one of scalar, avx2, avx512"


@pytest.mark.parametrize("call", ["o.glu(torch.randn(2, 4))", "o.backends()", "o.selected_name('cpu')"])
def test_unknown_simd_cap_is_an_error_naming_the_variable(call):
    """Not ignored, and not a silent fall back to the reference backend: the user set it for the C++ kernels."""
    result = _run_with_env(f"import torch, fastdiff.ops as o; {call}", FASTDIFF_SIMD="bogus")
    assert result.returncode != 0 and SIMD_ERROR in result.stderr, result.stderr[-2000:]


@pytest.mark.skipif(ops.backends()["cpp"] != "available", reason="the C++ extension is not built")
def test_the_extension_itself_refuses_an_unknown_simd_cap():
    result = _run_with_env("from fastdiff.ops import cpp_build; print(cpp_build.load().simd())", FASTDIFF_SIMD="bogus")
    assert result.returncode != 0 and "ValueError: " + SIMD_ERROR in result.stderr, result.stderr[-2000:]


@pytest.mark.skipif(ops.backends()["cpp"] != "available", reason="the C++ extension is not built")
@pytest.mark.parametrize("cap, levels", [("scalar", {"scalar"}), ("avx2", {"scalar", "avx2"}), ("", None)])
def test_valid_simd_caps_run_the_cpp_backend(cap, levels):
    code = "import torch, fastdiff.ops as o; o.glu(torch.randn(2, 4)); print(o.selected_name('cpu'), o.cpp_simd_level())"
    result = _run_with_env(code, FASTDIFF_SIMD=cap)
    assert result.returncode == 0, result.stderr[-2000:]
    backend, level = result.stdout.split()
    assert backend == "cpp" and (levels is None or level in levels)


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda: ops.attention(torch.randn(2, 4, 8), torch.randn(2, 4, 1, 8)), ValueError, "q: expected a rank-4"),
        (lambda: ops.attention([1.0], torch.randn(1, 2, 1, 8)), TypeError, "q: expected a torch.Tensor"),
        (lambda: ops.attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 16)), ValueError, "k: expected"),
        (lambda: ops.attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 3, 8)), ValueError, "heads"),
        (lambda: ops.attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 5, 2, 8)), ValueError, "v: expected the shape of k"),
        (lambda: ops.attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8).bfloat16()), TypeError, "k: dtype"),
        (lambda: ops.attention(torch.randn(1, 4, 2, 0), torch.randn(1, 4, 2, 0)), ValueError, "head dim and sequence lengths must be >= 1"),
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
