"""The fused ONNX decoder graph against Hugging Face, and the int4 re-packing against GPTQ, bit for bit.

Helpers here (pruned reference models, synthetic GPTQ tensors, a one-shot ORT run) are also used by
tests/test_onnx_engine.py.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import make_tiny_llama
from exporter.int4 import (
    dequantize_gptq,
    dequantize_matmulnbits,
    gptq_to_matmulnbits,
    pack_low_first,
    quantize_rtn,
    quantize_rtn_int4,
    split_blocks,
    unpack_low_first,
)
from exporter.onnx_graph import (
    GptqFormat,
    GraphOptions,
    GraphWriter,
    Linear,
    build_decoder,
    spec_from_hf_config,
)
from exporter.rope import cos_sin_cache, rope_from_hf
from runtime.errors import EdgepackError

PROJ = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


# ---------------------------------------------------------------------------------------------------------
# Helpers shared with test_onnx_engine.py


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def hf_with_weights(config, weights: dict[str, np.ndarray]):
    """A float32 LlamaForCausalLM of `config` holding `weights` (e.g. dequantized ones)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config).float().eval()
    skip = {"lm_head.weight"} if config.tie_word_embeddings else set()  # tied: the head is the embedding
    sd = {
        k: torch.from_numpy(np.ascontiguousarray(v))
        for k, v in weights.items()
        if k in model.state_dict() and k not in skip
    }
    model.load_state_dict(sd, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def depth_pruned(kind: str = "plain", drop=(1, 2)):
    """(HF reference, weights, config) of a tiny model with layers `drop` removed and the rest renumbered."""
    from transformers import LlamaForCausalLM

    full = make_tiny_llama(kind)
    keep = [i for i in range(full.config.num_hidden_layers) if i not in drop]
    sd = numpy_state(full)
    out = {k: v for k, v in sd.items() if not k.startswith("model.layers.")}
    for new, old in enumerate(keep):
        prefix = f"model.layers.{old}."
        for k, v in sd.items():
            if k.startswith(prefix):
                out[f"model.layers.{new}." + k[len(prefix) :]] = v
    config = full.config.__class__(**{**full.config.to_dict(), "num_hidden_layers": len(keep)})
    ref = LlamaForCausalLM(config).float().eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in out.items()}, strict=False)
    if config.tie_word_embeddings:
        ref.tie_weights()
    return ref, out, config


# Per layer: KV groups kept (of 2; each serves 2 of the 4 query heads) and MLP rows kept (of 128).
CHANNEL_PLAN = {0: ([0, 1], 96), 1: ([1], 64), 2: ([0, 1], 128), 3: ([0], 48)}


def channel_pruned(kind: str = "plain", plan=CHANNEL_PLAN):
    """(HF reference, sliced weights, config). The reference is the full-size HF model with the pruned heads
    and MLP rows zeroed, which computes exactly what the sliced model computes (a zeroed head attends to
    zero values and feeds zero o_proj columns; a zeroed MLP row gives silu(0) * 0)."""
    ref = make_tiny_llama(kind)
    cfg = ref.config
    hd, n_rep = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    sd = numpy_state(ref)
    sliced = dict(sd)
    rng = np.random.default_rng(7)
    with torch.no_grad():
        for i, (groups, inter) in plan.items():
            p = f"model.layers.{i}"
            q_heads = [g * n_rep + r for g in groups for r in range(n_rep)]
            q_rows = np.concatenate([np.arange(h * hd, (h + 1) * hd) for h in q_heads])
            kv_rows = np.concatenate([np.arange(g * hd, (g + 1) * hd) for g in groups])
            mlp_rows = np.sort(rng.choice(cfg.intermediate_size, inter, replace=False))
            sliced[f"{p}.self_attn.q_proj.weight"] = sd[f"{p}.self_attn.q_proj.weight"][q_rows]
            sliced[f"{p}.self_attn.k_proj.weight"] = sd[f"{p}.self_attn.k_proj.weight"][kv_rows]
            sliced[f"{p}.self_attn.v_proj.weight"] = sd[f"{p}.self_attn.v_proj.weight"][kv_rows]
            sliced[f"{p}.self_attn.o_proj.weight"] = sd[f"{p}.self_attn.o_proj.weight"][:, q_rows]
            sliced[f"{p}.mlp.gate_proj.weight"] = sd[f"{p}.mlp.gate_proj.weight"][mlp_rows]
            sliced[f"{p}.mlp.up_proj.weight"] = sd[f"{p}.mlp.up_proj.weight"][mlp_rows]
            sliced[f"{p}.mlp.down_proj.weight"] = sd[f"{p}.mlp.down_proj.weight"][:, mlp_rows]
            layer = ref.model.layers[i]
            drop_q = np.setdiff1d(np.arange(cfg.num_attention_heads * hd), q_rows)
            drop_kv = np.setdiff1d(np.arange(cfg.num_key_value_heads * hd), kv_rows)
            drop_mlp = np.setdiff1d(np.arange(cfg.intermediate_size), mlp_rows)
            layer.self_attn.q_proj.weight[drop_q] = 0
            layer.self_attn.k_proj.weight[drop_kv] = 0
            layer.self_attn.v_proj.weight[drop_kv] = 0
            layer.self_attn.o_proj.weight[:, drop_q] = 0
            layer.mlp.gate_proj.weight[drop_mlp] = 0
            layer.mlp.up_proj.weight[drop_mlp] = 0
            layer.mlp.down_proj.weight[:, drop_mlp] = 0
    return ref, sliced, cfg


def pack_gptq_int32(codes: np.ndarray, axis: int, bits: int = 4) -> np.ndarray:
    """GPTQ's int32 packing (lowest bits first) of uint codes along `axis` (0: qweight, 1: qzeros)."""
    per = 32 // bits
    c = np.asarray(codes, np.uint64) & ((1 << bits) - 1)
    if axis == 0:
        c = c.reshape(c.shape[0] // per, per, c.shape[1])
        words = sum(c[:, i, :] << np.uint64(bits * i) for i in range(per))
    else:
        c = c.reshape(c.shape[0], c.shape[1] // per, per)
        words = sum(c[:, :, i] << np.uint64(bits * i) for i in range(per))
    return words.astype(np.uint32).view(np.int32)


def fake_gptq(w: np.ndarray, group: int, rng, act_order: bool = False, sym: bool = False, v1: bool = True):
    """GPTQ-format tensors (qweight, qzeros, scales fp16, g_idx) that round-to-nearest quantize W [N, K]."""
    n, k = w.shape
    if act_order:
        perm = rng.permutation(k)
        g_idx = np.empty(k, np.int32)
        g_idx[perm] = np.arange(k) // group
    else:
        g_idx = (np.arange(k) // group).astype(np.int32)
    n_groups = -(-k // group)
    scales = np.zeros((n_groups, n), np.float32)
    zeros = np.zeros((n_groups, n), np.int64)
    for gi in range(n_groups):
        cols = w[:, g_idx == gi]
        if sym:
            scales[gi] = np.abs(cols).max(axis=1) / 7.5
            zeros[gi] = 8
        else:
            lo, hi = np.minimum(cols.min(axis=1), 0), np.maximum(cols.max(axis=1), 0)
            scales[gi] = (hi - lo) / 15
            zeros[gi] = np.clip(np.round(-lo / scales[gi]), 0, 15)
    scales = scales.astype(np.float16)
    s = scales.astype(np.float32)[g_idx]  # [K, N]
    codes = np.clip(np.round(w.T / s) + zeros[g_idx], 0, 15).astype(np.int64)  # [K, N]
    stored = (zeros - 1) & 0xF if v1 else zeros  # v1 stores zero - 1 (0 wraps to 15, read back as 16)
    k_pad = -(-k // 8) * 8
    codes_p = np.zeros((k_pad, n), np.int64)
    codes_p[:k] = codes
    return pack_gptq_int32(codes_p, 0), pack_gptq_int32(stored, 1), scales, g_idx


def gptq_weights(weights: dict, group: int, rng, act_order=False, sym=False):
    """The model's projections as GPTQ tensors, and the float state dict with their dequantized values."""
    quant, deq = dict(weights), dict(weights)
    for name in list(weights):
        if name.endswith(".weight") and any(p in name for p in PROJ):
            prefix = name[: -len(".weight")]
            qw, qz, sc, gi = fake_gptq(weights[name], group, rng, act_order=act_order, sym=sym)
            del quant[name]
            quant.update(
                {f"{prefix}.qweight": qw, f"{prefix}.qzeros": qz, f"{prefix}.scales": sc, f"{prefix}.g_idx": gi}
            )
            deq[name] = dequantize_gptq(qw, qz, sc, gi, bits=4, zero_offset=1)
    return quant, deq


def run_graph(path, meta, ids: np.ndarray) -> np.ndarray:
    """All-position logits of one cache-less forward pass of a built graph."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    b, t = ids.shape
    feeds = {
        "input_ids": ids.astype(np.int64),
        "seqlens_k": np.full(b, t - 1, np.int32),
        "total_sequence_length": np.array(t, np.int32),
        "logits_positions": np.tile(np.arange(t, dtype=np.int64), (b, 1)),
    }
    for kv in meta["kv_cache"]:
        feeds[kv["past_key"]] = feeds[kv["past_value"]] = np.zeros((b, kv["kv_heads"], 0, meta["head_dim"]), np.float32)
    return sess.run(["logits"], feeds)[0]


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()


def build(tmp_path, weights, config, name="model", **opts):
    spec = spec_from_hf_config(config, weights)
    eora = opts.pop("eora", None)
    path = tmp_path / name / "model.onnx"
    meta = build_decoder(
        weights, spec, path, GraphOptions(max_len=opts.pop("max_len", 96), **opts), eora=eora, progress=False
    )
    return path, meta


IDS = np.random.default_rng(3).integers(3, 256, (2, 17))


# ---------------------------------------------------------------------------------------------------------
# int4 packing


def test_pack_roundtrip_low_nibble_first():
    codes = np.array([[1, 2, 15, 0, 7]], np.uint8)
    packed = pack_low_first(codes, 4)
    assert packed.tolist() == [[0x21, 0x0F, 0x07]]
    assert unpack_low_first(packed, 4, 5).tolist() == codes.tolist()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_conversion_is_bit_exact(act_order, sym):
    """K=96 with group 64: the last block is padded; dequantizing both layouts gives identical floats."""
    rng = np.random.default_rng(0)
    n, k, group = 40, 96, 64
    qweight = rng.integers(-(2**31), 2**31, (k // 8, n), dtype=np.int64).astype(np.int32)
    stored = rng.integers(0, 16, (2, n)) if not sym else np.full((2, n), 7)
    qzeros = pack_gptq_int32(stored, 1)
    scales = rng.uniform(0.001, 0.05, (2, n)).astype(np.float16)
    g_idx = np.arange(k) // group
    if act_order:
        g_idx = np.empty(k, np.int64)
        g_idx[rng.permutation(k)] = np.arange(k) // group
    nb = gptq_to_matmulnbits(qweight, qzeros, scales, g_idx, bits=4, group_size=group)
    assert nb.B.shape == (n, 2, 32) and nb.scales.shape == (n, 2)
    assert (nb.perm is not None) == act_order
    if sym:
        assert nb.zero_points is None  # all zeros are 8: the op's default
    np.testing.assert_array_equal(dequantize_matmulnbits(nb), dequantize_gptq(qweight, qzeros, scales, g_idx))
    # padded tail of the last block dequantizes to exactly zero
    codes = unpack_low_first(nb.B, 4).reshape(n, -1)[:, k:]
    assert codes.shape == (n, 32)


@pytest.mark.parametrize("zeros", ["sym", "packed", "float", "offsets"])
@pytest.mark.parametrize("act_order", [False, True])
def test_split_blocks_keeps_every_value(zeros, act_order):
    """Block 64 -> 16 with K=80 (the last 64-block is mostly padding: only ceil(80/16)=5 sub-blocks stay)."""
    rng = np.random.default_rng(2)
    n, k, group = 24, 80, 64
    qweight = rng.integers(-(2**31), 2**31, (96 // 8, n), dtype=np.int64).astype(np.int32)
    stored = np.full((2, n), 7) if zeros == "sym" else rng.integers(0, 15, (2, n))
    if zeros == "float":
        stored[0, 0] = 15  # zero 16: the float zero-point form
    scales = rng.uniform(0.001, 0.05, (2, n)).astype(np.float16)
    g_idx = np.arange(k) // group
    if act_order:
        g_idx = np.empty(k, np.int64)
        g_idx[rng.permutation(k)] = np.arange(k) // group
    nb = gptq_to_matmulnbits(qweight, pack_gptq_int32(stored, 1), scales, g_idx, bits=4, group_size=group)
    if zeros == "offsets":
        nb = dataclasses.replace(nb, offsets=rng.normal(size=(n, 2)).astype(np.float32))
    split = split_blocks(nb, 16)
    assert split.block_size == 16 and split.n_blocks == 5 and split.scales.shape == (n, 5)
    assert (split.zero_points is None) == (zeros == "sym")
    if zeros == "float":
        assert split.zero_points.dtype == np.float32
    np.testing.assert_array_equal(dequantize_matmulnbits(split), dequantize_matmulnbits(nb))
    assert split_blocks(nb, 64) is nb
    with pytest.raises(EdgepackError, match="power of two"):
        split_blocks(nb, 24)


def test_gptq_graph_with_smaller_blocks_gives_the_same_logits(tmp_path):
    """max_gptq_block=32 on group-64 GPTQ weights: the same model (fp32 activations), more scale bytes."""
    model = make_tiny_llama("llama32", intermediate_size=96)
    quant, _ = gptq_weights(numpy_state(model), 64, np.random.default_rng(0))
    fmt = GptqFormat(bits=4, group_size=64)
    p64, m64 = build(tmp_path, quant, model.config, name="b64", gptq=fmt, accuracy_level=1)
    p32, m32 = build(tmp_path, quant, model.config, name="b32", gptq=fmt, accuracy_level=1, max_gptq_block=32)
    np.testing.assert_allclose(run_graph(p32, m32, IDS), run_graph(p64, m64, IDS), atol=1e-5)
    assert m32["weights"]["max_gptq_block"] == 32 and m64["weights"]["max_gptq_block"] is None
    blocks = {
        a.i
        for n in onnx.load(str(p32)).graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "block_size"
    }
    assert 32 in blocks and 64 not in blocks
    with pytest.raises(EdgepackError, match="max_gptq_block"):
        GraphOptions(max_gptq_block=48)


def test_gptq_zero_of_sixteen_uses_float_zero_points():
    """v1 stores zero - 1; a stored 15 reads back as 16, which no nibble can hold."""
    rng = np.random.default_rng(1)
    qweight = rng.integers(-(2**31), 2**31, (4, 16), dtype=np.int64).astype(np.int32)
    stored = np.full((1, 16), 15)
    scales = np.full((1, 16), 0.01, np.float16)
    nb = gptq_to_matmulnbits(qweight, pack_gptq_int32(stored, 1), scales, np.zeros(32, np.int64), group_size=32)
    assert nb.zero_points.dtype == np.float32 and (nb.zero_points == 16).all()
    np.testing.assert_array_equal(
        dequantize_matmulnbits(nb), dequantize_gptq(qweight, pack_gptq_int32(stored, 1), scales, np.zeros(32))
    )


def test_gptq_conversion_refuses_non_group_g_idx():
    with pytest.raises(EdgepackError, match="g_idx"):
        gptq_to_matmulnbits(
            np.zeros((4, 8), np.int32),
            np.zeros((2, 1), np.int32),
            np.ones((2, 8), np.float16),
            np.array([0] * 20 + [1] * 12),
            group_size=16,
        )  # groups of 20 and 12 rows


def _one_node_session(lin: Linear, k: int, accuracy_level: int = 1, fuse_a: bool = False):
    from onnx import TensorProto, helper

    g = GraphWriter()
    y = g.linear("x", lin, "proj", accuracy_level, fuse_a=fuse_a)
    g.node("Identity", [y], outputs=["y"])
    graph = helper.make_graph(
        g.nodes,
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", lin.n])],
        g.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("act_order", [False, True])
def test_matmulnbits_node_computes_x_times_dequantized_weight(act_order):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    qw, qz, sc, gi = fake_gptq(w, 64, rng, act_order=act_order)
    nb = gptq_to_matmulnbits(qw, qz, sc, gi, group_size=64)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    y = _one_node_session(Linear(nbits=nb), 96).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ dequantize_gptq(qw, qz, sc, gi).T, atol=2e-5, rtol=1e-5)


def test_float_zero_points_run_in_ort():
    rng = np.random.default_rng(3)
    qweight = rng.integers(-(2**31), 2**31, (4, 16), dtype=np.int64).astype(np.int32)
    stored = pack_gptq_int32(np.full((1, 16), 15), 1)
    scales = rng.uniform(0.01, 0.02, (1, 16)).astype(np.float16)
    nb = gptq_to_matmulnbits(qweight, stored, scales, np.zeros(32, np.int64), group_size=32)
    x = rng.standard_normal((3, 32)).astype(np.float32)
    y = _one_node_session(Linear(nbits=nb), 32).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ dequantize_matmulnbits(nb).T, atol=1e-5)


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
def test_rtn_error_is_within_half_a_step_and_ort_agrees(bits, symmetric):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((24, 80)).astype(np.float32)  # K=80: last block of 32 padded
    nb = quantize_rtn(w, bits=bits, block_size=32, symmetric=symmetric)
    deq = dequantize_matmulnbits(nb)
    step = np.repeat(np.abs(nb.scales), 32, axis=1)[:, :80]
    assert (np.abs(deq - w) <= step / 2 + 1e-6).all()
    x = rng.standard_normal((4, 80)).astype(np.float32)
    y = _one_node_session(Linear(nbits=nb), 80).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ deq.T, atol=3e-5, rtol=1e-5)
    assert quantize_rtn_int4(w).B.shape == (24, 3, 16)


def test_eora_branch_adds_b_times_a():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    a, b = rng.standard_normal((4, 64)).astype(np.float32), rng.standard_normal((32, 4)).astype(np.float32)
    nb = quantize_rtn_int4(w, block_size=32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    y = _one_node_session(Linear(nbits=nb, eora=(a, b)), 64).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ (dequantize_matmulnbits(nb) + b @ a).T, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_eora_a_stacked_under_the_weight(symmetric):
    """fuse_a: one MatMulNBits over [W; A] (A quantized like W), a Split, then B: equal to x (W + B A_q)^T."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((32, 80)).astype(np.float32)  # K=80: the last block of 32 is padded
    a, b = rng.standard_normal((4, 80)).astype(np.float32), rng.standard_normal((32, 4)).astype(np.float32)
    nb = quantize_rtn(w, bits=4, block_size=32, symmetric=symmetric)
    a_q = dequantize_matmulnbits(quantize_rtn(a, bits=4, block_size=32, symmetric=symmetric))
    x = rng.standard_normal((3, 80)).astype(np.float32)
    sess = _one_node_session(Linear(nbits=nb, eora=(a, b)), 80, fuse_a=True)
    y = sess.run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ (dequantize_matmulnbits(nb) + b @ a_q).T, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# RoPE and spec


@pytest.mark.parametrize("kind", ["plain", "llama32"])
def test_rope_cache_matches_hf_rotary_embedding(kind):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = make_tiny_llama(kind).config
    rope = LlamaRotaryEmbedding(config)
    pos = torch.arange(256)[None]
    cos_ref, sin_ref = rope(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = cos_sin_cache(rope_from_hf(config), config.head_dim, 256)
    half = config.head_dim // 2
    np.testing.assert_allclose(cos, cos_ref[0, :, :half].numpy(), atol=2e-5)
    np.testing.assert_allclose(sin, sin_ref[0, :, :half].numpy(), atol=2e-5)
    np.testing.assert_allclose(cos[:64], cos_ref[0, :64, :half].numpy(), atol=1e-6)  # small positions: exact
    if kind == "llama32":  # the scaling is really applied: the low frequencies differ from plain theta
        plain = cos_sin_cache(rope_from_hf({"rope_theta": 500000.0}), config.head_dim, 256)[0]
        assert np.abs(plain - cos).max() > 1e-3


def test_spec_reads_pruned_shapes_from_weights():
    _, weights, config = channel_pruned("llama32")
    spec = spec_from_hf_config(config, weights)
    assert [(l.num_attention_heads, l.num_key_value_heads, l.intermediate_size) for l in spec.layers] == [
        (4, 2, 96),
        (2, 1, 64),
        (4, 2, 128),
        (2, 1, 48),
    ]
    assert spec.tie_word_embeddings and spec.rope.kind == "llama3" and spec.head_dim == 16
    _, weights, config = depth_pruned("plain")
    assert spec_from_hf_config(config, weights).n_layers == 2


# ---------------------------------------------------------------------------------------------------------
# Whole graph vs Hugging Face


@pytest.mark.parametrize("kind", ["plain", "llama32"])
def test_fp32_graph_matches_hf(tmp_path, kind):
    model = make_tiny_llama(kind)
    path, meta = build(tmp_path, numpy_state(model), model.config)
    np.testing.assert_allclose(run_graph(path, meta, IDS), hf_logits(model, IDS), atol=1e-4)
    assert (path.parent / "model.onnx.data").exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    stored = json.loads(
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        .get_modelmeta()
        .custom_metadata_map["edgepack"]
    )
    assert stored == json.loads(json.dumps(meta))
    assert [kv["kv_heads"] for kv in meta["kv_cache"]] == [2, 2, 2, 2] and meta["max_len"] == 96


def test_unfused_graph_matches_hf(tmp_path):
    model = make_tiny_llama("llama32")
    path, meta = build(tmp_path, numpy_state(model), model.config, fuse_qkv=False, fuse_gate_up=False)
    np.testing.assert_allclose(run_graph(path, meta, IDS), hf_logits(model, IDS), atol=1e-4)


def test_depth_pruned_graph_matches_hf(tmp_path):
    ref, weights, config = depth_pruned("llama32")
    path, meta = build(tmp_path, weights, config)
    assert meta["num_layers"] == 2
    np.testing.assert_allclose(run_graph(path, meta, IDS), hf_logits(ref, IDS), atol=1e-4)


@pytest.mark.parametrize("kind", ["plain", "llama32"])
def test_channel_pruned_graph_matches_hf(tmp_path, kind):
    ref, weights, config = channel_pruned(kind)
    path, meta = build(tmp_path, weights, config)
    assert [kv["kv_heads"] for kv in meta["kv_cache"]] == [2, 1, 2, 1]
    np.testing.assert_allclose(run_graph(path, meta, IDS), hf_logits(ref, IDS), atol=1e-4)


def test_layer_without_attention_or_mlp(tmp_path):
    """A layer whose attention (or MLP) was pruned entirely has no KV cache and no such block."""
    model = make_tiny_llama("plain")
    weights = numpy_state(model)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(model.model.layers[1].self_attn, name).weight.zero_()
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(model.model.layers[2].mlp, name).weight.zero_()
    weights = {
        k: v
        for k, v in weights.items()
        if not k.startswith("model.layers.1.self_attn.") and not k.startswith("model.layers.2.mlp.")
    }
    path, meta = build(tmp_path, weights, model.config)
    assert [kv["layer"] for kv in meta["kv_cache"]] == [0, 2, 3]
    np.testing.assert_allclose(run_graph(path, meta, IDS), hf_logits(model, IDS), atol=1e-4)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_graph_matches_hf_with_dequantized_weights(tmp_path, act_order):
    """GPTQ tensors -> MatMulNBits (K=96 down_proj with group 64 is padded); fp32 activations
    (accuracy_level=1) give float32 agreement with HF running the dequantized weights."""
    model = make_tiny_llama("llama32", intermediate_size=96)
    quant, deq = gptq_weights(numpy_state(model), 64, np.random.default_rng(0), act_order=act_order)
    path, meta = build(tmp_path, quant, model.config, gptq=GptqFormat(bits=4, group_size=64), accuracy_level=1)
    assert meta["weights"]["projections"] == "int4-gptq"
    ref = hf_with_weights(model.config, deq)
    np.testing.assert_allclose(run_graph(path, meta, IDS), hf_logits(ref, IDS), atol=2e-4)


def test_int4_rtn_graph_matches_hf_with_dequantized_weights(tmp_path):
    model = make_tiny_llama("plain")
    weights = numpy_state(model)
    path, meta = build(tmp_path, weights, model.config, projections="int4", rtn_block_size=32, accuracy_level=1)
    deq = dict(weights)
    for k in weights:
        if any(p in k for p in PROJ):
            deq[k] = dequantize_matmulnbits(quantize_rtn_int4(weights[k], block_size=32))
    ref = hf_with_weights(model.config, deq)
    out, want = run_graph(path, meta, IDS), hf_logits(ref, IDS)
    np.testing.assert_allclose(out, want, atol=2e-4)
    assert np.abs(want - hf_logits(model, IDS)).max() > 1e-2  # the quantization really changed the model


def test_int8_activations_stay_close(tmp_path):
    """accuracy_level=4 (the CPU speed setting) quantizes activations to int8 per block: close, not exact."""
    model = make_tiny_llama("plain")
    weights = numpy_state(model)
    p1, m1 = build(tmp_path, weights, model.config, name="a1", projections="int4", accuracy_level=1)
    p4, m4 = build(tmp_path, weights, model.config, name="a4", projections="int4", accuracy_level=4)
    l1, l4 = run_graph(p1, m1, IDS), run_graph(p4, m4, IDS)
    assert np.abs(l1 - l4).max() < 0.05 * np.abs(l1).max()
    assert (l1.argmax(-1) == l4.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("fuse_a", [False, True])
def test_eora_graph_equals_dequantized_plus_low_rank(tmp_path, fuse_a):
    """The EoRA branch on every kind of projection (fused q|k|v and gate|up with some parts lacking EoRA,
    o, down); with fuse_a, A is stacked under the int4 weight and quantized like it."""
    import onnx

    model = make_tiny_llama("llama32", intermediate_size=96)
    rng = np.random.default_rng(1)
    quant, deq = gptq_weights(numpy_state(model), 64, rng)
    eora, corrected = {}, dict(deq)
    for i in range(model.config.num_hidden_layers):
        for proj in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            name = f"model.layers.{i}.{proj}"
            n, k = deq[f"{name}.weight"].shape
            a = (rng.standard_normal((8, k)) * 0.1).astype(np.float32)
            b = (rng.standard_normal((n, 8)) * 0.1).astype(np.float32)
            eora[name] = (a, b)
            a_used = dequantize_matmulnbits(quantize_rtn(a, 4, 64, symmetric=False)) if fuse_a else a
            corrected[f"{name}.weight"] = deq[f"{name}.weight"] + b @ a_used
    path, meta = build(
        tmp_path, quant, model.config, gptq=GptqFormat(group_size=64), accuracy_level=1, eora=eora, eora_fuse_a=fuse_a
    )
    assert meta["weights"]["eora_modules"] == len(eora) and meta["weights"]["eora_fuse_a"] == fuse_a
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    branches = model.config.num_hidden_layers * 4  # q|k|v, o, gate|up, down
    assert ops.count("MatMulNBits") == branches  # A rides in the weight's kernel, or is a float MatMul:
    assert ops.count("MatMul") == branches * (1 if fuse_a else 2)
    out = run_graph(path, meta, IDS)
    np.testing.assert_allclose(out, hf_logits(hf_with_weights(model.config, corrected), IDS), atol=3e-4)
    assert np.abs(out - hf_logits(hf_with_weights(model.config, deq), IDS)).max() > 1e-2  # the branch matters


def test_eora_split_b_keeps_only_the_diagonal_blocks(tmp_path):
    """eora_split_b: fused q|k|v and gate|up get one B kernel per part instead of a block-diagonal B with its
    zero blocks stored; the same numbers (float factors: exact; int8: the same per-part quantization), fewer
    bytes; a fused projection where a part lacks EoRA keeps the dense B."""
    import onnx

    model = make_tiny_llama("llama32", intermediate_size=96)
    rng = np.random.default_rng(2)
    quant, deq = gptq_weights(numpy_state(model), 64, rng)
    eora, corrected = {}, dict(deq)
    projs = ("q_proj", "k_proj", "v_proj", "o_proj")
    for i in range(model.config.num_hidden_layers):
        for proj in [f"self_attn.{p}" for p in projs] + ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]:
            if i == 1 and proj == "mlp.gate_proj":
                continue  # layer 1's gate|up keeps the dense B
            name = f"model.layers.{i}.{proj}"
            n, k = deq[f"{name}.weight"].shape
            a = (rng.standard_normal((32, k)) * 0.05).astype(np.float32)  # rank 32: int8 blocks align with parts
            b = (rng.standard_normal((n, 32)) * 0.05).astype(np.float32)
            eora[name] = (a, b)
            corrected[f"{name}.weight"] = deq[f"{name}.weight"] + b @ a
    ref = hf_logits(hf_with_weights(model.config, corrected), IDS)
    outs, sizes, kernels = {}, {}, {}
    for bits in (None, 8):
        for split in (False, True):
            tag = f"b{bits}-{split}"
            path, meta = build(
                tmp_path, quant, model.config, name=tag, gptq=GptqFormat(group_size=64), accuracy_level=1,
                eora=eora, eora_bits=bits, eora_split_b=split,
            )  # fmt: skip
            assert meta["weights"]["eora_split_b"] == split
            graph = onnx.load(str(path), load_external_data=False).graph
            kernels[tag] = sum(n.op_type in ("MatMulNBits", "MatMul") for n in graph.node)
            sizes[tag] = sum(
                np.prod(t.dims) * (4 if t.data_type == onnx.TensorProto.FLOAT else 1)
                for t in graph.initializer
                if ".eora_B" in t.name
            )
            outs[tag] = run_graph(path, meta, IDS)
    np.testing.assert_allclose(outs["bNone-True"], ref, atol=3e-4)
    np.testing.assert_allclose(outs["bNone-False"], ref, atol=3e-4)
    np.testing.assert_allclose(outs["b8-True"], outs["b8-False"], atol=1e-4)  # same per-part int8 blocks
    layers = model.config.num_hidden_layers
    for bits in (None, 8):  # q|k|v: 3 kernels instead of 1 in every layer; gate|up: 2 instead of 1 but in layer 1
        assert kernels[f"b{bits}-True"] - kernels[f"b{bits}-False"] == 2 * layers + (layers - 1)
        assert sizes[f"b{bits}-True"] < 0.7 * sizes[f"b{bits}-False"]


@pytest.mark.parametrize("table", ["int8", "int4"])
@pytest.mark.parametrize("kind", ["plain", "llama32"])
def test_quantized_embedding_and_head(tmp_path, kind, table):
    model = make_tiny_llama(kind)
    weights = numpy_state(model)
    path, meta = build(
        tmp_path, weights, model.config, embedding=table, lm_head=table, head_block_size=32, accuracy_level=1
    )
    bits = {"int8": 8, "int4": 4}[table]
    deq = dict(weights)
    deq["model.embed_tokens.weight"] = dequantize_matmulnbits(
        quantize_rtn(weights["model.embed_tokens.weight"], bits, 32)
    )
    if not model.config.tie_word_embeddings:
        deq["lm_head.weight"] = dequantize_matmulnbits(quantize_rtn(weights["lm_head.weight"], bits, 32))
    np.testing.assert_allclose(
        run_graph(path, meta, IDS), hf_logits(hf_with_weights(model.config, deq), IDS), atol=2e-4
    )
    if model.config.tie_word_embeddings:  # one packed table serves both the lookup and the LM head
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        tables = [t for t in graph.initializer if t.dims[0] == 256 and t.data_type == onnx.TensorProto.UINT8]
        assert len(tables) == 1


def test_int8_eora_branch_is_close_to_exact(tmp_path):
    """eora_bits=8 stores A and B as int8 MatMulNBits: equal to the dequantized factors, close to float ones."""
    model = make_tiny_llama("plain")
    weights = numpy_state(model)
    rng = np.random.default_rng(2)
    eora = {
        f"model.layers.{i}.self_attn.{m}": (
            (rng.standard_normal((8, 64)) * 0.2).astype(np.float32),
            (rng.standard_normal((64, 8)) * 0.2).astype(np.float32),
        )
        for i in range(4)
        for m in ("q_proj", "o_proj")
    }
    p8, m8 = build(tmp_path, weights, model.config, name="e8", eora=eora, eora_bits=8, accuracy_level=1)
    p32, m32 = build(tmp_path, weights, model.config, name="e32", eora=eora, accuracy_level=1)
    deq = dict(weights)
    for name, (a, b) in eora.items():
        a8 = dequantize_matmulnbits(quantize_rtn(a, 8, 32))
        b8 = dequantize_matmulnbits(quantize_rtn(b, 8, 16))
        deq[f"{name}.weight"] = weights[f"{name}.weight"] + b8 @ a8
    l8, l32 = run_graph(p8, m8, IDS), run_graph(p32, m32, IDS)
    np.testing.assert_allclose(l8, hf_logits(hf_with_weights(model.config, deq), IDS), atol=2e-4)
    assert np.abs(l8 - l32).max() < 0.02 * np.abs(l32).max() and m8["weights"]["eora_bits"] == 8


def test_tied_fp32_head_shares_the_embedding(tmp_path):
    import onnx

    model = make_tiny_llama("llama32")
    path, _ = build(tmp_path, numpy_state(model), model.config)
    graph = onnx.load(str(path), load_external_data=False).graph
    assert sum(1 for t in graph.initializer if tuple(t.dims) == (256, 64)) == 1
    ops = [n.op_type for n in graph.node]
    assert ops.count("GroupQueryAttention") == 4 and ops.count("SkipSimplifiedLayerNormalization") == 8
    assert (
        ops.count("SimplifiedLayerNormalization") == 1 and ops.count("MatMul") == 16
    )  # 4 layers x (qkv, o, gate|up, down)


def test_gptq_weights_without_format_are_refused(tmp_path):
    model = make_tiny_llama("plain")
    quant, _ = gptq_weights(numpy_state(model), 32, np.random.default_rng(0))
    with pytest.raises(EdgepackError, match="GptqFormat"):
        build(tmp_path, quant, model.config)


# ---------------------------------------------------------------------------------------------------------
# A real gptqmodel checkpoint (act-order) end to end


def test_real_gptqmodel_checkpoint_matches_torch_dequant(tmp_path):
    """gptqmodel 4-bit with desc_act (act-order g_idx) and group 32 -> MatMulNBits graph; logits equal the
    torch model rebuilt with compressor.gptq's independent dequantization (~15 s: one GPTQ run)."""
    from safetensors.numpy import load_file

    from compressor.gptq import load_quantized, quantize_gptq, read_quantize_config
    from compressor.recipe import GptqStage
    from test_gptq_eora import calibration, save_tiny_tokenizer

    base = tmp_path / "base"
    model = make_tiny_llama("llama32", hidden_size=128, intermediate_size=256, head_dim=32)
    model.save_pretrained(base)
    save_tiny_tokenizer(base)
    quantize_gptq(
        base,
        calibration(16, 48, seed=2),
        tmp_path / "gptq",
        GptqStage(group_size=32, desc_act=True, samples=16, damp=0.05),
    )
    cfg = read_quantize_config(tmp_path / "gptq")
    tensors = {}
    for f in sorted((tmp_path / "gptq").glob("model*.safetensors")):
        tensors.update(load_file(f))
    g_idx = tensors["model.layers.0.self_attn.q_proj.g_idx"]
    assert not np.array_equal(g_idx, np.arange(g_idx.size) // 32)  # really act-order
    fmt = GptqFormat(
        bits=cfg["bits"],
        group_size=cfg["group_size"],
        zero_offset=1 if cfg.get("checkpoint_format", cfg.get("format", "gptq")) == "gptq" else 0,
    )
    path, meta = build(tmp_path, tensors, model.config, gptq=fmt, accuracy_level=1)
    ref = load_quantized(tmp_path / "gptq")
    np.testing.assert_allclose(run_graph(path, meta, IDS), hf_logits(ref, IDS), atol=2e-4)


def test_compressor_channel_pruned_checkpoint(tmp_path):
    """A checkpoint from compressor.channels (per-layer widths, saved and reloaded from disk) exports as is."""
    import json as _json

    from safetensors.numpy import load_file

    from compressor.channels import load_channel_pruned, prune_channels

    model = make_tiny_llama("llama32")
    calib = torch.from_numpy(np.random.default_rng(4).integers(3, 256, (4, 32)))
    prune_channels(model, calib, ffn_keep=0.6, kv_groups_keep=5, per_layer_uniform=False)
    model.save_pretrained(tmp_path / "pruned")
    config = _json.loads((tmp_path / "pruned" / "config.json").read_text())
    weights = load_file(tmp_path / "pruned" / "model.safetensors")
    path, meta = build(tmp_path, weights, config)
    ref = load_channel_pruned(tmp_path / "pruned")
    widths = [(l["num_attention_heads"], l["intermediate_size"]) for l in meta["layers"]]
    assert len(set(widths)) > 1  # really non-uniform
    np.testing.assert_allclose(run_graph(path, meta, IDS), hf_logits(ref, IDS), atol=1e-4)
