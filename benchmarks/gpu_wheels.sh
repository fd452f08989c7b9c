#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what benchmarks/gpu_all.sh installs on the lent GPU machine, which
# reaches no package registry. Its image already has torch, torchvision, numpy, pillow, pyarrow,
# safetensors, tqdm, pyyaml, requests, click, filelock, msgpack, protobuf, aiohttp, grpcio, attrs,
# nvidia-ml-py (pynvml) and an older timm; it lacks Ray and jsonschema. Run here, where pip works:
#
#   bash benchmarks/gpu_wheels.sh            # then: du -sh .whl (about 44 MB)
#
# Ray's wheel (79 MB) is over the 64 MiB a call may carry, so it is slimmed: its Java jars, RLlib,
# Serve, the LLM library and the dashboard's web UI are dropped (the job uses Ray core only and starts
# no dashboard). Versions are the ones this project's environment was tested with (Python 3.12 there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
mkdir -p .whl
rm -f .whl/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl timm==1.0.31 ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
  referencing==0.37.0 rpds-py==2026.9.1
"$PY" - .whl/ray-*.whl <<'EOF'
import os
import sys
import zipfile

DROP = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/build/")
src = sys.argv[1]
tmp = src + ".slim"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
    for info in zin.infolist():  # ZipInfo keeps the mode bits: raylet and gcs_server stay executable
        if info.filename.startswith(DROP):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if not line.startswith(DROP)).encode()
        zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
os.replace(tmp, src)
print(f"{src}: slimmed to {os.path.getsize(src) / 2**20:.1f} MiB")
EOF
du -sh .whl
