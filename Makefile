# Each target is self-contained on a fresh machine: it creates .venv, installs, builds, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install demo train-default test bench clean gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip setuptools wheel

# torch first (pinned CPU wheel), then the package built against it without build isolation.
$(STAMP): $(PY) requirements-cpu.txt pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PIP) install -q -r requirements-cpu.txt
	$(PIP) install -q --no-build-isolation -e ".[test,serve]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fastdiff.demo

# Trains the default model from scratch on this CPU (fastdiff.train, ~100 min on 2 cores): checkpoints
# and loss curves in train-runs/, the pipeline folders in fastdiff/weights/. Run again to resume.
train-default: $(STAMP)
	$(PY) -m fastdiff.train all

# pytest's own script, not `python -m pytest`: the repo root must not be on sys.path, where the
# source folder kernels/ would shadow fastdiff.kernels' installed name for other packages.
test: $(STAMP)
	$(VENV)/bin/pytest tests -q --durations=15

bench: $(STAMP)
	$(VENV)/bin/pytest bench --benchmark-only --benchmark-columns=median,iqr,rounds

# On a CUDA machine: GPU tests, kernel and UNet benchmarks, report in gpu-report/ (README: GPU check);
# without one it says so and exits 0. Never builds .venv (the GPU image is offline): .venv's python
# when it exists, else $(PYTHON). Options: make gpu-check GPU_CHECK_ARGS="--only tests,kernels".
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m fastdiff.bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf build $(VENV) fastdiff/*.so *.egg-info
