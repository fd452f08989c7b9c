#!/usr/bin/env bash
# Regenerates the README's pictures with the project's own commands (run from the repository root).
set -euo pipefail
out=$(mktemp -d)
.venv/bin/lnstd run --output "$out/run" --no-progress
.venv/bin/lnstd explain "$out/run/demo-input/images/0003.jpg" --model vit_tiny_patch16_224 \
  --model-arg img_size=96 --model-arg patch_size=16 --model-arg num_classes=3 --out "$out/png"
cp "$out/png/0003_strip.png" docs/img/strip.png
.venv/bin/python - "$out/run/report.html" <<'PY'
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, ".")
from tests.browser import visit  # the same headless Chromium visit the report test makes

shot = Path(sys.argv[1]).with_suffix(".png")
visit(Path(sys.argv[1]), shot)
img = Image.open(shot)
img = img.resize((900, round(img.height * 900 / img.width)), Image.LANCZOS)
img.crop((0, 0, 900, min(img.height, 1500))).save("docs/img/report.png", optimize=True)
PY
echo "docs/img/strip.png docs/img/report.png written"
.venv/bin/python docs/toy_figures.py
