#!/usr/bin/env bash
# Sourced by train.sh and test.sh: creates .venv if missing and installs the
# package (editable, with the test and serving extras) when setup.py changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CHARLSTM_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "Creating virtual environment $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.charlstm-installed"
if [[ ! -f "$STAMP" || "$ROOT/setup.py" -nt "$STAMP" ]]; then
  echo "Installing charlstm and its dependencies into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test,serving]"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
cd "$ROOT"
