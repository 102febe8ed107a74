"""The chat fidelity metric: the source's greedy replies as a ChatReference (torch), scored teacher-forced
by runtime.harness.eval_chat on the torch model and on its ONNX export (same numbers), the match share equal
to what free greedy decoding gives, and the reference file's arrays validated."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from runtime.harness import EvalLimits, eval_chat
from runtime.reference import ChatReference, Reference

LIMITS = EvalLimits(chat_prompts=3, chat_max_new_tokens=24, chat_prompt_tokens=400, batch_size=3)


@pytest.fixture(scope="module")
def source(tiny_checkpoint):
    from compressor.torch_backend import TorchBackend, load_causal_lm
    from runtime.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(tiny_checkpoint)
    return TorchBackend(load_causal_lm(tiny_checkpoint), pad_id=tokenizer.pad_id), tokenizer


@pytest.fixture(scope="module")
def chat_ref(source):
    from compressor.chat_reference import build_chat_reference

    backend, tokenizer = source
    return build_chat_reference(backend.model, tokenizer, LIMITS, k=8, progress=False)


@pytest.fixture(scope="module")
def onnx_decoder(tiny_checkpoint, source, tmp_path_factory):
    from exporter.onnx_graph import GraphOptions, build_decoder, spec_from_hf_config
    from runtime.onnx_engine import OnnxDecoder

    model = source[0].model
    weights = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("chat_onnx") / "model.onnx"
    build_decoder(weights, spec_from_hf_config(model.config, weights), path, GraphOptions(max_len=512), progress=False)
    return OnnxDecoder(path, threads=1, pad_id=source[1].pad_id)


def test_reference_holds_the_source_greedy_replies(source, chat_ref):
    backend, tokenizer = source
    assert chat_ref.count == 3 and chat_ref.k == 8
    stops = {tokenizer.eos_id}
    for i in range(chat_ref.count):
        reply = chat_ref.reply(i)
        assert 1 <= len(reply) <= LIMITS.chat_max_new_tokens
        assert (chat_ref.top_ids[i, : len(reply), 0] == reply).all()  # each token was the source's top-1
        free = backend.greedy([chat_ref.prompt(i)], LIMITS.chat_max_new_tokens, stops)[0]
        assert free == [t for t in reply if t not in stops]


def test_the_source_scores_itself_perfectly(source, chat_ref):
    r = eval_chat(source[0], LIMITS, chat_ref, progress=False)
    assert r["match32"] == 1.0 and r["top1"] == 1.0
    assert r["kld"] == pytest.approx(0.0, abs=1e-5)
    assert r["replies"] == 3 and r["tokens"] == int(chat_ref.reply_lens.sum())


def test_torch_and_onnx_compute_the_same_numbers(source, chat_ref, onnx_decoder):
    t = eval_chat(source[0], LIMITS, chat_ref, progress=False)
    o = eval_chat(onnx_decoder, LIMITS, chat_ref, progress=False)
    assert o["match32"] == t["match32"] and o["top1"] == t["top1"]
    assert o["kld"] == pytest.approx(t["kld"], abs=1e-4)


def test_match32_equals_free_greedy_decoding_of_a_perturbed_model(source, chat_ref):
    import copy

    import torch

    from compressor.torch_backend import TorchBackend

    backend, tokenizer = source
    model = copy.deepcopy(backend.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(1.0 * p.std() * torch.randn_like(p, generator=torch.Generator().manual_seed(1)))
    noisy = TorchBackend(model, pad_id=tokenizer.pad_id)
    r = eval_chat(noisy, LIMITS, chat_ref, progress=False)
    assert r["kld"] > 0.01 and r["top1"] < 1.0, r
    stops = {tokenizer.eos_id}
    free = []
    for i in range(chat_ref.count):
        target = chat_ref.reply(i)[:32]
        out = noisy.greedy([chat_ref.prompt(i)], len(target), set())[0]
        free.append(out == target)
    assert r["match32"] == pytest.approx(np.mean(free))
    assert stops  # the tiny model's EOS exists, so replies could stop early


def test_limits_pick_the_first_replies_and_cap_their_length(source, chat_ref):
    r = eval_chat(source[0], replace(LIMITS, chat_prompts=2, chat_max_new_tokens=5), chat_ref, progress=False)
    assert r["replies"] == 2 and r["tokens"] == int(np.minimum(chat_ref.reply_lens[:2], 5).sum())
    with pytest.raises(Exception, match="reference holds 3"):
        eval_chat(source[0], replace(LIMITS, chat_prompts=4), chat_ref, progress=False)


def test_the_chat_reference_round_trips_through_the_reference_file(chat_ref, tmp_path):
    ref = Reference(
        np.zeros((1, 4), np.int64), np.zeros((1, 3, 2), np.int32), np.zeros((1, 3, 2), np.float32), chat_ref
    )
    ref.save(tmp_path / "r.safetensors")
    back = Reference.load(tmp_path / "r.safetensors", vocab_size=288).chat
    for name, arr in chat_ref.arrays().items():
        assert np.array_equal(back.arrays()[name], arr), name


def _crafted(chat_ref: ChatReference, name: str, value) -> ChatReference:
    arrays = {k: v.copy() for k, v in chat_ref.arrays().items()}
    arrays[name] = value(arrays[name])
    return ChatReference(*(arrays[k] for k in arrays))


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("chat_tokens", lambda a: a + 1000, "outside"),
        ("chat_top_ids", lambda a: -a - 1, "outside"),
        ("chat_top_logp", lambda a: a * np.nan, "finite"),
        ("chat_reply_lens", lambda a: a + 10_000, "lengths"),
        ("chat_prompt_lens", lambda a: a * 0, "lengths"),
        ("chat_prompt_lens", lambda a: a[:1], r"must be \[3\]"),
        ("chat_top_ids", lambda a: a[:, :, 0], "longest reply"),
        ("chat_top_logp", lambda a: a.astype(np.float16), "float16, expected float32"),
    ],
)
def test_crafted_chat_arrays_are_refused_in_one_line(chat_ref, tmp_path, name, change, message):
    from safetensors.numpy import save_file

    from runtime.errors import EdgepackError

    arrays = {k: v.copy() for k, v in chat_ref.arrays().items()}
    arrays[name] = change(arrays[name])
    arrays.update(window_ids=np.zeros((1, 4), np.int64), top_ids=np.zeros((1, 3, 2), np.int32))
    arrays["top_logp"] = np.zeros((1, 3, 2), np.float32)
    path = tmp_path / "crafted.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
    with pytest.raises(EdgepackError, match=message) as e:
        Reference.load(path, vocab_size=288)
    assert "\n" not in str(e.value)


def test_a_missing_chat_array_is_refused(chat_ref, tmp_path):
    from safetensors.numpy import save_file

    from runtime.errors import EdgepackError

    arrays = {k: np.ascontiguousarray(v) for k, v in chat_ref.arrays().items() if k != "chat_reply_lens"}
    arrays.update(window_ids=np.zeros((1, 4), np.int64), top_ids=np.zeros((1, 3, 2), np.int32))
    arrays["top_logp"] = np.zeros((1, 3, 2), np.float32)
    save_file(arrays, str(tmp_path / "r.safetensors"))
    with pytest.raises(EdgepackError, match="lacks the 'chat_reply_lens'"):
        Reference.load(tmp_path / "r.safetensors")


def test_pipeline_stage_evaluations_score_chat_against_the_source(tiny_checkpoint, tmp_path):
    from compressor import pipeline
    from compressor.recipe import Calibration, Recipe, WidthStage

    limits = EvalLimits(
        ctx=32, ppl_windows=1, qa_questions=1, qa_max_new_tokens=2, wikitext="tiny-wikitext", triviaqa="tiny-triviaqa"
    )
    limits = replace(limits, chat_prompts=2, chat_max_new_tokens=8, chat_prompt_tokens=400)
    base = Recipe(name="b", model=str(tiny_checkpoint), calibration=Calibration(samples=2, seqlen=32))
    summary = pipeline.run_pipeline(base, tmp_path / "b", eval_limits=limits, log=lambda m: None)
    assert summary["eval"]["chat"]["match32"] == 1.0 and summary["eval"]["chat"]["replies"] == 2  # the source
    pruned = Recipe(**{**base.__dict__, "name": "w", "width": WidthStage(n=2, m=4)})
    summary = pipeline.run_pipeline(pruned, tmp_path / "w", eval_limits=limits, log=lambda m: None)
    assert summary["eval"]["chat"]["kld"] > 1e-3  # half the weights gone: no longer the source's replies
    made = {f.name: f.read_bytes() for f in (tmp_path / "b" / "evals").glob("chat-reference-*")}
    copied = {f.name: f.read_bytes() for f in (tmp_path / "w" / "evals").glob("chat-reference-*")}
    assert len(made) == 1 and copied == made  # the sibling run's replies reused, not generated again
    off = replace(limits, chat_prompts=0)
    assert "chat" not in pipeline.run_pipeline(base, tmp_path / "b", eval_limits=off, log=lambda m: None)["eval"]


def test_eval_checkpoint_scores_chat_against_a_reference_file(tiny_checkpoint, chat_ref, tmp_path):
    import json

    from edgepack.cli import main

    ref = Reference(
        np.zeros((1, 4), np.int64), np.zeros((1, 3, 2), np.int32), np.zeros((1, 3, 2), np.float32), chat_ref
    )
    ref.save(tmp_path / "r.safetensors")
    out = tmp_path / "r.json"
    argv = ["eval", str(tiny_checkpoint), "--tasks", "chat", "--chat-prompts", "3", "--reference"]
    assert main([*argv, str(tmp_path / "r.safetensors"), "--json", str(out)]) == 0
    r = json.loads(out.read_text())["chat"]
    assert r["match32"] == 1.0 and r["replies"] == 3 and r["kld"] == pytest.approx(0.0, abs=1e-5)


def test_reference_generation_batches_by_memory():
    """Up to 16 prompts per generate() call while the kept logits fit the budget, never below the limits' batch."""
    from compressor.chat_reference import generation_rows

    limits = EvalLimits(chat_prompts=32, chat_max_new_tokens=128, batch_size=4)
    assert generation_rows(limits, 49_152) == 16  # SmolLM2: 16 x 2 x 128 x 49k floats = 805 MB
    assert generation_rows(limits, 128_256) == 8  # Llama-3.2's vocabulary: 8 rows (1.05 GB / 1 GiB budget)
    assert generation_rows(replace(limits, batch_size=12), 1_000_000) == 12
