# Two entry points that work on a fresh machine from a clean clone:
#   make demo   set up .venv, then run the prototype engine on the built-in offline demo
#   make test   set up .venv, then run the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m rdistill.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check rdistill tests && $(VENV)/bin/ruff format --check rdistill tests

bench: $(STAMP)
	$(VENV)/bin/python -m rdistill.bench prototypes

clean:
	rm -rf $(VENV) demo-output .pytest_cache
