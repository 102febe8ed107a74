"""Quality of the models the decode benchmark races, on one protocol: WikiText-2 perplexity, KL divergence and
top-1 agreement against the source model, on the bundle's own reference windows (standard limits: 40 × 512
tokens, the same token ids for every engine), with runtime.harness doing the scoring for all of them.

    python benchmarks/engine_quality.py BUNDLE [--extra-bundle B2] [--gguf Q4_1.gguf --gguf Q4_0.gguf] \\
        [--genai-dir GENAI_INT4_DIR] --bench-python BENCH_VENV/bin/python [--json OUT]

Speed without quality says little: onnxruntime-genai's default int4 build and a GGUF are different models
from an edgepack bundle (no pruning, other quantizers, an int4 LM head), so this puts a number on what each
one's speed costs. Backends, each in its own process:

- edgepack bundle: the runtime's own OnnxDecoder.
- onnxruntime-genai build: its ONNX graph run with plain onnxruntime (attention_mask in, empty KV cache,
  logits at every position), which is what genai's generator feeds it.
- llama.cpp GGUF: llama-cpp-python with logits for every position (benchmark environment only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the runtime's harness and metrics score every engine


class GenaiGraphBackend:
    """An onnxruntime-genai builder model (input_ids + attention_mask + past KV -> logits), run directly."""

    def __init__(self, model_dir: Path, threads: int | None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
        self.past = [
            (i.name, decoder["num_key_value_heads"], decoder["head_size"])
            for i in self.session.get_inputs()
            if i.name.startswith("past_key_values.")
        ]

    def log_probs(self, ids: np.ndarray) -> np.ndarray:
        b, t = ids.shape
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, t), np.int64)}
        for name, heads, dim in self.past:
            feeds[name] = np.zeros((b, heads, 0, dim), np.float32)
        from runtime.metrics import log_softmax

        return log_softmax(self.session.run(["logits"], feeds)[0])


class LlamaCppBackend:
    """A GGUF through llama-cpp-python, logits kept for every position of each window."""

    def __init__(self, gguf: Path, threads: int | None, ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(gguf),
            n_ctx=ctx,
            n_batch=ctx,
            logits_all=True,
            verbose=False,
            n_threads=threads or os.cpu_count(),
            n_threads_batch=threads or os.cpu_count(),
        )

    def log_probs(self, ids: np.ndarray) -> np.ndarray:
        from runtime.metrics import log_softmax

        rows = []
        for row in ids:
            self.llm.reset()
            self.llm.eval([int(t) for t in row])
            rows.append(log_softmax(np.asarray(self.llm.scores[: len(row)], np.float32)))
        return np.stack(rows)


def measure(kind: str, target: str, bundle: str, threads: int | None) -> dict:
    """PPL / KLD / top-1 of one engine's model on the bundle's reference windows (runs inside a subprocess)."""
    from runtime.harness import PRESETS, eval_perplexity
    from runtime.reference import Reference
    from runtime.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(Path(bundle) / "tokenizer")
    reference = Reference.load(Path(bundle) / "reference" / "reference.safetensors")
    limits = PRESETS["standard"]
    if kind == "edgepack":
        from runtime.onnx_engine import OnnxDecoder

        backend = OnnxDecoder(Path(target) / "onnx" / "model.onnx", threads=threads, pad_id=tokenizer.pad_id)
    elif kind == "genai":
        backend = GenaiGraphBackend(Path(target), threads)
    elif kind == "llamacpp":
        backend = LlamaCppBackend(Path(target), threads, int(reference.window_ids.shape[1]))
    else:
        raise ValueError(kind)
    out = eval_perplexity(backend, tokenizer, limits, progress=False, reference=reference)
    return {k: out[k] for k in ("ppl", "kld", "top1", "windows", "ctx", "tokens", "reference_k")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", help="the bundle whose reference windows and tokenizer everyone is scored on")
    ap.add_argument("--extra-bundle", action="append", default=[])
    ap.add_argument("--gguf", action="append", default=[])
    ap.add_argument("--genai-dir")
    ap.add_argument("--bench-python", help="python of the environment with llama-cpp-python")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--measure", nargs=2, metavar=("KIND", "TARGET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], args.bundle, args.threads or None)))
        return 0

    plan = [("edgepack", b, sys.executable) for b in [args.bundle, *args.extra_bundle]]
    if args.genai_dir:
        plan.append(("genai", args.genai_dir, sys.executable))
    plan += [("llamacpp", g, args.bench_python) for g in args.gguf if args.bench_python]
    results = {}
    for kind, target, python in plan:
        print(f"  {kind} {Path(target).name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [
                python,
                str(Path(__file__).resolve()),
                args.bundle,
                "--measure",
                kind,
                str(target),
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            print(f"  {kind} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
            continue
        results[f"{kind} {Path(target).name}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    first = next(iter(results.values()), None)
    if first:
        print(
            f"WikiText-2, {first['windows']} windows × {first['ctx']} = {first['tokens']} scored tokens; KL and top-1 "
            f"vs the source model (top-{first['reference_k']} reference of {Path(args.bundle).name})"
        )
    print("| engine | model | PPL | KLD vs source | top-1 vs source |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, r in results.items():
        kind, model = name.split(" ", 1)
        print(f"| {kind} | {model} | {r['ppl']:.2f} | {r['kld']:.3f} | {100 * r['top1']:.1f} % |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
