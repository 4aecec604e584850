# `make run` and `make test` each set up what they need on a fresh machine, then do their job.
# Python packages go into the active virtual environment, or else into the project's own .venv (so a
# Python that refuses system-wide installs, PEP 668, works); `. .venv/bin/activate` then puts its
# `dvc`, `python` and `mlflow` on PATH.
VENV := $(or $(VIRTUAL_ENV),$(CURDIR)/.venv)
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.image-transfer-pipeline-installed
# DVC runs each stage as `python -m stages.<name>`: the environment's python, also without activating it.
export PATH := $(VENV)/bin:$(PATH)

.PHONY: install run test test-fast system-packages

install: $(INSTALLED)

# Once per environment, again when pyproject.toml changes. torch first, and only where none is
# installed: the CPU build 2.13.0 here, and a GPU machine keeps the CUDA build it has (pyproject.toml
# accepts any 2.x from 2.4, so the project itself then installs no other).
$(INSTALLED): pyproject.toml
	@[ -x $(PYTHON) ] || bash scripts/make_venv.sh $(VENV)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev,team]"
	touch $@

# The main job: the whole pipeline, offline, on the committed CIFAR-10 archive and the embedded
# EfficientNet-Lite0 (params.yaml), ending with the exported model registered in ./mlflow.db.
run: install
	dvc repro

# Debian's chromium (the MLflow UI test) and postgresql (the team server test), when missing and
# apt-get can install them; without them those tests skip, or fail under CI=true.
system-packages:
	@bash scripts/system_packages.sh

# One pytest-xdist worker per core, each with one torch thread: the workers share the cores instead of
# fighting over them (the end-to-end tests mostly wait on one-threaded Python start-ups anyway).
TESTS = OMP_NUM_THREADS=1 $(PYTHON) -m pytest -n auto --dist loadgroup

test: install system-packages
	$(TESTS)

# The edit-test loop: everything but the end-to-end pipeline runs.
test-fast: install
	$(TESTS) -m "not slow"
