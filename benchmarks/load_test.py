"""Load test of `edgepack serve`: aggregate decode tokens/s and time to first token at 1, 4, 8, 16 concurrent
streaming clients (asyncio + httpx), and a check that every greedy reply equals the same request served alone.

    nice python benchmarks/load_test.py BUNDLE [--clients 1,4,8,16] [--requests 3] [--max-tokens 64]
                                                [--threads 2] [--json docs/load_test.json]

Starts the server itself (`edgepack serve BUNDLE --parallel MAX(clients)` on a free 127.0.0.1 port) unless
--url points at a running one. Each level: C clients, each sending --requests chat requests back to back
(closed loop, greedy, `stream_options.include_usage` for exact token counts); every request has its own
prompt. First a reference pass sends every prompt alone, one at a time; each level's replies must equal it.

Figures per level: aggregate tok/s = completion tokens of the level / its wall time (prefill included);
TTFT p50/p99 = request sent -> first content delta; per-stream decode tok/s = (tokens - 1) / (last delta -
first delta), median. The client runs on the same machine as the server: on a small box it competes for
the cores, so the figures are a floor.

`--in-process` drives runtime.batching.BatchScheduler directly (one thread per client, the same prompts through
the bundle's chat template, greedy over the bundle's other sampling defaults, as the server does): no HTTP,
no client. Together with benchmarks/batch_step_costs.py (the decode step alone) it says where the server's
throughput goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOPICS = [
    "the moon",
    "bread",
    "rivers",
    "chess",
    "volcanoes",
    "bees",
    "trains",
    "glaciers",
    "music",
    "maps",
    "clocks",
    "tea",
    "whales",
    "deserts",
    "bridges",
    "libraries",
    "snow",
    "coffee",
    "forests",
    "kites",
]
ASKS = [
    "Explain {} to a child.",
    "Write three facts about {}.",
    "Why do people like {}?",
    "Describe {} in one paragraph.",
    "What is the history of {}?",
]


def prompts(n: int) -> list[str]:
    return [ASKS[i % len(ASKS)].format(TOPICS[(i * 7) % len(TOPICS)]) + f" (#{i})" for i in range(n)]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = last = None
    parts, usage = [], None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                text = choice["delta"].get("content")
                if text:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    parts.append(text)
    return request_record(parts, usage["completion_tokens"] if usage else 0, t0, first, last)


def request_record(parts: list[str], tokens: int, t0: float, first: float | None, last: float | None) -> dict:
    """One request's reply and timings: sent at t0, first and last text at `first` / `last`."""
    return {
        "text": "".join(parts),
        "tokens": tokens,
        "ttft": (first or time.perf_counter()) - t0,
        "decode_rate": (tokens - 1) / (last - first) if first and last and last > first and tokens > 1 else None,
    }


async def run_level(url: str, model: str, texts: list[str], clients: int, per_client: int, max_tokens: int):
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker(c: int) -> list[tuple[int, dict]]:
            out = []
            for k in range(per_client):
                i = c * per_client + k
                out.append((i, await one_request(client, url, model, texts[i], max_tokens)))
            return out

        t0 = time.perf_counter()
        results = await asyncio.gather(*(worker(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return dict(pair for rs in results for pair in rs), wall


def run_level_in_process(scheduler, settings, prompt_ids: list[list[int]], clients: int, per_client: int):
    """The same closed loop as run_level, each client a thread calling the scheduler."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> dict:
        t0 = time.perf_counter()
        first = last = None
        parts, tokens = [], 0
        for event in scheduler.stream(prompt_ids[i], settings):
            now = time.perf_counter()
            first = first or now
            last = now
            tokens += 1
            parts.append(event.text)
        return request_record(parts, tokens, t0, first, last)

    def worker(c: int) -> list[tuple[int, dict]]:
        return [(c * per_client + k, one(c * per_client + k)) for k in range(per_client)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(worker, range(clients)))
    return dict(pair for rs in results for pair in rs), time.perf_counter() - t0


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: str, parallel: int, threads: int | None, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "edgepack", "serve", bundle, "--port", str(port), "--parallel", str(parallel)]
    if threads:
        cmd += ["--threads", str(threads)]
    cmd += list(extra)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise SystemExit("the server did not come up within 300 s")


def in_process_runner(bundle_path: str, parallel: int, threads: int):
    """A runner with run_level's signature over an in-process BatchScheduler (closed when the process ends)."""
    import dataclasses
    import functools

    from runtime.batching import BatchScheduler, PoolConfig
    from runtime.bundle import Bundle

    bundle = Bundle.open(bundle_path)
    scheduler = BatchScheduler(
        bundle.decoder(threads=threads), bundle.tokenizer, bundle.stop_ids, PoolConfig(slots=parallel)
    )
    greedy = dataclasses.replace(bundle.sampling_defaults(), temperature=0.0)
    system = bundle.system_prompt

    @functools.cache
    def ids(text: str) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return bundle.tokenizer.encode_chat(messages, add_generation_prompt=True)

    def runner(texts, clients, per_client, max_tokens):
        settings = dataclasses.replace(greedy, max_new_tokens=max_tokens)
        return run_level_in_process(scheduler, settings, [ids(t) for t in texts], clients, per_client)

    return runner, bundle.name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="?", help="bundle to serve (omit with --url)")
    ap.add_argument("--url", help="a running server instead of starting one")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=3, help="requests per client, back to back")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="server's onnxruntime threads")
    ap.add_argument("--no-check", action="store_true", help="skip the solo reference pass and equality check")
    ap.add_argument("--in-process", action="store_true", help="drive the batch scheduler directly (no HTTP)")
    ap.add_argument("--no-prefix-cache", action="store_true", help="serve with --no-prefix-cache (an A/B switch)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    texts = prompts(max(levels) * args.requests)
    proc = None
    if args.in_process:
        if not args.bundle:
            ap.error("--in-process needs a BUNDLE")
        runner, model = in_process_runner(args.bundle, max(levels), args.threads)
    elif args.url:
        url = args.url.rstrip("/")
    elif args.bundle:
        extra = ("--no-prefix-cache",) if args.no_prefix_cache else ()
        proc, url = start_server(args.bundle, max(levels), args.threads, *extra)
    else:
        ap.error("give a BUNDLE or --url")
    if not args.in_process:
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]

        def runner(texts_, clients, per_client, max_tokens):
            return asyncio.run(run_level(url, model, texts_, clients, per_client, max_tokens))

    try:
        cpu = cpu_name()
        print(
            f"CPU: {cpu} ({os.cpu_count()} logical cores); model {model}; {args.max_tokens} tokens per request, "
            f"{args.requests} requests per client; server threads {args.threads}"
            + ("; in process (no HTTP)" if args.in_process else ""),
            flush=True,
        )
        runner(texts[:1], 1, 1, 4)  # warm-up
        reference = None
        if not args.no_check:
            reference = {}
            for i, text in enumerate(texts):  # alone, one at a time
                reference[i] = runner([text], 1, 1, args.max_tokens)[0][0]["text"]
        rows, base = [], None
        for c in levels:
            results, wall = runner(texts, c, args.requests, args.max_tokens)
            tokens = sum(r["tokens"] for r in results.values())
            ttfts = [r["ttft"] for r in results.values()]
            rates = [r["decode_rate"] for r in results.values() if r["decode_rate"]]
            agg = tokens / wall
            base = base or agg
            mismatches = None if reference is None else sum(results[i]["text"] != reference[i] for i in results)
            row = {
                "clients": c,
                "requests": len(results),
                "tokens": tokens,
                "wall_s": wall,
                "aggregate_tok_s": agg,
                "speedup_vs_1": agg / base,
                "ttft_p50_ms": 1000 * percentile(ttfts, 0.5),
                "ttft_p99_ms": 1000 * percentile(ttfts, 0.99),
                "stream_decode_tok_s_median": statistics.median(rates) if rates else None,
                "mismatches_vs_solo": mismatches,
            }
            rows.append(row)
            print(
                f"{c:3d} clients: {agg:7.1f} tok/s aggregate ({row['speedup_vs_1']:.2f}x), TTFT p50 "
                f"{row['ttft_p50_ms']:.0f} ms p99 {row['ttft_p99_ms']:.0f} ms, per stream "
                f"{row['stream_decode_tok_s_median'] or 0:.1f} tok/s, {tokens} tokens in {wall:.1f} s, "
                f"replies differing from solo: {mismatches if mismatches is not None else 'not checked'}",
                flush=True,
            )
        print("\n| clients | aggregate tok/s | vs 1 client | TTFT p50 | TTFT p99 | per-stream tok/s | equal to solo |")
        print("|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            eq = (
                "n/a"
                if r["mismatches_vs_solo"] is None
                else f"{r['requests'] - r['mismatches_vs_solo']}/{r['requests']}"
            )
            print(
                f"| {r['clients']} | {r['aggregate_tok_s']:.1f} | {r['speedup_vs_1']:.2f}x | {r['ttft_p50_ms']:.0f} ms "
                f"| {r['ttft_p99_ms']:.0f} ms | {r['stream_decode_tok_s_median'] or 0:.1f} | {eq} |"
            )
        if args.json:
            from runtime.fileio import atomic_write_json

            atomic_write_json(
                args.json,
                {
                    "cpu": cpu,
                    "model": model,
                    "max_tokens": args.max_tokens,
                    "requests_per_client": args.requests,
                    "threads": args.threads,
                    "in_process": args.in_process,
                    "prefix_cache": not args.no_prefix_cache,
                    "levels": rows,
                },
            )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
