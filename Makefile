PYTHON ?= python3

.PHONY: install test test-fast

# The CPU build of torch first, so that the project's range (torch>=2.4,<3) installs nothing more.
install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev,team]"

# One pytest-xdist worker per core, each with one torch thread: the workers share the cores instead of
# fighting over them (the end-to-end tests mostly wait on one-threaded Python start-ups anyway).
TESTS = OMP_NUM_THREADS=1 $(PYTHON) -m pytest -n auto --dist loadgroup

test:
	$(TESTS)

# The edit-test loop: everything but the end-to-end pipeline runs.
test-fast:
	$(TESTS) -m "not slow"
