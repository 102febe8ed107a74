"""Stage 4: GPTQ 4-bit weight quantization with gptqmodel, and reading the result back in plain torch.

gptqmodel does the quantization and writes a standard GPTQ checkpoint (format "gptq", the v1 layout that
transformers, vLLM and GPTQModel load). Reading it back for evaluation does *not* go through gptqmodel's
inference kernels by default, because on CPU none of them computes what the shipped int4 ONNX model
computes:

- the AUTO kernel (TorchFusedLinear, `_weight_int4pack_mm_for_cpu`) crashes when an in_features is not a
  multiple of the group size (SmolLM2's K=576 with group 128);
- GPTQ_TORCH (TorchLinear) refuses float32 and runs fp16/bf16 activations;
- GPTQ_TORCH_INT8 re-quantizes the dequantized int4 weights to per-channel int8, a second lossy step.

So `load_quantized` rebuilds the float32 model with the exact dequantized weights `s * (q - z)` (what
onnxruntime's MatMulNBits computes); any gptqmodel backend can still be asked for by name.

gptqmodel quirks handled here (7.5.0): it needs GPTQMODEL_CPU_WORKERS>=2 on a 2-core machine; it needs
a tokenizer in the model directory even when given token ids; it writes per-run logs to ./logs of the
current directory (redirected into the output directory); it drops calibration rows of <= 10 tokens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from compressor.device import pick_device
from compressor.recipe import GptqStage
from runtime.errors import EdgepackError
from runtime.fileio import atomic_directory, atomic_write_json, sha256_file

MIN_CALIB_TOKENS = 11  # gptqmodel silently drops rows of <= 10 tokens (calibration_data_min_length=10)
QUANT_TENSOR_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


def import_gptqmodel():
    """Import gptqmodel with the environment it needs on a small CPU machine.

    With the default worker count (cpu_count/2 = 1 on a 2-core box) gptqmodel's CPU thread pool fails in
    quantize(); 2 workers work. An explicit GPTQMODEL_CPU_WORKERS from the user wins."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import gptqmodel

    return gptqmodel


@contextmanager
def gptqmodel_logs_into(log_dir: Path):
    """gptqmodel writes one log file per processor run into ./logs relative to the current directory
    (`gptqmodel.looper.loop_processor._PROJECT_LOG_DIR`, a private module constant). Point it into the
    stage's own directory so runs leave nothing behind in the user's working directory."""
    import gptqmodel.looper.loop_processor as lp

    previous = getattr(lp, "_PROJECT_LOG_DIR", None)
    if previous is None:  # a later gptqmodel without the constant: nothing to redirect
        yield
        return
    lp._PROJECT_LOG_DIR = Path(log_dir)
    try:
        yield
    finally:
        lp._PROJECT_LOG_DIR = previous


staging_dir = atomic_directory  # gptqmodel writes its own files: publish its output directory at once


def check_model_dir(model_dir: Path) -> None:
    """gptqmodel loads the tokenizer of every model it loads, even when it is given token ids."""
    if not (model_dir / "config.json").exists():
        raise EdgepackError(f"{model_dir}: not a model directory (no config.json)")
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise EdgepackError(f"{model_dir}: no tokenizer files; gptqmodel needs the tokenizer saved next to the model")


def calibration_rows(calib_examples, limit: int | None) -> list[list[int]]:
    """Token-id rows for gptqmodel: lists of ints, 1-D tensors, or dicts with input_ids (and optionally
    attention_mask, whose 0 positions are dropped), long enough to be kept."""

    def as_list(x) -> list[int]:
        return [int(t) for t in (x.reshape(-1).tolist() if torch.is_tensor(x) else x)]

    rows = []
    for ex in calib_examples:
        if isinstance(ex, dict):
            ids = as_list(ex["input_ids"])
            if ex.get("attention_mask") is not None:
                ids = [t for t, keep in zip(ids, as_list(ex["attention_mask"])) if keep]
        else:
            ids = as_list(ex)
        if len(ids) >= MIN_CALIB_TOKENS:
            rows.append(ids)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise EdgepackError(f"calibration data: no example with at least {MIN_CALIB_TOKENS} tokens")
    return rows


def grid_modules(model_dir) -> list[str]:
    """Projections of the float checkpoint whose weights already lie on a 4-bit block grid (a dequantized
    Q4_0/Q4_1/Q4_K GGUF that no stage moved): GPTQ leaves them alone and the export stores them exactly."""
    from safetensors import safe_open

    from compressor.recipe import PROJECTIONS
    from exporter.int4 import find_block_grid  # numpy only; the exporter packs what this finds

    found = []
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for key in st.keys():
                module = key.removesuffix(".weight")
                if key.endswith(".weight") and module.rsplit(".", 1)[-1] in PROJECTIONS:
                    if find_block_grid(st.get_tensor(key)) is not None:
                        found.append(module)
    return sorted(found)


def grid_only_checkpoint(model_dir: Path, tmp: Path, settings: GptqStage, on_grid: list[str]) -> None:
    """Every projection is on a grid: nothing for GPTQ to do. The stage's checkpoint is the float one with a
    quantize_config.json that says so (read back as plain weights; exported grid-exact)."""
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and (f.suffix == ".safetensors" or f.suffix in (".json", ".jinja")):
            shutil.copy2(f, tmp / f.name)
    qcfg = {
        "bits": settings.bits,
        "group_size": settings.group_size,
        "sym": settings.sym,
        "desc_act": settings.desc_act,
        "checkpoint_format": "gptq",
        "quant_method": "gptq",
        "grid_exact": on_grid,
    }
    atomic_write_json(tmp / "quantize_config.json", qcfg)


def quantize_gptq(model_dir, calib_examples, out_dir, settings: GptqStage | None = None) -> dict[str, Any]:
    """Quantize the float checkpoint in `model_dir` (with its tokenizer) and write a GPTQ checkpoint to
    `out_dir`. The model is loaded in float32, so GPTQ rounds the exact float weights the LoRA merge wrote
    (not an fp16/bf16 copy of them); calibration rows are used as given, one per batch, at most
    `settings.samples` of them. gptqmodel raises its damping by itself (damp_auto_increment) if H is singular.
    With settings.keep_grid, projections already on a 4-bit block grid are skipped (gptqmodel's negative
    `dynamic` rules) and stay float here, exact; when all are, gptqmodel does not run at all."""
    settings = settings or GptqStage()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_model_dir(model_dir)
    rows = calibration_rows(calib_examples, settings.samples)
    t0 = time.perf_counter()
    on_grid = grid_modules(model_dir) if settings.keep_grid else []
    n_proj = projection_count(model_dir)

    gptqmodel = import_gptqmodel()
    from gptqmodel import GPTQModel, QuantizeConfig

    device = pick_device()
    qcfg = QuantizeConfig(
        bits=settings.bits,
        group_size=settings.group_size,
        sym=settings.sym,
        desc_act=settings.desc_act,
        damp_percent=settings.damp,
        mse=settings.mse,
        offload_to_disk=False,  # small models fit in memory; offloading only adds temp files
        dynamic={f"-:^{re.escape(m)}$": {} for m in on_grid} or None,
    )
    with staging_dir(out_dir) as tmp, gptqmodel_logs_into(tmp / "logs"):
        if on_grid and len(on_grid) == n_proj:
            grid_only_checkpoint(model_dir, tmp, settings, on_grid)
            quant_log = {}
        else:
            model = GPTQModel.load(str(model_dir), qcfg, dtype=torch.float32, device=device)
            quant_log = model.quantize(rows, batch_size=1)
            model.save(str(tmp))
            del model
        seconds = time.perf_counter() - t0
        saved_cfg = json.loads((tmp / "quantize_config.json").read_text())
        losses = module_losses(quant_log)
        record = {
            "stage": "gptq",
            "settings": asdict(settings),
            "source": str(model_dir),
            "gptqmodel_version": gptqmodel.__version__,
            "device": device,
            "load_dtype": "float32",
            "calibration_rows": len(rows),
            "calibration_tokens": sum(len(r) for r in rows),
            "quantize_config": saved_cfg,
            "modules_quantized": len(losses),
            "grid_exact_modules": on_grid,
            "mean_module_loss": (sum(losses.values()) / len(losses)) if losses else None,
            "module_loss": losses,
            "seconds": round(seconds, 2),
            "files": {
                p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.glob("*.safetensors"))
            },
        }
        atomic_write_json(tmp / "gptq_record.json", record)
    return record


def projection_count(model_dir) -> int:
    from safetensors import safe_open

    from compressor.recipe import PROJECTIONS

    n = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            n += sum(
                k.endswith(".weight") and k[: -len(".weight")].rsplit(".", 1)[-1] in PROJECTIONS for k in st.keys()
            )
    return n


def module_losses(quant_log) -> dict[str, float]:
    """Per-module GPTQ loss (the weighted reconstruction error gptqmodel reports) from quantize()'s log."""
    out = {}
    rows = quant_log.get("gptq", []) if isinstance(quant_log, dict) else []
    for row in rows:
        try:
            out[f"layers.{row['layer']}.{row['module']}"] = float(row["loss"])
        except (KeyError, TypeError, ValueError):
            continue
    return out


# ---------------------------------------------------------------------------------------------------------
# Reading a GPTQ checkpoint back


def read_quantize_config(quant_dir: Path) -> dict:
    path = Path(quant_dir) / "quantize_config.json"
    if not path.exists():
        raise EdgepackError(f"{quant_dir}: not a GPTQ checkpoint (no quantize_config.json)")
    return json.loads(path.read_text())


def checkpoint_tensors(quant_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(quant_dir).glob("model*.safetensors"))
    if not files:
        raise EdgepackError(f"{quant_dir}: no model*.safetensors")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unpack GPTQ's int32 words (32/bits codes per word, lowest bits first) along `dim`.

    Written by hand: gptqmodel only unpacks inside its kernel classes, which need a loaded model and refuse
    float32; the formula is the documented GPTQ layout and is tested against gptqmodel's own dequant."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = (1 << bits) - 1
    if dim == 0:  # qweight [K/per_word, N] -> [K, N]
        codes = (packed.unsqueeze(1) >> shifts.view(1, per_word, 1)) & mask
        return codes.reshape(packed.shape[0] * per_word, packed.shape[1])
    codes = (packed.unsqueeze(2) >> shifts.view(1, 1, per_word)) & mask  # qzeros [G, N/per_word] -> [G, N]
    return codes.reshape(packed.shape[0], packed.shape[1] * per_word)


def dequantize_linear(qweight, qzeros, scales, g_idx, bits: int, zero_offset: int) -> torch.Tensor:
    """float32 weight [out, in] = scale * (q - zero), with the group of each input row from g_idx."""
    q = unpack_int32(qweight, bits, dim=0).float()  # [K, N]
    z = unpack_int32(qzeros, bits, dim=1)[:, : scales.shape[1]].float() + zero_offset  # [G, N]
    groups = g_idx.long()
    q = q[: groups.numel()]
    w = scales.float()[groups] * (q - z[groups])
    return w.t().contiguous()


def dequantized_state_dict(quant_dir) -> dict[str, torch.Tensor]:
    """The whole checkpoint as a float32 state dict: every GPTQ module's `qweight/qzeros/scales/g_idx`
    becomes `<module>.weight = scale * (q - z)`; other tensors (embeddings, norms, lm_head) are cast.

    Format "gptq" (v1) stores each zero point minus one, so z = stored + 1 (8 for symmetric 4-bit);
    "gptq_v2" stores it as is."""
    quant_dir = Path(quant_dir)
    cfg = read_quantize_config(quant_dir)
    bits = int(cfg.get("bits", 4))
    if bits not in (2, 4, 8):
        raise EdgepackError(f"{quant_dir}/quantize_config.json: bits={bits} not supported (2, 4 or 8)")
    fmt = str(cfg.get("checkpoint_format", cfg.get("format", "gptq"))).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise EdgepackError(f"{quant_dir}/quantize_config.json: checkpoint format {fmt!r} is not GPTQ")
    zero_offset = 1 if fmt == "gptq" else 0

    tensors = checkpoint_tensors(quant_dir)
    modules = sorted({k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")})
    out = {}
    for name in modules:
        qweight = tensors[f"{name}.qweight"]
        scales = tensors[f"{name}.scales"]
        g_idx = tensors.get(f"{name}.g_idx")
        if g_idx is None:  # checkpoints without g_idx use contiguous groups
            k = qweight.shape[0] * (32 // bits)
            g_idx = torch.arange(k) // int(cfg["group_size"])
        out[f"{name}.weight"] = dequantize_linear(qweight, tensors[f"{name}.qzeros"], scales, g_idx, bits, zero_offset)
    for key, t in tensors.items():
        if key.endswith(QUANT_TENSOR_SUFFIXES):
            continue
        out[key] = t.float() if t.is_floating_point() else t
    return out


def float_model_from_state_dict(config_dir, state_dict: dict[str, torch.Tensor]):
    """A float32 transformers model with the architecture of `config_dir` and the given weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights given are plain float tensors
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise EdgepackError(
            f"{config_dir}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval()


def load_quantized(quant_dir, backend: str = "dequant", device: str | None = None):
    """A model of the GPTQ checkpoint in `quant_dir` that returns logits.

    backend="dequant" (default): plain float32 transformers model with the exact dequantized weights, the
    same numbers the int4 ONNX model uses; works on CPU for any shape. Any gptqmodel BACKEND value (e.g.
    "gptq_torch_int8", "gptq_torch" with fp16/bf16) loads through gptqmodel's kernels instead."""
    quant_dir = Path(quant_dir)
    read_quantize_config(quant_dir)
    device = pick_device(device)
    if backend == "dequant":
        return float_model_from_state_dict(quant_dir, dequantized_state_dict(quant_dir)).to(device)
    import_gptqmodel()
    from gptqmodel import GPTQModel

    dtype = torch.float32 if backend in ("gptq_torch_int8", "auto") else torch.bfloat16
    return GPTQModel.load(str(quant_dir), backend=backend, device=device, dtype=dtype).model.eval()
