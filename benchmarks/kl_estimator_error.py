"""How far the bundle's compact top-k KL estimate is from the full KL, on the real model.

    python benchmarks/kl_estimator_error.py [--windows 2] [--run models/runs/W1-8_lora_wikitext_quant_eora]

Compares the source model with the final (EoRA) model of a run on the first WikiText-2 test windows (ctx 512)
and prints the full KL(P_source || Q) next to the top-k estimate for several k.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from compressor.stages import load_stage_model
    from compressor.torch_backend import TorchBackend, load_causal_lm
    from runtime import metrics
    from runtime.datasets import wikitext_eval_text
    from runtime.fileio import read_json
    from runtime.tokenizer import TextTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--run", default="models/runs/W1-8_lora_wikitext_quant_eora")
    ap.add_argument("--windows", type=int, default=2)
    args = ap.parse_args()
    tok = TextTokenizer(args.source)
    w = metrics.perplexity_windows(tok.encode(wikitext_eval_text()), 512, args.windows)
    p = TorchBackend(load_causal_lm(args.source)).log_probs(w)[:, :-1].reshape(-1, tok.vocab_size)
    final = sorted(Path(args.run).glob("[0-9][0-9]-*"))[-1]
    stage = final.name.split("-", 1)[1]
    q = TorchBackend(load_stage_model(stage, final, read_json(final / "record.json"))).log_probs(w)
    q = q[:, :-1].reshape(-1, q.shape[-1])
    full = metrics.kl_divergence(p, q).mean()
    print(f"{args.windows} windows x 512, {stage} model of {args.run}: full KL {full:.4f}")
    for k in (8, 32, 128):
        ids, lp = metrics.topk_reference(p, k)
        est = metrics.topk_kl(ids, lp, q).mean()
        print(f"  top-{k:<3d} estimate {est:.4f}  ({100 * (est / full - 1):+.0f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
