"""What EoRA's B factor costs per token, by storage: one decode-step matmul (M=1) of the B shapes a model's
layer has, as int8 MatMulNBits (the shipped default), int4 MatMulNBits, and a float32 MatMul.

B maps the rank-r branch back to the projection's outputs: [N, r], K = r (or 2r / 3r where projections are
fused and B is block-diagonal). So its kernels are short in K and long in N, a shape the int4/int8 kernels
were not tuned for. Each variant is one ONNX graph holding every B of one layer, chained through Adds so
nothing is dead; µs per call is the median of `--runs` calls after a warm-up.

    python benchmarks/eora_b_kernels.py [--model 1b|smollm2] [--rank 32] [--threads 2] [--runs 200]
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
from runtime.bench import cpu_name  # noqa: E402
from exporter.onnx_graph import eora_block  # noqa: E402

# (N, K) of every B in one layer, fused as the exporter fuses them: q/k/v stacked (K = 3r, block-diagonal),
# o (K = r), gate/up stacked (K = 2r), down (K = r).
SHAPES = {
    "1b": lambda r: [(2048 + 512 + 512, 3 * r), (2048, r), (2 * 8192, 2 * r), (2048, r)],
    "smollm2": lambda r: [(576 + 192 + 192, 3 * r), (576, r), (2 * 1536, 2 * r), (576, r)],
}


def layer_graph(shapes: list[tuple[int, int]], kind: str) -> bytes:
    """One graph: for each (N, K), x_K -> B -> y_N; the outputs summed (each padded to the widest N)."""
    rng = np.random.default_rng(0)
    nodes, inits, inputs, outs = [], [], [], []
    for i, (n, k) in enumerate(shapes):
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, 1, k]))
        w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
        if kind == "fp32":
            inits.append(numpy_helper.from_array(w.T.copy(), f"w{i}"))
            nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"]))
        else:
            q = quantize_rtn(w, bits={"int8": 8, "int4": 4}[kind], block_size=eora_block(k))
            inits += [numpy_helper.from_array(q.B, f"b{i}"), numpy_helper.from_array(q.scales, f"s{i}")]
            nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    [f"x{i}", f"b{i}", f"s{i}"],
                    [f"y{i}"],
                    domain="com.microsoft",
                    K=k,
                    N=n,
                    bits=q.bits,
                    block_size=q.block_size,
                    accuracy_level=4,
                )
            )
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 1, n]))
    graph = helper.make_graph(nodes, "eora_b", inputs, outs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    return model.SerializeToString()


def time_layer(shapes, kind: str, threads: int, runs: int) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(layer_graph(shapes, kind), sess_options=opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {f"x{i}": rng.standard_normal((1, 1, k)).astype(np.float32) for i, (_, k) in enumerate(shapes)}
    for _ in range(10):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    shapes = SHAPES[args.model](args.rank)
    cpu = cpu_name()
    flags = Path("/proc/cpuinfo").read_text()
    isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    print(f"{cpu} ({os.cpu_count()} cores, {isa}); onnxruntime {ort.__version__}; {args.threads} threads")
    print(f"EoRA B of one {args.model} layer, rank {args.rank}: (N, K) = {shapes}")
    print("| B stored as | bytes per layer | µs per layer (median) |")
    print("| --- | ---: | ---: |")
    for kind, bytes_per in (("int8", 9 / 8), ("int4", 5 / 8), ("fp32", 4)):
        us = time_layer(shapes, kind, args.threads, args.runs)
        nbytes = sum(n * k for n, k in shapes) * bytes_per
        print(f"| {kind} | {nbytes / 1e6:.2f} MB | {us:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
