"""Chat fidelity of checkpoints, ONNX files and bundles against their source (issue #18's metric), one table.

    python benchmarks/chat_fidelity.py --source models/SmolLM2-135M-Instruct --workdir /tmp/chatfid \
        --limits standard --checkpoint w18=models/runs/RUN/01-width/model --export-onnx --bundle main=models/bundles/B

The source's greedy replies come from compressor.chat_reference (cached in --workdir); every model is scored
with runtime.harness.eval_chat (teacher-forced KL, top-1, share of replies whose first 32 tokens it
reproduces). --export-onnx adds the source exported with the shipping graph (int4 projections, grid-exact where
the weights sit on a 4-bit grid, else RTN block 32; int8 embedding and head; int8 activations): the export
alone, no pruning. --show prints each model's free greedy reply to --say. Prints the CPU; run it under the
heavy lock.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from runtime.bench import cpu_name
from runtime.harness import PRESETS, eval_chat, limits_from


def named(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for item in items:
        name, _, path = item.partition("=")
        out.append((name, Path(path)) if path else (Path(name).name, Path(name)))
    return out


def export_onnx(source: Path, out: Path) -> Path:
    from dataclasses import replace

    from safetensors.numpy import load_file

    from exporter.export import shipping_graph
    from exporter.onnx_graph import build_decoder, spec_from_hf_config
    from runtime.fileio import read_json

    path = out / "shipping-graph" / "model.onnx"
    if not path.exists():
        weights = {}
        for f in sorted(source.glob("*.safetensors")):
            weights.update(load_file(str(f)))
        spec = spec_from_hf_config(read_json(source / "config.json"), weights)
        build_decoder(weights, spec, path, replace(shipping_graph(), gptq=None), progress=False)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, type=Path)
    ap.add_argument("--workdir", required=True, type=Path, help="cache of the source's replies and built graphs")
    ap.add_argument("--limits", default="standard", choices=list(PRESETS))
    ap.add_argument("--chat-prompts", type=int)
    ap.add_argument("--checkpoint", action="append", default=[], help="NAME=HF directory (torch)")
    ap.add_argument("--bundle", action="append", default=[], help="NAME=bundle directory or archive (onnxruntime)")
    ap.add_argument("--export-onnx", action="store_true", help="also the source exported with the shipping graph")
    ap.add_argument("--say", default="Give me three tips for staying healthy.", help="instruction for --show")
    ap.add_argument("--show", action="store_true", help="print every model's greedy reply to --say")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from compressor.chat_reference import chat_reference_for
    from compressor.torch_backend import TorchBackend, load_causal_lm
    from runtime.onnx_engine import OnnxDecoder
    from runtime.tokenizer import TextTokenizer

    limits = limits_from(args.limits, chat_prompts=args.chat_prompts)
    args.workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = TextTokenizer(args.source)
    t0 = time.perf_counter()
    chat = chat_reference_for(args.source, args.workdir, limits, tokenizer)
    gen_s = time.perf_counter() - t0
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores); limits {limits.describe()}")
    print(f"source replies: {chat.count} prompts, {int(chat.reply_lens.sum())} tokens ({gen_s:.0f} s incl. cache)")

    models = [("source (torch)", lambda: TorchBackend(load_causal_lm(args.source), pad_id=tokenizer.pad_id))]
    for name, path in named(args.checkpoint):
        models.append((f"{name} (torch)", lambda p=path: TorchBackend(load_causal_lm(p), pad_id=tokenizer.pad_id)))
    if args.export_onnx:
        models.append(
            (
                "source RTN int4 (onnx)",
                lambda: OnnxDecoder(export_onnx(args.source, args.workdir), pad_id=tokenizer.pad_id),
            )
        )
    for name, path in named(args.bundle):
        from runtime.bundle import Bundle

        models.append((f"{name} (bundle)", lambda p=path: Bundle.open(p).decoder()))

    prompt = tokenizer.encode_chat([{"role": "user", "content": args.say}])
    stops = {tokenizer.eos_id}
    rows = []
    print(f"\n| model | match32 % | top-1 % | KL (top-{chat.k}) | reply tokens | seconds |")
    print("|---|---|---|---|---|---|")
    for name, make in models:
        backend = make()
        r = eval_chat(backend, limits, chat, progress=False)
        print(
            f"| {name} | {100 * r['match32']:.1f} | {100 * r['top1']:.1f} | {r['kld']:.4f} | {r['tokens']} | "
            f"{r['seconds']:.0f} |"
        )
        if args.show:
            r["say"] = tokenizer.decode(backend.greedy([prompt], 48, stops)[0])
        rows.append({"model": name, **r})
        del backend
    if args.show:
        print(f"\nGreedy replies to {args.say!r} (48 tokens max):")
        for r in rows:
            print(f"- {r['model']}: {r['say']!r}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "limits": limits.describe(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
