"""What a model family's decoder looks like, read once from its Hugging Face config.

The graph builder (exporter.onnx_graph.DecoderBuilder) builds every family from the same blocks; the
differences between families are data, here, so no block asks "which family is this?":

    LLaMA     input_layernorm -> attention -> + ; post_attention_layernorm -> SwiGLU MLP -> +
    Gemma 3   input_layernorm -> attention (q/k RMSNorm per head) -> post_attention_layernorm -> + ;
              pre_feedforward_layernorm -> GeGLU MLP -> post_feedforward_layernorm -> +
              RMSNorm weights stored as w, applied as (1 + w); embedding scaled by sqrt(hidden);
              attention scaled by query_pre_attn_scalar^-0.5; sliding-window layers (their own RoPE base,
              `rope_local_base_freq`) interleaved with global ones (config.layer_types); tied head; optional
              final logit soft-capping.

A family is registered under the HF `model_type`s it covers (FAMILIES); an unknown model_type is refused
with one error line instead of being built as a LLaMA by mistake. Written by hand: transformers knows these
facts only inside its torch modules, and the graph builder must not need torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from exporter.rope import RopeSpec, rope_from_hf
from runtime.errors import EdgepackError

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class GraphFamily:
    """The family-specific facts the graph blocks read (defaults: LLaMA)."""

    name: str = "llama"
    architecture: str = "LlamaForCausalLM"
    norm_weight_offset: float = 0.0  # Gemma stores RMSNorm weights as w and multiplies by (1 + w)
    pre_mlp_norm: str = "post_attention_layernorm"  # the norm in front of the MLP, by its HF name
    post_attention_norm: str | None = None  # a norm on the attention output before the residual add
    post_mlp_norm: str | None = None  # a norm on the MLP output before the residual add
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (`self_attn.q_norm` / `k_norm`)
    activation: Literal["silu", "gelu_tanh"] = "silu"  # of the gate projection (SwiGLU / GeGLU)
    embedding_scale: float | None = None  # the looked-up embedding is multiplied by this
    attention_scale: float | None = None  # softmax scale; None = 1/sqrt(head_dim)
    attention_softcap: float | None = None  # tanh soft-capping of attention scores
    final_logit_softcap: float | None = None  # tanh soft-capping of the logits
    sliding_window: int | None = None  # tokens a sliding-window layer sees, itself included


@dataclass(frozen=True)
class FamilyConfig:
    """A family plus its per-layer facts: each layer's attention type and the RoPE of each type."""

    family: GraphFamily
    layer_types: tuple[str, ...]  # FULL or SLIDING per layer, as the config lists them; () = all FULL
    ropes: dict[str, RopeSpec]  # attention type -> RopeSpec


def _as_dict(config) -> dict:
    if isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(vars(config))


def _llama(cfg: dict) -> FamilyConfig:
    return FamilyConfig(GraphFamily(), (), {FULL: rope_from_hf(cfg)})


def _gemma3_ropes(cfg: dict) -> dict[str, RopeSpec]:
    """Per attention type RoPE: transformers 5 nests `rope_parameters` by layer type; older configs give
    `rope_theta` (+ `rope_scaling`) for global layers and `rope_local_base_freq` for sliding ones."""
    params = cfg.get("rope_parameters") or {}
    if FULL in params or SLIDING in params:
        return {
            t: rope_from_hf({"rope_parameters": params.get(t) or {"rope_type": "default"}}) for t in (FULL, SLIDING)
        }
    full = {"rope_theta": cfg.get("rope_theta", 1_000_000.0), "rope_scaling": cfg.get("rope_scaling")}
    local = {"rope_theta": cfg.get("rope_local_base_freq", 10_000.0)}
    return {FULL: rope_from_hf(full), SLIDING: rope_from_hf(local)}


def _gemma3_layer_types(cfg: dict) -> tuple[str, ...]:
    n = int(cfg.get("num_hidden_layers") or 0)
    types = cfg.get("layer_types")
    if types is None:  # older configs: every `sliding_window_pattern`-th layer is global
        pattern = int(cfg.get("sliding_window_pattern") or 6)
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    bad = sorted({t for t in types} - {FULL, SLIDING})
    if bad or len(types) != n:
        raise EdgepackError(f"config layer_types: {len(types)} entries of {bad or 'known'} types for {n} layers")
    return tuple(types)


def _gemma3(cfg: dict) -> FamilyConfig:
    if cfg.get("use_bidirectional_attention"):
        raise EdgepackError("Gemma 3 with bidirectional attention is not a causal decoder: not supported")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise EdgepackError(f"Gemma 3 activation {act!r}: only gelu_pytorch_tanh is supported by the ONNX export")
    soft = cfg.get("final_logit_softcapping")
    attn_soft = cfg.get("attn_logit_softcapping")
    family = GraphFamily(
        name="gemma3",
        architecture="Gemma3ForCausalLM",
        norm_weight_offset=1.0,
        pre_mlp_norm="pre_feedforward_layernorm",
        post_attention_norm="post_attention_layernorm",
        post_mlp_norm="post_feedforward_layernorm",
        qk_norm=True,
        activation="gelu_tanh",
        embedding_scale=float(cfg["hidden_size"]) ** 0.5,
        attention_scale=float(cfg.get("query_pre_attn_scalar") or 256) ** -0.5,
        attention_softcap=float(attn_soft) if attn_soft else None,
        final_logit_softcap=float(soft) if soft else None,
        sliding_window=int(cfg.get("sliding_window") or 0) or None,
    )
    return FamilyConfig(family, _gemma3_layer_types(cfg), _gemma3_ropes(cfg))


# HF model_type -> reader. A new family adds one entry (and, if it needs a new block, one GraphFamily field).
FAMILIES: dict[str, Callable[[dict], FamilyConfig]] = {
    "llama": _llama,
    "gemma3_text": _gemma3,
}


def family_from_hf_config(config) -> FamilyConfig:
    """The FamilyConfig of a transformers config object or config.json dict."""
    cfg = _as_dict(config)
    kind = cfg.get("model_type", "llama")  # configs without one (old tests, hand-written dicts) are LLaMA
    if kind not in FAMILIES:
        raise EdgepackError(f"model_type {kind!r}: no graph family for it (supported: {', '.join(sorted(FAMILIES))})")
    fc = FAMILIES[kind](cfg)
    if fc.family.embedding_scale is not None and not math.isfinite(fc.family.embedding_scale):
        raise EdgepackError("config: embedding scale is not a finite number")
    return fc
