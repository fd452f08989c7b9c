#!/usr/bin/env bash
# Set up a checkout for development and tests, on Debian: Chromium (the report test's browser) and
# .venv with the package, its command `lnstd` and the test tools.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q -e ".[dev]"
# Quantus, the reference the deletion test compares against, pins opencv-python, a second copy of the
# cv2 module that grad-cam's opencv-python-headless already provides: installed without its pins (the
# modules it imports are in the dev extra).
.venv/bin/pip install -q --no-deps "quantus==0.6.0"
echo "set up: .venv/bin/lnstd, .venv/bin/python -m pytest"
