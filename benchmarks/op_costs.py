"""What one decode step's non-matmul work costs in onnxruntime: GroupQueryAttention per call, at SmolLM2's
shape (9 query / 3 KV heads of 64, packed QKV, rotary inside, KV cache shared in place), in a chain of 30
layers like the real graph, for a few cache lengths. Prints µs per call.

    python benchmarks/op_costs.py [--threads 2] [--layers 30]

The decode benchmark (bench_decode.py) shows the weight kernels alone run at 1.3-1.5x the full graph's
speed; this says how much of the rest attention is.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def gqa_chain(layers: int, max_len: int) -> bytes:
    qkv_width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.random((max_len, HEAD_DIM // 2), dtype=np.float32), name) for name in ("cos", "sin")
    ]
    inputs = [
        helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, 1, qkv_width]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
    ]
    nodes, outputs = [], []
    for i in range(layers):
        inputs += [
            helper.make_tensor_value_info(f"past_k{i}", TensorProto.FLOAT, [1, KV_HEADS, max_len, HEAD_DIM]),
            helper.make_tensor_value_info(f"past_v{i}", TensorProto.FLOAT, [1, KV_HEADS, max_len, HEAD_DIM]),
        ]
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                ["qkv", "", "", f"past_k{i}", f"past_v{i}", "seqlens_k", "total", "cos", "sin"],
                [f"out{i}", f"k{i}", f"v{i}"],
                domain="com.microsoft",
                num_heads=HEADS,
                kv_num_heads=KV_HEADS,
                do_rotary=1,
                rotary_interleaved=0,
                local_window_size=-1,
            )
        )
        outputs += [
            helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, [1, 1, HEADS * HEAD_DIM]),
            helper.make_tensor_value_info(f"k{i}", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(f"v{i}", TensorProto.FLOAT, None),
        ]
    graph = helper.make_graph(nodes, "gqa_chain", inputs, outputs, inits)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    ).SerializeToString()


def time_gqa(layers: int, threads: int, past: int, max_len: int = 2048, runs: int = 30) -> float:
    """Median µs per GroupQueryAttention call, decoding one token after `past` cached ones."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(gqa_chain(layers, max_len), opts, providers=["CPUExecutionProvider"])
    binding = sess.io_binding()
    rng = np.random.default_rng(1)
    binding.bind_cpu_input("qkv", rng.standard_normal((1, 1, (HEADS + 2 * KV_HEADS) * HEAD_DIM), dtype=np.float32))
    binding.bind_cpu_input("seqlens_k", np.array([past], np.int32))
    binding.bind_cpu_input("total", np.array(past + 1, np.int32))
    for i in range(layers):  # one buffer per layer and role, bound as past and present: updated in place
        for past_name, present_name in ((f"past_k{i}", f"k{i}"), (f"past_v{i}", f"v{i}")):
            buf = ort.OrtValue.ortvalue_from_numpy(
                rng.standard_normal((1, KV_HEADS, max_len, HEAD_DIM), dtype=np.float32)
            )
            binding.bind_ortvalue_input(past_name, buf)
            binding.bind_ortvalue_output(present_name, buf)
        binding.bind_output(f"out{i}")
    for _ in range(5):
        sess.run_with_iobinding(binding)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run_with_iobinding(binding)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / layers * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args()
    print(
        f"GroupQueryAttention, {HEADS}/{KV_HEADS} heads x {HEAD_DIM}, rotary inside, {args.threads} threads, "
        f"onnxruntime {ort.__version__}"
    )
    for past in (16, 128, 256, 1024):
        us = time_gqa(args.layers, args.threads, past)
        print(
            f"  {past:5d} cached tokens: {us:6.1f} µs per call, {us * args.layers / 1000:.2f} ms per token "
            f"for {args.layers} layers"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
