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
# qtoolkit's int8 conv/linear kernel extension (qtoolkit/kernels/dnnl_ext.py) builds against the system oneDNN 2.x.
# Install it where this machine can (Debian/Ubuntu, root); without it the torch onednn ops run (slower at batch 1).
if [ ! -f /usr/include/oneapi/dnnl/dnnl.hpp ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[setup] installing libdnnl-dev (oneDNN 2.x) for the int8 kernel extension"
  (apt-get install -y -q libdnnl-dev >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libdnnl-dev >/dev/null 2>&1)) \
    || echo "[setup] could not install libdnnl-dev: converted models will run on torch's onednn ops"
fi
"$VENV/bin/python" -m qtoolkit.kernels.dnnl_ext | sed 's/^/[setup] int8 conv kernel: /'
"$VENV/bin/python" -c "import torch, qtoolkit; print(f'[setup] ok: torch {torch.__version__}, qtoolkit {qtoolkit.__version__}')"
