"""EoRA in float32, for machines where gptqmodel's EoRA would run in slow bf16/fp16.

gptqmodel 7.5.0's `GPTQModel.adapter.generate` refuses float32 (see compressor/eora.py), so on a CPU without
native bf16 matmuls (no AVX512-BF16 / AMX: most laptops, and the AVX2 EPYC VMs seen here, where a 2048x576 @
576x1536 product takes 3.0 s in bf16 against 35 ms in fp32, benchmarks/eora_math.py) it takes over an hour for SmolLM2. This module
runs the same method over a plain float32 transformers model of the dequantized GPTQ weights, with
gptqmodel's `eora_process_input` for the activation covariance and its `eora_compute_lora` decomposition
restated below. The loop is written by hand because gptqmodel's module looper cannot run in
float32; it follows that looper's order: layers in turn, and inside a layer the projections in gptqmodel's
LLaMA subsets (q/k/v, o, gate/up, down), each subset's covariance taken with the earlier subsets already
corrected, and the next layer fed by the corrected layer.

The decomposition is gptqmodel's `eora_compute_lora` restated (`eigen_scaling` + `lowrank_correction`, by
hand for speed at the 1B shape, where a profile of that function showed its full float64 eigendecomposition
per projection and its full SVD taking 67 % of the stage): the covariance's eigendecomposition is done once
per subset (q/k/v read the same input, as do gate/up), and the rank-r SVD comes from the eigendecomposition
of the smaller Gram matrix instead of a full SVD. `tests/test_gptq_eora.py` checks it against
`eora_compute_lora`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from runtime.errors import EdgepackError

# gptqmodel's LLaMA module order within a decoder layer (its `module_tree`); Gemma 3 uses the same names.
SUBSETS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


class _SubsetSeen(Exception):
    """Raised by the hook on a subset's first projection once it has its input (the projections of a subset
    share that input, and the rest of the layer is not needed for the covariance)."""


def float_weights(model_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """`{name: weight}` in float32 for the given modules of a safetensors checkpoint (any sharding)."""
    from safetensors import safe_open

    wanted, out = {f"{n}.weight": n for n in names}, {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in wanted.keys() & set(st.keys()):
                out[wanted[key]] = st.get_tensor(key).float()
    missing = sorted(set(names) - set(out))
    if missing:
        raise EdgepackError(f"{model_dir}: no float weight for {missing[:3]} (EoRA needs the model GPTQ quantized)")
    return out


def layer_inputs(model, rows: list[list[int]], device: str) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """One forward pass per row: the hidden state entering layer 0 and the keyword arguments every layer is
    called with (position embeddings, masks: the same tensor objects are shared between layers, so keeping
    them per layer costs nothing)."""
    layers = model.model.layers
    hidden, kwargs = [], []

    def keep(i):
        def hook(module, args, kw):
            kwargs[-1][i] = {k: v for k, v in kw.items() if k != "hidden_states"}
            if i == 0:
                hidden.append((args[0] if args else kw["hidden_states"]).detach())

        return hook

    handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for ids in rows:
            kwargs.append([{} for _ in layers])
            with torch.no_grad():
                model.model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return hidden, kwargs


def subset_covariance(layer, subset, hidden, kwargs_i, n_rows: int) -> torch.Tensor:
    """The EoRA activation statistic of the input the projections in `subset` share (they all read the same
    tensor), accumulated over the rows exactly as gptqmodel's EoraProcessor does (running total scaled by
    n / (n + batch), one row per batch); the layer's forward stops once the first of them has its input."""
    from gptqmodel.eora.eora import eora_process_input

    total: list[torch.Tensor] = []

    def hook(module, inputs, output):
        _, contribution, scale = eora_process_input(inputs, subset[0], n_rows, module.weight.device)
        total.append(contribution if not total else total.pop().mul_(scale).add_(contribution))
        raise _SubsetSeen

    handle = layer.get_submodule(subset[0]).register_forward_hook(hook)
    try:
        for h, kw in zip(hidden, kwargs_i):
            try:
                with torch.no_grad():
                    layer(h, **kw)
            except _SubsetSeen:
                pass
    finally:
        handle.remove()
    return total[0]


def eigen_scaling(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gptqmodel's eigenspace scaling S = Q·sqrt(L) of the covariance and its pseudo-inverse (eigenvalues at
    or below max(L)·n·eps(float32) dropped), in float32. gptqmodel decomposes in float64; float32 is about
    twice as fast (measured beside a compile, 8192² on 2 AVX2 cores) and its error, ~eps(float32)·max(L), lies far below
    that cut-off, so the kept directions are the same."""
    eigenvalues, q = torch.linalg.eigh(cov.float())
    if not torch.isfinite(eigenvalues).all():
        raise EdgepackError("EoRA: the activation covariance has non-finite eigenvalues")
    rtol = min(1.0, eigenvalues.numel() * torch.finfo(torch.float32).eps)
    keep = eigenvalues > eigenvalues[-1].clamp_min(0.0) * rtol
    root = torch.where(keep, eigenvalues.clamp_min(0.0).sqrt(), 0.0)
    inv_root = torch.where(keep, 1.0 / torch.where(keep, root, 1.0), 0.0)
    return q * root, inv_root[:, None] * q.T


def lowrank_correction(delta: torch.Tensor, scale: torch.Tensor, scale_inv: torch.Tensor, rank: int):
    """A [r, in], B [out, r] from the rank-r SVD of delta·S (as `eora_compute_lora`): the singular vectors
    of the smaller side come from the float64 eigendecomposition of its Gram matrix, the other side from
    one product."""
    m = (delta @ scale).double()
    wide = m.shape[0] <= m.shape[1]
    gram = m @ m.T if wide else m.T @ m
    eigenvalues, vectors = torch.linalg.eigh(gram)
    top = vectors[:, -rank:].flip(1)  # descending singular values
    s = eigenvalues[-rank:].flip(0).clamp_min(0.0).sqrt()
    nonzero = s > s[0] * 1e-12
    inv_s = torch.where(nonzero, 1.0 / torch.where(nonzero, s, 1.0), 0.0)
    if wide:
        u, vt = top, (top.T @ m) * inv_s[:, None]
    else:
        u, vt = (m @ top) * inv_s[None, :], top.T
    root_s = s.sqrt()
    b = (u * root_s[None, :]).float()
    a = (root_s[:, None] * vt).float() @ scale_inv
    return a, b


def eora_float32(
    model, model_dir: Path, quantized: list[str], rows: list[list[int]], rank: int, device: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module: (A [r, in], B [out, r])}` for the projections named in `quantized`, with `model` the float32
    model of the dequantized GPTQ weights (its corrected weights W_q + B·A are written into it as it goes)."""
    quantized_set = set(quantized)
    hidden, kwargs = layer_inputs(model, rows, device)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, layer in enumerate(tqdm(model.model.layers, desc="EoRA (float32) layers")):
        prefix = f"model.layers.{i}."
        originals = float_weights(model_dir, [prefix + n for n in sum(SUBSETS, ()) if prefix + n in quantized_set])
        for subset in SUBSETS:
            todo = tuple(n for n in subset if prefix + n in quantized_set)
            if not todo:
                continue
            cov = subset_covariance(layer, todo, hidden, [kw[i] for kw in kwargs], len(rows))
            scale, scale_inv = eigen_scaling(cov)
            for n in todo:
                module = layer.get_submodule(n)
                wq = module.weight.data
                a, b = lowrank_correction(originals[prefix + n].to(device) - wq, scale, scale_inv, rank)
                module.weight.data = wq + b @ a
                out[prefix + n] = (a.cpu(), b.cpu())
        with torch.no_grad():  # the next layer sees the corrected layer's output
            hidden = [_hidden_out(layer(h, **kw[i])) for h, kw in zip(hidden, kwargs)]
    return out


def _hidden_out(result):
    return (result[0] if isinstance(result, tuple) else result).detach()
