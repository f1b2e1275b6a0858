#!/usr/bin/env bash
# The API reference from the docstrings (pdoc): site/api/index.html.
#   bash scripts/build_api_docs.sh            # needs pdoc: pip install -e '.[docs]'
#   bash scripts/build_api_docs.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
OUT="${1:-site/api}"
if ! "$PY" -c "import pdoc" 2>/dev/null; then
    echo "pdoc is not installed for $PY: pip install -e '.[docs]'" >&2
    exit 1
fi
rm -rf "$OUT"
# the old flat calibration modules re-export qtoolkit.calibration: documented there, not twice
"$PY" -m pdoc --docformat google --no-show-source -o "$OUT" qtoolkit \
    '!qtoolkit.observers' '!qtoolkit.calibrators' '!qtoolkit.observer_base' '!qtoolkit.minmax_observers' \
    '!qtoolkit.per_channel_observers' '!qtoolkit.histogram_observer' '!qtoolkit.histogram_calibrators' \
    '!qtoolkit.tensor_calibrators' '!qtoolkit.calibrator_registry'
echo "API reference: $OUT/index.html"
