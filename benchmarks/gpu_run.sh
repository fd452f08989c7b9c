#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see benchmarks/README.md). Expects timm's wheel in .whl/.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
python3 benchmarks/check_device.py 2>&1 | tee "${OUT:-/tmp}/check_device.txt"
for p in fp32 bf16; do
  python3 benchmarks/bench_explain.py --device cuda --batch 64 --precision $p --repeats 5 \
    --models vit_base_patch16_224,swin_tiny_patch4_window7_224 2>&1 | tee "${OUT:-/tmp}/bench_cuda_$p.txt"
done
