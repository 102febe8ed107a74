"""Would training GPTQ's group scales along with EoRA's factors lower KL further? (issue #18, a byte-free lever)

    python benchmarks/eora_scale_tuning.py WORKDIR --quantcmp models/quantcmp/w18distill \\
        --adapter WORKDIR/04-eora/adapter --scale-lr 1e-4 [--steps 32 --eora-lr 2e-4]

WORKDIR: a finished run with GPTQ (its input is the float teacher) whose EoRA fit is --adapter; --quantcmp: a
`benchmarks/quant_vs_llamacpp.py --out` directory (WikiText windows + the float source's full log-probs). The
int4 codes and zero points stay fixed; each group's scale s becomes s·exp(u) with u trained (0 at the start),
together with every EoRA A and B, to minimise KL(float || model) on the recipe's 64 calibration rows of 512
tokens (56 trained in batches of 4 with a short warm-up and a cosine schedule, 8 held out). `--scale-lr 0`
trains EoRA alone with the same loop, the baseline. Printed: held-out KL every 8 steps and full-vocabulary KL
on the windows before and after (torch; the ONNX graph's runs ~0.004 higher). The stored scales stay fp32 in
the ONNX graph, so a win here would cost no bytes.

Written by hand: gptqmodel and peft train no GPTQ scales; the loop is a plain AdamW loop, shorter than
compressor.lora's trainer because nothing here is shipped.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mixed_precision_bound import window_kl  # noqa: E402


class ScaledInt4Linear(torch.nn.Module):
    """y = x·(q - z)·(s·exp(u))ᵀ + x·Aᵀ·Bᵀ: a GPTQ projection with trainable log-scale offsets u and EoRA."""

    def __init__(self, tensors: dict, name: str, a: torch.Tensor, b: torch.Tensor, zero_offset: int):
        super().__init__()
        from compressor.gptq import unpack_int32

        scales = tensors[f"{name}.scales"].float()
        q = unpack_int32(tensors[f"{name}.qweight"], 4, dim=0).float()
        z = unpack_int32(tensors[f"{name}.qzeros"], 4, dim=1)[:, : scales.shape[1]].float() + zero_offset
        groups = tensors[f"{name}.g_idx"].long()
        self.register_buffer("codes", (q[: groups.numel()] - z[groups]).t().contiguous())  # [out, in]
        self.register_buffer("scales", scales.t().contiguous())  # [out, groups]
        self.register_buffer("groups", groups)
        self.log_scale = torch.nn.Parameter(torch.zeros_like(self.scales))
        self.A = torch.nn.Parameter(a.clone())
        self.B = torch.nn.Parameter(b.clone())

    def forward(self, x):
        w = self.codes * (self.scales * torch.exp(self.log_scale))[:, self.groups]
        return x @ w.t() + (x @ self.A.t()) @ self.B.t()


def kl_to_teacher(teacher, student, rows: list[list[int]]) -> torch.Tensor:
    n = min(len(r) for r in rows)  # rows of one batch cut to the shortest: no padding to mask
    x = torch.tensor([r[:n] for r in rows])
    with torch.no_grad():
        logp = torch.log_softmax(teacher(x).logits.float(), -1)
    logq = torch.log_softmax(student(x).logits.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--quantcmp", type=Path, required=True)
    ap.add_argument("--adapter", type=Path, required=True, help="the EoRA fit to start from (PEFT layout)")
    ap.add_argument("--scale-lr", type=float, required=True, help="0: EoRA alone (the baseline)")
    ap.add_argument("--eora-lr", type=float, default=2e-4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    from compressor.eora import load_eora
    from compressor.gptq import checkpoint_tensors, dequantized_state_dict, float_model_from_state_dict
    from compressor.recipe import recipe_from_dict
    from compressor.torch_backend import load_causal_lm
    from compressor.training_data import quant_calibration_rows
    from compressor.workdir import Workdir
    from runtime.bench import cpu_name
    from runtime.fileio import read_json
    from runtime.tokenizer import TextTokenizer

    workdir = Workdir(args.workdir)
    summary = workdir.summary()
    qdir = workdir.stage_dirs(summary)["gptq"] / "model"
    fmt = str(read_json(qdir / "quantize_config.json").get("checkpoint_format", "gptq")).lower()
    teacher = load_causal_lm(next(s for s in summary["stages"] if s["stage"] == "gptq")["input_dir"])
    teacher.eval().requires_grad_(False)
    student = float_model_from_state_dict(qdir, dequantized_state_dict(qdir)).requires_grad_(False)
    tensors = checkpoint_tensors(qdir)
    for name, (a, b) in load_eora(args.adapter).items():
        parent, attr = name.rsplit(".", 1)
        layer = ScaledInt4Linear(tensors, name, a, b, zero_offset=1 if fmt == "gptq" else 0)
        setattr(student.get_submodule(parent), attr, layer)
    layers = [m for m in student.modules() if isinstance(m, ScaledInt4Linear)]

    saved = read_json(args.workdir / "recipe.json")  # the run's Recipe.to_dict(): absent stages are null
    recipe = recipe_from_dict({k: v for k, v in saved.items() if v is not None})
    source = Path(recipe.model)
    s = recipe.eora
    rows = quant_calibration_rows(
        TextTokenizer(source), s.dataset, 64, s.seqlen, recipe.calibration.dataset,
        source_dir=source, chat_cache=args.workdir / "lora-chat-replies.json",
    )  # fmt: skip
    train, held = rows[:56], rows[56:]
    windows = np.load(args.quantcmp / "windows.npy")
    ref = np.load(args.quantcmp / "source_logp.npy", mmap_mode="r")

    groups = [{"params": [p for m in layers for p in (m.A, m.B)], "lr": args.eora_lr}]
    if args.scale_lr > 0:
        groups.append({"params": [m.log_scale for m in layers], "lr": args.scale_lr})
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lr = [g["lr"] for g in optimizer.param_groups]

    def held_kl() -> float:
        with torch.no_grad():
            return float(sum(kl_to_teacher(teacher, student, [r]) for r in held) / len(held))

    print(f"{cpu_name()}; scale lr {args.scale_lr}, EoRA lr {args.eora_lr}, {args.steps} steps")
    print(f"start: window KL {window_kl(student, windows, ref):.5f}, held-out KL {held_kl():.5f}", flush=True)
    t0 = time.perf_counter()
    for step in range(args.steps):
        factor = min(1.0, (step + 1) / 2) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group, lr in zip(optimizer.param_groups, base_lr):
            group["lr"] = lr * factor
        loss = kl_to_teacher(teacher, student, [train[(step * 4 + i) % len(train)] for i in range(4)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 8 == 0:
            print(f"step {step + 1}: held-out KL {held_kl():.5f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"end: window KL {window_kl(student, windows, ref):.5f}, held-out KL {held_kl():.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
