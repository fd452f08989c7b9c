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
echo "set up: .venv/bin/lnstd, .venv/bin/python -m pytest"
