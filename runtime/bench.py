"""`edgepack bench`: how fast a bundle runs here, measured the way a chat uses it.

One session load, then `repeats` runs of (fresh cache, prefill `prompt_tokens` of WikiText, greedy decode of
`new_tokens` with no stop token), after one untimed warm-up run. Reported as min / median / max over the
runs, since the first run after load and background load on a laptop both skew a mean. Each decode step's
time spent in Python (sampling, detokenizing, stop strings) is reported on its own, so the report says how
much of a token is the generation loop rather than onnxruntime.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

from runtime.errors import EdgepackError


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), for benchmark records: figures differ between machines."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def read_bandwidth(allocations: int = 4, floats: int = 1 << 28) -> float:
    """Bytes per second this machine reads from memory: the best numpy read (max or dot) of a 1 GiB buffer
    split over all cores (numpy reductions release the GIL), as a multi-threaded decode reads. Best of several
    fresh allocations, since the limit must be the best the machine can do. On a shared VM the figure also
    moves over time (the 2-core dev VM reads ~50 GB/s in some minutes and ~75 GB/s in others; an AVX-512 C
    loop agrees), so compare a decode speed with a bandwidth measured next to it, never an old one."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n = os.cpu_count() or 1
    best = 0.0
    with ThreadPoolExecutor(n) as pool:
        for _ in range(allocations):
            a = np.ones(floats, dtype=np.float32)
            parts = np.array_split(a, n)
            for reduce in (np.max, lambda p: p.dot(p)):  # the fastest read wins (np.sum is compute-bound)
                for _ in range(3):
                    t0 = time.perf_counter()
                    list(pool.map(reduce, parts))
                    best = max(best, a.nbytes / (time.perf_counter() - t0))
            del a, parts
    return best


def weight_bytes(bundle) -> int:
    """Bytes a decode step reads: the ONNX weights (int4 projections, quantized head, EoRA factors). The
    embedding lookup reads one row per token, so a table of its own is counted although it is barely read."""
    return sum(
        int(info["size"])
        for rel, info in bundle.manifest["files"].items()
        if rel.startswith("onnx/") and rel.endswith(".data")
    )


def bench_prompt(tokenizer, n: int) -> list[int]:
    """The first n tokens of the shipped WikiText-2 test text (real text: realistic token ids)."""
    from runtime.datasets import wikitext_eval_text

    text = wikitext_eval_text("tiny-wikitext")
    ids = tokenizer.encode(text[: 16 * n + 64], add_special_tokens=True)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def bench_bundle(
    bundle,
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    repeats: int = 5,
    threads: int | None = None,
    prompt: list[int] | None = None,
    bandwidth: bool = False,
    draft: str = "none",
    step_tokens: int | None = None,
) -> dict:
    """Load time, time to first token, prefill and decode tokens/s (min/median/max), peak RSS; with
    `bandwidth`, also the memory-bandwidth limit of decode (measured after the peak RSS is read, so its
    1 GiB buffer does not count as the bundle's memory). With a `draft` (runtime.speculative.make_proposer's
    choices), each repeat also runs speculative decoding right after (or before: the order alternates) the
    plain run, and result["speculative"] holds its decode tokens/s, acceptance rate and speedup. step_tokens:
    the decoder's step width; None = one-token steps (plain decoding's speed, what sampled requests get)
    without a draft, and with a draft the width greedy generation takes (runtime.generation.exact_step_tokens:
    two-token steps on int8-activation graphs), so that both runs produce the same tokens."""
    import onnxruntime as ort

    from runtime.generation import Generator, SamplingSettings

    if prompt_tokens < 1 or new_tokens < 1 or repeats < 1:
        raise EdgepackError("bench: prompt_tokens, new_tokens and repeats must be >= 1")
    t0 = time.perf_counter()
    decoder = bundle.decoder(threads)
    load_s = time.perf_counter() - t0
    if prompt_tokens + new_tokens > decoder.max_len:
        raise EdgepackError(
            f"bench: {prompt_tokens} prompt + {new_tokens} new tokens exceed the model's context of {decoder.max_len}"
        )
    if step_tokens is None and draft == "none":
        step_tokens = 1
    # no EOS: every run decodes new_tokens
    gen = Generator(decoder, bundle.tokenizer, stop_ids=set(), step_tokens=step_tokens)
    prompt = list(prompt)[:prompt_tokens] if prompt else bench_prompt(bundle.tokenizer, prompt_tokens)
    settings = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=new_tokens)
    from runtime.speculative import make_proposer

    proposer = make_proposer(draft, bundle, threads)
    gen.reset()
    gen.generate(prompt, SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=min(8, new_tokens)))
    runs, spec_runs = [], []
    for i in range(repeats):
        for drafted in ((False, True) if i % 2 == 0 else (True, False)) if proposer else (False,):
            gen.draft = proposer if drafted else None
            gen.reset()  # a fresh cache each run, so the prompt is really prefilled
            if drafted and i == 0:  # warm-up of the speculative path (multi-token bindings, the draft's session)
                gen.generate(prompt, settings)
                gen.reset()
            t = time.perf_counter()
            r = gen.generate(prompt, settings)
            total = time.perf_counter() - t
            (spec_runs if drafted else runs).append(
                {
                    "ttft_s": r.ttft_s,
                    "prefill_tokens_per_s": r.prefill_tokens_per_s,
                    "decode_tokens_per_s": r.decode_tokens_per_s,
                    "total_s": total,
                    "new_tokens": r.new_tokens,
                    "loop_us_per_token": r.loop_us_per_token,
                    "drafted": r.drafted_tokens,
                    "accepted": r.accepted_tokens,
                    "token_ids": r.token_ids,
                }
            )
    gen.draft = None
    token_ids = runs[-1]["token_ids"]
    same_tokens = all([x.pop("token_ids") == token_ids for x in runs + spec_runs])
    result = {
        "bundle": bundle.describe()["name"],
        "path": str(bundle.source),
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()}",
        "onnxruntime": ort.__version__,
        "load_s": load_s,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "ttft_s": _stats([r["ttft_s"] for r in runs]),
        "prefill_tokens_per_s": _stats([r["prefill_tokens_per_s"] for r in runs]),
        "decode_tokens_per_s": _stats([r["decode_tokens_per_s"] for r in runs]),
        # of each decode step, the time spent in Python rather than in onnxruntime (median over runs)
        "loop_us_per_token": statistics.median(r["loop_us_per_token"] for r in runs),
        "step_tokens": decoder.step_tokens,  # the decode step width the runs took
        "token_ids": token_ids,
        "peak_rss_bytes": peak_rss_bytes(),
        "runs": runs,
    }
    if spec_runs:
        drafted, accepted = sum(x["drafted"] for x in spec_runs), sum(x["accepted"] for x in spec_runs)
        speedups = [s["decode_tokens_per_s"] / p["decode_tokens_per_s"] for s, p in zip(spec_runs, runs)]
        result["speculative"] = {
            "draft": proposer.name,
            "decode_tokens_per_s": _stats([x["decode_tokens_per_s"] for x in spec_runs]),
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "drafted_tokens": drafted,
            "speedup": _stats(speedups),  # per repeat, against the plain run next to it
            "same_tokens": same_tokens,
            "runs": spec_runs,
        }
    if bandwidth:  # every weight is read once per token: tokens/s <= bandwidth / weight bytes
        bw, wb = read_bandwidth(), weight_bytes(bundle)
        result.update(read_bandwidth_GBps=bw / 1e9, weight_bytes=wb, bandwidth_limit_tokens_per_s=bw / wb)
    return result


def format_bench(result: dict) -> str:
    from runtime.bundle import format_bytes

    def row(label, key, unit, scale=1.0, fmt="{:.1f}", source=None):
        s = (source or result)[key]
        vals = " / ".join(fmt.format(s[k] * scale) for k in ("min", "median", "max"))
        return f"{label:22s} {vals} {unit}  (min / median / max)"

    rss = result["peak_rss_bytes"]
    return "\n".join(
        [
            f"{result['bundle']}: {result['prompt_tokens']} prompt tokens, {result['new_tokens']} new tokens, "
            f"{result['repeats']} runs, threads={result['threads'] or 'default'} ({result['cpu_count']} CPUs, "
            f"{result['machine']}, onnxruntime {result['onnxruntime']})",
            *([f"{'open + digest check':22s} {result['open_s']:.2f} s"] if "open_s" in result else []),
            f"{'load (ONNX session)':22s} {result['load_s']:.2f} s",
            row("time to first token", "ttft_s", "ms", 1000.0),
            row("prefill", "prefill_tokens_per_s", "tokens/s"),
            row(
                "decode" if result.get("step_tokens", 1) == 1 else "decode, 2-token steps",
                "decode_tokens_per_s",
                "tokens/s",
            ),
            *(
                [
                    row(
                        f"decode, draft={result['speculative']['draft']}",
                        "decode_tokens_per_s",
                        "tokens/s",
                        source=result["speculative"],
                    ),
                    f"{'  speculative':22s} {result['speculative']['speedup']['median']:.2f}x plain decode (median of "
                    f"interleaved pairs), {100 * result['speculative']['acceptance_rate']:.0f} % of "
                    f"{result['speculative']['drafted_tokens']} guesses kept, output "
                    f"{'identical' if result['speculative']['same_tokens'] else 'DIFFERENT (float near-tie)'}",
                ]
                if "speculative" in result
                else []
            ),
            f"{'  in Python':22s} {result['loop_us_per_token']:.0f} µs of each token "
            f"({result['loop_us_per_token'] * result['decode_tokens_per_s']['median'] / 1e4:.1f} %: sampling, detokenizing, "
            "stop checks; the rest is onnxruntime)",
            *(
                [
                    f"{'bandwidth limit':22s} {result['bandwidth_limit_tokens_per_s']:.0f} tokens/s = "
                    f"{result['read_bandwidth_GBps']:.1f} GB/s read / {result['weight_bytes'] / 1e6:.1f} MB of weights; decode "
                    f"runs at {100 * result['decode_tokens_per_s']['median'] / result['bandwidth_limit_tokens_per_s']:.0f} % of it"
                ]
                if "bandwidth_limit_tokens_per_s" in result
                else []
            ),
            f"{'peak memory (RSS)':22s} {format_bytes(rss) if rss else 'n/a'}",
        ]
    )
