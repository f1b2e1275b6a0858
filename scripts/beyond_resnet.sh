#!/usr/bin/env bash
# Accuracy beyond ResNet: PTQ (W8A8 per calibrator, converted fast / integer agreement, W4A8 / W4A4 + QDrop,
# mixed precision, sensitivity) of the shipped MobileNetV2, EfficientNet-style and ViT checkpoints.
# One process per model (they run side by side); results in runs/beyond_resnet/<model>/beyond_resnet.{json,md}.
#
#   bash scripts/beyond_resnet.sh                       # all three, 2,000 test images, 45 s of QDrop per variant
#   TEST_SAMPLES=10000 RECON_TIME=90 bash scripts/beyond_resnet.sh
#   MODELS="efficientnet_small" bash scripts/beyond_resnet.sh --skip mixed,sensitivity   # extra args passed on
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
MODELS="${MODELS:-mobilenet_v2 efficientnet_small vit_small}"
OUT="${OUT:-runs/beyond_resnet}"
export PYTHONUNBUFFERED=1
pids=()
for m in $MODELS; do
    mkdir -p "$OUT/$m"
    "$PY" -m recipes.beyond_resnet --models "$m" --test-samples "${TEST_SAMPLES:-2000}" \
        --recon-time "${RECON_TIME:-45}" --threads "${THREADS:-1}" --no-progress --out "$OUT/$m" "$@" \
        > "$OUT/$m/log.txt" 2>&1 &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
for m in $MODELS; do cat "$OUT/$m/beyond_resnet.md" 2>/dev/null || echo "$m: failed, see $OUT/$m/log.txt"; done
exit $status
