#!/usr/bin/env bash
# Idempotent set-up of a local virtual environment (.venv) with edgepack and all extras.
# torch==2.13.0 is installed first, alone, so pip takes the CPU build and no multi-GB CUDA build is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.edgepack-setup
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (first run: about two minutes) ..." >&2
# pip byte-compiles every installed file on one core (~2 of the 3 minutes on a 2-core box); install without it
# and compile site-packages afterwards on all cores. A file that does not compile (pip skips those too, e.g.
# templates that are not Python) only lands in .venv/compileall.log.
.venv/bin/python -m pip install --quiet --no-compile --upgrade pip
.venv/bin/python -m pip install --quiet --no-compile "torch==2.13.0"
.venv/bin/python -m pip install --quiet --no-compile -e ".[compress,serve,dev]"
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
.venv/bin/python -m compileall -q -j 0 "$site" > .venv/compileall.log 2>&1 || true
echo "$want" > "$stamp"
