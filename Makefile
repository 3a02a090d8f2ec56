# Each target is self-contained on a fresh machine: it creates .venv, installs, builds, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install demo train-default test test-latest bench clean gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

# Exactly the versions in constraints.txt (the ones the suite last passed with; pip, setuptools and
# wheel too, hence no build isolation), torch from its CPU wheel; then the C++ kernels compiled
# once for this torch (fastdiff/ops/cpp_build.py) so that no test or demo waits for them.
$(STAMP): $(PY) requirements-cpu.txt constraints.txt pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PIP) install -q -c constraints.txt pip setuptools wheel
	$(PIP) install -q -c constraints.txt -r requirements-cpu.txt
	$(PIP) install -q -c constraints.txt --no-build-isolation -e ".[test,serve]"
	$(PY) -m fastdiff.ops.cpp_build
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fastdiff.demo

# Trains the default model from scratch on this CPU (fastdiff.train, ~100 min on 2 cores): checkpoints
# and loss curves in train-runs/, the pipeline folders in fastdiff/weights/. Run again to resume.
train-default: $(STAMP)
	$(PY) -m fastdiff.train all

test: $(STAMP)
	$(VENV)/bin/pytest tests -q --durations=15

# The suite against the newest releases of every dependency (torch stays the CPU wheel of
# requirements-cpu.txt) in .venv-latest: names the package that broke it, or, when green,
# rewrites constraints.txt with the new versions (review the diff, commit it).
test-latest:
	$(PYTHON) tools/test_latest.py

bench: $(STAMP)
	$(VENV)/bin/pytest bench --benchmark-only --benchmark-columns=median,iqr,rounds

# On a CUDA machine: GPU tests, kernel and UNet benchmarks, report in gpu-report/ (README: GPU check);
# without one it says so and exits 0. Never builds .venv (the GPU image is offline): .venv's python
# when it exists, else $(PYTHON). Options: make gpu-check GPU_CHECK_ARGS="--only tests,kernels".
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) tools/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build dist $(VENV) .venv-latest *.egg-info
