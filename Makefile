# r1v-distill: `make demo` and `make test` each build .venv from scratch when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# torch first, pinned to the CPU build unless a GPU is present, so nothing pulls a CUDA build by accident.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: venv demo test test-slow test-all bench lint clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/r1v run configs/demo.yaml

test: venv
	$(BIN)/pytest -q -x --durations=15

test-slow: venv
	$(BIN)/pytest -q -m slow --durations=15

test-all: venv
	$(BIN)/pytest -q -m "not gpu" --durations=25

bench: venv
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/decontaminate.py
	$(BIN)/python benchmarks/assess.py
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/filter.py
	$(BIN)/python benchmarks/sft_data.py
	$(BIN)/python benchmarks/train.py

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf runs .cache
