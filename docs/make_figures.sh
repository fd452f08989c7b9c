#!/usr/bin/env bash
# Regenerates the README's pictures with the project's own commands (run from the repository root).
set -euo pipefail
out=$(mktemp -d)
.venv/bin/lnstd run --output "$out/run" --no-progress
.venv/bin/lnstd explain "$out/run/_demo-input/images/0003.png" --checkpoint lnstd/checkpoints/toy_vit.safetensors \
  --out "$out/png"
.venv/bin/python - "$out/png/toy_vit/0003_strip.png" <<'PY'
import sys

from PIL import Image

img = Image.open(sys.argv[1])  # the 64 px toy image: show it larger
img.resize((img.width * 2, img.height * 2), Image.NEAREST).save("docs/img/strip.png", optimize=True)
PY
.venv/bin/python - "$out/run/_report.html" <<'PY'
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
