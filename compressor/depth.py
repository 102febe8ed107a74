"""Depth pruning: score decoder layers by the perplexity of the model without them, drop the least useful.

A layer's importance is the calibration perplexity of the model with that one layer skipped: a layer
whose removal barely moves perplexity is the cheapest to drop. Scoring swaps `model.model.layers` for a
ModuleList without the layer and puts the original back afterwards (also on error); it runs with
`use_cache=False`, so the attention modules' `layer_idx` (the KV cache slot) is never read while the
layers are out of order. `drop_layers` makes the removal permanent and renumbers those indices.

One-shot ranking (`layer_importance` + `select_layers_to_drop`) scores every layer once against the full
model; `iterative_drop` re-scores the survivors after each removal (k rounds, so ~k times the cost),
which accounts for layers that are only redundant together.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from compressor.calibration_forward import check_calib_ids, hidden_nll, iter_batches, model_device

# Per-layer lists a config may carry (transformers 5 `layer_types`, SmolLM3-style `no_rope_layers`, the
# channel stage's per-layer widths). drop_layers slices each one that is present, so the config stays
# consistent with the layers that remain.
PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers", "edgepack_layer_widths")


@contextlib.contextmanager
def layers_skipped(model, skipped: Iterable[int]):
    """Temporarily run `model` without the decoder layers `skipped` (original indices). Only for
    forward passes with use_cache=False: the remaining attention modules keep their old layer_idx."""
    original = model.model.layers
    skipped = set(skipped)
    model.model.layers = nn.ModuleList([layer for i, layer in enumerate(original) if i not in skipped])
    try:
        with per_layer_config_skipped(model.config, skipped):
            yield model
    finally:
        model.model.layers = original


@contextlib.contextmanager
def per_layer_config_skipped(config, skipped: set[int]):
    """Temporarily slice the config's per-layer lists like the layers: models that pick each layer's mask
    and RoPE by position from `config.layer_types` (Gemma 3: sliding-window vs global layers) would
    otherwise give the layers after a skipped one their neighbours' attention type while scoring."""
    saved = {}
    for key in PER_LAYER_CONFIG_LISTS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)):
            saved[key] = value
            setattr(config, key, type(value)(v for i, v in enumerate(value) if i not in skipped))
    try:
        yield config
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


def _removal_perplexities(
    model, calib_ids, already_dropped: set[int], batch_size: int, desc: str
) -> list[float | None]:
    """PPL with each still-present layer additionally skipped; None for layers already dropped.

    Layers before the skipped one are unchanged, so they run once per batch, not once per candidate: one
    forward pass records the hidden states (and keyword arguments: rotary tables, masks, per layer as the
    model builds them) entering every present layer, and "without layer k" resumes from layer k's input at
    layer k+1. That is n(n+1)/2 layer passes per batch instead of n^2 (16-layer Llama-3.2-1B: 136 vs 256)."""
    n_layers = len(model.model.layers)
    scores: list[float | None] = [None] * n_layers
    present = [i for i in range(n_layers) if i not in already_dropped]
    totals, count = [0.0] * len(present), 0
    device = model_device(model)
    with layers_skipped(model, already_dropped):
        layers = model.model.layers
        for batch in tqdm(list(iter_batches(calib_ids, batch_size)), desc=desc):
            batch = batch.to(device)
            entering = _layer_inputs(model, batch)
            for k, (hidden, _) in enumerate(entering):
                for j in range(k + 1, len(layers)):
                    hidden = _hidden_out(layers[j](hidden, **entering[j][1]))
                totals[k] += hidden_nll(model, model.model.norm(hidden), batch)
            count += batch.numel() - batch.shape[0]
    for k, original in enumerate(present):
        scores[original] = math.exp(totals[k] / count)
    return scores


def _layer_inputs(model, batch: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, keyword arguments) with which the model calls each of its decoder layers on `batch`,
    from one forward pass with pre-hooks (the model derives positions and masks itself)."""
    entering: list[tuple[torch.Tensor, dict]] = []

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        skip = ("hidden_states", "cache", "past_key_values", "past_key_value")
        entering.append((hidden, {**{k: v for k, v in kwargs.items() if k not in skip}, "use_cache": False}))

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in model.model.layers]
    try:
        model.model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return entering


def _hidden_out(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def layer_importance(model, calib_ids: torch.Tensor, batch_size: int = 4) -> list[float]:
    """Calibration perplexity of the model with decoder layer i removed, for every i (higher = more
    important). The model is left exactly as it was."""
    check_calib_ids(calib_ids)
    return _removal_perplexities(model, calib_ids, set(), batch_size, "depth: scoring layers")


def select_layers_to_drop(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the k layers with the lowest perplexity-when-removed, sorted ascending. Ties go to the
    lower index, so the choice is deterministic."""
    if not 0 <= k < len(scores):
        raise ValueError(f"can drop between 0 and {len(scores) - 1} of {len(scores)} layers, asked for {k}")
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:k])


@torch.no_grad()
def iterative_drop(
    model, calib_ids: torch.Tensor, k: int, batch_size: int = 4
) -> tuple[list[int], list[list[float | None]]]:
    """Greedy depth pruning: k rounds, each scoring the surviving layers with the ones already chosen
    skipped, and choosing the one whose removal hurts least.

    Returns (dropped, rounds): `dropped` lists original layer indices in the order they were chosen;
    `rounds[r][i]` is layer i's perplexity-when-removed in round r (original indexing, None for layers
    already dropped). The model is left unchanged; pass `dropped` to `drop_layers`."""
    check_calib_ids(calib_ids)
    n_layers = len(model.model.layers)
    if not 0 <= k < n_layers:
        raise ValueError(f"can drop between 0 and {n_layers - 1} of {n_layers} layers, asked for {k}")
    dropped: list[int] = []
    rounds: list[list[float | None]] = []
    for r in range(k):
        scores = _removal_perplexities(model, calib_ids, set(dropped), batch_size, f"depth: round {r + 1}/{k}")
        rounds.append(scores)
        dropped.append(min((i for i, s in enumerate(scores) if s is not None), key=lambda i: (scores[i], i)))
    return dropped, rounds


def drop_layers(model, layer_indices: Iterable[int]):
    """Remove decoder layers in place and make the model consistent again: remaining layers renumbered
    (every submodule with a `layer_idx`, which the KV cache uses as the layer's slot),
    `config.num_hidden_layers` and per-layer config lists updated. The result saves with
    `save_pretrained` and reloads with plain `from_pretrained`. Returns the model."""
    n_layers = len(model.model.layers)
    drop = sorted(set(int(i) for i in layer_indices))
    if any(not 0 <= i < n_layers for i in drop):
        raise ValueError(f"layer indices {drop} out of range for {n_layers} layers")
    if len(drop) >= n_layers:
        raise ValueError(f"cannot drop all {n_layers} layers")
    keep = [i for i in range(n_layers) if i not in set(drop)]

    model.model.layers = nn.ModuleList([model.model.layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx

    config = model.config
    if config.num_hidden_layers != n_layers:
        raise ValueError(f"config.num_hidden_layers={config.num_hidden_layers} but the model has {n_layers} layers")
    for key in PER_LAYER_CONFIG_LISTS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)):
            if len(value) != n_layers:
                raise ValueError(f"config.{key} has {len(value)} entries for {n_layers} layers")
            setattr(config, key, type(value)(value[i] for i in keep))
    config.num_hidden_layers = len(keep)
    return model
