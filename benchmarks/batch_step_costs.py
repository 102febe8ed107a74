"""What a continuous-batching decode step costs as rows are added: the server's throughput ceiling.

For B rows (every row with `--cached` tokens in its KV cache), one decode step over the slot pool exactly as
runtime.batching runs it (one IOBinding over rows [0, B) of the shared cache); prints ms per step, aggregate
tokens/s and the step's cost against one row's. Aggregate throughput at B clients is at most
B / (step(B) / step(1)) times one client's, so the server's "8 clients >= 3x one" needs step(8) <= 2.67 step(1).
Then an onnxruntime profile of the same steps at two row counts, summed per operator type, says which
kernels grow with the rows.

    python benchmarks/batch_step_costs.py BUNDLE [--rows 1,2,4,8,16] [--cached 128] [--steps 40]
        [--threads 2] [--profile-rows 1,8] [--accuracy-level N] [--json OUT]

`--accuracy-level N` rewrites every MatMulNBits node's accuracy_level in memory first (an experiment: a
bundle's level is fixed at export; 1 = fp32 activations, 4 = int8).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.batching import SlotCache, _DecodeBatch  # noqa: E402
from runtime.bench import cpu_name as _cpu_model  # noqa: E402
from runtime.bundle import Bundle  # noqa: E402


def cpu_name() -> str:
    return f"{_cpu_model()} ({os.cpu_count()} cores)"


def step_times(session, decoder, rows: int, cached: int, steps: int) -> list[float]:
    """Seconds per decode step over rows [0, rows), each row starting with `cached` tokens."""
    cache = SlotCache(decoder.kv_layers, rows, cached + steps + 8, decoder.head_dim)
    batch = _DecodeBatch(session, cache, rows, decoder.vocab_size)
    rng = np.random.default_rng(0)
    times = []
    for i in range(steps + 5):  # 5 warm-up steps
        batch.ids[:, 0] = rng.integers(0, decoder.vocab_size, rows)
        batch.seqlens[:] = cached + i
        batch.total[()] = cached + i + 1
        t0 = time.perf_counter()
        session.run_with_iobinding(batch.binding)
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return times


def with_accuracy_level(onnx_path: Path, level: int) -> bytes:
    """The graph with every MatMulNBits at `level` (weights inlined: fine below protobuf's 2 GB)."""
    import onnx

    model = onnx.load(str(onnx_path))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = level
    return model.SerializeToString()


def session_for(model, threads: int, profile_prefix: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def profile_by_op(model, decoder, rows: int, cached: int, steps: int, threads: int) -> dict[str, float]:
    """µs per step spent in each operator type (onnxruntime's own profiler, node events only)."""
    with tempfile.TemporaryDirectory() as tmp:
        session = session_for(model, threads, str(Path(tmp) / "prof"))
        step_times(session, decoder, rows, cached, steps)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    # warm-up steps are in the profile too
    return {op: us / (steps + 5) for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--cached", type=int, default=128, help="tokens already in every row's cache")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile-rows", default="1,8", help="row counts to profile per operator type ('' = none)")
    ap.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], help="rewrite MatMulNBits' level")
    ap.add_argument("--json")
    args = ap.parse_args()

    bundle = Bundle.open(args.bundle)
    decoder = bundle.decoder(threads=args.threads)  # metadata (KV layers, vocabulary); its session unless rewritten
    model = str(bundle.onnx_path)
    if args.accuracy_level is not None:
        model = with_accuracy_level(bundle.onnx_path, args.accuracy_level)
    session = decoder.session if args.accuracy_level is None else session_for(model, args.threads)
    print(
        f"{bundle.name}; {cpu_name()}; onnxruntime {ort.__version__}; {args.threads} threads; "
        f"{args.cached} cached tokens per row; median of {args.steps} steps; MatMulNBits accuracy_level "
        f"{'as exported' if args.accuracy_level is None else args.accuracy_level}"
    )
    out = {"bundle": bundle.name, "cpu": cpu_name(), "threads": args.threads, "cached": args.cached}
    level = "as exported" if args.accuracy_level is None else args.accuracy_level
    out.update({"accuracy_level": level, "rows": {}})
    print("| rows | ms per step | step / one row's | aggregate tok/s | aggregate / one row's |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    base = None
    for rows in [int(r) for r in args.rows.split(",")]:
        ms = statistics.median(step_times(session, decoder, rows, args.cached, args.steps)) * 1e3
        base = base or ms
        out["rows"][rows] = {"ms_per_step": round(ms, 3), "tok_s": round(rows * 1e3 / ms, 1)}
        print(f"| {rows} | {ms:.2f} | {ms / base:.2f}x | {rows * 1e3 / ms:.0f} | {rows * base / ms:.2f}x |", flush=True)

    prof_rows = [int(r) for r in args.profile_rows.split(",") if r]
    if prof_rows:
        profiles = {r: profile_by_op(model, decoder, r, args.cached, args.steps, args.threads) for r in prof_rows}
        out["profile_us_per_step"] = profiles
        ops = sorted({op for p in profiles.values() for op in p}, key=lambda op: -profiles[prof_rows[-1]].get(op, 0))
        print("\nµs per step by operator type (onnxruntime profiler; kernel time only)")
        print("| operator | " + " | ".join(f"{r} rows" for r in prof_rows) + " | growth |")
        print("| --- | " + " | ".join("---:" for _ in prof_rows) + " | ---: |")
        for op in ops:
            vals = [profiles[r].get(op, 0.0) for r in prof_rows]
            growth = f"{vals[-1] / vals[0]:.2f}x" if vals[0] else "-"
            print(f"| {op} | " + " | ".join(f"{v:.0f}" for v in vals) + f" | {growth} |")
        totals = [sum(profiles[r].values()) for r in prof_rows]
        print("| all kernels | " + " | ".join(f"{t:.0f}" for t in totals) + f" | {totals[-1] / totals[0]:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
