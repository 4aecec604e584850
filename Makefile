PYTHON ?= python3

.PHONY: install test test-fast

# The CPU build of torch first, so that the project's range (torch>=2.4,<3) installs nothing more.
install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev,team]"

test:
	$(PYTHON) -m pytest

# The edit-test loop: everything but the end-to-end pipeline runs.
test-fast:
	$(PYTHON) -m pytest -m "not slow"
