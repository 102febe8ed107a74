"""Does onnxruntime's MatMulNBits compute a row the same whatever the number of rows beside it?

Batched decoding (the server) and speculative verification score several rows in one run; their greedy output
equals one-row decoding only where a row's result does not depend on the batch. This builds one MatMulNBits
node per (block, zero points, accuracy level) on random weights, runs the same row x alone (M=1) and as row 0
of M = 2..16 rows (the others random), and prints the largest |difference| from the M=1 result and from the
M=2 result. 0 means bit-identical. Measured 2026-12-07 on an AMD EPYC with AVX-512 VNNI (onnxruntime 1.32):
accuracy level 4 bit-identical for every M at block 32, 3e-7 at block 128; level 1 ~1e-6 between M=1 and M>=2,
identical among M>=2. An AVX2 EPYC gave <= 3e-6 for every variant earlier. (What breaks greedy equality of
speculative verification is upstream of MatMulNBits: see runtime.speculative's "Exactness".)

    python benchmarks/nbits_row_dependence.py [--threads 2] [--rows 2,3,4,5,8,16]

It first prints which bit widths this onnxruntime's CPU MatMulNBits kernel accepts (1.32: 2, 4 and 8; a graph
with 3, 5 or 6 bits fails at session creation), the widths any per-matrix precision choice can use.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter.int4 import quantize_rtn  # noqa: E402
from runtime.bench import cpu_name  # noqa: E402

N, K = 1536, 576  # SmolLM2's up projection


def accepted_bits(threads: int) -> list[int]:
    """The bit widths for which a MatMulNBits session can be created and run here."""
    ok = []
    for bits in range(2, 9):
        packed = np.zeros((8, 1, 32 * bits // 8), np.uint8)
        inits = [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(np.ones((8, 1), np.float32), "s")]
        node = helper.make_node(
            "MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=32, N=8, bits=bits, block_size=32
        )
        graph = helper.make_graph(
            [node],
            "bits",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
            inits,
        )
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = threads, 4
        try:
            sess = ort.InferenceSession(helper.make_model(graph, opset_imports=opsets).SerializeToString(), opts)
            sess.run(None, {"x": np.ones((1, 32), np.float32)})
            ok.append(bits)
        except Exception:  # onnxruntime refuses the width (its own exception types)
            pass
    return ok


def session(block: int, symmetric: bool, level: int, threads: int) -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    q = quantize_rtn((rng.standard_normal((N, K)) * 0.02).astype(np.float32), 4, block, symmetric)
    inits = [numpy_helper.from_array(q.B, "b"), numpy_helper.from_array(q.scales, "s")]
    ins = ["x", "b", "s"]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.zero_points, "z"))
        ins.append("z")
    node = helper.make_node(
        "MatMulNBits", ins, ["y"], domain="com.microsoft", K=K, N=N, bits=4, block_size=block, accuracy_level=level
    )
    graph = helper.make_graph(
        [node],
        "nbits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="2,3,4,5,8,16")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    flags = Path("/proc/cpuinfo").read_text()
    isa = "AVX-512 VNNI" if " avx512_vnni" in flags else ("AVX-512" if " avx512f" in flags else "AVX2")
    print(f"{cpu_name()} ({os.cpu_count()} cores, {isa}); onnxruntime {ort.__version__}; {args.threads} threads")
    print(f"MatMulNBits bit widths this kernel accepts: {accepted_bits(args.threads)}")
    print("| block | zero points | accuracy level | " + " | ".join(f"M={m} vs 1 / vs 2" for m in rows) + " |")
    print("| ---: | --- | ---: | " + " | ".join("---:" for _ in rows) + " |")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, K)).astype(np.float32)
    others = rng.standard_normal((max(rows), K)).astype(np.float32)
    for block, symmetric in [(32, False), (32, True), (128, True)]:
        for level in (1, 4):
            sess = session(block, symmetric, level, args.threads)
            solo = sess.run(None, {"x": x})[0][0]
            pair = sess.run(None, {"x": np.concatenate([x, others[:1]])})[0][0]
            cells = []
            for m in rows:
                y = sess.run(None, {"x": np.concatenate([x, others[: m - 1]])})[0][0]
                cells.append(f"{np.abs(y - solo).max():.1e} / {np.abs(y - pair).max():.1e}")
            print(f"| {block} | {'no' if symmetric else 'yes'} | {level} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
