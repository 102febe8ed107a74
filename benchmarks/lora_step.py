"""LoRA training steps on a real checkpoint: seconds per step, peak RSS, user vs system CPU time and page
faults of this process, for the loss as shipped (chunked LM head) or the old full-vocabulary logits.

    python benchmarks/lora_step.py MODEL_DIR [--steps 6] [--loss chunked|full] [--objective lm|distill]
        [--teacher SOURCE_DIR] [--malloc retain|default] [--json OUT.json]

The LoRA settings are the recipe's defaults (the main job's `lora=wikitext`: rank 8 on q/k/v/o, batch 8 x 256
tokens of WikiText valid); `--loss full` swaps in the pre-#12 loss (F.cross_entropy over [B, T, V] float32
logits) to measure the "before"; `--malloc default`
leaves glibc's trimming on (compressor.allocator). The first step is a warm-up and is left out of the step times. Run under
`/usr/bin/time -v` for the kernel's view too; run nothing else heavy beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.bench import cpu_name  # noqa: E402


def full_logits_nll_sum(model, batch):
    """The loss before the chunked one (kept here only to measure the difference)."""
    import torch.nn.functional as F

    from compressor.lora import IGNORE

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return nll, int((targets != IGNORE).sum())


def usage() -> dict:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "user_s": r.ru_utime,
        "system_s": r.ru_stime,
        "minor_faults": r.ru_minflt,
        "peak_rss_mb": r.ru_maxrss / 1024,
    }


def main() -> int:
    import torch

    from compressor import lora as L
    from compressor.recipe import LoraStage
    from compressor.torch_backend import load_causal_lm
    from compressor.training_data import wikitext_examples
    from runtime.tokenizer import TextTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--loss", choices=["chunked", "full"], default="chunked")
    ap.add_argument("--objective", choices=["lm", "distill"], default="lm")
    ap.add_argument("--teacher", help="teacher checkpoint for --objective distill (default: the model itself)")
    ap.add_argument("--malloc", choices=["retain", "default"], default="retain", help="default: glibc as it comes")
    ap.add_argument("--json")
    args = ap.parse_args()

    if args.malloc == "default":
        L.retained_freed_memory = lambda: contextlib.nullcontext(False)

    if args.loss == "full":
        L.nll_sum = full_logits_nll_sum
    step_times: list[float] = []
    accumulate = L._accumulate_gradients

    def timed(*a, **k):
        t = time.perf_counter()
        out = accumulate(*a, **k)
        step_times.append(time.perf_counter() - t)
        return out

    L._accumulate_gradients = timed
    stage = LoraStage(objective=args.objective)
    tokenizer = TextTokenizer(args.model)
    train, _, _ = wikitext_examples(tokenizer, stage.seqlen, stage.samples)
    settings = L.LoraTraining.for_examples(stage, len(train), tokenizer.pad_id)
    settings.steps = settings.eval_every = settings.checkpoint_every = args.steps
    model = load_causal_lm(args.model)
    teacher = load_causal_lm(args.teacher or args.model) if args.objective == "distill" else None
    before = usage()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        L.train_lora(model, train, [], settings, tmp, teacher=teacher)
    wall = time.perf_counter() - t0
    after = usage()
    steady = step_times[1:] or step_times
    result = {
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "loss": args.loss,
        "malloc": args.malloc,
        "objective": args.objective,
        "steps": args.steps,
        "batch": f"{stage.batch_size} x {stage.seqlen} tokens",
        "s_per_step_median": round(statistics.median(steady), 2),
        "s_per_step_first": round(step_times[0], 2),
        "train_wall_s": round(wall, 1),
        "train_user_s": round(after["user_s"] - before["user_s"], 1),
        "train_system_s": round(after["system_s"] - before["system_s"], 1),
        "train_minor_faults": after["minor_faults"] - before["minor_faults"],
        "peak_rss_mb": round(after["peak_rss_mb"]),
    }
    result["system_share"] = round(
        result["train_system_s"] / max(result["train_user_s"] + result["train_system_s"], 1e-9), 3
    )
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
