"""Stage 5: EoRA, a training-free low-rank correction of the GPTQ error, with gptqmodel.

For every quantized projection gptqmodel's EoRA finds A [r, in], B [out, r] such that W ≈ W_q + B·A where
it matters: the error W - W_q is projected onto the eigenspace of the calibration activations' covariance
before the truncated SVD, so the rank is spent on the input directions the model actually sees. Layers are
processed in order with the corrected quantized weights, so each layer is fitted to the inputs the
corrected model will give it. The result cannot be folded into int4 weights; it ships as a PEFT LoRA
adapter and the runtime adds B(A x) to the int4 matmul's output.

dtype choice (gptqmodel 7.5.0): `GPTQModel.adapter.generate` refuses float32 in two places, neither with an
override: it loads the quantized model with BACKEND.GPTQ_TORCH, whose TorchLinear accepts only
fp16/bf16, and EoraProcessor asserts the corrected weight is fp16/bf16. So the only supported knob is the
`dtype` argument of generate(). We pass bfloat16 by default: EoRA replays whole calibration rows through
each layer, i.e. matrix-matrix products, where bf16 is the fastest of the three on CPUs with AVX512-BF16
(measured here, 2 threads, 2048x576 @ 576x576: bf16 11 ms, fp32 35 ms, fp16 517 ms; a SmolLM2-shaped
2-layer forward of 512 tokens: bf16 0.14 s, fp32 0.44 s, fp16 0.93 s). Only matrix-vector products
(one token at a time, as in decoding) are slow in bf16 (8 ms vs 0.05 ms), and EoRA does none. bf16 also
cannot overflow on large activations, which fp16 can. The precision cost is small:
the covariance, eigendecomposition and SVD run in float32/float64 inside gptqmodel, only the weights and
layer activations are held in bf16; on the tiny test model bf16 and fp16 adapters cut the logits error
by the same amount (72.3 % vs 72.2 % of it left). "float16" is available as a setting (e.g. on CUDA).

Without native bf16 (AVX2-only CPUs: most laptops) bf16 matmuls are emulated, ~86x slower than float32
(2048x576 @ 576x1536 on an AVX2 AMD EPYC: 3.0 s vs 35 ms, benchmarks/eora_math.py), and gptqmodel's EoRA took over an hour for
SmolLM2. There `dtype="auto"` (the default) runs the same math in float32 through our own layer loop
(compressor/eora_float32.py); the record says which ran.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from compressor.device import pick_device
from compressor.gptq import (
    calibration_rows,
    check_model_dir,
    gptqmodel_logs_into,
    import_gptqmodel,
    read_quantize_config,
    staging_dir,
)
from compressor.recipe import EoraStage
from runtime.errors import EdgepackError
from runtime.fileio import atomic_write_json, sha256_file

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def generate_eora(
    model_dir, quantized_dir, calib_examples, out_dir, settings: EoraStage | None = None, dtype: str = "auto"
) -> dict[str, Any]:
    """Fit EoRA adapters for the GPTQ checkpoint `quantized_dir` of the float model `model_dir` and write
    them to `out_dir` as a PEFT LoRA adapter (adapter_model.safetensors + adapter_config.json), from at most
    `settings.samples` calibration rows. `dtype`: "bfloat16" or "float16" run gptqmodel's EoRA (which refuses
    float32, see the module docstring); "float32" runs the same math in float32 (compressor/eora_float32.py);
    "auto" takes bfloat16 on CUDA and on CPUs with native bf16 matmuls, float32 elsewhere."""
    settings = settings or EoraStage()
    model_dir, quantized_dir, out_dir = Path(model_dir), Path(quantized_dir), Path(out_dir)
    check_model_dir(model_dir)
    read_quantize_config(quantized_dir)
    device = pick_device()
    dtype = eora_dtype(device) if dtype == "auto" else dtype
    if dtype not in ("bfloat16", "float16", "float32"):
        raise EdgepackError(f"eora dtype={dtype!r}: choose auto, bfloat16, float16 or float32")
    rows = calibration_rows(calib_examples, settings.samples)

    gptqmodel = import_gptqmodel()
    from gptqmodel import GPTQModel
    from gptqmodel.adapter.adapter import Lora

    t0 = time.perf_counter()
    with staging_dir(out_dir) as tmp, gptqmodel_logs_into(tmp / "logs"):
        if not has_gptq_modules(quantized_dir):
            write_empty_adapter(tmp, settings.rank)
        elif dtype == "float32":
            write_adapter(tmp, eora_in_float32(model_dir, quantized_dir, rows, settings.rank, device), settings.rank)
        else:  # grid-exact projections are skipped by gptqmodel's dynamic rules
            with dequantize_only_quantized_modules():
                GPTQModel.adapter.generate(
                    adapter=Lora(rank=settings.rank, path=str(tmp)),
                    model_id_or_path=str(model_dir),
                    quantized_model_id_or_path=str(quantized_dir),
                    calibration_dataset=rows,
                    dtype=getattr(torch, dtype),
                    device=device,
                )
        seconds = time.perf_counter() - t0
        if not (tmp / ADAPTER_FILE).exists():
            raise EdgepackError(f"{out_dir}: gptqmodel wrote no {ADAPTER_FILE}")
        eora = load_eora(tmp)
        record = {
            "stage": "eora",
            "settings": {**asdict(settings), "dtype": dtype},
            "source": str(model_dir),
            "quantized": str(quantized_dir),
            "gptqmodel_version": gptqmodel.__version__,
            "device": device,
            "calibration_rows": len(rows),
            "calibration_tokens": sum(len(r) for r in rows),
            "modules": len(eora),
            "target_modules": sorted({name.rsplit(".", 1)[-1] for name in eora}),
            "extra_parameters": sum(a.numel() + b.numel() for a, b in eora.values()),
            "seconds": round(seconds, 2),
            "files": {
                ADAPTER_FILE: {"bytes": (tmp / ADAPTER_FILE).stat().st_size, "sha256": sha256_file(tmp / ADAPTER_FILE)}
            },
        }
        atomic_write_json(tmp / "eora_record.json", record)
    return record


def eora_dtype(device: str) -> str:
    """bfloat16 (gptqmodel's EoRA) where bf16 matmuls are native: CUDA, or a CPU with AVX512-BF16 or AMX;
    float32 (our loop) elsewhere, where bf16 matmuls are emulated and ~50x slower than float32."""
    if device.startswith("cuda"):
        return "bfloat16"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "float32"
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


def eora_in_float32(model_dir, quantized_dir, rows, rank: int, device: str):
    """EoRA over a float32 model of the dequantized GPTQ weights (compressor/eora_float32.py)."""
    from compressor.eora_float32 import eora_float32
    from compressor.gptq import dequantized_state_dict, float_model_from_state_dict

    state = dequantized_state_dict(quantized_dir)
    quantized = sorted(k[: -len(".weight")] for k in quantized_weight_names(quantized_dir))
    model = float_model_from_state_dict(quantized_dir, state).to(device)
    del state
    return eora_float32(model, Path(model_dir), quantized, rows, rank, device)


def quantized_weight_names(quantized_dir: Path) -> list[str]:
    """`{module}.weight` of every GPTQ-packed projection (those with a qweight) in the checkpoint."""
    from safetensors import safe_open

    names = []
    for f in sorted(Path(quantized_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names += [k[: -len(".qweight")] + ".weight" for k in st.keys() if k.endswith(".qweight")]
    return names


def write_adapter(out: Path, eora: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int) -> None:
    """The adapters in PEFT's LoRA layout with lora_alpha = r (scaling 1), as gptqmodel writes them."""
    from safetensors.torch import save_file

    tensors = {}
    for name, (a, b) in eora.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(out / ADAPTER_FILE))
    targets = sorted({name.rsplit(".", 1)[-1] for name in eora})
    atomic_write_json(
        out / ADAPTER_CONFIG, {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": targets}
    )


@contextmanager
def dequantize_only_quantized_modules():
    """gptqmodel 7.5.0's EoRA dequantizes every projection of a layer and fails (KeyError in
    DequantizeProcessor.process, then the worker pool ends the process) on one that the checkpoint's
    `dynamic` rules left unquantized, although its EoRA processor skips those itself. Grid-exact projections
    are such modules: make the dequantize step pass over them (their weight is already the exact one)."""
    from gptqmodel.looper.dequantize_processor import DequantizeProcessor

    original = DequantizeProcessor.process

    def process(self, module, *args, **kwargs):
        if module.full_name not in self.quantized_modules:
            return None
        return original(self, module, *args, **kwargs)

    DequantizeProcessor.process = process
    try:
        yield
    finally:
        DequantizeProcessor.process = original


def has_gptq_modules(quantized_dir: Path) -> bool:
    """False for a GPTQ stage whose projections were all on a 4-bit grid (kept exact, nothing to correct)."""
    return bool(quantized_weight_names(quantized_dir))


def write_empty_adapter(out: Path, rank: int) -> None:
    """A LoRA adapter with no modules: what EoRA makes of a checkpoint with nothing quantized."""
    from safetensors.torch import save_file

    save_file({}, str(out / ADAPTER_FILE))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": [], "note": "no GPTQ module"}
    atomic_write_json(out / ADAPTER_CONFIG, cfg)


def load_eora(eora_dir) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A [r, in], B [out, r])} in float32 from a PEFT LoRA adapter, with PEFT's scaling
    lora_alpha / r folded into B, so that the correction is exactly W_q + B·A.

    gptqmodel saves lora_alpha = r (scaling 1) and its own runtime adds x·A·B with no scaling, so the two
    readings agree."""
    from safetensors.torch import load_file

    eora_dir = Path(eora_dir)
    cfg_path, weights_path = eora_dir / ADAPTER_CONFIG, eora_dir / ADAPTER_FILE
    if not cfg_path.exists() or not weights_path.exists():
        raise EdgepackError(f"{eora_dir}: not a LoRA adapter (needs {ADAPTER_CONFIG} and {ADAPTER_FILE})")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise EdgepackError(f"{cfg_path}: per-module rank/alpha patterns are not supported")
    scaling = float(cfg.get("lora_alpha", cfg["r"])) / float(cfg["r"])
    tensors = load_file(weights_path)
    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[: -len(".lora_A.weight")].removeprefix(PEFT_PREFIX)
        b = tensors.get(key.replace(".lora_A.weight", ".lora_B.weight"))
        if b is None:
            raise EdgepackError(f"{weights_path}: {name} has lora_A but no lora_B")
        out[name] = (a.float(), b.float() * scaling)
    if not out and cfg.get("target_modules") != []:  # [] = written on purpose (write_empty_adapter)
        raise EdgepackError(f"{weights_path}: no lora_A/lora_B pairs")
    return out


def apply_eora_to_dequantized(
    state_dict: dict[str, torch.Tensor], eora: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """A new state dict with W_q + B·A for every corrected projection (for evaluation in plain torch;
    the shipped model keeps the branch separate)."""
    out = dict(state_dict)
    for name, (a, b) in eora.items():
        key = f"{name}.weight"
        if key not in out:
            raise EdgepackError(f"EoRA module {name} has no weight in the quantized checkpoint")
        w = out[key]
        if tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise EdgepackError(f"EoRA module {name}: B·A is {b.shape[0]}x{a.shape[1]}, weight is {tuple(w.shape)}")
        out[key] = w.float() + b.float() @ a.float()
    return out
