#!/usr/bin/env bash
# Create (or reuse) the local virtualenv .venv and install everything qtoolkit needs.
# Idempotent: re-running after a successful install only checks a stamp file.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${QTOOLKIT_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.qtoolkit-setup"
want="$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing requirements (torch is large: a minute or more)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c "import torch, qtoolkit; print(f'[setup] ok: torch {torch.__version__}, qtoolkit {qtoolkit.__version__}')"
