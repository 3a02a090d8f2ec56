"""fastdiff as a library: built with pip's build isolation from a folder of wheels that holds no
torch (so no build can fetch one), installed from the source folder, the sdist and the wheel into
a venv that already has torch, and run from another folder with the shipped weights. The C++
kernels compile on first use per torch version (fastdiff.ops.cpp_build): a torch upgrade means a
new build, never a stale one."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import torch

from fastdiff.ops import cpp_build

REPO = Path(__file__).resolve().parent.parent
OFFLINE = {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def run(*command, cwd=None, env=None, timeout=600) -> str:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env={**os.environ, **(env or {})},
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, command))}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """The build requirements only (setuptools, wheel and what they need), at the versions this venv runs."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    run(sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", folder,
        f"setuptools=={metadata.version('setuptools')}", f"wheel=={metadata.version('wheel')}",
        env={"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""})
    assert not list(folder.glob("torch*")), "the wheelhouse must hold no torch"
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the checkout's tracked and unignored files (links kept), as a fresh clone has them."""
    folder = tmp_path_factory.mktemp("src") / "fastdiff"
    files = run("git", "ls-files", "-co", "--exclude-standard", cwd=REPO).splitlines()
    for name in files:
        target, origin = folder / name, REPO / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_symlink():
            target.symlink_to(os.readlink(origin))
        elif origin.is_file():
            shutil.copy2(origin, target)
    return folder


@pytest.fixture(scope="module")
def built(source, wheelhouse, tmp_path_factory) -> dict[str, Path]:
    """sdist and wheel by `python -m build` (isolated, offline), then a wheel built from that sdist."""
    dist = tmp_path_factory.mktemp("dist")
    env = {**OFFLINE, "PIP_FIND_LINKS": str(wheelhouse)}
    run(sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", dist, source, env=env)
    [sdist], [wheel] = dist.glob("*.tar.gz"), dist.glob("*.whl")
    from_sdist = tmp_path_factory.mktemp("from-sdist")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", from_sdist, sdist, env=env)
    return {"sdist": sdist, "wheel": wheel, "wheel from sdist": next(from_sdist.glob("*.whl"))}


def test_wheels_carry_kernels_sources_and_weights_and_no_top_level_kernels(built):
    for label in ("wheel", "wheel from sdist"):
        names = set(zipfile.ZipFile(built[label]).namelist())
        for expected in ("fastdiff/kernels/attention.py", "fastdiff/ops/triton.py", "fastdiff/csrc/attention.cpp",
                         "fastdiff/csrc/common.h", "fastdiff/weights/generate/unet/config.json",
                         "fastdiff/weights/edit/unet/diffusion_pytorch_model.safetensors"):
            assert expected in names, f"{label}: {expected} missing"
        assert not any(n.startswith("kernels/") or n.startswith("csrc/") for n in names), label
        assert not any(n.startswith(("tools/", "bench/")) for n in names), f"{label}: project tooling is not installed"
        assert "fastdiff/bench/kernels.py" in names and "fastdiff/bench/peak.py" in names, f"{label}: the tables are"
        assert not any(n.endswith(".so") for n in names), f"{label}: nothing is compiled at build time"


@pytest.fixture
def venv_with_torch(tmp_path_factory) -> Path:
    """A new venv that sees this venv's packages (torch among them) through a .pth file, but not
    its editable fastdiff (a .pth file's folders are not scanned for .pth files)."""
    folder = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", folder)
    site = next(folder.glob("lib/python*/site-packages"))
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_relative_to(sys.prefix)]
    (site / "parent_env.pth").write_text("\n".join(ours) + "\n")
    return folder


@pytest.mark.parametrize("what", ["source folder", "sdist", "wheel"])
def test_pip_install_with_build_isolation_offline_then_generate_from_another_folder(
        what, venv_with_torch, source, built, wheelhouse, tmp_path):
    env = {**OFFLINE, "PIP_FIND_LINKS": str(wheelhouse)}
    target = {"source folder": source, "sdist": built["sdist"], "wheel": built["wheel"]}[what]
    # dependencies, torch included, are satisfied by the parent venv's: with no index and no torch
    # in the wheelhouse, any attempt to fetch one fails the install
    run(venv_with_torch / "bin" / "pip", "install", "-q", target, env=env)
    code = ("import json, sys, fastdiff, torch; from fastdiff.ops import cpp_build\n"
            "image = fastdiff.generate('a big red circle at the top left on a white background', seed=0, steps=4)[0]\n"
            "print(json.dumps([fastdiff.__file__, sys.prefix, list(image.size), torch.__version__, "
            "cpp_build.load().simd(), str(cpp_build.SOURCE_DIR)]))")
    where, prefix, size, version, simd, sources = json.loads(run(venv_with_torch / "bin" / "python", "-c", code, cwd=tmp_path))
    assert Path(where).is_relative_to(prefix) and Path(sources).is_relative_to(prefix), "the installed copy runs"
    assert size == [128, 128] and version == torch.__version__ and simd != "scalar"


def test_another_torch_gets_its_own_build_and_is_told_so(tmp_path, monkeypatch, capsys):
    """After a torch upgrade the next use compiles for the new torch, naming the old builds; a
    build folder without its 'built' mark (an interrupted build) is never loaded."""
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path))
    old = cpp_build.build_dir("2.12.0")
    old.mkdir(parents=True)
    (old / "built").write_text("2.12.0")
    assert cpp_build.build_dir() != old and cpp_build.build_dir().parent == old.parent
    assert torch.__version__ in cpp_build.build_dir().name

    compiled = []
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kw: compiled.append(kw) or "new build")
    assert cpp_build.build() == "new build"
    [kwargs] = compiled
    assert kwargs["build_directory"] == str(cpp_build.build_dir())
    assert sorted(kwargs["sources"]) == sorted(map(str, cpp_build.sources()))
    err = capsys.readouterr().err
    assert f"compiling the C++ kernels for torch {torch.__version__} (builds in the cache are for torch 2.12.0)" in err
    assert (cpp_build.build_dir() / "built").read_text() == torch.__version__


def test_a_build_killed_midway_does_not_block_the_next(tmp_path, monkeypatch):
    """torch's build lock file, left by a killed build, made every later build wait forever; the
    next build removes it (its own lock is an flock, released when a builder dies)."""
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path))
    folder = cpp_build.build_dir()
    folder.mkdir(parents=True)
    (folder / "lock").write_text("")  # what a killed torch build leaves
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kw: "rebuilt")
    assert cpp_build.build() == "rebuilt"
    assert not (folder / "lock").exists() and (folder / "built").exists()
