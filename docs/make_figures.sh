#!/usr/bin/env bash
# Regenerates the README's pictures with the project's own commands (run from the repository root).
set -euo pipefail
out=$(mktemp -d)
.venv/bin/lnstd run --output "$out/run" --no-progress
.venv/bin/lnstd explain "$out/run/_demo-input/images/0003.png" --checkpoint lnstd/checkpoints/toy_vit.safetensors \
  --methods all --out "$out/png"
.venv/bin/python - "$out/png/toy_vit/0003_strip.png" <<'PY'
import sys

from PIL import Image

img = Image.open(sys.argv[1])  # the 64 px toy image: show it larger
img.resize((img.width * 2, img.height * 2), Image.NEAREST).save("docs/img/strip.png", optimize=True)
PY
# A user's own photos: 40 unlabelled photo-like JPEGs and 3 broken files, a ViT-S with random weights.
.venv/bin/python - "$out/photos" <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from photos import write_photos

folder = Path(sys.argv[1])
folder.mkdir()
payloads = write_photos(folder, 40)
(folder / "truncated.jpg").write_bytes(payloads[0][: len(payloads[0]) // 3])
(folder / "notes.jpg").write_bytes(b"not a picture\n")
(folder / "empty.png").write_bytes(b"")
PY
.venv/bin/lnstd run --input "$out/photos" --output "$out/photos-run" --model vit_small_patch16_224 --no-progress
.venv/bin/python - "$out/run/_report.html" docs/img/report.png "$out/photos-run/_report.html" \
  docs/img/report_photos.png <<'PY'
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, ".")
from tests.browser import visit  # the same headless Chromium visit the report test makes

shots = list(zip(sys.argv[1::2], sys.argv[2::2], [1280, 1280]))
shots.append((sys.argv[1], "docs/img/report_390.png", 390))  # the demo's report on a phone
for page, dest, width in shots:
    shot = Path(dest).with_suffix(".tmp.png")
    seen = visit(Path(page), shot, width=width)  # the whole page, `width` px wide
    assert seen.scroll_width <= width, f"{page} overflows: {seen.scroll_width} px"
    img = Image.open(shot).convert("RGB")
    shot.unlink()
    img.quantize(256, method=Image.Quantize.MEDIANCUT).save(dest, optimize=True)
    print(dest, img.size)
PY
# The demo report's "Where the model looks" section alone, 1280 px and 390 px wide.
.venv/bin/python - "$out/run/_report.html" <<'PY'
import sys
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

sys.path.insert(0, ".")
from tests.browser import CHROMIUM, FLAGS

with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
    for width, dest in ((1280, "docs/img/where.png"), (390, "docs/img/where_390.png")):
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(Path(sys.argv[1]).resolve().as_uri(), wait_until="load")
        shot = Path(dest).with_suffix(".tmp.png")
        page.query_selector("#where-section").screenshot(path=str(shot))
        img = Image.open(shot).convert("RGB")
        shot.unlink()
        img.quantize(256, method=Image.Quantize.MEDIANCUT).save(dest, optimize=True)
        print(dest, img.size)
    browser.close()
PY
echo "docs/img/strip.png docs/img/report.png docs/img/report_390.png docs/img/report_photos.png docs/img/where*.png written"
.venv/bin/python docs/toy_figures.py
