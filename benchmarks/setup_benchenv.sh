#!/usr/bin/env bash
# The benchmark environment for the peer engines, kept apart from edgepack's own .venv (peer engines are never
# edgepack dependencies):
#   BENCH/venv                llama-cpp-python 0.3.36 (built from the PyPI sdist for this CPU), onnxruntime-genai
#                             (with its builder's needs: torch 2.13.0 CPU, transformers, onnx), gguf
#   BENCH/src/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py   llama.cpp's own converter
#   BENCH/llama.cpp-build/bin llama-bench, llama-quantize, llama-perplexity, llama-imatrix and the shared
#                             libraries llama-cpp-python loads (compiled once, for this CPU's instruction sets)
# Usage: bash benchmarks/setup_benchenv.sh [BENCH]        (default /work/benchenv)
# Compiling llama.cpp takes ~20 min on 2 cores; it runs under `nice`. Re-running skips a finished set-up
# (BENCH/READY).
set -euo pipefail
BENCH=/work/benchenv
[ $# -ge 1 ] && BENCH="$1"
LCP=llama_cpp_python-0.3.36
BUILD="$BENCH/llama.cpp-build"
mkdir -p "$BENCH/dl" "$BENCH/src"
if [ ! -f "$BENCH/READY" ]; then
    python3 -m venv "$BENCH/venv"
    PIP="$BENCH/venv/bin/pip"
    "$PIP" install -q --upgrade pip
    "$PIP" install -q torch==2.13.0
    "$PIP" install -q transformers onnx onnx-ir onnxruntime-genai gguf sentencepiece numpy safetensors
    [ -f "$BENCH/dl/$LCP.tar.gz" ] || "$PIP" download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$BENCH/dl"
    tar -xzf "$BENCH/dl/$LCP.tar.gz" -C "$BENCH/src"
    # llama.cpp is compiled once, for this CPU, as shared libraries plus the native tools; the Python package is
    # then installed without its own copy (LLAMA_BUILD=OFF) and given these libraries.
    # This CPU's instruction sets, but never AMX: VMs list amx_* in /proc/cpuinfo without granting the tile
    # state, and -march=native's AMX kernels then die with SIGILL (seen here on a Xeon VM).
    has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
    cmake -S "$BENCH/src/$LCP/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
        -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c) \
        -DGGML_BMI2=$(has bmi2) -DGGML_AVX_VNNI=$(has avx_vnni) -DGGML_AVX512=$(has avx512f) \
        -DGGML_AVX512_VBMI=$(has avx512_vbmi) -DGGML_AVX512_VNNI=$(has avx512_vnni) \
        -DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
        -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=ON >/dev/null
    nice -n 10 cmake --build "$BUILD" -j 2 --target llama llama-bench llama-quantize llama-perplexity llama-imatrix >/dev/null
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PIP" install -q "$BENCH/src/$LCP"
    LIB=$("$BENCH/venv/bin/python" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent / 'lib')")
    mkdir -p "$LIB"
    cp -a "$BUILD"/bin/*.so* "$LIB"/
    "$BENCH/venv/bin/python" -c "import llama_cpp, onnxruntime_genai; print('llama_cpp', llama_cpp.__version__, 'onnxruntime_genai', onnxruntime_genai.__version__)"
    touch "$BENCH/READY"
fi
echo "benchmark environment: $BENCH/venv/bin/python; llama.cpp tools: $BUILD/bin"
