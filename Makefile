# The two set-up commands of the README: `make run` and `make test`. Each installs what it
# needs into .venv on a fresh machine (Python >= 3.11), then runs.
PYTHON ?= python3
VENV   ?= .venv
STAMP  := $(VENV)/.qlw-installed

.PHONY: run test bench-channel screenshots clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	# torch first and pinned, so that the resolver never swaps it for another build.
	$(VENV)/bin/python -m pip install -q "torch==2.13.0"
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	# An editable install compiles none of qlw's own modules: the first `qlw` would compile them
	# before it paints (a cold start). Compile them here, once.
	$(VENV)/bin/python -m compileall -q tui backend sessions
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/qlw

# Two workers: a module's tests stay together, the tmux tests run one after the other
# (tests/conftest.py). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

bench-channel: $(STAMP)
	$(VENV)/bin/python bench/channel.py

clean:
	rm -rf $(VENV) build *.egg-info

screenshots: $(STAMP)
	$(VENV)/bin/python docs/screenshots.py
