#!/usr/bin/env bash
# The main job on the embedded default: synthetic sample data, our own model, trained and queried.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/retrieval demo "$@"
