"""The C++ kernels (csrc/) compiled on first use, once per torch version, into a cache.

Why not at install time: a C++ extension that includes torch's headers must be compiled against
the very torch that imports it, and pip's isolated build would fetch a torch of its own (a
CUDA build of several hundred MB, maybe another version) to compile against. So the wheel
ships the sources (fastdiff/csrc, a link to the checkout's csrc/) and builds nothing; the first
use of the C++ backend compiles them with torch.utils.cpp_extension (ninja, ~1-2 min on 2
cores) into

    $FASTDIFF_CACHE (default $XDG_CACHE_HOME/fastdiff, else ~/.cache/fastdiff)
        /cpp/torch-<torch version>-<python ABI>-cxx11abi<0|1>-<hash of sources and flags>/

A build is only ever loaded by the torch it was compiled for: after a torch upgrade the next
use compiles a new one (one line on stderr says so and names the torch of the builds already
there); no undefined symbol, no crash. `make install` compiles ahead (python -m
fastdiff.ops.cpp_build). Without a compiler the automatic CPU backend falls back to the
reference with one warning (fastdiff.ops), and a forced FASTDIFF_BACKEND=cpp raises.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import sys
import sysconfig
import threading
from pathlib import Path

import torch

NAME = "fastdiff_C"
SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc"
CFLAGS = ("-O3", "-fopenmp", "-std=c++20", "-Wall", "-Wno-unknown-pragmas")
LDFLAGS = ("-fopenmp",)
_BUILT = "built"  # written after a successful build: a folder without it is rebuilt, never loaded

_lock = threading.Lock()
_module = None


def cache_root() -> Path:
    if os.environ.get("FASTDIFF_CACHE"):
        return Path(os.environ["FASTDIFF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastdiff"


def sources() -> list[Path]:
    found = sorted(SOURCE_DIR.glob("*.cpp"))
    if not found:
        raise ImportError(f"fastdiff's C++ sources are missing from {SOURCE_DIR} (a broken install)")
    return found


def build_dir(torch_version: str | None = None) -> Path:
    """The cache folder of the build for `torch_version` (default: the running torch)."""
    digest = hashlib.sha256(" ".join(CFLAGS + LDFLAGS).encode())
    for path in sorted(SOURCE_DIR.glob("*.[ch]*")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    soabi = sysconfig.get_config_var("SOABI") or f"py{sys.version_info.major}{sys.version_info.minor}"
    version = torch_version or torch.__version__
    return cache_root() / "cpp" / f"torch-{version}-{soabi}-cxx11abi{abi}-{digest.hexdigest()[:12]}"


def _import_built(folder: Path):
    spec = importlib.util.spec_from_file_location(NAME, folder / f"{NAME}.so")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[NAME] = module
    return module


def _compile(folder: Path):
    from torch.utils.cpp_extension import load as jit_load

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "build.flock", "w") as guard:
        # one build per folder across processes; the OS releases the lock if a builder dies
        fcntl.flock(guard, fcntl.LOCK_EX)
        if (folder / _BUILT).exists():  # another process finished it while this one waited
            return _import_built(folder)
        # torch's own lock file, left behind by a build that was killed: torch would wait on it forever
        (folder / "lock").unlink(missing_ok=True)
        others = sorted({(p / _BUILT).read_text() for p in folder.parent.glob("torch-*") if (p / _BUILT).exists()}
                        - {torch.__version__})
        before = f" (builds in the cache are for torch {', '.join(others)})" if others else ""
        print(f"fastdiff: compiling the C++ kernels for torch {torch.__version__}{before} into {folder}; "
              f"once per torch version, about 1-2 minutes", file=sys.stderr, flush=True)
        module = jit_load(name=NAME, sources=[str(p) for p in sources()], extra_include_paths=[str(SOURCE_DIR)],
                          extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), build_directory=str(folder),
                          verbose=False)
        (folder / _BUILT).write_text(torch.__version__)
        return module


def build():
    """The extension module of this torch's build in the cache, compiled first when there is none;
    each call looks again, as the first use in a process does (`load` does it once per process)."""
    folder = build_dir()
    return _import_built(folder) if (folder / _BUILT).exists() else _compile(folder)


def load():
    """The compiled extension module (csrc/'s bindings), built on the first call in a process. Its
    functions check their arguments themselves (a RuntimeError naming the argument), for a caller
    that skips fastdiff.ops."""
    global _module
    with _lock:
        if _module is None:
            _module = build()
        return _module


if __name__ == "__main__":  # make install: compile ahead, say where
    print(f"fastdiff C++ kernels: {build_dir()} (SIMD level {load().simd()})")
