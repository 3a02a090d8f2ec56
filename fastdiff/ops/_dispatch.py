"""Backend choice: CUDA tensors -> Triton, CPU tensors -> C++, anything else -> reference
(hardware.device_backend). The dense products (linear, conv2d) are torch's own: the C++ backend
runs them through oneDNN (fastdiff.ops.onednn, which needs no compiled extension, so a failed C++ build
leaves them fast), and Triton, which has no kernel for them, through the reference (torch's CUDA
products are the fast path there).

FASTDIFF_BACKEND=reference|cpp|triton or `use_backend(name)` forces one. A backend chosen
automatically that cannot run falls back to the reference (with one warning); a backend asked
for by name that cannot run raises, and so does an invalid backend setting (BackendConfigError,
e.g. a FASTDIFF_SIMD value the C++ kernels do not know). `simulate_unavailable(name)` takes that
fallback on a machine where the backend does run; `reset_warnings()` lets each warning come again.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings

from fastdiff import hardware

BACKENDS = ("reference", "cpp", "triton")

_local = threading.local()
_modules: dict[str, object] = {}
_load_errors: dict[str, str] = {}
_warned: set[str] = set()

_MODULES = {"reference": "fastdiff.ops.reference", "cpp": "fastdiff.ops.cpp", "triton": "fastdiff.ops.triton",
            "onednn": "fastdiff.ops.onednn"}
DENSE_OPS = ("linear", "conv2d")
_DENSE_IMPLEMENTATION = {"cpp": "onednn", "triton": "reference"}


class BackendConfigError(ValueError):
    """A backend's setting (e.g. FASTDIFF_SIMD) is invalid: the user's to fix, so it is raised
    wherever the backend is loaded, never a reason to fall back."""


def _import(name: str):
    """The module implementing backend `name` (or "onednn", the C++ backend's dense products), or None
    (reason kept in _load_errors)."""
    if name in _modules:
        return _modules[name]
    if name in _load_errors:
        return None
    try:
        module = importlib.import_module(_MODULES[name])
    except BackendConfigError:
        raise
    except Exception as exc:  # missing extension, missing triton, broken build
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    _modules[name] = module
    return module


def _triton_runs_on_cpu() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def backends() -> dict[str, str]:
    """Every backend with 'available' or the reason it is not."""
    report = {}
    for name in BACKENDS:
        module = _import(name)
        if module is None:
            report[name] = f"unavailable ({_load_errors[name]})"
        elif name == "triton" and not _cuda_available() and not _triton_runs_on_cpu():
            report[name] = "unavailable (no CUDA device; set TRITON_INTERPRET=1 to run it on the CPU)"
        else:
            report[name] = "available"
    return report


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def forced_backend() -> str | None:
    """The backend forced in this thread (`use_backend`) or by FASTDIFF_BACKEND, or None when
    the choice is automatic. An unknown FASTDIFF_BACKEND value raises ValueError."""
    name = getattr(_local, "forced", None) or os.environ.get("FASTDIFF_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"FASTDIFF_BACKEND / use_backend: expected one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force backend `name` for ops called inside the block (this thread only)."""
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {BACKENDS}, got {name!r}")
    previous = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = previous


def _implementation(backend: str, op: str) -> str:
    """The module key that runs `op` for `backend`: the backend's own, but for the dense products."""
    return _DENSE_IMPLEMENTATION.get(backend, backend) if op in DENSE_OPS else backend


def _runnable_on(name: str, device_type: str) -> str | None:
    """None if backend module `name` can run on `device_type`, else why not."""
    if _import(name) is None:
        return _load_errors[name]
    if name in ("cpp", "onednn") and device_type != "cpu":
        return f"the C++ backend runs on CPU tensors, got {device_type}"
    if name == "triton" and device_type != "cuda" and not (device_type == "cpu" and _triton_runs_on_cpu()):
        return f"Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device_type}"
    return None


def select(op: str, device_type: str):
    """The backend module that runs `op` for tensors on `device_type`."""
    forced = forced_backend()
    if forced is not None:
        name = _implementation(forced, op)
        why = _runnable_on(name, device_type)
        if why is not None:
            raise RuntimeError(f"fastdiff.ops.{op}: backend {forced!r} was asked for but cannot run: {why}")
        return _modules[name]
    auto = _implementation(hardware.device_backend(device_type), op)
    why = _runnable_on(auto, device_type)
    if why is None:
        return _modules[auto]
    warn_once(auto, f"fastdiff: {auto} backend unavailable ({why}); using the reference backend", stacklevel=4)
    return _import("reference")


def reference_for(op: str, module, reason: str):
    """The reference module in place of fast backend `module` for a call its kernel does not
    cover (`reason` says why), with one warning per process per reason; `module` itself when it
    already is the reference."""
    reference = _import("reference")
    if module is reference:
        return module
    warn_once(f"{op}: {reason}", f"fastdiff.ops.{op}: {reason}; running it on the reference backend (plain PyTorch)",
              stacklevel=4)
    return reference


def warn_once(key: str, message: str, stacklevel: int = 3):
    """A RuntimeWarning with `message` the first time `key` comes up in this process (again after
    reset_warnings)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def selected_name(device_type: str) -> str:
    """Name of the backend `select` picks for `device_type` (for reports)."""
    module = select("backend", device_type)
    return next(name for name, m in _modules.items() if m is module)


def reset_warnings():
    """Forget which fallbacks were warned about (a backend unavailable, a call the kernels do not
    cover, a weight packed on every call): each warns again, once, the next time it happens. For
    an application that reports warnings per job, or a test that expects one."""
    _warned.clear()


FAST_BACKENDS = ("cpp", "triton")  # those with a fallback; the reference is the fallback


@contextlib.contextmanager
def simulate_unavailable(name: str, reason: str = "simulated"):
    """Inside the block, fast backend `name` counts as failed to load, for `reason`, in every thread:
    the automatic choice falls back to the reference with its warning and a request by name raises, as
    on a machine without a compiler (cpp) or without Triton. For testing that path, fastdiff's own or
    an embedding application's, where the backend does load. The dense products of the C++ backend
    (oneDNN) need no build and stay available."""
    if name not in FAST_BACKENDS:
        raise ValueError(f"simulate_unavailable: name must be one of {FAST_BACKENDS}, got {name!r}")
    loaded, error = _modules.pop(name, None), _load_errors.get(name)
    _load_errors[name] = reason
    try:
        yield
    finally:
        if error is None:
            del _load_errors[name]
        else:
            _load_errors[name] = error
        if loaded is not None:
            _modules[name] = loaded


@contextlib.contextmanager
def poison_outputs():
    """Inside the block, kernels fill their outputs with NaN before writing (for tests)."""
    setters = []
    for name in ("cpp", "triton"):
        module = _import(name)
        if module is not None:
            setters.append(module.set_poison_outputs)
    for set_poison in setters:
        set_poison(True)
    try:
        yield
    finally:
        for set_poison in setters:
            set_poison(False)
