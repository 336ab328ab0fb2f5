#!/usr/bin/env bash
# Create .venv if it is missing and install the project into it (sourced by demo.sh and test.sh).
# torch==2.13.0 (the CPU build) goes in first: an unpinned torch would pull several GB of CUDA packages.
# Re-running is cheap: nothing is installed again until pyproject.toml changes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.retrieval-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e ".[dev,serve]"
  echo "$want" > "$stamp"
fi
