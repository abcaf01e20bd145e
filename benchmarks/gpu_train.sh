#!/usr/bin/env bash
# Train benchmark on one GPU: our trainer vs a plain transformers + DeepSpeed ZeRO-2 loop, same run.
#   bash benchmarks/gpu_train.sh [OUT_JSON]        (default: $OUT/train_bench.json, else /tmp/train_bench.json)
# Carried wheels in .whl/ (deepspeed and its pure-Python deps) go to /tmp/site; torch, transformers,
# accelerate and pyarrow come from the machine. Nothing from ray, polars or math-verify is imported.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULT="${1:-${OUT:-/tmp}/train_bench.json}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import deepspeed, torch, transformers; print('deepspeed', deepspeed.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
# ~2.0B-parameter student, 8k tokens, bf16: baseline, then our variants (z2bf, z2lbf, z1bf, z0b, z2) while
# --budget-s allows; BENCH_FLAGS="--gpu --variants z2bf" runs one chosen variant
# BENCH_FLAGS="--tiny" runs the same script on a CPU (the check that it runs at all)
timeout "${BENCH_TIMEOUT:-540}" python3 benchmarks/train.py ${BENCH_FLAGS:---gpu --profile 2} --out "$RESULT" "${@:2}"
echo "figures in $RESULT"
