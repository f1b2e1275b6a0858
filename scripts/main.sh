#!/usr/bin/env bash
# The main job: set up .venv, make sure the dataset is there, then run end to end
# (FP32 eval -> PTQ sweep -> short QAT -> int8 conversion check -> report/).
#
#   bash scripts/main.sh                                   # offline default: Fashion-MNIST + shipped ResNet-20
#   bash scripts/main.sh --dataset cifar10 --data-dir DIR  # trains an FP32 model first if no --checkpoint
#   bash scripts/main.sh --help                            # all options (python -m recipes.main_job --help)
#
# Fashion-MNIST is read from ./data or /usr/share/datasets/fashion-mnist (Debian package
# dataset-fashion-mnist); when it is missing and this runs as root, recipes.main_job installs it
# with `apt-get install -y dataset-fashion-mnist` (otherwise it says what to do).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m recipes.main_job "$@"
