# Two entry points that work on a fresh machine from a clean clone:
#   make demo   set up .venv, then run the full job (python -m rdistill.pds) on the built-in offline demo
#   make test   set up .venv, then run the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PUBLISHED_WRITERS := clip-retrieval==2.45.0 img2dataset==1.47.0
# torch first, from the builds this machine's pip finds (x86_64: 2.14.1 with its torchvision; aarch64: 2.9.1);
# override with `make TORCH="torch==X torchvision==Y"`. The package itself never pins torch.
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH ?= torch==2.9.1 torchvision==0.24.1
else
TORCH ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -c 'import torch, torchvision' 2>/dev/null || $(VENV)/bin/python -m pip install --quiet $(TORCH)
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	# the writers of clip-retrieval and img2dataset, for tests that read what they really write; --no-deps: their
	# pinned dependencies would downgrade ours, and the tests load only their writer modules (tests/published.py)
	$(VENV)/bin/python -m pip install --quiet --no-deps $(PUBLISHED_WRITERS)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m rdistill.pds --config configs/demo.yaml --output demo-output

# two pytest workers, a test file each at a time: most of the suite's wall time is waiting on Ray (clusters starting,
# jobs submitted), which the other worker's tests fill; every Ray instance a test starts picks its own ports
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check rdistill tests && $(VENV)/bin/ruff format --check rdistill tests

bench: $(STAMP)
	$(VENV)/bin/python -m rdistill.dev.bench prototypes

clean:
	rm -rf $(VENV) demo-output planted-demo-output demo-distill .pytest_cache
