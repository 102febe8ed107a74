"""Depth pruning: layer removal is exact, survives save/reload and KV-cache generation, and the
importance score finds a layer that does nothing."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_llama

from compressor.calibration_forward import calibration_perplexity
from compressor.depth import (
    _removal_perplexities,
    drop_layers,
    iterative_drop,
    layer_importance,
    layers_skipped,
    select_layers_to_drop,
)


def calib(n=6, seqlen=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n, seqlen), generator=g)


@torch.no_grad()
def self_generated_calib(model, n=8, seqlen=24, seed=0):
    """Greedy continuations of random 2-token prompts by the model itself. On random tokens a random
    model's layers can hurt perplexity (removing one may help); on its own greedy text every real layer
    matters, which is what an importance test needs."""
    seq = torch.randint(3, 256, (n, 2), generator=torch.Generator().manual_seed(seed))
    while seq.shape[1] < seqlen:
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


@torch.no_grad()
def manual_logits(model, ids, layer_indices):
    """Reference forward written out by hand: embed -> chosen layers -> norm -> lm_head, rotary
    embeddings from the model's own rotary module and an explicit causal mask."""
    inner = model.model
    hidden = inner.embed_tokens(ids)
    T = ids.shape[1]
    position_ids = torch.arange(T).unsqueeze(0)
    cos_sin = inner.rotary_emb(hidden, position_ids=position_ids)
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    for i in layer_indices:
        hidden = inner.layers[i](hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=cos_sin)
    return model.lm_head(inner.norm(hidden))


def make_identity_layer(model, i):
    """Zero o_proj and down_proj: both residual branches add exactly 0, so the layer is an identity."""
    with torch.no_grad():
        model.model.layers[i].self_attn.o_proj.weight.zero_()
        model.model.layers[i].mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("kind", ["plain", "llama32"])
def test_manual_forward_matches_model(kind):
    model = make_tiny_llama(kind)
    ids = calib(2, 12)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    torch.testing.assert_close(manual_logits(model, ids, range(4)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["plain", "llama32"])
def test_drop_layers_equals_running_remaining_layers(kind):
    model = make_tiny_llama(kind)
    ids = calib(2, 12)
    ref = manual_logits(model, ids, [0, 2])  # layers 1 and 3 removed, computed on the original model
    drop_layers(model, [3, 1])
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_drop_layers_updates_per_layer_config_lists():
    model = make_tiny_llama("plain")
    model.config.layer_types = ["full_attention"] * 4
    model.config.edgepack_layer_widths = [{"intermediate_size": 100 + i} for i in range(4)]
    drop_layers(model, [0, 2])
    assert model.config.layer_types == ["full_attention"] * 2
    assert model.config.edgepack_layer_widths == [{"intermediate_size": 101}, {"intermediate_size": 103}]


def test_drop_layers_rejects_bad_indices():
    model = make_tiny_llama("plain")
    with pytest.raises(ValueError):
        drop_layers(model, [4])
    with pytest.raises(ValueError):
        drop_layers(model, [0, 1, 2, 3])


def test_dropped_model_saves_reloads_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama("llama32")
    drop_layers(model, [1])
    ids = calib(2, 10)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert loaded.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)

    # KV-cache generation must match a cache-free greedy decode of the same model.
    out = loaded.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    seq = ids[:1]
    with torch.no_grad():
        for _ in range(6):
            nxt = loaded(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_identity_layer_is_least_important_and_dropped_first():
    model = make_tiny_llama("llama32")
    make_identity_layer(model, 2)
    ids = self_generated_calib(model)
    full_ppl = calibration_perplexity(model, ids, batch_size=4)
    before = [p.clone() for p in model.parameters()]
    scores = layer_importance(model, ids, batch_size=4)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # model untouched
    assert len(model.model.layers) == 4
    assert scores[2] == pytest.approx(full_ppl, rel=1e-5)
    assert min(scores) == scores[2] and all(s > scores[2] * 1.001 for i, s in enumerate(scores) if i != 2)
    assert select_layers_to_drop(scores, 1) == [2]
    assert 2 in select_layers_to_drop(scores, 2)


def test_layer_importance_batching_does_not_change_scores():
    model = make_tiny_llama("plain")
    ids = calib(5, 12)
    a = layer_importance(model, ids, batch_size=1)
    b = layer_importance(model, ids, batch_size=4)
    assert a == pytest.approx(b, rel=1e-5)


def test_calibration_perplexity_matches_hf_loss():
    model = make_tiny_llama("plain")
    ids = calib(3, 12)
    with torch.no_grad():
        hf_loss = model(ids, labels=ids, use_cache=False).loss.item()
    assert calibration_perplexity(model, ids, batch_size=2) == pytest.approx(math.exp(hf_loss), rel=1e-5)


def test_layers_skipped_restores_on_error():
    model = make_tiny_llama("plain")
    original = model.model.layers
    with pytest.raises(RuntimeError):
        with layers_skipped(model, [0]):
            assert len(model.model.layers) == 3
            raise RuntimeError("boom")
    assert model.model.layers is original


def test_select_layers_to_drop():
    assert select_layers_to_drop([5.0, 1.0, 3.0, 1.0], 2) == [1, 3]
    assert select_layers_to_drop([5.0, 1.0, 3.0, 2.0], 0) == []
    with pytest.raises(ValueError):
        select_layers_to_drop([1.0, 2.0], 2)


def test_iterative_drop_uses_original_indices_and_rescoring():
    model = make_tiny_llama("llama32")
    make_identity_layer(model, 1)
    make_identity_layer(model, 3)
    ids = self_generated_calib(model)
    full_ppl = calibration_perplexity(model, ids)
    dropped, rounds = iterative_drop(model, ids, k=2, batch_size=4)
    assert sorted(dropped) == [1, 3]
    assert len(rounds) == 2 and all(len(r) == 4 for r in rounds)
    assert rounds[0][1] == pytest.approx(full_ppl, rel=1e-5)
    assert rounds[1][dropped[0]] is None
    # In round 2 the other identity layer, scored with the first already skipped, is still free to drop.
    assert rounds[1][dropped[1]] == pytest.approx(full_ppl, rel=1e-5)
    assert all(s > full_ppl * 1.001 for i, s in enumerate(rounds[1]) if i not in dropped)
    assert len(model.model.layers) == 4  # iterative_drop only chooses
    # Round 1 equals the one-shot ranking.
    assert rounds[0] == pytest.approx(layer_importance(model, ids, batch_size=4), rel=1e-6)


@pytest.mark.parametrize("kind", ["plain", "llama32"])
def test_cached_scoring_equals_rerunning_the_model_without_each_layer(kind):
    """Scoring resumes from cached layer inputs; it must give the perplexity of a full forward pass of the
    model without that layer (and without the already dropped ones, as in an iterative round)."""
    model = make_tiny_llama(kind)
    ids = calib(5, 12)
    for dropped in (set(), {1}):
        expected = []
        for i in range(4):
            if i in dropped:
                expected.append(None)
                continue
            with layers_skipped(model, dropped | {i}):
                expected.append(calibration_perplexity(model, ids, batch_size=2))
        got = _removal_perplexities(model, ids, dropped, batch_size=2, desc="test")
        assert [g is None for g in got] == [e is None for e in expected]
        assert [g for g in got if g is not None] == pytest.approx([e for e in expected if e is not None], rel=1e-5)
