# Every target does its own set-up: a virtual environment with the CPU build of torch, then the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-out
# The compatibility line: transformers 4.57 with Optimum's ORTModel classes (optimum-onnx needs transformers<4.58).
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.installed

.PHONY: install demo test test-compat lint slow bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(COMPAT_STAMP): pyproject.toml
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q torch==2.13.0
	$(COMPAT_PY) -m pip install -q -e '.[dev,optimum]' 'transformers>=4.57,<4.58'
	touch $(COMPAT_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m qbert_deploy.demo --out $(DEMO_OUT)

lint: $(STAMP)
	$(PY) -m ruff check qbert_deploy tests benchmarks ci
	$(PY) -m mypy

test: $(STAMP) lint
	$(PY) -m pytest -q

# Optimum, and one end-to-end run, on transformers 4.57 (the tests marked `compat`).
test-compat: $(COMPAT_STAMP)
	$(COMPAT_PY) -m pytest -q -m compat

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(DEMO_OUT) .pytest_cache .mypy_cache .ruff_cache
