"""GPTQ (stage 4) and EoRA (stage 5) on a tiny Llama-3.2-shaped model, end to end with gptqmodel on CPU.

The model is widened so every in_features (128, 256) is a multiple of the group size (32); one GPTQ run
and one EoRA run are shared by all tests in this file (~30 s on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from runtime.errors import EdgepackError

GROUP = 32
RANK = 16
VOCAB = 256
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def save_tiny_tokenizer(path: Path, vocab_size: int = VOCAB) -> None:
    """gptqmodel loads a tokenizer with every model, so the tiny model needs one: a word-level vocabulary
    't3'..'t255' with <pad>=0, <s>=1, </s>=2 matching the tiny config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>"
    ).save_pretrained(path)


def calibration(n: int, seqlen: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, VOCAB, (seqlen - 1,), generator=g).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from compressor.eora import generate_eora
    from compressor.gptq import quantize_gptq
    from compressor.recipe import EoraStage, GptqStage

    root = tmp_path_factory.mktemp("gptq_eora")
    base = root / "base"
    model = make_tiny_llama("llama32", hidden_size=128, intermediate_size=256, head_dim=32)
    model.save_pretrained(base)
    save_tiny_tokenizer(base)
    calib = calibration(24, 64, seed=1)
    gptq_record = quantize_gptq(base, calib, root / "gptq", GptqStage(group_size=GROUP, samples=16, damp=0.05))
    settings = EoraStage(rank=RANK, samples=16)
    eora_record = generate_eora(base, root / "gptq", calib, root / "eora", settings, dtype="bfloat16")
    eora32_record = generate_eora(base, root / "gptq", calib, root / "eora32", settings, dtype="float32")
    return dict(
        root=root, base=base, model=model, calib=calib, gptq=gptq_record, eora=eora_record, eora32=eora32_record
    )


@torch.no_grad()
def logits_of(model, rows: list[list[int]]) -> torch.Tensor:
    return model(input_ids=torch.tensor(rows)).logits.float()


def test_gptq_writes_checkpoint_and_record(run):
    q = run["root"] / "gptq"
    rec = run["gptq"]
    cfg = json.loads((q / "quantize_config.json").read_text())
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["desc_act"]) == (4, GROUP, True, False)
    assert rec["calibration_rows"] == 16 and rec["calibration_tokens"] == 16 * 64
    assert rec["modules_quantized"] == 4 * len(PROJ)
    assert json.loads((q / "gptq_record.json").read_text())["settings"]["group_size"] == GROUP
    assert (q / "tokenizer.json").exists() and "model.safetensors" in rec["files"]
    assert list((q / "logs").glob("*.log")), "gptqmodel's run logs belong in the stage directory"
    assert not list(run["root"].glob(".gptq.staging-*"))


def test_dequantized_state_dict_matches_gptqmodel_dequantization(run):
    """Our v1 unpacking (z = stored + 1) against gptqmodel's own TorchLinear.dequantize_weight. With fp16
    scales, scale*(q-z) is exact in float32 and one rounding in fp16, so the two agree bit for bit."""
    from compressor.gptq import dequantized_state_dict, import_gptqmodel

    import_gptqmodel()
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    ours = dequantized_state_dict(run["root"] / "gptq")
    qm = GPTQModel.load(str(run["root"] / "gptq"), backend=BACKEND.GPTQ_TORCH, device="cpu", dtype=torch.float16)
    checked = 0
    for name, module in qm.model.named_modules():
        if isinstance(module, TorchLinear):
            theirs = module.dequantize_weight().T  # [out, in]
            assert torch.equal(ours[f"{name}.weight"].half(), theirs), name
            checked += 1
    assert checked == 4 * len(PROJ)
    assert not any(k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for k in ours)
    assert all(v.dtype == torch.float32 for v in ours.values() if v.is_floating_point())


def test_dequantized_weights_are_a_4bit_grid_near_the_float_weights(run):
    from compressor.gptq import dequantized_state_dict

    deq = dequantized_state_dict(run["root"] / "gptq")
    ref = run["model"].state_dict()
    for name, w in deq.items():
        if not any(name.endswith(f"{p}.weight") for p in PROJ):
            assert torch.equal(w, ref[name]), name  # embeddings and norms pass through untouched
            continue
        rel = (w - ref[name]).norm() / ref[name].norm()
        assert 0 < rel < 0.2, (name, rel)
        groups = w.t().reshape(-1, GROUP, w.shape[0]).sort(dim=1).values  # [groups, GROUP, out]
        levels = (groups[:, 1:] != groups[:, :-1]).sum(dim=1) + 1  # distinct values per (group, column)
        assert levels.max() <= 16, name


def test_mse_clipping_reaches_gptqmodel_and_shrinks_scales(run, tmp_path):
    """`[gptq] mse` turns on gptqmodel's clipping search (ranges p * [min, max] for p <= 1, least |error|^2.4
    kept): the run records it, and a good share of the groups get a smaller scale than the min/max one."""
    from safetensors.torch import load_file

    from compressor.gptq import quantize_gptq
    from compressor.recipe import GptqStage

    quantize_gptq(
        run["base"], run["calib"], tmp_path / "mse", GptqStage(group_size=GROUP, samples=16, damp=0.05, mse=2.4)
    )
    assert json.loads((tmp_path / "mse" / "gptq_record.json").read_text())["settings"]["mse"] == 2.4
    plain, clipped = (load_file(str(d / "model.safetensors")) for d in (run["root"] / "gptq", tmp_path / "mse"))
    scales = [k for k in plain if k.endswith(".scales")]
    assert scales and all(clipped[k].shape == plain[k].shape for k in scales)
    ratio = torch.cat([(clipped[k].float() / plain[k].float()).flatten() for k in scales])
    assert (ratio < 0.99).float().mean() > 0.1  # clipping moved a good share of the groups


def test_load_quantized_gives_logits_close_to_the_float_model(run):
    from compressor.gptq import load_quantized

    rows = run["calib"][:4]
    q = load_quantized(run["root"] / "gptq")
    ref, got = logits_of(run["model"], rows), logits_of(q, rows)
    assert got.shape == ref.shape
    assert torch.isfinite(got).all()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.3, rel
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.5
    # tied embeddings (Llama-3.2 style) survive the float rebuild
    assert q.lm_head.weight.data_ptr() == q.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("which, dtype", [("eora", "bfloat16"), ("eora32", "float32")])
def test_eora_adapter_layout(run, which, dtype):
    """gptqmodel's bf16 EoRA and our float32 loop write the same PEFT layout, recording the dtype used."""
    from compressor.eora import load_eora

    eora_dir = run["root"] / which
    cfg = json.loads((eora_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == RANK
    assert sorted(cfg["target_modules"]) == sorted(PROJ)
    eora = load_eora(eora_dir)
    assert len(eora) == 4 * len(PROJ) == run[which]["modules"]
    ref = run["model"].state_dict()
    for name, (a, b) in eora.items():
        out_f, in_f = ref[f"{name}.weight"].shape
        assert a.shape == (RANK, in_f) and b.shape == (out_f, RANK), name
        assert a.dtype == b.dtype == torch.float32
    assert json.loads((eora_dir / "eora_record.json").read_text())["settings"]["dtype"] == dtype


@pytest.mark.parametrize("which", ["eora", "eora32"])
def test_eora_reduces_the_quantization_error(run, which):
    """On the calibration data, float model vs dequantized GPTQ model with and without W_q + B·A: EoRA must
    shrink both the logits error and each projection's output error on the float model's own inputs."""
    from compressor.eora import apply_eora_to_dequantized, load_eora
    from compressor.gptq import dequantized_state_dict, float_model_from_state_dict

    q_dir = run["root"] / "gptq"
    deq = dequantized_state_dict(q_dir)
    eora = load_eora(run["root"] / which)
    corrected = apply_eora_to_dequantized(deq, eora)
    rows = run["calib"][:16]
    ref = logits_of(run["model"], rows)
    err_q = (logits_of(float_model_from_state_dict(q_dir, deq), rows) - ref).pow(2).mean()
    err_e = (logits_of(float_model_from_state_dict(q_dir, corrected), rows) - ref).pow(2).mean()
    assert err_e < 0.8 * err_q, (err_e, err_q)

    inputs = {}

    def keep_input(name):
        def hook(module, args, output):
            inputs[name] = args[0].reshape(-1, args[0].shape[-1])

        return hook

    hooks = [m.register_forward_hook(keep_input(n)) for n, m in run["model"].named_modules() if n in eora]
    try:
        logits_of(run["model"], rows)
    finally:
        for h in hooks:
            h.remove()
    w = run["model"].state_dict()
    improved = 0
    for name in eora:
        x, key = inputs[name], f"{name}.weight"
        before = (x @ (w[key] - deq[key]).T).pow(2).mean()
        after = (x @ (w[key] - corrected[key]).T).pow(2).mean()
        improved += bool(after < before)
    assert improved == len(eora), f"{improved}/{len(eora)} projections improved"


def test_float32_eora_matches_gptqmodels_bf16_eora(run):
    """The float32 loop is gptqmodel's method, not a new one: per projection its correction B·A has
    gptqmodel's norm and direction up to bf16 noise (gptqmodel holds activations and weights in bf16, which
    moves the chosen subspace where the tiny model's spectrum is flat: measured median 0.10, max 0.31 relative
    difference), and it removes at least as much of the logits error."""
    import statistics

    from compressor.eora import apply_eora_to_dequantized, load_eora
    from compressor.gptq import dequantized_state_dict, float_model_from_state_dict

    ours, theirs = load_eora(run["root"] / "eora32"), load_eora(run["root"] / "eora")
    assert ours.keys() == theirs.keys()
    rel = []
    for name in ours:
        d32, d16 = ours[name][1] @ ours[name][0], theirs[name][1] @ theirs[name][0]
        assert abs(d32.norm() / d16.norm() - 1) < 0.02, name
        rel.append(((d32 - d16).norm() / d16.norm()).item())
    assert statistics.median(rel) < 0.15 and max(rel) < 0.45, rel

    q_dir, rows = run["root"] / "gptq", run["calib"][:16]
    deq, ref = dequantized_state_dict(q_dir), logits_of(run["model"], rows)

    def error(eora):
        model = float_model_from_state_dict(q_dir, apply_eora_to_dequantized(deq, eora))
        return (logits_of(model, rows) - ref).pow(2).mean().item()

    assert error(ours) <= 1.05 * error(theirs)


def test_eora_dtype_follows_the_hardware():
    from compressor.eora import eora_dtype

    assert eora_dtype("cuda") == eora_dtype("cuda:1") == "bfloat16"
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert eora_dtype("cpu") == ("bfloat16" if {"avx512_bf16", "amx_bf16"} & flags else "float32")


def test_generate_eora_refuses_an_unknown_dtype(run, tmp_path):
    from compressor.eora import generate_eora

    with pytest.raises(EdgepackError, match="choose auto, bfloat16, float16 or float32"):
        generate_eora(run["base"], run["root"] / "gptq", run["calib"], tmp_path / "e", dtype="int8")


def test_apply_eora_checks_shapes():
    from compressor.eora import apply_eora_to_dequantized

    sd = {"m.weight": torch.zeros(4, 6)}
    out = apply_eora_to_dequantized(sd, {"m": (torch.ones(2, 6), torch.ones(4, 2))})
    assert torch.equal(out["m.weight"], torch.full((4, 6), 2.0)) and torch.equal(sd["m.weight"], torch.zeros(4, 6))
    with pytest.raises(EdgepackError, match="B·A is 4x5"):
        apply_eora_to_dequantized(sd, {"m": (torch.ones(2, 5), torch.ones(4, 2))})
    with pytest.raises(EdgepackError, match="no weight"):
        apply_eora_to_dequantized(sd, {"x": (torch.ones(2, 6), torch.ones(4, 2))})


def test_quantize_needs_a_tokenizer_next_to_the_model(tmp_path):
    from compressor.gptq import quantize_gptq

    make_tiny_llama("plain").save_pretrained(tmp_path / "m")
    with pytest.raises(EdgepackError, match="no tokenizer"):
        quantize_gptq(tmp_path / "m", calibration(2, 32, 0), tmp_path / "q")
    with pytest.raises(EdgepackError, match="at least 11 tokens"):
        save_tiny_tokenizer(tmp_path / "m")
        quantize_gptq(tmp_path / "m", [[1, 2, 3]], tmp_path / "q")


def test_calibration_rows_accept_ids_tensors_and_masked_dicts():
    from compressor.gptq import calibration_rows

    ids = list(range(3, 15))
    rows = calibration_rows(
        [ids, torch.tensor([ids]), {"input_ids": ids + [0, 0], "attention_mask": [1] * 12 + [0, 0]}, [5] * 10],
        limit=None,
    )
    assert rows == [ids, ids, ids]  # the 10-token row is dropped, as gptqmodel would silently do
    assert calibration_rows([ids] * 5, limit=2) == [ids, ids]


@pytest.mark.parametrize("out_f, in_f", [(48, 96), (96, 48)])
def test_float32_decomposition_equals_gptqmodels(out_f, in_f):
    """eigen_scaling + lowrank_correction (one eigendecomposition per shared input, rank-r SVD through the
    Gram matrix) give gptqmodel's eora_compute_lora correction, also on a rank-deficient covariance."""
    from gptqmodel.eora.eora import eora_compute_lora

    from compressor.eora_float32 import eigen_scaling, lowrank_correction

    g = torch.Generator().manual_seed(0)
    x = torch.randn(in_f // 2, in_f, generator=g) * torch.linspace(0.1, 3, in_f)  # rank in_f / 2
    cov, delta = x.T @ x / x.shape[0], torch.randn(out_f, in_f, generator=g) * 0.01
    a, b = lowrank_correction(delta, *eigen_scaling(cov), rank=8)
    a_ref, b_ref = eora_compute_lora(delta, "m", cov, 8, torch.float32, torch.device("cpu"))
    ref = b_ref @ a_ref
    assert a.shape == a_ref.shape and b.shape == b_ref.shape
    assert ((b @ a - ref).norm() / ref.norm()).item() < 1e-4


def test_eora_tuning_distils_the_factors_towards_the_float_model(run, tmp_path):
    """compressor.eora_tune: starting from the fit, a few distillation steps lower KL(float || quantized +
    B·A) on rows it never saw, keep the adapter's layout (same modules, shapes, scaling 1), and a second call
    on the same directory resumes from the finished checkpoint instead of training again."""
    from compressor.eora import load_eora
    from compressor.eora_tune import tune_eora
    from compressor.gptq import dequantized_state_dict, float_model_from_state_dict
    from compressor.recipe import EoraStage

    q_dir = run["root"] / "gptq"
    settings = EoraStage(rank=RANK, samples=16, seqlen=64, tune_steps=12, tune_lr=1e-4, tune_batch_size=4)
    quantized = float_model_from_state_dict(q_dir, dequantized_state_dict(q_dir))
    record = tune_eora(run["model"], quantized, run["root"] / "eora32", run["calib"], settings, tmp_path, 0)
    assert record["steps"] == 12 and record["rows"] + record["heldout_rows"] == len(run["calib"])
    assert 0 < record["relative_change"] < 1
    fit, tuned = load_eora(run["root"] / "eora32"), load_eora(tmp_path / "adapter")
    assert set(tuned) == set(fit)
    assert all(tuned[n][0].shape == fit[n][0].shape and tuned[n][1].shape == fit[n][1].shape for n in fit)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == RANK

    unseen = calibration(8, 64, seed=7)

    def kl_to_float(eora) -> float:
        from compressor.eora import apply_eora_to_dequantized

        model = float_model_from_state_dict(q_dir, apply_eora_to_dequantized(dequantized_state_dict(q_dir), eora))
        p = torch.log_softmax(logits_of(run["model"], unseen), -1)
        q = torch.log_softmax(logits_of(model, unseen), -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    # a random model on random tokens leaves little to win (SmolLM2: -14 % held-out KL); it must still be a win
    assert record["heldout_kl"][-1][1] < 0.97 * record["heldout_kl"][0][1]
    assert kl_to_float(tuned) < 0.99 * kl_to_float(fit)
    quantized = float_model_from_state_dict(q_dir, dequantized_state_dict(q_dir))  # peft wrapped the first
    again = tune_eora(run["model"], quantized, run["root"] / "eora32", run["calib"], settings, tmp_path, 0)
    assert again["train_loss"] == record["train_loss"]  # resumed at the last step: nothing retrained
    assert all(torch.equal(load_eora(tmp_path / "adapter")[n][1], tuned[n][1]) for n in fit)
    with pytest.raises(EdgepackError, match="tune_steps"):
        EoraStage(tune_steps=-1)


def test_lever_benchmarks_start_from_the_exported_numbers(run):
    """benchmarks/eora_scale_tuning.py's layer, before training, is exactly GPTQ's dequantized weight plus B·A;
    benchmarks/mixed_precision_bound.py swaps back to float exactly the projections a pattern names."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from eora_scale_tuning import ScaledInt4Linear
    from mixed_precision_bound import restored

    from compressor.eora import load_eora
    from compressor.gptq import checkpoint_tensors, dequantized_state_dict, read_quantize_config

    qdir = run["root"] / "gptq"
    fmt = str(read_quantize_config(qdir).get("checkpoint_format", "gptq")).lower()
    tensors, deq = checkpoint_tensors(qdir), dequantized_state_dict(qdir)
    name, (a, b) = next(iter(load_eora(run["root"] / "eora32").items()))
    layer = ScaledInt4Linear(tensors, name, a, b, zero_offset=1 if fmt == "gptq" else 0)
    x = torch.randn(3, a.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (deq[f"{name}.weight"] + b @ a).t(), rtol=1e-5, atol=1e-5)
        layer.log_scale.fill_(0.1)  # every scale x e^0.1: the weight scales with it, B·A does not
        torch.testing.assert_close(
            layer(x) - x @ (b @ a).t(), x @ (deq[f"{name}.weight"] * 1.1052).t(), rtol=1e-3, atol=1e-4
        )
    float_sd = run["model"].state_dict()
    swapped, count = restored(deq, float_sd, r"\.v_proj")
    v_keys = [k for k in deq if k.endswith("v_proj.weight")]
    assert v_keys and count == sum(float_sd[k].numel() for k in v_keys)
    for k in deq:
        assert torch.equal(swapped[k], float_sd[k] if k in v_keys else deq[k]), k
