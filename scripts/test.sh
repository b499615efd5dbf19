#!/usr/bin/env bash
# Run every test: ruff, unit tests, the notebooks under nbval, and browser tests of the dashboards in a real
# JupyterLab (Debian's chromium driven by playwright). Installs the test tools it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

"$PY" -m pip install -q -e ".[notebooks,dev]"
# chromium drives the browser tests; fonts-noto-cjk lets plots and the zh dashboards render Chinese labels
# (without a CJK font npukit falls back to English plot labels, and the zh browser test cannot check the font).
MISSING=""
[ -x /usr/bin/chromium ] || MISSING="chromium"
fc-list :lang=zh 2>/dev/null | grep -q . || MISSING="$MISSING fonts-noto-cjk"
if [ -n "$MISSING" ]; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -q && $SUDO apt-get install -y -q $MISSING
fi

"$PY" -m ruff check npukit tests benchmarks  # lint first (pyproject.toml's [tool.ruff]): seconds, not minutes

export NPUKIT_ARTIFACTS=${NPUKIT_ARTIFACTS:-artifacts}
# NOTE: the notebooks' stored outputs come from a CPU run in fp32 (NPUKIT_DEVICE=cpu NPUKIT_DTYPE=float32);
# nbval compares against them, so run them the same way unless told otherwise. With the notebooks' default
# ("auto") they still run top to bottom, but generated text may differ (bf16 on some CPUs, NPUs, GPUs).
export NPUKIT_DEVICE=${NPUKIT_DEVICE:-cpu}
export NPUKIT_DTYPE=${NPUKIT_DTYPE:-float32}
# notebooks/ holds both editions (notebooks/zh/ is the Chinese one): pytest collects them recursively.
"$PY" -m pytest tests notebooks --nbval --nbval-current-env --nbval-sanitize-with nbval_sanitize.cfg \
  --nbval-cell-timeout 300 "$@"
