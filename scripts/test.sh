#!/usr/bin/env bash
# Install (idempotent), then run the test suite on the CPU, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
exec .venv/bin/python -m pytest -q "$@"
