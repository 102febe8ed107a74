"""Compare LoRA recovery variants against their source on what a chat user sees and on WikiText (torch, fp32).

    python benchmarks/lora_recovery_compare.py SOURCE NAME=CHECKPOINT [NAME=CHECKPOINT ...]
        [--chat-prompts 32] [--ppl-windows 16] [--workdir DIR] [--json OUT.json]

Chat: the harness's chat fidelity metric (runtime.harness.eval_chat, issue #18 part A) at standard limits (32
user-oriented instructions; none of them is a LoRA training prompt, which come from the self-instruct seed
tasks): KL(source || model) (top-32 lower bound) and top-1 agreement per reply token on the source's greedy
replies, and the share of replies whose first 32 tokens the model reproduces greedily.
WikiText: perplexity and full-vocabulary KL / top-1 vs the source on N windows of 512 tokens of the test split
(the source resident beside each checkpoint, its logits recomputed per checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def logits_of(model, rows: list[list[int]], pad_id: int):
    """Right-padded batch -> float32 logits [B, T, V] (padding masked)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()


def compare_positions(src_logits, logits, positions):
    """(sum KL(src || model), top-1 agreements, argmax-equal flags) at `positions` (list of (row, t))."""
    import torch

    rows = torch.tensor([p[0] for p in positions])
    cols = torch.tensor([p[1] for p in positions])
    ls, lm = src_logits[rows, cols].log_softmax(-1), logits[rows, cols].log_softmax(-1)
    kl = (ls.exp() * (ls - lm)).sum(-1)
    same = ls.argmax(-1) == lm.argmax(-1)
    return kl, same


def wikitext_scores(source, model, windows, batch: int = 4) -> dict:
    import math

    import torch

    nll, kls, agree = 0.0, [], []
    count = 0
    for start in range(0, len(windows), batch):
        rows = windows[start : start + batch]
        src, out = logits_of(source, rows, 0), logits_of(model, rows, 0)
        targets = torch.tensor([r[1:] for r in rows])
        lm = out[:, :-1].log_softmax(-1)
        nll -= float(lm.gather(-1, targets[..., None]).sum())
        count += targets.numel()
        positions = [(i, t) for i in range(len(rows)) for t in range(len(rows[0]) - 1)]
        kl, same = compare_positions(src, out, positions)
        kls.append(kl)
        agree.append(same)
    return {
        "wikitext_ppl": round(math.exp(nll / count), 3),
        "wikitext_kld": round(float(torch.cat(kls).mean()), 4),
        "wikitext_top1": round(float(torch.cat(agree).float().mean()), 4),
    }


def main() -> int:
    import torch

    from compressor.chat_reference import chat_reference_for
    from compressor.torch_backend import TorchBackend, load_causal_lm
    from runtime.datasets import wikitext_eval_text
    from runtime.harness import eval_chat, limits_from
    from runtime.metrics import perplexity_windows
    from runtime.tokenizer import TextTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("models", nargs="+", help="NAME=CHECKPOINT_DIR")
    ap.add_argument("--chat-prompts", type=int, default=32)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument(
        "--workdir", default="/tmp/edgepack-lora-compare", help="where the source's chat reference is cached"
    )
    ap.add_argument("--skip-source", action="store_true", help="no row for the source itself (KL 0 by definition)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)

    tok = TextTokenizer(args.source)
    limits = limits_from("standard", chat_prompts=args.chat_prompts)
    chat = chat_reference_for(Path(args.source), Path(args.workdir), limits, tok)
    windows = perplexity_windows(tok.encode(wikitext_eval_text("wikitext2-test")), 512, args.ppl_windows)
    windows = [list(map(int, w)) for w in windows]
    source = load_causal_lm(args.source).eval()
    results = {}
    for spec in ([] if args.skip_source else [f"source={args.source}"]) + args.models:
        name, _, path = spec.partition("=")
        t0 = time.perf_counter()
        model = source if path == args.source else load_causal_lm(path).eval()
        c = eval_chat(TorchBackend(model, pad_id=tok.pad_id), limits, chat, progress=False)
        row = {"checkpoint": path, "chat_kld": c["kld"], "chat_top1": c["top1"], "chat_match32": c["match32"]}
        row.update(wikitext_scores(source, model, windows))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = row
        print(name, json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
