#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the default test suite (< 5 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
