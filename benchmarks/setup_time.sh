#!/usr/bin/env bash
# Fresh-venv set-up time: pip's own single-core byte-compilation (what scripts/setup_env.sh does) against
# pip --no-compile, then compileall on all cores, one after the other from the
# tracked files of this checkout, plus the first `import torch, transformers, gptqmodel, peft, onnxruntime` after
# each (PYTHONDONTWRITEBYTECODE may be set, so nothing is compiled lazily). Prints the CPU. Run it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -m1 'model name' /proc/cpuinfo
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
first_import() { local s; s=$(date +%s.%N); "$1"/.venv/bin/python -c "import torch, transformers, gptqmodel, peft, onnxruntime" >/dev/null 2>&1; echo "$(date +%s.%N) - $s" | bc; }
for mode in pip-compile compileall; do
    dir=$tmp/$mode && mkdir -p "$dir" && git ls-files | tar -cf - -T - | tar -x -C "$dir"
    s=$SECONDS
    flag=""
    [ $mode = compileall ] && flag=--no-compile
    (cd "$dir" && python3 -m venv .venv && .venv/bin/python -m pip install -q $flag --upgrade pip \
        && .venv/bin/python -m pip install -q $flag "torch==2.13.0" && .venv/bin/python -m pip install -q $flag -e ".[compress,serve,dev]")
    if [ $mode = compileall ]; then
        "$dir"/.venv/bin/python -m compileall -q -j 0 "$dir"/.venv/lib/python3*/site-packages >/dev/null 2>&1 || true
    fi
    echo "$mode: set-up $((SECONDS - s)) s, first import $(first_import "$dir") s"
    rm -rf "$dir"
done
