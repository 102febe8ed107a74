"""EoRA in float32, for machines where gptqmodel's EoRA would run in slow bf16/fp16.

gptqmodel 7.5.0's `GPTQModel.adapter.generate` refuses float32 (see compressor/eora.py), so on a CPU without
native bf16 matmuls (no AVX512-BF16 / AMX: most laptops, and the AVX2 EPYC VMs seen here, where a 2048x576 @
576x1536 product takes 4.2 s in bf16 against 74 ms in fp32) it takes over an hour for SmolLM2. This module
drives the same method with gptqmodel's own math (`eora_process_input` for the activation covariance,
`eora_compute_lora` for the eigenspace-projected truncated SVD) over a plain float32 transformers model of
the dequantized GPTQ weights. The loop is written by hand because gptqmodel's module looper cannot run in
float32; it follows that looper's order: layers in turn, and inside a layer the projections in gptqmodel's
LLaMA subsets (q/k/v, o, gate/up, down), each subset's covariance taken with the earlier subsets already
corrected, and the next layer fed by the corrected layer.
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
    """Raised by a hook once every projection of the subset has seen its input (the rest of the layer is
    not needed for the covariance)."""


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


def subset_covariances(layer, subset, hidden, kwargs_i, n_rows: int) -> dict[str, torch.Tensor]:
    """The EoRA activation statistic of each projection in `subset`, accumulated over the rows exactly as
    gptqmodel's EoraProcessor does (running total scaled by n / (n + batch), one row per batch)."""
    from gptqmodel.eora.eora import eora_process_input

    totals: dict[str, torch.Tensor] = {}
    seen: set[str] = set()

    def hook(name):
        def fn(module, inputs, output):
            _, contribution, scale = eora_process_input(inputs, name, n_rows, module.weight.device)
            totals[name] = contribution if name not in totals else totals[name].mul_(scale).add_(contribution)
            seen.add(name)
            if seen == set(subset):
                raise _SubsetSeen

        return fn

    handles = [layer.get_submodule(n).register_forward_hook(hook(n)) for n in subset]
    try:
        for h, kw in zip(hidden, kwargs_i):
            seen.clear()
            try:
                with torch.no_grad():
                    layer(h, **kw)
            except _SubsetSeen:
                pass
    finally:
        for h in handles:
            h.remove()
    return totals


def eora_float32(
    model, model_dir: Path, quantized: list[str], rows: list[list[int]], rank: int, device: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module: (A [r, in], B [out, r])}` for the projections named in `quantized`, with `model` the float32
    model of the dequantized GPTQ weights (its corrected weights W_q + B·A are written into it as it goes)."""
    from gptqmodel.eora.eora import eora_compute_lora

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
            covariances = subset_covariances(layer, todo, hidden, [kw[i] for kw in kwargs], len(rows))
            for n in todo:
                module = layer.get_submodule(n)
                wq = module.weight.data
                delta = originals[prefix + n].to(device) - wq
                a, b = eora_compute_lora(delta, prefix + n, covariances.pop(n), rank, torch.float32, wq.device)
                module.weight.data = wq + b @ a
                out[prefix + n] = (a.cpu(), b.cpu())
        with torch.no_grad():  # the next layer sees the corrected layer's output
            hidden = [_hidden_out(layer(h, **kw[i])) for h, kw in zip(hidden, kwargs)]
    return out


def _hidden_out(result):
    return (result[0] if isinstance(result, tuple) else result).detach()
