"""Speculative decoding against plain decoding on one bundle, interleaved in one run.

    python benchmarks/spec_decode.py BUNDLE [--drafts lookup,model] [--wikitext 8] [--chat 8] [--new-tokens 128]
                                     [--steps 1,2] [--threads N] [--json docs/spec_decode_smollm2.json]

`--steps 1,2` also runs every variant with two-token decode steps (`NAME@2`, OnnxDecoder.step_tokens = 2, what
greedy generation takes on int8-activation graphs); each variant's greedy output is compared with plain decoding
at its own step width.

Prompt sets: WikiText-2 test continuation (128-token windows from spread-out articles, greedy, no stop token
so every run decodes --new-tokens), chat instructions (runtime/data/chat, the bundle's chat template and
system prompt, greedy, EOS ends a reply), and the same chat prompts with the bundle's sampling defaults
(temperature/top-p/repetition penalty, fixed seeds: the distribution is unchanged, the tokens are not
comparable, so only speed and acceptance are reported there).

For every prompt the variants (plain, then each draft) run back to back in a rotating order, so background
load on a shared machine hits them alike; speeds are total tokens after the first / total time after the
first token. Greedy outputs are compared with plain token for token (a difference can only come from a float
near-tie between the one-token and the multi-token pass). The first part times `OnnxDecoder.score` of 1..9
tokens against one `decode`, the verification cost runtime.speculative.VERIFY_COST_PER_TOKEN stands for.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime.bundle import Bundle  # noqa: E402
from runtime.generation import ChatSession, SamplingSettings  # noqa: E402
from runtime.speculative import chat_instructions, make_proposer  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        name = platform.processor() or "unknown CPU"
    import os

    return f"{name}, {os.cpu_count()} CPUs"


def wikitext_prompts(tokenizer, n: int, length: int = 128) -> list[list[int]]:
    from runtime.datasets import wikitext_eval_text

    text = wikitext_eval_text("wikitext2-test")
    step = len(text) // (n + 1)
    out = []
    for i in range(n):
        chunk = text[(i + 1) * step :]
        chunk = chunk[chunk.index("\n") + 1 :]  # start at a line
        out.append(tokenizer.encode(chunk[: 8 * length], add_special_tokens=True)[:length])
    return out


def chat_prompts(bundle, n: int, max_new_tokens: int) -> list[list[int]]:
    """The first n instructions whose prompt leaves room for the reply."""
    from runtime.errors import EdgepackError

    chat = ChatSession(bundle.generator(draft="none"), bundle.tokenizer, bundle.system_prompt)
    out = []
    for text in chat_instructions():
        try:
            ids, dropped = chat.build_prompt([{"role": "user", "content": text}], max_new_tokens)
        except EdgepackError:
            continue
        if len(ids) + max_new_tokens <= chat.context_length:
            out.append(ids)
        if len(out) == n:
            break
    return out


def verify_cost(decoder, context: list[int], widths=range(1, 10), repeats: int = 20) -> dict:
    """Median time of score(w tokens) / median time of decode(1 token), at the same context length."""
    import statistics

    decoder.reset()
    decoder.prefill(context)
    base = decoder.length
    times: dict[int, list[float]] = {w: [] for w in widths}
    for _ in range(repeats):
        for w in widths:
            decoder.rewind(base)
            t = time.perf_counter()
            if w == 1:
                decoder.decode(context[-1])
            else:
                decoder.score(context[-w:])
            times[w].append(time.perf_counter() - t)
    one = statistics.median(times[1])
    return {"decode_ms": 1e3 * one, "relative": {w: statistics.median(v) / one for w, v in times.items()}}


def reference_of(name: str) -> str:
    """The plain variant a variant's greedy output must equal: plain decoding at the same step width."""
    return "plain" + name[len(name.split("@")[0]) :]


def run_set(gen, proposers: dict, prompts: list[list[int]], settings_for, compare: bool, label: str) -> dict:
    """proposers: variant name -> (proposer or None, decode step tokens); "NAME@2" variants take two-token
    steps (OnnxDecoder.step_tokens)."""
    names = list(proposers)
    acc = {n: {"tokens": 0, "seconds": 0.0, "drafted": 0, "accepted": 0, "new_tokens": 0} for n in names}
    diverged = {n: 0 for n in names}
    first_diff: dict[str, list[int]] = {n: [] for n in names}  # index of the first differing token
    for i, ids in enumerate(prompts):
        order = names[i % len(names) :] + names[: i % len(names)]
        outs = {}
        for name in order:
            gen.draft, gen.step_tokens = proposers[name]
            gen.reset()
            t = time.perf_counter()
            r = gen.generate(ids, settings_for(i))
            total = time.perf_counter() - t
            a = acc[name]
            a["tokens"] += max(r.new_tokens - 1, 0)
            a["seconds"] += total - r.ttft_s
            a["drafted"] += r.drafted_tokens
            a["accepted"] += r.accepted_tokens
            a["new_tokens"] += r.new_tokens
            outs[name] = r.token_ids
        if compare:
            for name in names:
                ref = outs[reference_of(name)]
                if outs[name] != ref:
                    diverged[name] += 1
                    first_diff[name].append(
                        next(
                            (j for j, (x, y) in enumerate(zip(outs[name], ref)) if x != y),
                            min(len(outs[name]), len(ref)),
                        )
                    )
        print(
            f"  {label} prompt {i + 1}/{len(prompts)}: "
            + ", ".join(f"{n} {acc[n]['tokens'] / max(acc[n]['seconds'], 1e-9):.0f} tok/s" for n in names),
            file=sys.stderr,
        )
    plain = acc["plain"]["tokens"] / acc["plain"]["seconds"]
    out = {}
    for name in names:
        a = acc[name]
        speed = a["tokens"] / a["seconds"]
        out[name] = {
            "decode_tokens_per_s": speed,
            "speedup": speed / plain,
            "new_tokens": a["new_tokens"],
            "acceptance_rate": a["accepted"] / a["drafted"] if a["drafted"] else None,
            "drafted": a["drafted"],
            "accepted": a["accepted"],
        }
        if compare:
            out[name]["outputs_differing_from_plain"] = diverged[name]
            out[name]["first_differing_token"] = first_diff[name]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument(
        "--drafts", default="lookup,model", help="comma list of lookup, model (model: if the bundle has one)"
    )
    ap.add_argument("--wikitext", type=int, default=8, help="WikiText continuation prompts")
    ap.add_argument("--chat", type=int, default=8, help="chat instruction prompts")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int)
    ap.add_argument(
        "--steps",
        default="1",
        help="comma list of decode step widths (1, 2): 2 adds NAME@2 variants whose every step goes through the "
        "multi-token path (OnnxDecoder.step_tokens=2), compared with plain@2",
    )
    ap.add_argument("--no-sampled", action="store_true", help="skip the sampled chat set")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    bundle = Bundle.open(args.bundle)
    gen = bundle.generator(args.threads, draft="none")
    drafts = {"plain": None}
    for name in args.drafts.split(","):
        if name == "model" and not bundle.has_draft:
            print("(the bundle has no draft model: skipping draft=model)", file=sys.stderr)
            continue
        drafts[name] = make_proposer(name, bundle, args.threads)
    steps = [int(w) for w in args.steps.split(",")]
    proposers = {name + ("" if w == 1 else f"@{w}"): (proposer, w) for w in steps for name, proposer in drafts.items()}
    cpu = cpu_name()
    print(f"{bundle.name} on {cpu}, threads={args.threads or 'default'}", file=sys.stderr)

    wiki = wikitext_prompts(bundle.tokenizer, args.wikitext)
    chats = chat_prompts(bundle, args.chat, args.new_tokens)
    result = {
        "bundle": bundle.name,
        "cpu": cpu,
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "verify_cost": verify_cost(gen.decoder, wiki[0]),
    }
    print(
        "verify cost (score of w tokens / one decode): "
        + ", ".join(f"{w}: {r:.2f}" for w, r in result["verify_cost"]["relative"].items()),
        file=sys.stderr,
    )

    greedy = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=args.new_tokens)
    gen.stop_ids, stops = set(), gen.stop_ids  # WikiText continuation: always the full --new-tokens
    result["wikitext_greedy"] = run_set(gen, proposers, wiki, lambda i: greedy, True, "wikitext")
    gen.stop_ids = stops
    result["chat_greedy"] = run_set(gen, proposers, chats, lambda i: greedy, True, "chat")
    if not args.no_sampled:
        from dataclasses import replace

        base = replace(bundle.sampling_defaults(), max_new_tokens=args.new_tokens)
        result["chat_sampled"] = run_set(gen, proposers, chats, lambda i: replace(base, seed=i), False, "chat sampled")
        result["chat_sampled_settings"] = {
            "temperature": base.temperature,
            "top_k": base.top_k,
            "top_p": base.top_p,
            "repetition_penalty": base.repetition_penalty,
        }

    print(f"\n{bundle.name} — {cpu}, threads={args.threads or 'default'}, {args.new_tokens} new tokens")
    print(
        f"{'set':16s} {'draft':9s} {'decode tok/s':>12s} {'vs plain':>9s} {'accepted':>9s} {'differ':>7s}  "
        f"(differ: greedy outputs not identical to plain at the same step width, of {len(wiki)} / {len(chats)})"
    )
    for key in ("wikitext_greedy", "chat_greedy", "chat_sampled"):
        for name, r in result.get(key, {}).items():
            rate = f"{100 * r['acceptance_rate']:.0f} %" if r["acceptance_rate"] is not None else "-"
            differ = r.get("outputs_differing_from_plain", "-")
            if r.get("first_differing_token"):
                differ = f"{differ} (from token {min(r['first_differing_token'])})"
            print(
                f"{key:16s} {name:9s} {r['decode_tokens_per_s']:12.1f} {r['speedup']:8.2f}x {rate:>9s} {differ!s:>7s}"
            )
    if args.json:
        from runtime.fileio import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
