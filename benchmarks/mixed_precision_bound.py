"""How much could more bits for some projections buy? An upper bound for the mixed-precision lever of issue #18.

    python benchmarks/mixed_precision_bound.py WORKDIR --quantcmp models/quantcmp/w18distill \\
        [--eora BUNDLE/safetensors/eora] 'v_proj' 'k_proj|v_proj' 'down_proj' 'layers\\.(0|1|2|3)\\.'

WORKDIR is a finished pipeline run with a GPTQ stage (its input, `02-lora/model` or whatever the GPTQ stage
quantized, is the float reference); --quantcmp is a `benchmarks/quant_vs_llamacpp.py --out` directory (its
WikiText windows and the float source's full log-probs over them). For each regular expression, the matching
projections of the GPTQ model (and of GPTQ + the EoRA adapter, when given) are put back to their float
weights, which is what an 8-bit copy would nearly be (8-bit block-32 RTN error is ~1/16 of 4-bit's), and
full-vocabulary KL(float || model) is measured in torch on the windows. The MB column is what storing those
weights in 8 bits would add over 4-bit group-32 with zero points (8 + 32/32 against 4 + 32/32 + 4/32 bits per
weight, MatMulNBits' layout). Torch KL runs ~0.004 below the ONNX graph's (int8 activations and head).

Written by hand: no library measures a model with chosen layers swapped back to float.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXTRA_BITS_8BIT = (8 + 1) - (4 + 1 + 4 / 32)  # bits per weight: int8 block 32 vs int4 block 32 + zero points


def window_kl(model, windows: np.ndarray, ref: np.ndarray) -> float:
    """Mean full-vocabulary KL(reference || model) per predicted token over the windows."""
    kl = n = 0.0
    with torch.no_grad():
        for w in range(len(windows)):
            logq = torch.log_softmax(model(torch.tensor(windows[w : w + 1])).logits[0, :-1].double(), -1)
            logp = torch.tensor(np.asarray(ref[w, :-1]), dtype=torch.float64)
            kl += float((logp.exp() * (logp - logq[:, : logp.shape[1]])).sum())
            n += logq.shape[0]
    return kl / n


def restored(base: dict, float_sd: dict, pattern: str) -> tuple[dict, int]:
    """`base` with every projection weight whose name matches `pattern` replaced by its float value."""
    out, count = dict(base), 0
    for key in base:
        if key.endswith("_proj.weight") and key in float_sd and re.search(pattern, key):
            out[key] = float_sd[key]
            count += float_sd[key].numel()
    return out, count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("patterns", nargs="+", help="regular expressions over weight names, e.g. 'v_proj'")
    ap.add_argument("--quantcmp", type=Path, required=True, help="a quant_vs_llamacpp.py --out directory")
    ap.add_argument("--eora", type=Path, help="an EoRA adapter directory (PEFT layout) for the GPTQ model")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from compressor.eora import apply_eora_to_dequantized, load_eora
    from compressor.gptq import dequantized_state_dict, float_model_from_state_dict
    from compressor.torch_backend import load_causal_lm
    from compressor.workdir import Workdir
    from runtime.bench import cpu_name

    workdir = Workdir(args.workdir)
    summary = workdir.summary()
    qdir = workdir.stage_dirs(summary)["gptq"] / "model"
    float_dir = Path(next(s for s in summary["stages"] if s["stage"] == "gptq")["input_dir"])
    float_sd = {k: v.float() for k, v in load_causal_lm(float_dir).state_dict().items()}
    qsd = dequantized_state_dict(qdir)
    model = float_model_from_state_dict(qdir, qsd)
    windows = np.load(args.quantcmp / "windows.npy")
    ref = np.load(args.quantcmp / "source_logp.npy", mmap_mode="r")
    bases = {"GPTQ": qsd}
    if args.eora:
        bases["GPTQ + EoRA"] = apply_eora_to_dequantized(qsd, load_eora(args.eora))

    def kl_of(sd: dict) -> float:
        model.load_state_dict(sd, strict=False)
        return window_kl(model, windows, ref)

    print(f"{cpu_name()}; float reference {float_dir}; {len(windows)} windows x {windows.shape[1]} tokens; KL in torch")
    print("| float again | weights (M) | + MB as 8-bit | " + " | ".join(f"KL, {b}" for b in bases) + " |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in bases) + " |")
    print("| nothing (as quantized) | 0 | 0 | " + " | ".join(f"{kl_of(sd):.4f}" for sd in bases.values()) + " |")
    for pattern in args.patterns:
        kls, count = [], 0
        for sd in bases.values():
            new, count = restored(sd, float_sd, pattern)
            kls.append(f"{kl_of(new):.4f}")
        cell = pattern.replace("|", "\\|")  # a Markdown table cell
        print(f"| `{cell}` | {count / 1e6:.2f} | {count * EXTRA_BITS_8BIT / 8e6:.1f} | " + " | ".join(kls) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
