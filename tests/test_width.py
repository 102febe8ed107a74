"""WANDA N:M width pruning (N pruned of every M): mask structure, WANDA vs magnitude, norms against a
hand computation, mask files, parameter counting against the seed study's Llama-3.2-1B figures."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from compressor.width import (
    DEFAULT_TARGETS,
    apply_nm_pruning,
    collect_input_norms,
    count_parameters,
    load_masks,
    nm_masks,
    nm_nonzero_count,
    prune_nm_sequential,
    reapply_masks,
    save_masks,
    sparsity_report,
)
from runtime.errors import EdgepackError


def calib(n=4, seqlen=16, seed=1):
    return torch.randint(3, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 8), (4, 8), (12, 16), (0, 4)])
def test_every_group_has_exactly_n_pruned(n, m):
    g = torch.Generator().manual_seed(n * 100 + m)
    weight = torch.randn(24, 64, generator=g)
    norm = torch.rand(64, generator=g) + 0.1
    mask = nm_masks(weight, norm, n, m)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    pruned_per_group = (~mask).reshape(24, 64 // m, m).sum(-1)
    assert torch.all(pruned_per_group == n)


def test_wanda_differs_from_magnitude_on_hand_example():
    # Row 0: |W| = [1, 2, 3, 4], ||X|| = [10, 1, 1, 0.1] -> scores [10, 2, 3, 0.4].
    # W2:4 prunes the two lowest scores: inputs 3 and 1. Magnitude alone would prune inputs 0 and 1.
    # Row 1: |W| = [4, 3, 2, 1] -> scores [40, 3, 2, 0.1]: prunes inputs 3 and 2 (same as magnitude).
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0], [-4.0, 3.0, -2.0, 1.0]])
    norm = torch.tensor([10.0, 1.0, 1.0, 0.1])
    mask = nm_masks(weight, norm, 2, 4)
    assert mask.tolist() == [[True, False, True, False], [True, True, False, False]]
    magnitude = nm_masks(weight, torch.ones(4), 2, 4)
    assert magnitude[0].tolist() == [False, False, True, True]


def test_ties_prune_lower_index_first():
    mask = nm_masks(torch.ones(2, 8), torch.ones(8), 1, 4)
    assert mask.tolist() == [[False, True, True, True] * 2] * 2
    mask = nm_masks(torch.ones(1, 4), torch.ones(4), 3, 4)
    assert mask.tolist() == [[False, False, False, True]]


def test_bad_shapes_and_ratios_raise():
    with pytest.raises(ValueError, match="not divisible by M=8"):
        nm_masks(torch.ones(2, 12), torch.ones(12), 1, 8)
    with pytest.raises(ValueError):
        nm_masks(torch.ones(2, 8), torch.ones(8), 4, 4)
    with pytest.raises(ValueError):
        nm_masks(torch.ones(2, 8), torch.ones(4), 1, 4)


@torch.no_grad()
def test_input_norms_match_hand_computation():
    model = make_tiny_llama("llama32")
    ids = calib()
    norms = collect_input_norms(model, ids, batch_size=3)
    assert set(norms) == {
        f"model.layers.{i}.{p}"
        for i in range(4)
        for p in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
    }
    layer0 = model.model.layers[0]
    x = layer0.input_layernorm(model.model.embed_tokens(ids))  # input of q/k/v in layer 0
    torch.testing.assert_close(norms["model.layers.0.self_attn.q_proj"], x.reshape(-1, 64).norm(dim=0))
    torch.testing.assert_close(norms["model.layers.0.self_attn.v_proj"], x.reshape(-1, 64).norm(dim=0))
    # down_proj input: act(gate(h)) * up(h) with h the post-attention-norm hidden of layer 0.
    emb = model.model.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    cos_sin = model.model.rotary_emb(emb, pos)
    mask = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)[None, None]
    attn, _ = layer0.self_attn(layer0.input_layernorm(emb), position_embeddings=cos_sin, attention_mask=mask)
    h = layer0.post_attention_layernorm(emb + attn)
    inner = layer0.mlp.act_fn(layer0.mlp.gate_proj(h)) * layer0.mlp.up_proj(h)
    torch.testing.assert_close(
        norms["model.layers.0.mlp.down_proj"], inner.reshape(-1, 128).norm(dim=0), rtol=1e-4, atol=1e-5
    )


def test_apply_pruning_on_llama32_zeroes_weights_and_model_runs():
    model = make_tiny_llama("llama32")
    ids = calib()
    norms = collect_input_norms(model, ids)
    before = count_parameters(model)
    masks = apply_nm_pruning(model, norms, 2, 4)
    assert len(masks) == 4 * len(DEFAULT_TARGETS)
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert torch.all(weight[~mask] == 0) and torch.all(weight[mask] != 0)
        assert torch.all((weight == 0).reshape(weight.shape[0], -1, 4).sum(-1) == 2)
    report = sparsity_report(model, masks)
    assert report["total"]["sparsity"] == pytest.approx(0.5)
    assert report["total"]["mask_violations"] == 0
    # The embedding's padding row (pad_token_id=0) is zero from init: the only zero outside the masks.
    natural_zeros = before["dense"] - before["nonzero"]
    assert natural_zeros == 64
    assert report["parameters"]["nonzero"] == nm_nonzero_count(model, 2, 4) - natural_zeros
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_masks_round_trip_bit_exact(tmp_path):
    g = torch.Generator().manual_seed(3)
    masks = {
        "model.layers.0.self_attn.q_proj": torch.rand(64, 64, generator=g) > 0.5,
        "model.layers.0.mlp.down_proj": torch.rand(7, 13, generator=g) > 0.3,  # not a multiple of 8 bits
        "model.layers.1.mlp.up_proj": torch.ones(3, 5, dtype=torch.bool),
    }
    path = tmp_path / "masks.safetensors"
    save_masks(path, masks)
    loaded = load_masks(path)
    assert loaded.keys() == masks.keys()
    for name in masks:
        assert loaded[name].dtype == torch.bool and torch.equal(loaded[name], masks[name])
    assert path.stat().st_size < 64 * 64 // 8 + 200 + 2048  # packed: about 1 bit per weight plus header
    assert not [p for p in tmp_path.iterdir() if p.name != "masks.safetensors"]  # no temp file left


def test_load_masks_errors_name_the_file(tmp_path):
    with pytest.raises(EdgepackError, match="nope.safetensors"):
        load_masks(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(EdgepackError, match="bad.safetensors"):
        load_masks(bad)


def test_reapply_masks_restores_zeros_after_dense_update(tmp_path):
    model = make_tiny_llama("plain")
    masks = apply_nm_pruning(model, collect_input_norms(model, calib()), 1, 2)
    save_masks(tmp_path / "m.safetensors", masks)
    with torch.no_grad():  # a dense LoRA merge fills the pruned zeros
        for name in masks:
            model.get_submodule(name).weight.add_(0.01)
    assert sparsity_report(model, masks)["total"]["mask_violations"] > 0
    reapply_masks(model, load_masks(tmp_path / "m.safetensors"))
    report = sparsity_report(model, masks)
    assert report["total"]["mask_violations"] == 0 and report["total"]["sparsity"] == pytest.approx(0.5)
    with pytest.raises(EdgepackError):
        reapply_masks(model, {"model.layers.9.mlp.up_proj": torch.ones(2, 2, dtype=torch.bool)})


def test_sequential_wanda():
    ids = calib()
    dense = make_tiny_llama("llama32")
    one_pass_norms = collect_input_norms(dense, ids)

    # With nothing pruned the sequential pass sees the dense activations: same norms, same masks.
    seq0 = make_tiny_llama("llama32")
    _, norms0 = prune_nm_sequential(seq0, ids, 0, 4)
    for name in one_pass_norms:
        torch.testing.assert_close(norms0[name], one_pass_norms[name], rtol=1e-5, atol=1e-6)

    # With pruning, layer 0 matches one-pass; layer 1's norms are those of a model whose layer 0 is pruned.
    seq = make_tiny_llama("llama32")
    masks, norms = prune_nm_sequential(seq, ids, 2, 4, batch_size=3)
    layer0 = {k: v for k, v in one_pass_norms.items() if k.startswith("model.layers.0.")}
    ref = make_tiny_llama("llama32")
    with torch.no_grad():
        for name, norm in layer0.items():
            weight = ref.get_submodule(name).weight
            mask = nm_masks(weight, norm, 2, 4)
            weight.masked_fill_(~mask, 0)
            assert torch.equal(masks[name], mask)
    after_layer0 = collect_input_norms(ref, ids)
    name = "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(norms[name], after_layer0[name], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(norms[name], one_pass_norms[name], rtol=1e-3)
    assert sparsity_report(seq, masks)["total"]["sparsity"] == pytest.approx(0.5)


def llama32_1b_on_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_parameter_counts_match_seed_study_for_llama32_1b():
    model = llama32_1b_on_meta()
    counts = count_parameters(model)
    assert round(counts["dense"] / 1e6, 1) == 1235.8
    assert counts["nonzero"] is None  # values unknown on meta
    assert round(nm_nonzero_count(model, 1, 2) / 1e6, 1) == 749.3
    assert round(nm_nonzero_count(model, 2, 4) / 1e6, 1) == 749.3
    assert nm_nonzero_count(model, 1, 8) > nm_nonzero_count(model, 12, 16)


def test_count_parameters_counts_tied_embedding_once():
    tied, untied = make_tiny_llama("llama32"), make_tiny_llama("plain")
    assert count_parameters(untied)["dense"] - count_parameters(tied)["dense"] == 256 * 64
    # nonzero subtracts exact zeros: here only the embedding's padding row (pad_token_id=0).
    assert count_parameters(tied)["dense"] - count_parameters(tied)["nonzero"] == 64
    with torch.no_grad():
        tied.model.layers[0].mlp.up_proj.weight[:3, :5] = 0
    assert count_parameters(tied)["dense"] - count_parameters(tied)["nonzero"] == 64 + 15
