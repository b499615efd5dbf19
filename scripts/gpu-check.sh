#!/usr/bin/env bash
# Graph mode and the engine's fidelity on a lent NVIDIA GPU (issue 12), in under 5 minutes.
#
#   PYTHONPATH=. bash scripts/gpu-check.sh        # from the repo root; logs and JSON go to $OUT (or ./gpu-check-out)
#
# Needs python3 with a CUDA torch, transformers, accelerate, safetensors, pytest and hypothesis. No network, no
# npukit install, no SmolLM2 weights: the tests use tiny-llama (built locally from a seed) and the benchmark
# also a random-weight Llama (hidden 2048, 16 layers) built on the GPU. Every step runs even if one fails;
# the exit status is the number of failed steps.
# The same commands run on a CPU (how they are tested without a GPU; compiling costs minutes there):
#   DEVICE=cpu RANDOM_CONFIG=256x2 BENCH_DTYPE=float32 BENCH_ARGS="--batches 1 3 --compile-sizes 1,4" \
#     bash scripts/gpu-check.sh
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export NPUKIT_TEST_DEVICE=$DEVICE
export NPUKIT_HOME=${NPUKIT_HOME:-$(mktemp -d)/npukit}  # tiny-llama is built here (a few seconds)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
FAILED=0

step() {  # step NAME TIMEOUT_S COMMAND...: run it, log to $OUT/NAME.log, count a failure
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 40
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $((SECONDS - start)) s"
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
}

step info 60 "$PY" -c "
import torch, transformers
print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| transformers', transformers.__version__)
print('cuda available:', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device:', torch.cuda.get_device_name(0), '| capability', torch.cuda.get_device_capability(0))
"
# The engine's fidelity on the device: greedy tokens equal HF generate (fp32) under every scheduling regime.
step fidelity 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_llm.py -k "tiny_greedy_equals_hf or prefill_logits"
# Graph mode (CUDA graphs per capture size): tokens equal eager, padding counted, fallbacks.
step graph_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_graph.py
# Eager vs graph decode step time by batch size: the launch-bound tiny model, then a 2048 x 16 random Llama.
step bench_tiny 90 "$PY" benchmarks/bench_graph.py --device "$DEVICE" --model tiny-llama --dtype float32 \
  --repeat 20 --out "$OUT/bench_graph_tiny.json" ${BENCH_ARGS:-}
step bench_2048x16 150 "$PY" benchmarks/bench_graph.py --device "$DEVICE" --random-config "${RANDOM_CONFIG:-2048x16}" \
  --dtype "${BENCH_DTYPE:-bfloat16}" --repeat 10 --out "$OUT/bench_graph_2048x16.json" ${BENCH_ARGS:-}
# Quantised linears on the device (W8A16 / W8A8 kernels picked by the probe there): batch-1 TPOT and 32 sequences.
step quant_bench 120 "$PY" benchmarks/bench_levers.py --device "$DEVICE" --model tiny-llama \
  --variants fp32 w8a16-fp32 w8a8-fp32 --rounds 2 --batch 32 --prompt-len 32 --new-tokens 16
echo "gpu-check: $FAILED failed step(s); logs in $OUT"
exit "$FAILED"
