"""Structured width pruning that really shrinks the model: whole FFN channels and whole KV groups.

N:M sparsity (width.py) zeroes weights but keeps every matmul its full size, so it saves no time on a
CPU. Here the pruned units are removed: the Linear modules are replaced by smaller ones.

Units and scores (activation-aware, the WANDA idea summed over a unit; all norms over every
calibration token, collected with forward hooks on the dense model in one pass):
- FFN channel c of a layer (one intermediate unit: row c of gate_proj and up_proj, column c of
  down_proj): score_c = sum_j |W_down[j, c]| * ||h_c||_2, h = the input of down_proj
  (act(gate(x)) * up(x)). Removing the channel is exactly zeroing h_c, i.e. removing the term
  W_down[:, c] * h_c from the layer's output; the score is the size of that term summed over tokens,
  bounded through the weight magnitudes.
- KV group g (one KV head and its num_key_value_groups query heads, removed together so that the
  query-to-KV head mapping of GQA stays intact): score_g = sum over the columns `cols` of o_proj that
  belong to the group's query heads of sum_j |W_o[j, col]| * ||a_col||_2, a = the input of o_proj
  (the concatenated head outputs). Removing the group is exactly zeroing those o_proj columns, so this
  is the same kind of estimate as for FFN channels. It ignores nothing: a query head only ever reaches
  the residual stream through its o_proj columns.

Selection: by default (per_layer_uniform=True) every layer keeps the same number of channels and KV
groups, its own top-scored ones. With per_layer_uniform=False channels (and groups) are ranked
globally across layers, so widths differ per layer; scores of different layers are in the same units
(contribution to the residual stream), which is what makes a global ranking meaningful. Each layer keeps
at least one KV group and at least `ffn_multiple_of` channels.

Widths to mind downstream: WANDA N:M needs in_features divisible by M (down_proj's in_features is the
kept intermediate size) and GPTQ's group size (128) wants whole groups; pass ffn_multiple_of to round.

Saving and loading. LlamaConfig has one intermediate_size and one head count, so per-layer widths are
stored in the config as `config.edgepack_layer_widths`, a list with one
{"intermediate_size", "num_key_value_heads", "num_attention_heads"} per layer, and the global values are
set to the largest width over layers (head counts stay at the original values if the largest would not
divide hidden_size: transformers 5 refuses such a config).
- Uniform widths: the global values equal every layer's, so `save_pretrained` + plain
  `AutoModelForCausalLM.from_pretrained` load it like any Llama.
- Non-uniform widths (or a uniform head count that does not divide hidden_size): plain `from_pretrained`
  cannot; it builds every layer from the global values, reports the mismatched shapes and raises
  RuntimeError (transformers 5.24, ignore_mismatched_sizes=False; never pass True, it would re-initialise
  the pruned layers at random). Load with `load_channel_pruned(path)`, which builds the model from the
  config on the meta device, resizes each layer's modules to its recorded widths, and assigns the
  safetensors weights. `layer_widths(config)` gives every layer's widths for either kind.

Attention with fewer heads works unchanged in transformers 5 LlamaAttention: the projections' outputs
are reshaped to (..., -1, head_dim), so the head count follows the weight shapes; head_dim,
num_key_value_groups and the scaling come from the config and do not change, since whole groups go.
The DynamicCache sizes its per-layer tensors from the keys it receives, so generation with a KV cache
works with per-layer head counts (a StaticCache, sized from the config, would not).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from compressor.calibration_forward import input_norms
from runtime.errors import EdgepackError

WIDTHS_KEY = "edgepack_layer_widths"


# ------------------------------------------------------------------ widths
def _attn_shape(attn) -> tuple[int, int, int]:
    """(num_key_value_heads, num_attention_heads, head_dim) of an attention module, from its weights."""
    head_dim = attn.head_dim
    return attn.k_proj.out_features // head_dim, attn.q_proj.out_features // head_dim, head_dim


def current_widths(model) -> list[dict]:
    """Every decoder layer's widths, read from its modules."""
    widths = []
    for layer in model.model.layers:
        n_kv, n_q, _ = _attn_shape(layer.self_attn)
        widths.append(
            {
                "intermediate_size": layer.mlp.down_proj.in_features,
                "num_key_value_heads": n_kv,
                "num_attention_heads": n_q,
            }
        )
    return widths


def layer_widths(config) -> list[dict]:
    """Every decoder layer's widths from a config: the recorded per-layer list, or the global values."""
    recorded = getattr(config, WIDTHS_KEY, None)
    if recorded:
        if len(recorded) != config.num_hidden_layers:
            raise EdgepackError(
                f"config {WIDTHS_KEY} has {len(recorded)} entries for {config.num_hidden_layers} layers"
            )
        return [dict(w) for w in recorded]
    return [
        {
            "intermediate_size": config.intermediate_size,
            "num_key_value_heads": config.num_key_value_heads,
            "num_attention_heads": config.num_attention_heads,
        }
        for _ in range(config.num_hidden_layers)
    ]


def _set_config_widths(config, widths: list[dict]) -> None:
    """Record per-layer widths and set the global values to the largest (see the module docstring)."""
    setattr(config, WIDTHS_KEY, [dict(w) for w in widths])
    config.intermediate_size = max(w["intermediate_size"] for w in widths)
    n_q = max(w["num_attention_heads"] for w in widths)
    n_kv = max(w["num_key_value_heads"] for w in widths)
    if config.hidden_size % n_q == 0:
        config.num_attention_heads, config.num_key_value_heads = n_q, n_kv


def is_uniform(config) -> bool:
    """True when plain from_pretrained builds every layer at its recorded widths."""
    return all(w == _global_widths(config) for w in layer_widths(config))


def _global_widths(config) -> dict:
    return {
        "intermediate_size": config.intermediate_size,
        "num_key_value_heads": config.num_key_value_heads,
        "num_attention_heads": config.num_attention_heads,
    }


# ------------------------------------------------------------------ scoring
@torch.no_grad()
def channel_scores(model, calib_ids: torch.Tensor, batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
    """Per layer {"ffn": [intermediate_size], "kv_groups": [num_key_value_heads]} scores (float32, CPU),
    as defined in the module docstring."""
    norms = input_norms(model, calib_ids, ("o_proj", "down_proj"), batch_size, desc="channels: input norms")
    scores = []
    for li, layer in enumerate(model.model.layers):
        down = layer.mlp.down_proj.weight.detach().abs().float().cpu()
        ffn = (down * norms[f"model.layers.{li}.mlp.down_proj"][None, :]).sum(dim=0)
        attn = layer.self_attn
        n_kv, _, _ = _attn_shape(attn)
        o = attn.o_proj.weight.detach().abs().float().cpu()
        cols = (o * norms[f"model.layers.{li}.self_attn.o_proj"][None, :]).sum(dim=0)
        # o_proj columns are ordered by query head; query heads g*G .. g*G+G-1 share KV head g.
        kv = cols.reshape(n_kv, -1).sum(dim=-1)
        scores.append({"ffn": ffn, "kv_groups": kv})
    return scores


# ------------------------------------------------------------------ slicing
def _sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear holding the chosen rows (outputs) and columns (inputs) of `linear`."""
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows.to(weight.device)]
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device="meta")
    new.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias.detach()
        bias = bias[rows.to(bias.device)] if rows is not None else bias
        new.bias = nn.Parameter(bias.clone(), requires_grad=linear.bias.requires_grad)
    return new


def keep_ffn_channels(mlp, channels: torch.Tensor) -> None:
    """Keep only these intermediate channels (ascending indices): gate/up rows, down columns."""
    channels = torch.as_tensor(channels, dtype=torch.long).sort().values
    mlp.gate_proj = _sliced_linear(mlp.gate_proj, rows=channels)
    mlp.up_proj = _sliced_linear(mlp.up_proj, rows=channels)
    mlp.down_proj = _sliced_linear(mlp.down_proj, cols=channels)
    mlp.intermediate_size = len(channels)


def keep_kv_groups(attn, groups: torch.Tensor) -> None:
    """Keep only these KV groups (ascending indices): the KV head's k/v rows, its query heads' q rows and
    o_proj columns. Kept groups stay in order, so query head -> KV head mapping is preserved."""
    groups = torch.as_tensor(groups, dtype=torch.long).sort().values
    n_kv, n_q, head_dim = _attn_shape(attn)
    q_per_kv = n_q // n_kv
    if q_per_kv != attn.num_key_value_groups:
        raise ValueError(
            f"attention has {n_q} query heads over {n_kv} KV heads, config says {attn.num_key_value_groups} per KV head"
        )
    kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    q_rows = (groups[:, None] * (q_per_kv * head_dim) + torch.arange(q_per_kv * head_dim)).reshape(-1)
    attn.q_proj = _sliced_linear(attn.q_proj, rows=q_rows)
    attn.k_proj = _sliced_linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = _sliced_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = _sliced_linear(attn.o_proj, cols=q_rows)


# ------------------------------------------------------------------ selection
def _count(keep: float | int, total: int, what: str, minimum: int = 1, multiple_of: int = 1) -> int:
    """How many of `total` units to keep: a float is a fraction in (0, 1], an int a count."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"{what} keep must be a fraction or a count, got {keep!r}")
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"{what} keep fraction must be in (0, 1], got {keep}")
        n = round(keep * total / multiple_of) * multiple_of
    else:
        if not 1 <= keep <= total:
            raise ValueError(f"{what}: cannot keep {keep} of {total}")
        n = keep
    return min(total, max(minimum, n))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ascending; ties keep the lower index (stable sort)."""
    order = torch.argsort(-scores, stable=True)
    return order[:k].sort().values


def _global_counts(scores: list[torch.Tensor], total_keep: int, minimum: int, multiple_of: int) -> list[int]:
    """Per-layer counts from a ranking of all layers' units together: every layer first gets its own
    `minimum` best units, the rest of `total_keep` goes to the best remaining units of any layer; each
    count is then rounded to a multiple (so the total is exact only when multiple_of is 1)."""
    if total_keep < minimum * len(scores):
        raise ValueError(f"keeping {total_keep} units cannot give each of {len(scores)} layers {minimum}")
    rest_scores, owner = [], []
    for i, s in enumerate(scores):
        order = torch.argsort(-s, stable=True)
        rest_scores.append(s[order[minimum:]])
        owner.append(torch.full((len(s) - minimum,), i))
    flat, owner = torch.cat(rest_scores), torch.cat(owner)
    chosen = owner[torch.argsort(-flat, stable=True)[: total_keep - minimum * len(scores)]]
    counts = []
    for i, s in enumerate(scores):
        n = minimum + int((chosen == i).sum())
        n = round(n / multiple_of) * multiple_of
        counts.append(min(len(s), max(minimum, n)))
    return counts


@torch.no_grad()
def prune_channels(
    model,
    calib_ids: torch.Tensor,
    ffn_keep: float,
    kv_groups_keep: float | int,
    batch_size: int = 4,
    per_layer_uniform: bool = True,
    ffn_multiple_of: int = 1,
) -> dict:
    """Remove the lowest-scored FFN channels and KV groups of every layer, in place.

    ffn_keep: fraction of intermediate channels kept (per layer if uniform, of all layers' channels
    together otherwise), rounded to a multiple of `ffn_multiple_of`.
    kv_groups_keep: a float is the fraction of KV groups kept; an int is the count kept per layer
    (uniform) or in total over all layers (global ranking). At least one group stays in each layer.

    Updates the config (see the module docstring) and returns a JSON-able record: per layer its widths,
    the original indices of the kept channels and groups, and the KV group scores."""
    scores = channel_scores(model, calib_ids, batch_size)
    before = current_widths(model)
    if per_layer_uniform:
        ffn_counts = [_count(ffn_keep, len(s["ffn"]), "ffn", ffn_multiple_of, ffn_multiple_of) for s in scores]
        kv_counts = [_count(kv_groups_keep, len(s["kv_groups"]), "kv_groups") for s in scores]
    else:
        ffn_total = sum(len(s["ffn"]) for s in scores)
        kv_total = sum(len(s["kv_groups"]) for s in scores)
        ffn_counts = _global_counts(
            [s["ffn"] for s in scores], _count(ffn_keep, ffn_total, "ffn"), ffn_multiple_of, ffn_multiple_of
        )
        kv_counts = _global_counts(
            [s["kv_groups"] for s in scores], _count(kv_groups_keep, kv_total, "kv_groups"), 1, 1
        )

    record_layers = []
    for li, layer in enumerate(tqdm(model.model.layers, desc="channels: slicing")):
        channels = _top(scores[li]["ffn"], ffn_counts[li])
        groups = _top(scores[li]["kv_groups"], kv_counts[li])
        if len(channels) < before[li]["intermediate_size"]:
            keep_ffn_channels(layer.mlp, channels)
        if len(groups) < before[li]["num_key_value_heads"]:
            keep_kv_groups(layer.self_attn, groups)
        record_layers.append(
            {
                "kept_ffn_channels": channels.tolist(),
                "kept_kv_groups": groups.tolist(),
                "kv_group_scores": [round(float(x), 6) for x in scores[li]["kv_groups"]],
            }
        )
    widths = current_widths(model)
    for entry, w in zip(record_layers, widths):
        entry.update(w)
    _set_config_widths(model.config, widths)
    return {
        "ffn_keep": ffn_keep,
        "kv_groups_keep": kv_groups_keep,
        "per_layer_uniform": per_layer_uniform,
        "ffn_multiple_of": ffn_multiple_of,
        "widths_before": before,
        "uniform_widths": is_uniform(model.config),
        "layers": record_layers,
    }


# ------------------------------------------------------------------ loading
def _read_safetensors(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise EdgepackError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for name in files:
        for key, tensor in load_file(str(path / name)).items():
            state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def load_channel_pruned(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | None = None):
    """Load a model saved after `prune_channels`, with per-layer widths (also works for uniform widths
    and for unpruned checkpoints). Returns the eval-mode causal LM of the config (LLaMA, Gemma 3)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise EdgepackError(f"{path}: no config.json")
    config = AutoConfig.from_pretrained(path)
    widths = layer_widths(config)
    # parameters on the meta device (filled from the checkpoint below), buffers built for real: they are not
    # in the checkpoint (rotary inv_freq, Gemma's embedding scale)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    hidden = config.hidden_size
    for layer, w in zip(model.model.layers, widths):
        with torch.device("meta"):
            layer.mlp.gate_proj = nn.Linear(hidden, w["intermediate_size"], bias=layer.mlp.gate_proj.bias is not None)
            layer.mlp.up_proj = nn.Linear(hidden, w["intermediate_size"], bias=layer.mlp.up_proj.bias is not None)
            layer.mlp.down_proj = nn.Linear(w["intermediate_size"], hidden, bias=layer.mlp.down_proj.bias is not None)
            layer.mlp.intermediate_size = w["intermediate_size"]
            attn = layer.self_attn
            q_out, kv_out = w["num_attention_heads"] * attn.head_dim, w["num_key_value_heads"] * attn.head_dim
            if w["num_attention_heads"] // w["num_key_value_heads"] != attn.num_key_value_groups:
                raise EdgepackError(
                    f"{path}: layer widths {w} break the config's GQA ratio {attn.num_key_value_groups}"
                )
            attn.q_proj = nn.Linear(hidden, q_out, bias=attn.q_proj.bias is not None)
            attn.k_proj = nn.Linear(hidden, kv_out, bias=attn.k_proj.bias is not None)
            attn.v_proj = nn.Linear(hidden, kv_out, bias=attn.v_proj.bias is not None)
            attn.o_proj = nn.Linear(q_out, hidden, bias=attn.o_proj.bias is not None)

    state = _read_safetensors(path, dtype)
    tied = config.tie_word_embeddings
    if tied:
        state.pop("lm_head.weight", None)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatch: the config's widths do not describe the weights
        raise EdgepackError(
            f"{path}: weights do not match the recorded layer widths ({str(e).splitlines()[0]})"
        ) from None
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise EdgepackError(f"{path}: weights missing {missing[:3]} / unexpected {unexpected[:3]}")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise EdgepackError(f"{path}: {still_meta[0]} was not loaded (and {len(still_meta) - 1} more)")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    if device is not None:
        model.to(device)
    return model.eval()
