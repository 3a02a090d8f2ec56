"""What a newcomer types, run as they would: each README command in a subprocess started in the
repository root (`python -c` and `python -m` put that folder first on sys.path), and the rule that
makes it safe: no folder of the checkout hides an installed distribution (kernels/ once hid
Hugging Face's `kernels`, which transformers imports)."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from serving_util import free_port, wait_healthy

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TIMEOUT_S = 300  # per command: a hang fails the test instead of the suite


def in_checkout(where: str) -> bool:
    """Whether `where` is a file of the checkout (the venv, which make install puts inside it, is not)."""
    path = Path(where).resolve()
    return bool(where) and path.is_relative_to(REPO) and not path.is_relative_to(Path(sys.prefix).resolve())


def run_in_root(*command: str, timeout: float = TIMEOUT_S, **env) -> str:
    result = subprocess.run(command, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_no_folder_of_the_checkout_hides_an_installed_distribution():
    """Every top-level name of every installed distribution, looked up as `python -c` run in the
    root looks it up, resolves outside the checkout (fastdiff itself excepted)."""
    probe = """
import importlib.metadata, importlib.util, json, sys
found = {}
for name in sorted(importlib.metadata.packages_distributions()):
    if name == "fastdiff" or not name.isidentifier():
        continue
    try:
        spec = importlib.util.find_spec(name)
    except Exception as exc:  # a broken distribution is not this test's business
        continue
    if spec is not None:
        found[name] = [spec.origin or ""] + list(spec.submodule_search_locations or [])
print(json.dumps({"path0": sys.path[0], "found": found}))
"""
    report = json.loads(run_in_root(sys.executable, "-c", probe))
    assert report["path0"] == "", "python -c should put the working folder first on sys.path"
    assert "kernels" in report["found"], "transformers' dependency `kernels` should be installed (make install)"
    hidden = {name: where for name, where in report["found"].items() if any(map(in_checkout, where))}
    assert not hidden, f"folders of the checkout shadow installed distributions: {hidden}"


def test_transformers_and_the_triton_kernels_import_from_the_root():
    out = run_in_root(sys.executable, "-c", "import kernels, fastdiff.ops.triton as t; from transformers import CLIPTextModel; "
                                            "print(kernels.__file__); print(t.attention.__module__)")
    installed, kernel_module = out.split()
    assert not in_checkout(installed) and kernel_module == "fastdiff.kernels.attention"


def readme_block(heading: str, language: str) -> str:
    """The first ```language block under README's `## heading`."""
    section = (REPO / "README.md").read_text().split(f"## {heading}\n", 1)[1]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def test_readme_quick_start_snippet_with_python_c(tmp_path):
    snippet = readme_block("Quick start", "python")
    check = f"\nimage.save({str(tmp_path / 'g.png')!r}); edited.save({str(tmp_path / 'e.png')!r})\n"
    run_in_root(sys.executable, "-c", snippet + check)
    assert Image.open(tmp_path / "g.png").size == Image.open(tmp_path / "e.png").size == (128, 128)


def test_readme_cli_commands(tmp_path):
    """The quick start's shell lines that take seconds (validate and bench are tested on their own)."""
    lines = [shlex.split(line, comments=True) for line in readme_block("Quick start", "sh").splitlines()]
    runnable = [words for words in lines if words and words[1] in ("generate", "edit", "info")]
    assert [w[1] for w in runnable] == ["generate", "edit", "info"]
    for words in runnable:  # out.png / edited.png land in tmp_path, not the checkout
        words = [str(tmp_path / w) if w.endswith(".png") else w for w in words]
        run_in_root(str(BIN / "fastdiff"), *words[1:])
    assert Image.open(tmp_path / "edited.png").size == (128, 128)


def test_demo_quick_form(tmp_path):
    out = run_in_root(sys.executable, "-m", "fastdiff.demo", "--quick", "--out", str(tmp_path))
    assert "read back correctly" in out
    assert (tmp_path / "generate_grid.png").exists() and (tmp_path / "edit_grid.png").exists()


def test_train_two_steps(tmp_path, one_thread):
    run_in_root(sys.executable, "-m", "fastdiff.train", "all", "--steps", "2", "--work", str(tmp_path / "runs"),
                "--out", str(tmp_path / "weights"))
    assert (tmp_path / "weights" / "generate" / "model_index.json").exists()


def test_ray_replica_started_in_the_root(tmp_path):
    """`fastdiff serve --ray` from the root: its Ray workers import transformers with the root as
    their working folder. Stopped with SIGTERM, which also shuts its local cluster down."""
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(BIN / "fastdiff"), "serve", "--ray", "--model", "small", "--replicas", "1",
                             "--num-cpus", "1", "--threads", "1", "--port", str(port)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=240)
        response = httpx.post(f"{url}/v1/generate", json={"prompt": "a cat", "seed": 0, "height": 64, "width": 64},
                              timeout=120)
        assert response.status_code == 200, response.text
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
