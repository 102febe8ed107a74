"""Structured channel / KV-group pruning: removal equals zeroing in the dense model, scores find dead
units, and pruned models save, reload (uniform with plain from_pretrained, non-uniform with
load_channel_pruned) and generate with a KV cache."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama

from compressor.channels import (
    channel_scores,
    current_widths,
    is_uniform,
    keep_ffn_channels,
    keep_kv_groups,
    layer_widths,
    load_channel_pruned,
    prune_channels,
)
from compressor.width import collect_input_norms
from runtime.errors import EdgepackError

HEAD_DIM = 16


def calib(n=4, seqlen=16, seed=1):
    return torch.randint(3, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids):
    return model(ids, use_cache=False).logits


@torch.no_grad()
def zero_ffn_channels(model, li, channels, where="down"):
    mlp = model.model.layers[li].mlp
    if where == "down":
        mlp.down_proj.weight[:, channels] = 0
    else:
        mlp.gate_proj.weight[channels] = 0
        mlp.up_proj.weight[channels] = 0


@torch.no_grad()
def zero_kv_groups(model, li, groups):
    """What removing a KV group amounts to: its query heads' o_proj columns contribute nothing.
    (Zeroing q rows would not do it: softmax of zero scores still averages the values.)"""
    attn = model.model.layers[li].self_attn
    q_per_kv = attn.num_key_value_groups
    for g in groups:
        attn.o_proj.weight[:, g * q_per_kv * HEAD_DIM : (g + 1) * q_per_kv * HEAD_DIM] = 0


@torch.no_grad()
def greedy_no_cache(model, ids, steps):
    seq = ids
    for _ in range(steps):
        seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("kind", ["plain", "llama32"])
def test_keep_everything_changes_nothing(kind):
    model = make_tiny_llama(kind)
    ids = calib()
    ref = logits(model, ids)
    record = prune_channels(model, ids, ffn_keep=1.0, kv_groups_keep=1.0)
    assert current_widths(model) == record["widths_before"]
    assert [layer["kept_ffn_channels"] for layer in record["layers"]] == [list(range(128))] * 4
    assert torch.equal(logits(model, ids), ref)


@pytest.mark.parametrize("where", ["down", "gate_up"])
def test_removing_ffn_channels_equals_zeroing_them(where):
    model = make_tiny_llama("llama32")
    ids = calib()
    channels = torch.tensor([3, 17, 40, 41, 100, 127])
    dense = copy.deepcopy(model)
    zero_ffn_channels(dense, 1, channels, where)
    keep = torch.tensor([c for c in range(128) if c not in set(channels.tolist())])
    keep_ffn_channels(model.model.layers[1].mlp, keep)
    assert model.model.layers[1].mlp.down_proj.weight.shape == (64, 122)
    torch.testing.assert_close(logits(model, ids), logits(dense, ids), rtol=1e-5, atol=1e-5)


def test_removing_kv_group_equals_zeroing_its_o_proj_columns():
    model = make_tiny_llama("llama32")  # 4 query heads over 2 KV heads
    ids = calib()
    dense = copy.deepcopy(model)
    zero_kv_groups(dense, 2, [0])
    keep_kv_groups(model.model.layers[2].self_attn, torch.tensor([1]))
    attn = model.model.layers[2].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (32, 16, 32)
    torch.testing.assert_close(logits(model, ids), logits(dense, ids), rtol=1e-5, atol=1e-5)
    # And the removed group's K/V really were the ones of KV head 0: keeping group 0 instead differs.
    other = copy.deepcopy(dense)
    keep_kv_groups(other.model.layers[2].self_attn, torch.tensor([0]))
    assert not torch.allclose(logits(other, ids), logits(model, ids), atol=1e-3)


def test_prune_channels_equals_zeroing_what_the_record_says_was_removed():
    model = make_tiny_llama(
        "llama32", num_attention_heads=8, num_key_value_heads=4, hidden_size=128, intermediate_size=128
    )
    ids = calib()
    dense = copy.deepcopy(model)
    record = prune_channels(model, ids, ffn_keep=0.75, kv_groups_keep=0.5, batch_size=3)
    for li, layer in enumerate(record["layers"]):
        assert layer["intermediate_size"] == 96 and layer["num_key_value_heads"] == 2
        assert layer["num_attention_heads"] == 4
        zero_ffn_channels(dense, li, [c for c in range(128) if c not in layer["kept_ffn_channels"]])
        zero_kv_groups(dense, li, [g for g in range(4) if g not in layer["kept_kv_groups"]])
    torch.testing.assert_close(logits(model, ids), logits(dense, ids), rtol=1e-4, atol=1e-4)
    assert record["uniform_widths"] and is_uniform(model.config)
    assert model.config.intermediate_size == 96 and model.config.num_key_value_heads == 2
    assert model.config.num_attention_heads == 4 and model.config.head_dim == 16


@torch.no_grad()
def test_scores_follow_the_formula_and_find_dead_units():
    model = make_tiny_llama("llama32")
    layer = model.model.layers[1]
    layer.mlp.down_proj.weight[:, [5, 9]] = 0  # dead FFN channels
    layer.self_attn.o_proj.weight[:, 32:64] = 0  # KV group 1's two query heads output nothing
    ids = calib()
    scores = channel_scores(model, ids, batch_size=2)
    norms = collect_input_norms(model, ids, targets=("down_proj", "o_proj"))
    down = norms["model.layers.1.mlp.down_proj"]
    expect = (layer.mlp.down_proj.weight.abs() * down[None]).sum(0)
    torch.testing.assert_close(scores[1]["ffn"], expect)
    o = norms["model.layers.1.self_attn.o_proj"]
    col = (layer.self_attn.o_proj.weight.abs() * o[None]).sum(0)
    torch.testing.assert_close(scores[1]["kv_groups"], torch.stack([col[:32].sum(), col[32:].sum()]))
    assert scores[1]["kv_groups"][1] == 0 and scores[1]["ffn"][[5, 9]].eq(0).all()

    record = prune_channels(model, ids, ffn_keep=126 / 128, kv_groups_keep=1)
    assert record["layers"][1]["kept_kv_groups"] == [0]
    assert 5 not in record["layers"][1]["kept_ffn_channels"] and 9 not in record["layers"][1]["kept_ffn_channels"]


def test_uniform_prune_saves_and_loads_with_plain_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama("llama32")
    ids = calib()
    prune_channels(model, ids, ffn_keep=0.5, kv_groups_keep=1)
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert torch.equal(logits(plain, ids), logits(model, ids))
    ours = load_channel_pruned(tmp_path)
    assert torch.equal(logits(ours, ids), logits(model, ids))


def test_non_uniform_round_trip_and_kv_cache_generation(tmp_path):
    model = make_tiny_llama("llama32")
    ids = calib()
    record = prune_channels(model, ids, ffn_keep=0.5, kv_groups_keep=5, per_layer_uniform=False, ffn_multiple_of=8)
    widths = current_widths(model)
    assert len({w["intermediate_size"] for w in widths}) > 1 and len({w["num_key_value_heads"] for w in widths}) > 1
    assert sum(w["intermediate_size"] for w in widths) == pytest.approx(256, abs=4 * 8)
    assert sum(w["num_key_value_heads"] for w in widths) == 5
    assert all(w["intermediate_size"] % 8 == 0 and w["num_key_value_heads"] >= 1 for w in widths)
    assert not record["uniform_widths"] and layer_widths(model.config) == widths
    model.save_pretrained(tmp_path)

    loaded = load_channel_pruned(tmp_path)
    assert current_widths(loaded) == widths
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    out = loaded.generate(ids[:2, :6], max_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(out, greedy_no_cache(loaded, ids[:2, :6], 8))

    bf16 = load_channel_pruned(tmp_path, dtype=torch.bfloat16)
    assert bf16.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32


def test_plain_from_pretrained_refuses_non_uniform(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama("plain")
    prune_channels(model, calib(), ffn_keep=0.5, kv_groups_keep=6, per_layer_uniform=False)
    assert not is_uniform(model.config)
    model.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="(?i)size|shape"):
        AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)


def test_head_count_not_dividing_hidden_size_keeps_config_valid(tmp_path):
    # Like Llama-3.2-1B keeping 6 of 8 KV groups (24 heads, 2048 % 24 != 0): transformers 5 rejects a
    # config whose num_attention_heads does not divide hidden_size, so the global values stay original.
    model = make_tiny_llama("llama32", num_attention_heads=8, num_key_value_heads=4)
    ids = calib()
    record = prune_channels(model, ids, ffn_keep=1.0, kv_groups_keep=3)
    assert [w["num_attention_heads"] for w in current_widths(model)] == [6] * 4
    assert model.config.num_attention_heads == 8 and model.config.num_key_value_heads == 4
    assert not record["uniform_widths"]
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(load_channel_pruned(tmp_path), ids), logits(model, ids))


def test_depth_after_channels_keeps_widths_consistent(tmp_path):
    from compressor.depth import drop_layers

    model = make_tiny_llama("llama32")
    ids = calib()
    prune_channels(model, ids, ffn_keep=0.5, kv_groups_keep=5, per_layer_uniform=False)
    widths = current_widths(model)
    drop_layers(model, [0])
    assert layer_widths(model.config) == widths[1:]
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(load_channel_pruned(tmp_path), ids), logits(model, ids))


def test_loader_errors_name_the_path(tmp_path):
    with pytest.raises(EdgepackError, match=str(tmp_path)):
        load_channel_pruned(tmp_path)
    model = make_tiny_llama("plain")
    prune_channels(model, calib(), ffn_keep=0.5, kv_groups_keep=1)
    model.config.edgepack_layer_widths[0]["intermediate_size"] = 80  # lies about the weights
    model.save_pretrained(tmp_path)
    with pytest.raises(EdgepackError, match="do not match"):
        load_channel_pruned(tmp_path)


def test_bad_keep_values_raise():
    model = make_tiny_llama("plain")
    with pytest.raises(ValueError):
        prune_channels(model, calib(), ffn_keep=0.0, kv_groups_keep=1)
    with pytest.raises(ValueError):
        prune_channels(model, calib(), ffn_keep=0.5, kv_groups_keep=3)  # only 2 KV groups per layer
