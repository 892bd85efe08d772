#!/usr/bin/env bash
# Create .venv with everything defectclip, its app and its tests need, at the pinned versions.
# Safe to re-run: an existing .venv is reused and only missing packages are installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "defectclip needs Python 3.11"'

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torch first and alone: pip then takes the pinned build and never resolves a different one.
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -r requirements.txt -c constraints.txt
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
# The browser test drives Debian's chromium (no browser download); install it when we can.
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will be skipped"
  else
    echo "chromium not installed (needs root and apt-get): the browser test will be skipped"
  fi
fi
echo "defectclip is installed in .venv"
