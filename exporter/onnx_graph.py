"""The fused ONNX decoder graph of a (possibly depth- and channel-pruned) LLaMA, built from weights.

The graph is written node by node with `onnx.helper` instead of `torch.onnx.export`, the way
onnxruntime-genai's model builder does it, because decode speed on a 2-core CPU comes from running few,
fused onnxruntime kernels per token, and an export trace gives hundreds of small ops that ORT's optimizer
only partly re-fuses. Per decoder layer the graph has:

    SkipSimplifiedLayerNormalization   residual add + RMSNorm in one pass (the first norm of the model is a
                                       plain SimplifiedLayerNormalization; each later one also emits the
                                       new residual, so the residual stream is never a separate Add)
    MatMul / MatMulNBits (q|k|v)       one fused projection: q, k and v rows stacked along N
    GroupQueryAttention                packed QKV in, rotary applied inside (do_rotary=1 with cos/sin caches
                                       baked at export, so llama3 scaling costs nothing), causal softmax,
                                       KV cache appended in place
    MatMul / MatMulNBits (o)
    SkipSimplifiedLayerNormalization
    MatMul / MatMulNBits (gate|up)     fused along N, then Split, x*sigmoid(x)*up
    MatMul / MatMulNBits (down)

Projections are float32 MatMuls against a pre-transposed initializer, or int4 `com.microsoft.MatMulNBits`
(GPTQ codes re-packed bit-exactly by exporter.int4, or RTN-quantized from float). An optional EoRA
low-rank branch adds `(x A^T) B^T` to a projection's output; for fused projections the A's are stacked and
the B's placed block-diagonally, so the branch is still two small MatMuls per fused projection. A and B are
float32 by default (exact); `eora_bits=8` (or 4) stores them as MatMulNBits too. With `eora_fuse_a` the A
rows are stacked under the int4 weight's own rows (A quantized like the weight, RTN), so the projection's
kernel computes [x W^T | x A^T] in one pass and a Split hands x A^T to B: one kernel fewer per projection.
Small kernels are what EoRA costs on a CPU, not bytes (a cold M=1 MatMulNBits of 50-100 KB takes ~7 us,
mostly fixed cost), so this is the cheapest layout ORT's ops allow; B cannot ride in the same kernel
because it needs x A^T first.

Embedding and LM head: float32 (a tied head is a Gemm with transB on the embedding itself, no second
copy), or block-quantized int8/int4: GatherBlockQuantized for the lookup, MatMulNBits for the head; a tied
quantized pair shares one packed table (the lookup reads it through a Reshape).

Why these layouts and defaults (decode speed and quality measurements): docs/graph_benchmarks.md.

KV cache: GQA takes `past_key_values.{i}.key/value` [batch, kv_heads, past_len, head_dim] (BNSH) and
produces `present.{i}.key/value`. When the caller binds the *same* buffer of length max_len as past and
present, GQA writes the new positions into it in place (ORT's CPU kernel checks the pointers:
past_present_share_buffer), so decoding never reallocates or copies the cache; runtime.onnx_engine does
this with IO binding. With an empty past (length 0) the present is a fresh [batch, kv, seq, head_dim].

Graph I/O contract: runtime.contract (names, metadata key and format), shared with runtime.onnx_engine.
The metadata this module returns is also stored in the model's metadata_props under that key.

seqlens_k / total_sequence_length are GQA's own inputs, passed directly instead of an attention mask: the
runtime knows every row's length, and computing them in the graph (ReduceSum, Sub, Cast per step) would
only add work. GQA's convention is that each row's valid tokens start at cache position 0 (right padding):
a batch of prompts of different lengths is prefilled right-padded with per-row seqlens_k, and each row's
decode then writes at its own position, so no row ever sees pad tokens and positions need no shifting.
`logits_positions` selects which hidden states go through the LM head: the last prompt token of each row
during prefill, [0] during decode, every position for log-likelihood scoring; the vocab projection is the
most expensive matmul of a small model, so it is not run on positions nobody reads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from exporter.families import FULL, SLIDING, GraphFamily, family_from_hf_config
from exporter.int4 import NBitsWeight, concat_nbits, find_block_grid, gptq_to_matmulnbits, quantize_rtn, split_blocks
from exporter.rope import RopeSpec, cos_sin_cache
from runtime.contract import (
    FORMAT,
    FORMAT_VERSION,
    INPUT_DOCS,
    INPUT_IDS,
    LOGITS,
    LOGITS_POSITIONS,
    METADATA_KEY,
    OUTPUT_DOCS,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    kv_names,
)
from runtime.errors import EdgepackError
from runtime.settings import Settings

MS = "com.microsoft"
OPSET = 21
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------------------
# What the graph is built from


@dataclass(frozen=True)
class LayerSpec:
    num_attention_heads: int  # 0 = attention removed from this layer
    num_key_value_heads: int
    intermediate_size: int  # 0 = MLP removed from this layer
    attention_type: str = FULL  # FULL or SLIDING (exporter.families): which window and RoPE the layer uses


@dataclass(frozen=True)
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    head_dim: int
    layers: tuple[LayerSpec, ...]
    rms_norm_eps: float
    rope: RopeSpec
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    family: GraphFamily = GraphFamily()  # LLaMA unless the config says otherwise (exporter.families)
    rope_local: RopeSpec | None = None  # RoPE of sliding-window layers, when the family has them

    @property
    def n_layers(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class GptqFormat:
    """How the `.qweight/.qzeros/.scales/.g_idx` tensors in `weights` are to be read."""

    bits: int = 4
    group_size: int = 128
    zero_offset: int = 1  # 1 for "gptq" (v1: zeros stored minus one), 0 for "gptq_v2"


@dataclass
class GraphOptions(Settings):
    """How the graph stores and computes its weights; checked once, on construction (runtime.settings)."""

    section: ClassVar[str] = "GraphOptions"
    max_len: int | None = None  # longest context (cos/sin cache rows); None = min(max_position_embeddings, 2048)
    gptq: GptqFormat | None = None  # needed when `weights` holds GPTQ tensors
    projections: Literal["keep", "int4"] = "keep"  # "keep": float stays fp32, GPTQ stays int4; "int4": RTN float ones
    rtn_block_size: int = 32
    # GPTQ weights in blocks of at most this size (each group's scale repeated: the same values, more bytes);
    # None = one block per GPTQ group. Block 32 decodes faster than 128 where weights exceed the cache
    # (benchmarks/nbits_block_speed.py; the 1B tables in the README).
    max_gptq_block: int | None = None
    # float projections already on a 4-bit block grid (an imported Q4_0/Q4_1/Q4_K GGUF that no stage moved) are
    # stored exactly (exporter.int4.find_block_grid) whenever the graph quantizes: projections="int4" or GPTQ
    grid_exact: bool = True
    embedding: Literal["fp32", "int8", "int4"] = "fp32"  # int8/int4: GatherBlockQuantized
    lm_head: Literal["fp32", "int8", "int4"] = "fp32"  # int8/int4: MatMulNBits
    head_block_size: int = 32  # block of the quantized embedding / LM head
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4  # MatMulNBits: 4 = int8 activations (fastest on CPU), 1 = fp32
    fuse_qkv: bool = True
    fuse_gate_up: bool = True
    eora_bits: Literal[8, 4] | None = None  # None: EoRA A/B as float32 MatMuls (exact); 8: int8 MatMulNBits
    eora_fuse_a: bool = False  # EoRA's A stacked under an int4 weight's rows: one kernel fewer per projection
    # fused q/k/v and gate/up: one B kernel per part instead of one block-diagonal B whose zero blocks are stored
    # (2/3 of q/k/v's B, 1/2 of gate/up's); fewer bytes, 2-3 more small kernels per fused projection
    eora_split_b: bool = False

    def check(self) -> None:
        self.at_least(16, "rtn_block_size", "head_block_size", "max_gptq_block")
        if self.max_gptq_block is not None and self.max_gptq_block & (self.max_gptq_block - 1):
            raise self.error("max_gptq_block", self.max_gptq_block, "must be a power of two")


# ---------------------------------------------------------------------------------------------------------
# Reading shapes from an HF config + weights


def _get(config, key, default=None):
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _shape(t) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def _out_features(state_dict, prefix: str) -> int:
    if f"{prefix}.weight" in state_dict:
        return _shape(state_dict[f"{prefix}.weight"])[0]
    if f"{prefix}.qweight" in state_dict:
        return _shape(state_dict[f"{prefix}.qweight"])[1]
    raise EdgepackError(f"weights: no {prefix}.weight or {prefix}.qweight")


def layer_indices(state_dict) -> list[int]:
    found = sorted({int(k.split(".")[2]) for k in state_dict if k.startswith("model.layers.")})
    if found != list(range(len(found))):
        raise EdgepackError(f"weights: decoder layers are not numbered 0..n-1 (found {found[:8]}...)")
    return found


def spec_from_hf_config(config, state_dict) -> DecoderSpec:
    """DecoderSpec from a transformers config (object or config.json dict) and the weights' shapes.

    Per-layer head counts and MLP widths are read from the weights, not the config, so depth-pruned
    (layers removed and renumbered) and channel-pruned (heads / KV groups / MLP rows removed per layer)
    checkpoints need nothing special. The head size comes from the config (`head_dim`, or the original
    hidden_size / num_attention_heads), since pruning removes whole heads and never changes it. The family
    (exporter.families) and each layer's attention type come from the config, whose per-layer lists the
    depth stage keeps in step with the layers that remain."""
    fc = family_from_hf_config(config)
    if "model.embed_tokens.weight" not in state_dict:
        raise EdgepackError("weights: no model.embed_tokens.weight")
    vocab, hidden = _shape(state_dict["model.embed_tokens.weight"])
    head_dim = _get(config, "head_dim") or (_get(config, "hidden_size") // _get(config, "num_attention_heads"))
    layers = []
    indices = layer_indices(state_dict)
    types = fc.layer_types or (FULL,) * len(indices)
    if len(types) != len(indices):
        raise EdgepackError(f"config lists {len(types)} layer types, the weights have {len(indices)} layers")
    for i in indices:
        p = f"model.layers.{i}"
        has_attn = any(k.startswith(f"{p}.self_attn.q_proj.") for k in state_dict)
        has_mlp = any(k.startswith(f"{p}.mlp.gate_proj.") for k in state_dict)
        nq = _out_features(state_dict, f"{p}.self_attn.q_proj") // head_dim if has_attn else 0
        nkv = _out_features(state_dict, f"{p}.self_attn.k_proj") // head_dim if has_attn else 0
        inter = _out_features(state_dict, f"{p}.mlp.gate_proj") if has_mlp else 0
        if has_attn and (nkv == 0 or nq % nkv):
            raise EdgepackError(f"layer {i}: {nq} query heads cannot be grouped over {nkv} KV heads")
        layers.append(LayerSpec(nq, nkv, inter, types[i]))
    eos = _get(config, "eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
    tied = bool(_get(config, "tie_word_embeddings", False))
    if not tied and "lm_head.weight" not in state_dict:
        tied = True  # no separate head in the weights: it is the embedding
    return DecoderSpec(
        vocab_size=vocab,
        hidden_size=hidden,
        head_dim=int(head_dim),
        layers=tuple(layers),
        rms_norm_eps=float(_get(config, "rms_norm_eps", 1e-5)),
        rope=fc.ropes[FULL],
        max_position_embeddings=int(_get(config, "max_position_embeddings", 2048) or 2048),
        tie_word_embeddings=tied,
        bos_token_id=_get(config, "bos_token_id"),
        eos_token_ids=eos_ids,
        family=fc.family,
        rope_local=fc.ropes.get(SLIDING) if any(l.attention_type == SLIDING for l in layers) else None,
    )


# ---------------------------------------------------------------------------------------------------------
# Weights of one projection


def as_numpy(t) -> np.ndarray:
    """numpy view of a numpy array or a CPU torch tensor (duck-typed: this module never imports torch)."""
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if t.is_floating_point() and str(t.dtype) != "torch.float32":
            t = t.float()
        return t.numpy()
    return np.asarray(t)


@dataclass
class Linear:
    """A projection: exactly one of `float_weight` [N, K] or `nbits`; optional bias [N] and EoRA (A, B)."""

    float_weight: np.ndarray | None = None
    nbits: NBitsWeight | None = None
    bias: np.ndarray | None = None
    eora: tuple[np.ndarray, np.ndarray] | None = None  # A [r, K], B [N, r]
    grid_exact: bool = False  # float weight that was already on a 4-bit block grid, stored exactly
    # fused projections (fuse_linears): each part's (rows of N, rank); B is block-diagonal along them
    eora_blocks: list[tuple[int, int]] | None = None

    @property
    def n(self) -> int:
        return self.float_weight.shape[0] if self.nbits is None else self.nbits.N

    @property
    def k(self) -> int:
        return self.float_weight.shape[1] if self.nbits is None else self.nbits.K


def load_linear(weights, prefix: str, options: GraphOptions, eora=None) -> Linear:
    if f"{prefix}.qweight" in weights:
        if options.gptq is None:
            raise EdgepackError(f"weights: {prefix} is GPTQ-quantized; pass GraphOptions(gptq=GptqFormat(...))")
        g = options.gptq
        qweight = as_numpy(weights[f"{prefix}.qweight"])
        g_idx = weights.get(f"{prefix}.g_idx")
        if g_idx is None:
            g_idx = np.arange(qweight.shape[0] * (32 // g.bits)) // g.group_size
        nb = gptq_to_matmulnbits(
            qweight,
            as_numpy(weights[f"{prefix}.qzeros"]),
            as_numpy(weights[f"{prefix}.scales"]),
            as_numpy(g_idx),
            bits=g.bits,
            group_size=g.group_size,
            zero_offset=g.zero_offset,
        )
        lin = Linear(nbits=nb if options.max_gptq_block is None else split_blocks(nb, options.max_gptq_block))
    elif f"{prefix}.weight" in weights:
        w = as_numpy(weights[f"{prefix}.weight"]).astype(np.float32)
        quantizing = options.projections == "int4" or options.gptq is not None
        grid = find_block_grid(w) if options.grid_exact and quantizing else None
        if grid is not None:
            lin = Linear(nbits=grid, grid_exact=True)
        elif options.projections == "int4":
            lin = Linear(nbits=quantize_rtn(w, bits=4, block_size=options.rtn_block_size))
        else:  # "keep" (GraphOptions checks the choice)
            lin = Linear(float_weight=w)
    else:
        raise EdgepackError(f"weights: no {prefix}.weight or {prefix}.qweight")
    if f"{prefix}.bias" in weights:
        lin.bias = as_numpy(weights[f"{prefix}.bias"]).astype(np.float32)
    if eora is not None:
        a, b = (as_numpy(x).astype(np.float32) for x in eora)
        if a.shape[1] != lin.k or b.shape[0] != lin.n or a.shape[0] != b.shape[1]:
            raise EdgepackError(f"EoRA for {prefix}: A {a.shape} / B {b.shape} do not fit a {lin.n}x{lin.k} weight")
        lin.eora = (a, b)
    return lin


def fuse_linears(parts: list[Linear]) -> Linear | None:
    """Stack projections that read the same input along N, or None when they cannot share one kernel."""
    if all(p.nbits is None for p in parts):
        fused = Linear(float_weight=np.concatenate([p.float_weight for p in parts], axis=0))
    elif all(p.nbits is not None for p in parts):
        try:
            fused = Linear(nbits=concat_nbits([p.nbits for p in parts]))
        except EdgepackError:
            return None
    else:
        return None
    if any(p.bias is not None for p in parts):
        fused.bias = np.concatenate([p.bias if p.bias is not None else np.zeros(p.n, np.float32) for p in parts])
    if any(p.eora is not None for p in parts):
        a_rows, rank = [], 0
        for p in parts:
            if p.eora is not None:
                a_rows.append(p.eora[0])
                rank += p.eora[0].shape[0]
        b = np.zeros((sum(p.n for p in parts), rank), np.float32)
        row = col = 0
        for p in parts:
            if p.eora is not None:
                r = p.eora[0].shape[0]
                b[row : row + p.n, col : col + r] = p.eora[1]
                col += r
            row += p.n
        fused.eora = (np.concatenate(a_rows, axis=0), b)
        fused.eora_blocks = [(p.n, p.eora[0].shape[0] if p.eora is not None else 0) for p in parts]
    return fused


# ---------------------------------------------------------------------------------------------------------
# Graph assembly


class GraphWriter:
    """Collects nodes and initializers; names every intermediate value uniquely."""

    def __init__(self):
        import onnx

        self.onnx = onnx
        self.nodes = []
        self.initializers = []
        self._names: set[str] = set()

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        name = self.unique(name)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(
        self,
        op: str,
        inputs: list[str],
        n_out: int = 1,
        name: str | None = None,
        domain: str = "",
        outputs: list[str] | None = None,
        unnamed: tuple[int, ...] = (),
        **attrs,
    ) -> list[str]:
        """Add one node; returns its output names. `unnamed`: indices of optional outputs left out ("")."""
        base = self.unique(name or op)
        outs = (
            outputs
            if outputs is not None
            else [self.unique(f"{base}/out{j}" if n_out > 1 else f"{base}/out") for j in range(n_out)]
        )
        outs = ["" if j in unnamed else o for j, o in enumerate(outs)]
        self.nodes.append(self.onnx.helper.make_node(op, inputs, outs, name=base, domain=domain or None, **attrs))
        return outs

    def linear(
        self,
        x: str,
        lin: Linear,
        name: str,
        accuracy_level: int,
        eora_bits: int | None = None,
        fuse_a: bool = False,
        split_b: bool = False,
    ) -> str:
        """y = x W^T (+ bias) (+ (x A^T) B^T for EoRA). With `fuse_a` and an n-bit weight, A is stacked under
        W's rows (quantized like W) so one kernel computes [x W^T | x A^T] and a Split separates them. With
        `split_b` and a fused projection (lin.eora_blocks), each part's block of B is its own kernel."""
        eora = lin.eora
        fold = eora is not None and fuse_a and lin.nbits is not None and lin.nbits.perm is None and lin.bias is None
        if lin.nbits is None:
            y = self.node("MatMul", [x, self.const(f"{name}.weight_t", lin.float_weight.T)], name=f"{name}/MatMul")[0]
            if lin.bias is not None:
                y = self.node("Add", [y, self.const(f"{name}.bias", lin.bias)], name=f"{name}/BiasAdd")[0]
        else:
            nb = lin.nbits
            xin = x
            if nb.perm is not None:  # act-order GPTQ: the weight's K is stored sorted by group
                xin = self.node("Gather", [x, self.const(f"{name}.perm", nb.perm)], axis=-1, name=f"{name}/ActOrder")[0]
            if fold:
                nb = concat_nbits(
                    [
                        nb,
                        quantize_rtn(eora[0], bits=nb.bits, block_size=nb.block_size, symmetric=nb.zero_points is None),
                    ]
                )
            consts = [
                self.const(f"{name}.qweight", nb.B),
                self.const(f"{name}.scales", nb.scales),
                self.const(f"{name}.zero_points", nb.zero_points) if nb.zero_points is not None else "",
                self.const(f"{name}.bias", lin.bias) if lin.bias is not None else "",
            ]
            y = self.matmul_nbits(xin, nb, consts, name, accuracy_level)
            if nb.offsets is not None:
                y = self.block_offsets(xin, y, nb, name)
        if eora is None:
            return y
        a, b = eora

        def factor(w: np.ndarray) -> Linear:
            if eora_bits is None:
                return Linear(float_weight=w)
            return Linear(nbits=quantize_rtn(w, bits=eora_bits, block_size=eora_block(w.shape[1])))

        if fold:
            split = self.const(f"{name}.eora_split", np.array([lin.n, a.shape[0]], np.int64))
            y, t = self.node("Split", [y, split], n_out=2, axis=-1, name=f"{name}/EoRA_Split")
        else:
            t = self.linear(x, factor(a), f"{name}.eora_A", accuracy_level)
        blocks = lin.eora_blocks if split_b else None
        if not blocks or len(blocks) < 2 or any(r == 0 for _, r in blocks):
            u = self.linear(t, factor(b), f"{name}.eora_B", accuracy_level)
        else:  # B's diagonal blocks only: part i's rows of N read part i's columns of the rank
            ranks = self.const(f"{name}.eora_ranks", np.array([r for _, r in blocks], np.int64))
            ts = self.node("Split", [t, ranks], n_out=len(blocks), axis=-1, name=f"{name}/EoRA_RankSplit")
            us, row, col = [], 0, 0
            for i, ((n, r), ti) in enumerate(zip(blocks, ts)):
                us.append(self.linear(ti, factor(b[row : row + n, col : col + r]), f"{name}.eora_B{i}", accuracy_level))
                row, col = row + n, col + r
            u = self.node("Concat", us, axis=-1, name=f"{name}/EoRA_Concat")[0]
        return self.node("Add", [y, u], name=f"{name}/EoRA_Add")[0]

    def block_offsets(self, x: str, y: str, nb: NBitsWeight, name: str) -> str:
        """y + (sum of x over each K block) @ offsets^T: the non-integer part of a grid-exact weight's zero
        points (exporter.int4.find_block_grid), a float matmul only K / block_size deep."""
        shape = self.const(f"{name}.block_shape", np.array([0, 0, nb.n_blocks, nb.block_size], np.int64))
        blocks = self.node("Reshape", [x, shape], name=f"{name}/BlockRows")[0]
        axes = self.const(f"{name}.block_axis", np.array([-1], np.int64))
        sums = self.node("ReduceSum", [blocks, axes], keepdims=0, name=f"{name}/BlockSums")[0]
        offs = self.node("MatMul", [sums, self.const(f"{name}.offsets_t", nb.offsets.T.copy())], name=f"{name}/Offsets")
        return self.node("Add", [y, offs[0]], name=f"{name}/OffsetAdd")[0]

    def matmul_nbits(self, x: str, nb: NBitsWeight, consts: list[str], name: str, accuracy_level: int) -> str:
        """MatMulNBits over already-registered initializers [B, scales, zero_points or "", bias or ""]."""
        b, scales, zp, bias = consts
        inputs = [x, b, scales, zp, "", bias]
        while inputs[-1] == "":
            inputs.pop()
        return self.node(
            "MatMulNBits",
            inputs,
            domain=MS,
            name=f"{name}/MatMulNBits",
            K=nb.K,
            N=nb.N,
            bits=nb.bits,
            block_size=nb.block_size,
            accuracy_level=accuracy_level,
        )[0]


def eora_block(k: int) -> int:
    """Block size for a quantized EoRA factor with K inputs: 32, or smaller for a small rank."""
    return 32 if k >= 32 else 16


def _eora_for(eora: dict | None, module: str):
    if not eora:
        return None
    return eora.get(module)


def _quantized_table(w: np.ndarray, kind: str, block: int) -> NBitsWeight:
    bits = {"int8": 8, "int4": 4}[kind]
    h = w.shape[1]
    while block > 16 and h % block:  # GatherBlockQuantized needs whole blocks along the hidden axis
        block //= 2
    if h % block:
        raise EdgepackError(f"hidden_size {h} is not a multiple of 16: cannot block-quantize the embedding")
    return quantize_rtn(w, bits=bits, block_size=block, symmetric=True)


def build_decoder(
    weights,
    spec: DecoderSpec,
    path,
    options: GraphOptions | None = None,
    eora: dict | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the fused decoder graph to `path` (+ `path.name + ".data"` with the weights) and return its
    metadata (also stored in the model's metadata_props under runtime.contract.METADATA_KEY).

    weights: name -> array in HF naming (numpy or CPU torch tensors); a projection is either
    `<module>.weight` (float) or GPTQ `<module>.qweight/.qzeros/.scales/.g_idx` (with options.gptq).
    eora: optional {"model.layers.{i}.self_attn.q_proj": (A [r, in], B [out, r]), ...}, scaling folded in."""
    import onnx

    b = DecoderBuilder(weights, spec, options or GraphOptions(), eora)
    layers = range(spec.n_layers)
    if progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc="building ONNX decoder", unit="layer")
    b.embed()
    for i in layers:
        b.layer(i)
    b.lm_head(b.norm("model.norm.weight", "final_norm"))
    path = Path(path)
    metadata = b.metadata(path.name + ".data")
    _save_atomically(onnx, b.model(metadata), path, metadata["external_data"])
    return metadata


class DecoderBuilder:
    """The decoder graph, one block at a time: `embed`, then per layer `attention(i)` and `mlp(i)`, then
    `lm_head`. The residual stream is two names: `residual` (the running sum) and `pending` (the last
    block's output, not yet added); `norm` folds the pending add into the next RMSNorm
    (SkipSimplifiedLayerNormalization), so the residual stream never needs an Add node of its own."""

    def __init__(self, weights, spec: DecoderSpec, options: GraphOptions, eora: dict | None):
        from onnx import TensorProto, helper

        self.w, self.spec, self.o, self.eora = weights, spec, options, eora
        self.max_len = int(options.max_len or min(spec.max_position_embeddings, 2048))
        if any(l.num_attention_heads for l in spec.layers) and spec.head_dim % 16:
            raise EdgepackError(f"head_dim={spec.head_dim}: GroupQueryAttention with rotary needs a multiple of 16")
        self.g = GraphWriter()
        self.helper, self.tp = helper, TensorProto
        self.inputs = [
            helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, ["batch_size"]),
            helper.make_tensor_value_info(TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []),
            helper.make_tensor_value_info(LOGITS_POSITIONS, TensorProto.INT64, ["batch_size", "num_logits"]),
        ]
        self.outputs = [
            helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch_size", "num_logits", spec.vocab_size])
        ]
        self.kv_layers: list[dict] = []
        self.residual: str = ""  # the running residual sum
        self.pending: str | None = None  # a block's output still to be added to `residual`
        self.embed_table: np.ndarray | None = None
        self.embed_name: str | None = None  # the fp32 embedding initializer, shared by a tied fp32 head
        self.shared_table = None  # (NBitsWeight, consts) of a quantized embedding the tied head reads too
        self.grid_exact: list[str] = []  # projections stored grid-exact (GraphOptions.grid_exact)

    # -- helpers
    def const_f32(self, key: str) -> str:
        return self.g.const(key, as_numpy(self.w[key]).astype(np.float32))

    def linear(self, x: str, lin: Linear, name: str) -> str:
        o = self.o
        return self.g.linear(x, lin, name, o.accuracy_level, o.eora_bits, o.eora_fuse_a, o.eora_split_b)

    def load(self, prefix: str) -> Linear:
        lin = load_linear(self.w, prefix, self.o, _eora_for(self.eora, prefix))
        if lin.grid_exact:
            self.grid_exact.append(prefix)
        return lin

    def norm_weight(self, key: str) -> str:
        """An RMSNorm weight as the kernel multiplies it (Gemma's stored w is applied as 1 + w)."""
        offset = np.float32(self.spec.family.norm_weight_offset)
        return self.g.const(key, as_numpy(self.w[key]).astype(np.float32) + offset)

    def rms(self, x: str, weight_key: str, name: str) -> str:
        """A plain RMSNorm over the last axis of `x` (no residual involved)."""
        return self.g.node(
            "SimplifiedLayerNormalization",
            [x, self.norm_weight(weight_key)],
            name=f"{name}/SimplifiedLayerNorm",
            axis=-1,
            epsilon=float(self.spec.rms_norm_eps),
            stash_type=1,
        )[0]

    def head_rms(self, x: str, weight_key: str, name: str) -> str:
        """RMSNorm of every head of a [batch, seq, heads * head_dim] projection (Gemma's q/k norm)."""
        g = self.g
        heads = g.node("Reshape", [x, self.heads_shape], name=f"{name}/ToHeads")[0]
        y = self.rms(heads, weight_key, name)
        return g.node("Reshape", [y, self.flat_heads_shape], name=f"{name}/FromHeads")[0]

    def norm(self, weight_key: str, name: str) -> str:
        """RMSNorm of the residual stream; adds the pending block output to it first (one fused kernel)."""
        if self.pending is None:
            return self.rms(self.residual, weight_key, name)
        w, eps = self.norm_weight(weight_key), float(self.spec.rms_norm_eps)
        # outputs 1 and 2 (mean, inv_std_var) are training outputs: left unnamed
        y, _, _, summed = self.g.node(
            "SkipSimplifiedLayerNormalization",
            [self.pending, self.residual, w],
            n_out=4,
            domain=MS,
            name=f"{name}/SkipSimplifiedLayerNorm",
            unnamed=(1, 2),
            epsilon=eps,
        )
        self.residual, self.pending = summed, None
        return y

    # -- blocks
    def embed(self) -> None:
        vocab, hidden = self.spec.vocab_size, self.spec.hidden_size
        table = as_numpy(self.w["model.embed_tokens.weight"]).astype(np.float32)
        if table.shape != (vocab, hidden):
            raise EdgepackError(f"model.embed_tokens.weight is {table.shape}, spec says {(vocab, hidden)}")
        self.embed_table, g = table, self.g
        if self.o.embedding == "fp32":
            self.embed_name = g.const("model.embed_tokens.weight", table)
            self.residual = g.node("Gather", [self.embed_name, INPUT_IDS], axis=0, name="embed_tokens/Gather")[0]
        else:
            q = _quantized_table(table, self.o.embedding, self.o.head_block_size)
            b_name = g.const("model.embed_tokens.qweight", q.B)
            scales = g.const("model.embed_tokens.scales", q.scales)
            if self.spec.tie_word_embeddings and self.o.lm_head == self.o.embedding:
                # Tied and quantized alike: the LM head's MatMulNBits reads the very same initializers, and the
                # lookup sees them as [vocab, hidden * bits / 8] through a Reshape (H is a whole number of blocks).
                self.shared_table = (q, [b_name, scales, "", ""])
            data = g.node(
                "Reshape", [b_name, g.const("embed_rows", np.array([vocab, -1], np.int64))], name="embed_tokens/Rows"
            )[0]
            self.residual = g.node(
                "GatherBlockQuantized",
                [data, INPUT_IDS, scales],
                domain=MS,
                name="embed_tokens/GatherBlockQuantized",
                bits=q.bits,
                block_size=q.block_size,
                gather_axis=0,
                quantize_axis=1,
            )[0]
        if self.spec.family.embedding_scale is not None:
            scale = g.const("embed_scale", np.array(self.spec.family.embedding_scale, np.float32))
            self.residual = g.node("Mul", [self.residual, scale], name="embed_tokens/Scale")[0]
        self.rope_caches = {}
        ropes = {FULL: self.spec.rope, SLIDING: self.spec.rope_local}
        for kind, rope in ropes.items():
            if rope is not None:
                cos, sin = cos_sin_cache(rope, self.spec.head_dim, self.max_len)
                suffix = "" if kind == FULL else "_local"
                self.rope_caches[kind] = (g.const(f"cos_cache{suffix}", cos), g.const(f"sin_cache{suffix}", sin))
        self.heads_shape = g.const("heads_shape", np.array([0, 0, -1, self.spec.head_dim], np.int64))
        self.flat_heads_shape = g.const("flat_heads_shape", np.array([0, 0, -1], np.int64))

    def layer(self, i: int) -> None:
        if self.spec.layers[i].num_attention_heads:
            self.attention(i)
        if self.spec.layers[i].intermediate_size:
            self.mlp(i)

    def qkv(self, i: int, h: str) -> list[str]:
        """GQA's first three inputs: packed QKV (third and second ""), or q, k, v each [batch, seq, n]. With
        the family's q/k norm, a fused projection is split so each head of q and k is normalized first."""
        ls, hd, p = self.spec.layers[i], self.spec.head_dim, f"model.layers.{i}.self_attn"
        q, k, v = (self.load(f"{p}.{m}") for m in ("q_proj", "k_proj", "v_proj"))
        if (q.n, k.n, v.n) != (ls.num_attention_heads * hd, ls.num_key_value_heads * hd, ls.num_key_value_heads * hd):
            raise EdgepackError(f"layer {i}: q/k/v shapes {q.n}/{k.n}/{v.n} disagree with the spec")
        fused = fuse_linears([q, k, v]) if self.o.fuse_qkv else None
        if fused is not None:
            packed = self.linear(h, fused, f"layers.{i}.attn.qkv_proj")
            if not self.spec.family.qk_norm:
                return [packed, "", ""]
            split = self.g.const(f"layers.{i}.attn.split", np.array([q.n, k.n, v.n], np.int64))
            outs = self.g.node("Split", [packed, split], n_out=3, axis=-1, name=f"layers.{i}/attn/Split")
        else:
            outs = [
                self.linear(h, lin, f"layers.{i}.attn.{m}") for lin, m in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj"))
            ]
        if self.spec.family.qk_norm:
            outs[0] = self.head_rms(outs[0], f"{p}.q_norm.weight", f"layers.{i}/attn/q_norm")
            outs[1] = self.head_rms(outs[1], f"{p}.k_norm.weight", f"layers.{i}/attn/k_norm")
        return list(outs)

    def attention(self, i: int) -> None:
        ls, hd, p, fam = self.spec.layers[i], self.spec.head_dim, f"model.layers.{i}.self_attn", self.spec.family
        h = self.norm(f"model.layers.{i}.input_layernorm.weight", f"layers.{i}/input_layernorm")
        qkv = self.qkv(i, h)
        if ls.attention_type not in self.rope_caches:
            raise EdgepackError(f"layer {i}: attention type {ls.attention_type!r} has no RoPE settings")
        cos, sin = self.rope_caches[ls.attention_type]
        # GQA's local_window_size and HF's sliding_window both count the current token (checked by the
        # parity tests: a window one smaller or larger changes the logits from position WINDOW on)
        window = fam.sliding_window if ls.attention_type == SLIDING and fam.sliding_window else -1
        extra = {}
        if fam.attention_scale is not None:
            extra["scale"] = float(fam.attention_scale)
        if fam.attention_softcap is not None:
            extra["softcap"] = float(fam.attention_softcap)
        names = {"layer": i, "kv_heads": ls.num_key_value_heads, **kv_names(i)}
        self.kv_layers.append(names)
        shape = ["batch_size", ls.num_key_value_heads, "past_sequence_length", hd]
        self.inputs += [
            self.helper.make_tensor_value_info(names[r], self.tp.FLOAT, shape) for r in ("past_key", "past_value")
        ]
        shape = ["batch_size", ls.num_key_value_heads, "present_sequence_length", hd]
        self.outputs += [
            self.helper.make_tensor_value_info(names[r], self.tp.FLOAT, shape) for r in ("present_key", "present_value")
        ]
        attn = self.g.node(
            "GroupQueryAttention",
            qkv + [names["past_key"], names["past_value"], SEQLENS_K, TOTAL_SEQUENCE_LENGTH, cos, sin],
            domain=MS,
            name=f"layers.{i}/GroupQueryAttention",
            outputs=[self.g.unique(f"layers.{i}/attn/out"), names["present_key"], names["present_value"]],
            num_heads=ls.num_attention_heads,
            kv_num_heads=ls.num_key_value_heads,
            do_rotary=1,
            rotary_interleaved=0,
            local_window_size=window,
            **extra,
        )[0]
        out = self.linear(attn, self.load(f"{p}.o_proj"), f"layers.{i}.attn.o_proj")
        if fam.post_attention_norm:
            out = self.rms(out, f"model.layers.{i}.{fam.post_attention_norm}.weight", f"layers.{i}/post_attn_norm")
        self.pending = out

    def mlp(self, i: int) -> None:
        g, p, fam = self.g, f"model.layers.{i}.mlp", self.spec.family
        h = self.norm(f"model.layers.{i}.{fam.pre_mlp_norm}.weight", f"layers.{i}/{fam.pre_mlp_norm}")
        gate, up = self.load(f"{p}.gate_proj"), self.load(f"{p}.up_proj")
        fused = fuse_linears([gate, up]) if self.o.fuse_gate_up else None
        if fused is not None:
            gu = self.linear(h, fused, f"layers.{i}.mlp.gate_up_proj")
            split = g.const(f"layers.{i}.mlp.split", np.array([gate.n, up.n], np.int64))
            gate_out, up_out = g.node("Split", [gu, split], n_out=2, axis=-1, name=f"layers.{i}/mlp/Split")
        else:
            gate_out = self.linear(h, gate, f"layers.{i}.mlp.gate_proj")
            up_out = self.linear(h, up, f"layers.{i}.mlp.up_proj")
        act = g.node("Mul", [self.activation(gate_out, f"layers.{i}/mlp"), up_out], name=f"layers.{i}/mlp/GateMul")[0]
        out = self.linear(act, self.load(f"{p}.down_proj"), f"layers.{i}.mlp.down_proj")
        if fam.post_mlp_norm:
            out = self.rms(out, f"model.layers.{i}.{fam.post_mlp_norm}.weight", f"layers.{i}/post_mlp_norm")
        self.pending = out

    def activation(self, x: str, name: str) -> str:
        """The gate's activation: SiLU (x * sigmoid(x)) or GeGLU's tanh-approximated GELU (FastGelu)."""
        if self.spec.family.activation == "gelu_tanh":
            return self.g.node("FastGelu", [x], domain=MS, name=f"{name}/FastGelu")[0]
        sig = self.g.node("Sigmoid", [x], name=f"{name}/Sigmoid")[0]
        return self.g.node("Mul", [x, sig], name=f"{name}/SiLU")[0]

    def lm_head(self, h: str) -> None:
        """Only the requested positions (logits_positions) go through the head: GatherElements along seq."""
        g, hidden, vocab = self.g, self.spec.hidden_size, self.spec.vocab_size
        idx = g.node(
            "Unsqueeze", [LOGITS_POSITIONS, g.const("axes_2", np.array([2], np.int64))], name="logits/Unsqueeze"
        )[0]
        pos_shape = g.node("Shape", [LOGITS_POSITIONS], name="logits/Shape")[0]
        full_shape = g.node(
            "Concat", [pos_shape, g.const("hidden_size", np.array([hidden], np.int64))], axis=0, name="logits/Concat"
        )[0]
        idx = g.node("Expand", [idx, full_shape], name="logits/Expand")[0]
        h = g.node("GatherElements", [h, idx], axis=1, name="logits/GatherElements")[0]
        tied, cap = self.spec.tie_word_embeddings, self.spec.family.final_logit_softcap
        final = LOGITS if cap is None else g.unique("logits/uncapped")
        head_w = self.embed_table if tied else as_numpy(self.w["lm_head.weight"]).astype(np.float32)
        if head_w.shape != (vocab, hidden):
            raise EdgepackError(f"lm_head weight is {head_w.shape}, expected {(vocab, hidden)}")
        if self.o.lm_head == "fp32" and tied and self.embed_name is not None:
            # Share the embedding initializer: Gemm reads it transposed (transB), no second copy on disk.
            flat = g.node(
                "Reshape", [h, g.const("flat_shape", np.array([-1, hidden], np.int64))], name="lm_head/Flatten"
            )[0]
            y = g.node("Gemm", [flat, self.embed_name], transB=1, name="lm_head/Gemm")[0]
            out_shape = g.node(
                "Concat", [pos_shape, g.const("vocab_size", np.array([vocab], np.int64))], axis=0, name="lm_head/Concat"
            )[0]
            g.node("Reshape", [y, out_shape], name="lm_head/Unflatten", outputs=[final])
            self.softcap_logits(final, cap)
            return
        if self.o.lm_head == "fp32":
            y = g.linear(h, Linear(float_weight=head_w), "lm_head", self.o.accuracy_level)
        elif self.shared_table is not None:
            y = g.matmul_nbits(h, self.shared_table[0], self.shared_table[1], "lm_head", self.o.accuracy_level)
        else:
            bits = {"int8": 8, "int4": 4}[self.o.lm_head]
            lin = Linear(nbits=quantize_rtn(head_w, bits=bits, block_size=self.o.head_block_size, symmetric=True))
            y = g.linear(h, lin, "lm_head", self.o.accuracy_level)
        g.node("Identity", [y], name="lm_head/Identity", outputs=[final])
        self.softcap_logits(final, cap)

    def softcap_logits(self, y: str, cap: float | None) -> None:
        """logits = cap * tanh(y / cap), when the family caps them (otherwise `y` already is LOGITS)."""
        if cap is None:
            return
        c = self.g.const("logit_softcap", np.array(cap, np.float32))
        t = self.g.node("Div", [y, c], name="logits/SoftcapDiv")[0]
        t = self.g.node("Tanh", [t], name="logits/SoftcapTanh")[0]
        self.g.node("Mul", [t, c], name="logits/SoftcapMul", outputs=[LOGITS])

    # -- the file
    def metadata(self, data_name: str) -> dict[str, Any]:
        spec, o = self.spec, self.o
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "max_len": self.max_len,
            "vocab_size": spec.vocab_size,
            "hidden_size": spec.hidden_size,
            "head_dim": spec.head_dim,
            "num_layers": spec.n_layers,
            "layers": [asdict(l) for l in spec.layers],
            "kv_cache": self.kv_layers,
            "kv_layout": "BNSH",
            "kv_dtype": "float32",
            "inputs": dict(INPUT_DOCS),
            "outputs": dict(OUTPUT_DOCS),
            "bos_token_id": spec.bos_token_id,
            "eos_token_ids": list(spec.eos_token_ids),
            "rope": asdict(spec.rope),
            "rope_local": asdict(spec.rope_local) if spec.rope_local else None,
            "family": asdict(spec.family),
            "architecture": spec.family.architecture,
            "weights": {
                "projections": _projection_kind(self.w, o),
                "grid_exact_projections": len(self.grid_exact),
                "gptq": asdict(o.gptq) if o.gptq else None,
                "max_gptq_block": o.max_gptq_block,
                "embedding": o.embedding,
                "lm_head": o.lm_head,
                "tied_embeddings": spec.tie_word_embeddings,
                "accuracy_level": o.accuracy_level,
                "eora_modules": len(self.eora or {}),
                "eora_bits": o.eora_bits,
                "eora_fuse_a": bool(o.eora_fuse_a and self.eora),
                "eora_split_b": bool(o.eora_split_b and self.eora),
                "fused_qkv": o.fuse_qkv,
                "fused_gate_up": o.fuse_gate_up,
            },
            "external_data": data_name,
        }

    def model(self, metadata: dict):
        helper = self.helper
        graph = helper.make_graph(self.g.nodes, "edgepack_decoder", self.inputs, self.outputs, self.g.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
            producer_name="edgepack",
            ir_version=10,
        )
        helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata)})
        return model


def _projection_kind(weights, options: GraphOptions) -> str:
    if any(k.endswith(".qweight") for k in weights):
        return f"int{options.gptq.bits}-gptq" if options.gptq else "gptq"
    return "int4-rtn" if options.projections == "int4" else "fp32"


def _save_atomically(onnx, model, path: Path, data_name: str) -> None:
    """Write model + external data into a temporary sibling directory, then move both into place (data
    first, so a model file never points at a missing data file). The manifest's digests catch a crash
    between the two renames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        onnx.save_model(
            model,
            str(tmp / path.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        if (tmp / data_name).exists():
            os.replace(tmp / data_name, path.parent / data_name)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
