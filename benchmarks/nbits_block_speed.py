"""How fast onnxruntime's int4 MatMulNBits reads weights at one decode step (M=1), by block size and zero
points: the weight kernels of one layer of a model, chained, timed back to back; prints µs per layer and the
effective read rate (weight bytes / time), next to this machine's read bandwidth (numpy copy, best of 4).

    python benchmarks/nbits_block_speed.py [--model 1b|smollm2] [--threads 2] [--runs 50]

The 1B bundle's GPTQ weights are block 128 symmetric; onnxruntime-genai's builder writes block 32 with zero
points (as the SmolLM2 main job's `group=32a`). This separates the kernel's speed from everything else.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter.int4 import quantize_rtn  # noqa: E402
from runtime.bench import cpu_name, read_bandwidth  # noqa: E402

# (N, K) of the fused projections of one layer: qkv, o, gate_up, down
LAYERS = {
    "1b": [(2048 + 512 + 512, 2048), (2048, 2048), (2 * 8192, 2048), (2048, 8192)],
    "smollm2": [(576 + 192 + 192, 576), (576, 576), (2 * 1536, 576), (576, 1536)],
}
VARIANTS = [(128, True), (128, False), (64, False), (32, True), (32, False)]  # (block, symmetric)


def layer_graph(shapes, block: int, symmetric: bool, copies: int) -> tuple[bytes, int]:
    """`copies` layers' worth of independent weight kernels (more weight than the L3 cache holds)."""
    rng = np.random.default_rng(0)
    nodes, inits, inputs, outputs, nbytes = [], [], [], [], 0
    for c in range(copies):
        for i, (n, k) in enumerate(shapes):
            name = f"l{c}_{i}"
            q = quantize_rtn((rng.standard_normal((n, k)) * 0.02).astype(np.float32), 4, block, symmetric)
            ins = [f"x{i}", f"{name}_b", f"{name}_s"]
            inits += [numpy_helper.from_array(q.B, ins[1]), numpy_helper.from_array(q.scales, ins[2])]
            nbytes += q.B.nbytes + q.scales.nbytes
            if q.zero_points is not None:
                inits.append(numpy_helper.from_array(q.zero_points, f"{name}_z"))
                ins.append(f"{name}_z")
                nbytes += q.zero_points.nbytes
            attrs = dict(K=k, N=n, bits=4, block_size=block, accuracy_level=4)
            nodes.append(helper.make_node("MatMulNBits", ins, [f"y{name}"], domain="com.microsoft", **attrs))
            outputs.append(helper.make_tensor_value_info(f"y{name}", TensorProto.FLOAT, [1, n]))
    inputs = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, k]) for i, (_, k) in enumerate(shapes)]
    graph = helper.make_graph(nodes, "nbits", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString(), nbytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(LAYERS), default="1b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    shapes = LAYERS[args.model]
    copies = 4 if args.model == "1b" else 16  # ~120 MB / ~60 MB of weights: far more than L3
    cpu = cpu_name()
    isa = "AVX-512" if " avx512f" in Path("/proc/cpuinfo").read_text() else "AVX2"
    bw = read_bandwidth()
    print(f"{cpu} ({os.cpu_count()} cores, {isa}); onnxruntime {ort.__version__}; {args.threads} threads")
    print(
        f"read bandwidth (runtime.bench.read_bandwidth): {bw / 1e9:.1f} GB/s; {copies} x one {args.model} layer's kernels"
    )
    print("| block | zero points | weight MB | µs per layer | GB/s | % of read bandwidth |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    rng = np.random.default_rng(1)
    feeds = {f"x{i}": rng.standard_normal((1, k)).astype(np.float32) for i, (_, k) in enumerate(shapes)}
    for block, symmetric in VARIANTS:
        model, nbytes = layer_graph(shapes, block, symmetric, copies)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        del model
        for _ in range(5):
            sess.run(None, feeds)
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        rate = nbytes / t
        zp = "no" if symmetric else "yes"
        print(f"| {block} | {zp} | {nbytes / 1e6:.0f} | {t / copies * 1e6:.0f} | {rate / 1e9:.1f} | {rate / bw:.0%} |")
        del sess
    return 0


if __name__ == "__main__":
    sys.exit(main())
