#!/usr/bin/env bash
# Install (idempotent), then run maskrun with any overrides: bash scripts/run.sh mask.ratio=0.3
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/maskrun "$@"
