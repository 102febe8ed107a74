"""Width pruning: WANDA N:M sparsity on the decoder's linear layers.

Notation. **In edgepack `N:M` means N weights PRUNED in every group of M consecutive input weights**
(the seed study's notation): W1:2 and W2:4 are both 50 % sparse, W1:8 is 12.5 %, W12:16 is 75 %.
NVIDIA's "2:4" counts the weights *kept*; here it is the other way round.

Score (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): weight W_ij of a Linear
(out i, in j) scores |W_ij| * ||X_j||_2, where ||X_j||_2 is the L2 norm of input feature j over every
calibration token. Groups are M consecutive input weights of one output row; in each group the N
lowest-scoring weights are zeroed. Ties break towards the lower input index (stable sort), so the same
weights and norms always give the same mask.

Two ways to get the norms:
- `collect_input_norms` (the default, one pass): all norms come from one forward of the *dense* model.
  Cheap and simple; later layers see activations that the pruned model will not produce.
- `prune_nm_sequential` (WANDA as published): layer by layer, the norms of layer l's linears are taken
  on the outputs of the already-pruned layers 0..l-1, then layer l is pruned and its pruned outputs feed
  layer l+1. Within one layer all linears use that layer's dense inputs (as the reference code does).
  Costs two passes of each layer and keeps every calibration hidden state in memory.

The masks are part of the stage's output: `save_masks` stores them as packed bits, and `reapply_masks`
lets a later stage (a LoRA merge) put the zeros back. Zeroing is done by hand because no library offers
WANDA for an arbitrary HF model without taking over the whole pipeline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from compressor.calibration_forward import InputSquareSums, capture_layer_inputs, find_linears, input_norms
from runtime.errors import EdgepackError
from runtime.fileio import atomic_write_bytes

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MASKS_FORMAT = "edgepack-nm-masks"
MASKS_VERSION = "1"


# ------------------------------------------------------------------ scoring
@torch.no_grad()
def collect_input_norms(
    model, calib_ids: torch.Tensor, targets: Iterable[str] = DEFAULT_TARGETS, batch_size: int = 4
) -> dict[str, torch.Tensor]:
    """||X_j||_2 over all calibration tokens for the input of each target Linear, by module name
    (e.g. "model.layers.3.self_attn.q_proj"), from one forward of the model as it is (one-pass WANDA)."""
    return input_norms(model, calib_ids, targets, batch_size, desc="width: input norms")


def _check_nm(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or m < 1 or not 0 <= n < m:
        raise ValueError(f"N:M needs integers 0 <= N < M (N pruned of every M), got {n}:{m}")


def nm_masks(weight: torch.Tensor, input_norm: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask (True = kept) of a [out, in] weight: in every group of M consecutive input weights of a
    row, the N weights with the lowest |W_ij| * ||X_j||_2 are pruned (N pruned of M, the seed's
    notation). Ties prune the lower input index first."""
    _check_nm(n, m)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if in_features % m:
        raise ValueError(f"in_features={in_features} is not divisible by M={m}: N:M groups need whole groups")
    if input_norm.shape != (in_features,):
        raise ValueError(f"input norm has shape {tuple(input_norm.shape)}, weight expects ({in_features},)")
    score = weight.detach().abs().float() * input_norm.to(device=weight.device, dtype=torch.float32)[None, :]
    groups = score.reshape(out_features, in_features // m, m)
    lowest = torch.argsort(groups, dim=-1, stable=True)[..., :n]
    mask = torch.ones(groups.shape, dtype=torch.bool, device=weight.device)
    mask.scatter_(-1, lowest, False)
    return mask.reshape(out_features, in_features)


# ------------------------------------------------------------------ pruning
@torch.no_grad()
def _prune_linear(linear: nn.Linear, norm: torch.Tensor, n: int, m: int) -> torch.Tensor:
    mask = nm_masks(linear.weight, norm, n, m)
    linear.weight.masked_fill_(~mask, 0)
    return mask.cpu()


@torch.no_grad()
def apply_nm_pruning(
    model, norms: dict[str, torch.Tensor], n: int, m: int, targets: Iterable[str] = DEFAULT_TARGETS
) -> dict[str, torch.Tensor]:
    """Zero, in place, the N lowest-scoring of every M input weights (N pruned, the seed's notation) of
    each target Linear; returns the keep-masks (bool, CPU) by module name."""
    _check_nm(n, m)
    linears = find_linears(model, targets)
    missing = [name for name in linears if name not in norms]
    if missing:
        raise ValueError(f"no input norm for {missing[0]} (and {len(missing) - 1} more)")
    return {
        name: _prune_linear(lin, norms[name], n, m)
        for name, lin in tqdm(linears.items(), desc=f"width: W{n}:{m} masks", leave=False)
    }


@torch.no_grad()
def prune_nm_sequential(
    model, calib_ids: torch.Tensor, n: int, m: int, targets: Iterable[str] = DEFAULT_TARGETS, batch_size: int = 4
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """WANDA as published: prune layer by layer, each layer's input norms measured on the outputs of the
    already-pruned layers before it. Prunes the model in place; returns (masks, norms)."""
    _check_nm(n, m)
    linears = find_linears(model, targets)
    batches = capture_layer_inputs(model, calib_ids, batch_size)
    masks, norms = {}, {}
    for li, layer in enumerate(tqdm(model.model.layers, desc=f"width: sequential W{n}:{m}")):
        prefix = f"model.layers.{li}."
        layer_linears = {name: lin for name, lin in linears.items() if name.startswith(prefix)}
        with InputSquareSums(layer_linears) as sums:
            for hidden, kwargs in batches:
                layer(hidden, **kwargs)
        layer_norms = sums.norms()
        for name, lin in layer_linears.items():
            masks[name] = _prune_linear(lin, layer_norms[name], n, m)
        norms.update(layer_norms)
        batches = [(_hidden_out(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in batches]
    return masks, norms


def _hidden_out(output):
    return output[0] if isinstance(output, tuple) else output


# ------------------------------------------------------------------ mask files
def save_masks(path: str | os.PathLike, masks: dict[str, torch.Tensor]) -> None:
    """Write keep-masks as packed bits (numpy.packbits, big bit order, 1 = kept), one uint8 tensor per
    module in a safetensors file whose metadata holds each mask's shape. Written atomically."""
    from safetensors.numpy import save

    tensors, shapes = {}, {}
    for name, mask in masks.items():
        flat = mask.detach().cpu().numpy().astype(bool).reshape(-1)
        tensors[name] = np.packbits(flat, bitorder="big")
        shapes[name] = list(mask.shape)
    metadata = {"format": MASKS_FORMAT, "version": MASKS_VERSION, "bitorder": "big", "shapes": json.dumps(shapes)}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a file written by `save_masks` back into bool keep-masks (CPU)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise EdgepackError(f"{path}: mask file not found")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != MASKS_FORMAT:
                raise EdgepackError(f"{path}: not an edgepack N:M mask file (format={meta.get('format')!r})")
            if meta.get("version") != MASKS_VERSION:
                raise EdgepackError(f"{path}: unsupported mask file version {meta.get('version')!r}")
            shapes = json.loads(meta["shapes"])
            masks = {}
            for name in f.keys():
                shape = shapes[name]
                bits = np.unpackbits(f.get_tensor(name), count=int(np.prod(shape)), bitorder=meta["bitorder"])
                masks[name] = torch.from_numpy(bits.astype(bool).reshape(shape))
    except EdgepackError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise EdgepackError(f"{path}: unreadable mask file ({e})") from None
    return masks


@torch.no_grad()
def reapply_masks(model, masks: dict[str, torch.Tensor]):
    """Zero the pruned weights again (after a LoRA merge filled them in). Returns the model."""
    for name, mask in masks.items():
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            raise EdgepackError(f"mask names module {name}, which the model does not have") from None
        if tuple(weight.shape) != tuple(mask.shape):
            raise EdgepackError(f"mask for {name} has shape {tuple(mask.shape)}, weight has {tuple(weight.shape)}")
        weight.masked_fill_(~mask.to(weight.device), 0)
    return model


# ------------------------------------------------------------------ counting
def count_parameters(model) -> dict:
    """dense: unique parameters (a tied lm_head/embedding counts once, since it is one Parameter);
    nonzero: dense minus the exact zeros in the weights, the seed study's count for a sparse model.
    On the meta device values are unknown, so nonzero is None there (use `nm_nonzero_count`)."""
    params = [p for _, p in model.named_parameters()]  # named_parameters drops shared (tied) ones
    dense = sum(p.numel() for p in params)
    if any(p.is_meta for p in params):
        return {"dense": dense, "nonzero": None}
    zeros = sum(int((p == 0).sum()) for p in params)
    return {"dense": dense, "nonzero": dense - zeros}


def nm_nonzero_count(model, n: int, m: int, targets: Iterable[str] = DEFAULT_TARGETS) -> int:
    """Analytic parameter count after N:M pruning (N pruned of M) of the targets, from shapes only (works
    on the meta device): dense minus N/M of every target weight."""
    _check_nm(n, m)
    pruned = 0
    for name, lin in find_linears(model, targets).items():
        if lin.weight.numel() % m:
            raise ValueError(f"{name}: {lin.weight.numel()} weights not divisible by M={m}")
        pruned += lin.weight.numel() // m * n
    return count_parameters(model)["dense"] - pruned


@torch.no_grad()
def sparsity_report(model, masks: dict[str, torch.Tensor]) -> dict:
    """Per module: shape, pruned (mask zeros), sparsity, zeros actually in the weight, and
    mask_violations (pruned positions whose weight is not zero: a later stage undid the mask).
    Totals over the masked modules, and the whole model's count_parameters."""
    modules, numel, pruned, violations = {}, 0, 0, 0
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        keep = mask.to(weight.device)
        m_pruned = int((~keep).sum())
        m_viol = int((weight[~keep] != 0).sum())
        modules[name] = {
            "shape": list(mask.shape),
            "pruned": m_pruned,
            "sparsity": m_pruned / mask.numel(),
            "zeros_in_weight": int((weight == 0).sum()),
            "mask_violations": m_viol,
        }
        numel, pruned, violations = numel + mask.numel(), pruned + m_pruned, violations + m_viol
    total = {
        "numel": numel,
        "pruned": pruned,
        "sparsity": pruned / numel if numel else 0.0,
        "mask_violations": violations,
    }
    return {"modules": modules, "total": total, "parameters": count_parameters(model)}
