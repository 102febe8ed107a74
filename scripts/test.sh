#!/usr/bin/env bash
# Set up and run the test suite (tiny random models; the SmolLM2 end-to-end tests run with EDGEPACK_SLOW=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-2} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -rs "$@"  # -rs: every skip prints its reason
