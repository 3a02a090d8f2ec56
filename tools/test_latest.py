"""`make test-latest`: the suite against the newest release of every dependency, in .venv-latest.

`make install` pins everything to constraints.txt, so an upstream release cannot turn main red
overnight; this is how the pins move forward. torch stays requirements-cpu.txt's CPU wheel (the
newest torch on PyPI is a CUDA build of several GB). Then:

- green (the whole suite): constraints.txt is rewritten with the versions that passed; review `git diff` and commit.
- red: each package whose version moved is put back, alone, to its constraints.txt version and
  the failing tests are rerun; a package whose rollback turns them green is named as the one that
  broke the suite (none named: the failure needs several packages moved together, or is not a
  version's doing; the moved packages are listed either way).

    python tools/test_latest.py [--reuse] [-- extra pytest arguments]
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-latest"
PY, PIP = VENV / "bin" / "python", VENV / "bin" / "pip"
CONSTRAINTS = REPO / "constraints.txt"


def run(*command, check=True, capture=False) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, command)), flush=True)
    result = subprocess.run([str(c) for c in command], cwd=REPO, text=True, capture_output=capture)
    if check and result.returncode != 0:
        sys.exit(f"test-latest: {' '.join(map(str, command))} failed ({result.returncode})\n{result.stderr or ''}")
    return result


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> dict[str, tuple[str, str]]:
    """canonical name -> (name as written, version) of every `name==version` line."""
    found = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        if match:
            name, version = match.groups()
            found[canonical(name)] = (name, version.split("+")[0] if canonical(name) == "torch" else version)
    return found


def frozen() -> dict[str, tuple[str, str]]:
    text = run(PIP, "freeze", "--all", "--exclude-editable", capture=True).stdout
    return {k: v for k, v in pins(text).items() if k != "fastdiff"}


def pytest(*args) -> tuple[int, list[str]]:
    """Exit code and the node ids of failed or erroring tests (from -ra's summary)."""
    result = subprocess.run([str(VENV / "bin" / "pytest"), "-q", "-ra", "-p", "no:cacheprovider", *args],
                            cwd=REPO, text=True, capture_output=True)
    print(result.stdout[-5000:], result.stderr[-2000:], sep="\n", flush=True)
    failing = sorted({line.split()[1] for line in result.stdout.splitlines() if re.match(r"^(FAILED|ERROR) tests/", line)})
    return result.returncode, failing


def install():
    shutil.rmtree(VENV, ignore_errors=True)
    run(sys.executable, "-m", "venv", VENV)
    run(PIP, "install", "-q", "-U", "pip", "setuptools", "wheel")
    run(PIP, "install", "-q", "-r", "requirements-cpu.txt")
    # -c: eager upgrades would otherwise lift torch to the newest release pip can reach (a CUDA build)
    run(PIP, "install", "-q", "--upgrade", "--upgrade-strategy", "eager", "-c", "requirements-cpu.txt",
        "--no-build-isolation", "-e", ".[test,serve]")
    run(PY, "-m", "fastdiff.ops.cpp_build")


def write_constraints(versions: dict[str, tuple[str, str]]):
    header = [line for line in CONSTRAINTS.read_text().splitlines() if line.startswith("#")]
    body = sorted(f"{name}=={version}" for name, version in versions.values())
    CONSTRAINTS.write_text("\n".join(header + body) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="keep .venv-latest as it is (no new install)")
    parser.add_argument("pytest_args", nargs="*", default=["tests"], help="what to run (default: tests)")
    args = parser.parse_args()
    if not (args.reuse and PY.exists()):
        install()
    pinned, latest = pins(CONSTRAINTS.read_text()), frozen()
    moved = {key: (pinned.get(key, (name, None))[1], version) for key, (name, version) in latest.items()
             if pinned.get(key, (name, None))[1] != version}
    print("\nmoved since constraints.txt:" if moved else "\nno version moved since constraints.txt")
    for key, (old, new) in sorted(moved.items()):
        print(f"  {latest[key][0]:<32} {old or '(new)':>14} -> {new}")

    code, failing = pytest(*args.pytest_args)
    if code == 0 and args.pytest_args != ["tests"]:
        print(f"\ntest-latest: green on {' '.join(args.pytest_args)}; constraints.txt is only refreshed by a whole-suite run")
        return 0
    if code == 0:
        write_constraints(latest)
        print(f"\ntest-latest: green. constraints.txt now holds these versions: review `git diff constraints.txt`, commit")
        return 0
    if not failing:
        print(f"\ntest-latest: pytest exited {code} with no failed test named (collection or configuration error?)")
        return 1
    print(f"\ntest-latest: {len(failing)} failing; rolling each moved package back alone to find the one that broke them")
    culprits = []
    for key, (old, new) in sorted(moved.items()):
        if old is None:
            continue
        name = latest[key][0]
        run(PIP, "install", "-q", "--no-deps", f"{name}=={old}")
        rerun_code, _ = pytest(*failing)
        run(PIP, "install", "-q", "--no-deps", f"{name}=={new}")
        if rerun_code == 0:
            culprits.append(f"{name} {old} -> {new}")
    print("\nfailing with the newest releases:", *failing, sep="\n  ")
    if culprits:
        print("broken by (rolling it back alone fixes them):", *culprits, sep="\n  ")
    else:
        print("no single package's rollback fixes them: several moved together, or the failure is not a version's doing")
    print("constraints.txt left as it is")
    return 1


if __name__ == "__main__":
    sys.exit(main())
