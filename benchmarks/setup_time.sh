#!/usr/bin/env bash
# Fresh-venv set-up time: pip's own single-core byte-compilation (the old scripts/setup_env.sh) against the
# current scripts/setup_env.sh (pip --no-compile, then compileall on all cores), one after the other from the
# tracked files of this checkout, plus the first `import torch, transformers, gptqmodel, peft, onnxruntime` after
# each (PYTHONDONTWRITEBYTECODE may be set, so nothing is compiled lazily). Prints the CPU. Run it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -m1 'model name' /proc/cpuinfo
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
first_import() { local s; s=$(date +%s.%N); "$1"/.venv/bin/python -c "import torch, transformers, gptqmodel, peft, onnxruntime" >/dev/null 2>&1; echo "$(date +%s.%N) - $s" | bc; }
for mode in pip-compile setup_env; do
    dir=$tmp/$mode && mkdir -p "$dir" && git ls-files | tar -cf - -T - | tar -x -C "$dir"
    s=$SECONDS
    if [ $mode = pip-compile ]; then
        (cd "$dir" && python3 -m venv .venv && .venv/bin/python -m pip install -q --upgrade pip \
            && .venv/bin/python -m pip install -q "torch==2.13.0" && .venv/bin/python -m pip install -q -e ".[compress,serve,dev]")
    else
        (cd "$dir" && bash scripts/setup_env.sh)
    fi
    echo "$mode: set-up $((SECONDS - s)) s, first import $(first_import "$dir") s"
    rm -rf "$dir"
done
