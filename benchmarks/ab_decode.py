"""Interleaved A/B decode timing of two or more bundles in one process: each round decodes every bundle once,
so slow drifts of a shared machine (memory bandwidth, neighbours) hit all of them alike. Use it to compare
export variants of the same model; bench_decode.py is the cross-engine benchmark.

    python benchmarks/ab_decode.py BUNDLE_A BUNDLE_B [--rounds 10] [--threads 2]
    python benchmarks/ab_decode.py A/model.onnx B/model.onnx --tokenizer MODEL_DIR   # bare decoder graphs

Each round: fresh cache, prefill the same 128 prompt tokens, 128 greedy decode steps. Prints the median,
min and max tokens/s per bundle and each bundle's median relative to the first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from runtime.bench import bench_prompt
    from runtime.bundle import Bundle
    from runtime.onnx_engine import OnnxDecoder
    from runtime.tokenizer import TextTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--tokenizer", help="tokenizer directory for the prompt when no bundle is given")
    args = ap.parse_args()
    decoders, tokenizer = [], None
    for path in args.bundles:  # a bundle, or a bare decoder graph such as quant_vs_llamacpp.py's exports
        if path.endswith(".onnx"):
            decoders.append(OnnxDecoder(Path(path), threads=args.threads, pad_id=0))
        else:
            bundle = Bundle.open(path)
            decoders.append(bundle.decoder(args.threads))
            tokenizer = tokenizer or bundle.tokenizer
    if tokenizer is None:
        if not args.tokenizer:
            ap.error("--tokenizer DIR is needed when every argument is a bare .onnx graph")
        tokenizer = TextTokenizer(args.tokenizer)
    prompt = bench_prompt(tokenizer, args.prompt_tokens)
    rates: list[list[float]] = [[] for _ in decoders]
    for _ in range(args.rounds + 1):  # the first round is the warm-up
        for i, dec in enumerate(decoders):
            dec.reset()
            token = int(dec.prefill(prompt).argmax())
            t0 = time.perf_counter()
            for _ in range(args.new_tokens):
                token = int(dec.decode(token).argmax())
            rates[i].append(args.new_tokens / (time.perf_counter() - t0))
    first = statistics.median(rates[0][1:])
    print(
        f"{args.rounds} interleaved rounds, {args.prompt_tokens} prompt + {args.new_tokens} greedy tokens, "
        f"threads={args.threads or 'default'}"
    )
    for path, r in zip(args.bundles, rates):
        med = statistics.median(r[1:])
        print(f"  {path:45s} decode {med:6.1f} tok/s (min {min(r[1:]):.0f}, max {max(r[1:]):.0f})  {med / first:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
