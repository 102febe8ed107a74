"""Quantization only, apples to apples: edgepack's int4 exports against llama.cpp's quantizer, from the same
float32 weights, scored on the same tokens against that float32 source with the full vocabulary.

    python benchmarks/quant_vs_llamacpp.py --source models/SmolLM2-135M-Instruct --out models/quantcmp/raw \\
        [--variant grid --variant rtn32 --variant fp32] [--run gptq=WORKDIR --run eora=WORKDIR] \\
        [--llamacpp /work/benchenv/llama.cpp-build/bin --convert .../convert_hf_to_gguf.py \\
         --bench-python /work/benchenv/venv/bin/python --quants Q4_0,Q4_K_M,Q5_K_M,Q8_0 --imatrix] \\
        [--gguf NAME=FILE] [--windows 6 --ctx 256 --chat-prompts 16 --decode-tokens 64] [--plot docs/quant.png]

What each row is:
- edgepack `--variant`: an ONNX graph built from the source's own weights with the shipping options (int8
  embedding and head, int8-activation MatMulNBits): `grid` = grid-exact projections where the weights lie on a
  4-bit block grid (exporter.int4.find_block_grid), RTN block 32 elsewhere; `rtn32` / `rtn32-asym` = RTN block
  32 with the grid ignored; `fp32` = float projections (the graph's own floor: int8 head only).
- edgepack `--run NAME=WORKDIR`: a finished pipeline run whose stages are GPTQ (and EoRA) only, exported as
  `edgepack export` would (exporter.export.build_onnx).
- llama.cpp: convert_hf_to_gguf.py (F32) then llama-quantize, with and without an importance matrix
  (llama-imatrix on the same WikiText-2 valid calibration text), scored by llama-cpp-python.

Columns: weight bytes (the ONNX data / GGUF file, what a decode step reads), decode tokens/s (greedy, one
sequence, same threads, one engine after another in this run), WikiText-2 test PPL on the windows, full-
vocabulary KL(source || model) and top-1 agreement per token, and chat fidelity (runtime.harness.eval_chat on the
source's greedy replies: top-32 KL lower bound, top-1, share of replies whose first 32 tokens match). Each row
is measured in its own process and cached in OUT/results.json (a rerun measures only what is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from runtime.bench import cpu_name  # noqa: E402

VARIANTS = ("grid", "rtn32", "rtn32-asym", "fp32")


# ------------------------------------------------------------------------------------------ source reference
def prepare(source: Path, out: Path, windows: int, ctx: int, chat_prompts: int) -> None:
    """OUT/windows.npy, OUT/source_logp.npy (full log-probs [W, ctx, V], float32) and OUT/chat.npz."""
    from runtime.datasets import wikitext_eval_text
    from runtime.metrics import perplexity_windows
    from runtime.tokenizer import TextTokenizer

    out.mkdir(parents=True, exist_ok=True)
    if (out / "source_logp.npy").exists() and (out / "chat.npz").exists():
        return
    from compressor.chat_reference import chat_reference_for
    from compressor.torch_backend import TorchBackend, load_causal_lm
    from runtime.harness import EvalLimits

    tok = TextTokenizer(source)
    ids = perplexity_windows(tok.encode(wikitext_eval_text("wikitext2-test")), ctx, windows)
    backend = TorchBackend(load_causal_lm(source), pad_id=tok.pad_id)
    logp = np.lib.format.open_memmap(out / "source_logp.tmp.npy", "w+", np.float32, (len(ids), ctx, tok.vocab_size))
    for w in range(len(ids)):
        logp[w] = backend.log_probs(ids[w : w + 1])[0, :, : tok.vocab_size]
    logp.flush()
    del logp
    np.save(out / "windows.npy", ids)
    os.replace(out / "source_logp.tmp.npy", out / "source_logp.npy")
    limits = EvalLimits(chat_prompts=chat_prompts)
    chat = chat_reference_for(source, out, limits, tok)
    np.savez(
        out / "chat.npz",
        **{k: getattr(chat, k) for k in ("tokens", "prompt_lens", "reply_lens", "top_ids", "top_logp")},
    )


# ------------------------------------------------------------------------------------------ building models
def build_variant(source: Path, variant: str, dest: Path) -> Path:
    from safetensors.numpy import load_file

    from exporter.export import shipping_graph
    from exporter.onnx_graph import build_decoder, spec_from_hf_config
    from runtime.fileio import read_json

    path = dest / "model.onnx"
    if path.exists():
        return path
    weights = {}
    for f in sorted(source.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    config = read_json(source / "config.json")
    opts = shipping_graph()
    opts.projections = "keep" if variant == "fp32" else "int4"
    opts.grid_exact = variant == "grid"
    from exporter import onnx_graph

    original = onnx_graph.quantize_rtn
    if variant == "rtn32-asym":  # the projections only: the int8 embedding/head and EoRA ask for symmetric=True
        onnx_graph.quantize_rtn = lambda w, bits=4, block_size=32, symmetric=False: original(
            w, bits, block_size, symmetric
        )
    try:
        build_decoder(weights, spec_from_hf_config(config, weights), path, opts, progress=False)
    finally:  # builds run in this process one after another: never leak the patch into the next one
        onnx_graph.quantize_rtn = original
    return path


def build_run(workdir: Path, dest: Path, eora: bool = True) -> Path:
    """The ONNX graph `edgepack export` makes of a finished GPTQ(+EoRA) run; eora=False leaves EoRA out."""
    from compressor.workdir import Workdir
    from exporter.export import ExportOptions, build_onnx

    path = dest / "onnx" / "model.onnx"
    if not path.exists():
        summary = Workdir(workdir).summary()
        if not eora:
            summary = dict(summary, stages=[s for s in summary["stages"] if s["stage"] != "eora"])
        build_onnx(workdir, summary, dest, ExportOptions())
    return path


def make_ggufs(args, out: Path) -> dict[str, Path]:
    """F32 GGUF by llama.cpp's converter, then each quant type, plain and with an importance matrix."""
    bin_dir, made = Path(args.llamacpp), {}
    f32 = out / "gguf" / "source-F32.gguf"
    f32.parent.mkdir(parents=True, exist_ok=True)
    if not f32.exists():
        run([args.bench_python, args.convert, str(args.source), "--outtype", "f32", "--outfile", str(f32)])
    imatrix = out / "gguf" / "imatrix.dat"
    if args.imatrix and not imatrix.exists():
        from runtime.datasets import calibration_text

        calib = out / "gguf" / "calibration.txt"
        calib.write_text(calibration_text("wikitext2-valid"))
        run([str(bin_dir / "llama-imatrix"), "-m", str(f32), "-f", str(calib), "-o", str(imatrix), "-c", "512",
             "--chunks", "32", "-t", str(args.threads)])  # fmt: skip
    for q in args.quants.split(","):
        for tag, extra in [("", [])] + ([("-imat", ["--imatrix", str(imatrix)])] if args.imatrix else []):
            if q in ("Q8_0",) and tag:
                continue  # Q8_0 does not use an importance matrix
            dst = out / "gguf" / f"source-{q}{tag}.gguf"
            if not dst.exists():
                run([str(bin_dir / "llama-quantize"), *extra, str(f32), str(dst), q, str(args.threads)])
            made[f"llama.cpp {q}{tag}"] = dst
    return made


def run(cmd: list[str]) -> None:
    print("  $ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


# ------------------------------------------------------------------------------------------ measuring one model
def measure(kind: str, target: str, out: Path, threads: int, chat_prompts: int, decode_tokens: int) -> dict:
    from runtime.harness import EvalLimits, eval_chat
    from runtime.reference import ChatReference

    ids = np.load(out / "windows.npy")
    ref = np.load(out / "source_logp.npy", mmap_mode="r")
    if kind == "edgepack":
        from runtime.onnx_engine import OnnxDecoder

        backend = OnnxDecoder(Path(target), threads=threads, pad_id=0)
        size = sum(p.stat().st_size for p in Path(target).parent.glob("model.onnx*"))
    else:
        from engine_quality import LlamaCppBackend

        backend = LlamaCppBackend(Path(target), threads, 1024)
        size = Path(target).stat().st_size
    kl = top1 = nll = 0.0
    n = 0
    for w in range(len(ids)):
        logq = backend.log_probs(ids[w : w + 1])[0, :-1].astype(np.float64)
        logp = np.asarray(ref[w, :-1], np.float64)
        kl += float((np.exp(logp) * (logp - logq[:, : logp.shape[1]])).sum())
        top1 += float((logp.argmax(-1) == logq.argmax(-1)).sum())
        nll -= float(logq[np.arange(len(logq)), ids[w, 1:]].sum())
        n += len(logq)
    chat = ChatReference(**dict(np.load(out / "chat.npz")))
    c = eval_chat(backend, EvalLimits(chat_prompts=min(chat_prompts, chat.count)), chat, progress=False)
    speed = decode_speed(kind, target, backend, threads, ids[0, :32].tolist(), decode_tokens)
    return {
        "bytes": size,
        "decode_tok_s": speed,
        "ppl": float(np.exp(nll / n)),
        "kl": kl / n,
        "top1": top1 / n,
        "tokens": n,
        "chat_kld": c["kld"],
        "chat_top1": c["top1"],
        "chat_match32": c["match32"],
        "chat_replies": c["replies"],
    }


def decode_speed(kind: str, target: str, backend, threads: int, prompt: list[int], n: int) -> float:
    if kind == "edgepack":
        backend.reset()
        logits = backend.prefill(prompt)
        t0 = time.perf_counter()
        for _ in range(n):
            logits = backend.decode(int(np.argmax(logits)))
        return n / (time.perf_counter() - t0)
    from llama_cpp import Llama

    llm = Llama(model_path=target, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.eval(prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return n / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ report
def table(results: dict, source: str) -> str:
    lines = [
        f"Source: {source} (float32). CPU: {cpu_name()}, {os.cpu_count()} cores.",
        "| model | MB | decode tok/s | PPL | KL full | top-1 | chat KL (top-32) | chat top-1 | chat match 32 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in sorted(results.items(), key=lambda kv: kv[1]["bytes"]):
        lines.append(
            f"| {name} | {r['bytes'] / 1e6:.1f} | {r['decode_tok_s']:.1f} | {r['ppl']:.3f} | {r['kl']:.4f} | "
            f"{100 * r['top1']:.1f} % | {r['chat_kld']:.4f} | {100 * r['chat_top1']:.1f} % | "
            f"{100 * r['chat_match32']:.0f} % |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        colour = "tab:blue" if name.startswith("edgepack") else "tab:orange"
        ax.scatter(r["bytes"] / 1e6, max(r["kl"], 1e-5), color=colour)
        ax.annotate(name.split(" ", 1)[-1], (r["bytes"] / 1e6, max(r["kl"], 1e-5)), fontsize=7)
    ax.set_xlabel("weight MB (what a decode step reads)")
    ax.set_ylabel("full-vocabulary KL vs float32 source (log)")
    ax.set_yscale("log")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variant", action="append", default=[], choices=VARIANTS)
    ap.add_argument("--run", action="append", default=[], help="NAME=WORKDIR of a GPTQ(+EoRA)-only pipeline run")
    ap.add_argument("--run-gptq-only", action="append", default=[], help="NAME=WORKDIR, exported without EoRA")
    ap.add_argument("--gguf", action="append", default=[], help="NAME=FILE of a ready GGUF")
    ap.add_argument("--llamacpp", help="directory with llama-quantize (and llama-imatrix)")
    ap.add_argument("--convert", help="llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--bench-python", help="python with llama-cpp-python (and the converter's needs)")
    ap.add_argument("--quants", default="Q4_0,Q4_K_M,Q5_K_M,Q8_0")
    ap.add_argument("--imatrix", action="store_true")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chat-prompts", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--measure", nargs=2, metavar=("KIND", "TARGET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        r = measure(*args.measure, args.out, args.threads, args.chat_prompts, args.decode_tokens)
        print(json.dumps(r))
        return 0

    prepare(args.source, args.out, args.windows, args.ctx, args.chat_prompts)
    plan = [(f"edgepack {v}", "edgepack", lambda v=v: build_variant(args.source, v, args.out / "onnx" / v), sys.executable)
            for v in args.variant]  # fmt: skip
    for spec in args.run_gptq_only:
        name, _, wd = spec.partition("=")
        build = lambda n=name, w=wd: build_run(Path(w), args.out / "runs" / n, eora=False)  # noqa: E731
        plan.append((f"edgepack {name}", "edgepack", build, sys.executable))
    for spec in args.run:
        name, _, wd = spec.partition("=")
        plan.append(
            (
                f"edgepack {name}",
                "edgepack",
                lambda n=name, w=wd: build_run(Path(w), args.out / "runs" / n),
                sys.executable,
            )
        )
    ggufs = {n: Path(p) for n, _, p in (s.partition("=") for s in args.gguf)}
    if args.llamacpp and args.convert and args.bench_python:
        ggufs.update(make_ggufs(args, args.out))
    plan += [(name, "llamacpp", lambda p=p: p, args.bench_python or sys.executable) for name, p in ggufs.items()]

    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name, kind, make, python in plan:
        if name in results:
            continue
        target = make()
        print(f"  measuring {name} ...", file=sys.stderr, flush=True)
        cmd = [python, str(Path(__file__).resolve()), "--source", str(args.source), "--out", str(args.out),
               "--threads", str(args.threads), "--chat-prompts", str(args.chat_prompts),
               "--decode-tokens", str(args.decode_tokens), "--measure", kind, str(target)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"  {name} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, results_path)
    print(table(results, str(args.source)))
    if args.plot and results:
        plot(results, args.plot, f"quantization only, from {'/'.join(args.source.parts[-3:])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
