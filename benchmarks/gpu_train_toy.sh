#!/usr/bin/env bash
# Train the toy benchmark's ViT and Swin on a lent GPU machine (timm's wheel in .whl/); the
# checkpoints come back under $OUT/checkpoints.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
for arch in vit swin; do
  python3 -m lnstd train-toy --arch $arch --out "$OUT/checkpoints" --device cuda --batch 128 --lr 1e-3 \
    --steps 20000 --train-images 20000 --max-minutes 3.7 2>&1 | tee -a "$OUT/train.log"
done
