PYTHON ?= python3

.PHONY: install test test-fast

# The CPU build of torch first, so that the project's range (torch>=2.4,<3) installs nothing more.
install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev,team]"

# On every core (pytest-xdist): the end-to-end tests mostly wait on one-threaded Python start-ups.
test:
	$(PYTHON) -m pytest -n auto --dist loadgroup

# The edit-test loop: everything but the end-to-end pipeline runs.
test-fast:
	$(PYTHON) -m pytest -n auto --dist loadgroup -m "not slow"
