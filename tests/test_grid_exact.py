"""Grid-exact quantization: weights already on a 4-bit block grid (a dequantized Q4_0 / Q4_1 / Q4_K GGUF) are
found, stored exactly as MatMulNBits (+ per-block offsets), and left alone by GPTQ."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_tiny_llama
from exporter.int4 import dequantize_matmulnbits, find_block_grid
from test_onnx_graph import IDS, PROJ, build, hf_logits, hf_with_weights, numpy_state, run_graph


def q4_1(w: np.ndarray) -> np.ndarray:
    """llama.cpp's Q4_1 round trip (blocks of 32 along K: d = (max - min) / 15 and m = min, both float16,
    q = round((x - min) / d)), dequantized to float32 as gguf-py does: d * q + m."""
    n, k = w.shape
    b = w.reshape(n, k // 32, 32).astype(np.float32)
    lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    d = ((hi - lo) / 15).astype(np.float16).astype(np.float32)
    m = lo.astype(np.float16).astype(np.float32)
    q = np.clip(np.round((b - lo) / np.where(d == 0, 1, d)), 0, 15)
    return (d * q + m).reshape(n, k).astype(np.float32)


def q4_0(w: np.ndarray) -> np.ndarray:
    """llama.cpp's Q4_0: d = max / -8 of the signed largest magnitude (float16), q = clip(round(x / d) + 8)."""
    n, k = w.shape
    b = w.reshape(n, k // 32, 32).astype(np.float32)
    big = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)
    d = (big / -8).astype(np.float16).astype(np.float32)
    q = np.clip(np.round(b / np.where(d == 0, 1, d)) + 8, 0, 15)
    return (d * (q - 8)).reshape(n, k).astype(np.float32)


def sparse_codes(w: np.ndarray, rng) -> np.ndarray:
    """A Q4_K-like block grid whose extreme codes are unused: codes 2..12 only, scale and min per block."""
    n, k = w.shape
    scale = rng.uniform(0.01, 0.05, (n, k // 32, 1)).astype(np.float32)
    mins = rng.uniform(-0.3, 0.0, (n, k // 32, 1)).astype(np.float32)
    q = rng.integers(2, 13, (n, k // 32, 32)).astype(np.float32)
    return (scale * q + mins).reshape(n, k).astype(np.float32)


@pytest.mark.parametrize("grid", ["q4_1", "q4_0", "sparse_codes"])
def test_block_grids_are_found_and_reproduced_exactly(grid):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 128)).astype(np.float32) * 0.05
    on_grid = {"q4_1": q4_1, "q4_0": q4_0, "sparse_codes": lambda x: sparse_codes(x, rng)}[grid](w)
    nb = find_block_grid(on_grid)
    assert nb is not None and nb.block_size == 32 and nb.zero_points.dtype == np.uint8
    err = np.abs(dequantize_matmulnbits(nb) - on_grid).max()
    assert err <= 1e-6 * np.abs(on_grid).max()
    if grid == "q4_0":  # integer zero point 8: nothing to add per block
        assert nb.offsets is None


def test_weights_off_the_grid_are_not_taken_for_grid_ones():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    assert find_block_grid(w) is None  # plain float
    moved = q4_1(w)
    moved[3, 5] += 1e-3  # one weight off the grid (what a LoRA merge does to all of them)
    assert find_block_grid(moved) is None
    pruned = q4_1(w)
    pruned[:, ::8] = 0.0  # N:M pruning puts zeros that Q4_1's grid does not hold
    assert find_block_grid(pruned) is None
    assert find_block_grid(q4_1(w)[:, :40]) is None  # K not a multiple of 32


def grid_model():
    model = make_tiny_llama("plain")
    weights = numpy_state(model)
    for key in weights:
        if any(p in key for p in PROJ):
            weights[key] = q4_1(weights[key])
    return model, weights


def test_grid_weights_export_exactly(tmp_path):
    """A model whose projections are on a Q4_1 grid: the int4 graph computes the very same function (fp32
    activations), every projection is stored grid-exact, and a GPTQ graph keeps float on-grid ones exact too."""
    model, weights = grid_model()
    ref = hf_logits(hf_with_weights(model.config, weights), IDS)
    path, meta = build(tmp_path, weights, model.config, projections="int4", accuracy_level=1)
    assert meta["weights"]["grid_exact_projections"] == len(PROJ) * model.config.num_hidden_layers
    np.testing.assert_allclose(run_graph(path, meta, IDS), ref, atol=1e-4)
    path, meta = build(tmp_path, weights, model.config, name="rtn", projections="int4", grid_exact=False)
    assert meta["weights"]["grid_exact_projections"] == 0
    assert np.abs(run_graph(path, meta, IDS) - ref).max() > 1e-3  # RTN on top of the grid moves the model


# ---------------------------------------------------------------------------------------------------------
# GPTQ and EoRA leave on-grid projections alone


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """A tiny model whose MLP projections are on a Q4_1 grid and whose attention ones are not (what LoRA on
    q/k/v/o does to an imported GGUF): GPTQ + EoRA, then the all-on-grid variant."""
    import torch

    from compressor.eora import generate_eora
    from compressor.gptq import quantize_gptq
    from compressor.recipe import EoraStage, GptqStage
    from test_gptq_eora import calibration, save_tiny_tokenizer

    root = tmp_path_factory.mktemp("grid_gptq")
    model = make_tiny_llama("llama32", hidden_size=128, intermediate_size=256, head_dim=32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.copy_(torch.from_numpy(q4_1(p.numpy())))
    model.save_pretrained(root / "base")
    save_tiny_tokenizer(root / "base")
    calib = calibration(8, 48, seed=1)
    gptq = GptqStage(group_size=32, samples=8, damp=0.05)
    rec = quantize_gptq(root / "base", calib, root / "gptq", gptq)
    eora = generate_eora(root / "base", root / "gptq", calib, root / "eora", EoraStage(rank=8, samples=8))
    return dict(root=root, model=model, calib=calib, gptq=rec, eora=eora, settings=gptq)


def test_gptq_skips_on_grid_projections(mixed_run):
    from compressor.eora import load_eora
    from compressor.gptq import checkpoint_tensors

    layers = mixed_run["model"].config.num_hidden_layers
    mlp = [f"model.layers.{i}.mlp.{m}" for i in range(layers) for m in ("down_proj", "gate_proj", "up_proj")]
    assert mixed_run["gptq"]["grid_exact_modules"] == sorted(mlp)
    tensors = checkpoint_tensors(mixed_run["root"] / "gptq")
    state = mixed_run["model"].state_dict()
    for m in mlp:  # kept as they were, exactly
        assert f"{m}.qweight" not in tensors
        assert np.array_equal(tensors[f"{m}.weight"].float().numpy(), state[f"{m}.weight"].numpy())
    assert "model.layers.0.self_attn.q_proj.qweight" in tensors
    corrected = load_eora(mixed_run["root"] / "eora")
    assert corrected and all(".self_attn." in name for name in corrected)


def test_gptq_checkpoint_with_grid_modules_exports_them_exactly(mixed_run, tmp_path):
    from compressor.gptq import checkpoint_tensors, dequantized_state_dict
    from exporter.onnx_graph import GptqFormat

    model = mixed_run["model"]
    weights = {
        k: v.float().numpy() if v.is_floating_point() else v.numpy()
        for k, v in checkpoint_tensors(mixed_run["root"] / "gptq").items()
    }
    path, meta = build(tmp_path, weights, model.config, gptq=GptqFormat(bits=4, group_size=32), accuracy_level=1)
    assert meta["weights"]["grid_exact_projections"] == 3 * model.config.num_hidden_layers
    deq = {k: v.numpy() for k, v in dequantized_state_dict(mixed_run["root"] / "gptq").items()}
    np.testing.assert_allclose(
        run_graph(path, meta, IDS), hf_logits(hf_with_weights(model.config, deq), IDS), atol=2e-4
    )


def test_all_on_grid_runs_no_gptq_and_no_eora(mixed_run):
    """Every projection on the grid (the raw import of a Q4_1 GGUF): the stage keeps the float checkpoint,
    EoRA writes an empty adapter, and reading both back gives the source model unchanged."""
    import torch

    from compressor.eora import apply_eora_to_dequantized, generate_eora, load_eora
    from compressor.gptq import dequantized_state_dict, quantize_gptq
    from compressor.recipe import EoraStage

    root, model = mixed_run["root"], mixed_run["model"]
    on_grid = make_tiny_llama("llama32", hidden_size=128, intermediate_size=256, head_dim=32)
    with torch.no_grad():
        for name, p in on_grid.named_parameters():
            if any(
                f".{m}." in name for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
            ):
                p.copy_(torch.from_numpy(q4_1(p.numpy())))
    on_grid.save_pretrained(root / "all")
    for f in (root / "base").glob("tokenizer*"):
        (root / "all" / f.name).write_bytes(f.read_bytes())
    rec = quantize_gptq(root / "all", mixed_run["calib"], root / "all-gptq", mixed_run["settings"])
    assert rec["modules_quantized"] == 0 and len(rec["grid_exact_modules"]) == 7 * model.config.num_hidden_layers
    generate_eora(root / "all", root / "all-gptq", mixed_run["calib"], root / "all-eora", EoraStage(rank=8, samples=8))
    assert load_eora(root / "all-eora") == {}
    sd = apply_eora_to_dequantized(dequantized_state_dict(root / "all-gptq"), {})
    for k, v in on_grid.state_dict().items():
        if k in sd:
            assert torch.equal(sd[k], v)
