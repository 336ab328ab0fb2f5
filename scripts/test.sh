#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite (CPU-only, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
