# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates or refreshes .venv (torch CPU build first, then tractrain with its dev extra).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-long bench clean

$(STAMP): setup.py setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) -P -m tractrain.bin.train --force  # the demo starts over each time

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n auto  # pytest-xdist: one worker per core

test-long: venv
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
