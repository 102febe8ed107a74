"""The shared quality harness: metrics checked against independent computations on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime import metrics


@pytest.mark.parametrize(
    "prediction, aliases, em, contains",
    [
        ("The Beatles", ["Beatles"], True, True),  # article dropped
        ("beatles!", ["The Beatles"], True, True),  # punctuation and case
        ("Beyoncé Knowles", ["Beyonce Knowles"], True, True),  # accents folded
        ("It was Mark Twain's idea", ["Mark Twain"], False, True),  # containment, whole words
        ("Twainesque", ["Twain"], False, False),  # no partial-word containment
        ("“Jaws”", ["Jaws"], True, True),  # curly quotes are punctuation
        ("Charles_Dickens", ["charles dickens"], True, True),  # underscores are spaces
        ("Paris, France", ["Paris"], False, True),
        ("", ["anything"], False, False),
        ("a", ["The"], False, False),  # aliases that normalise to nothing never match
        ("ＡＢＣ", ["abc"], True, True),  # full-width unicode (NFKD)
    ],
)
def test_triviaqa_normalisation(prediction, aliases, em, contains):
    assert metrics.exact_match(prediction, aliases) is em
    assert metrics.contains_answer(prediction, aliases) is contains


def test_answer_span_takes_first_nonempty_line():
    assert metrics.answer_span("\n  Paris \nQuestion: next") == "Paris"
    assert metrics.answer_span("   \n") == ""


def test_windows_are_non_overlapping_and_drop_the_tail():
    w = metrics.perplexity_windows(list(range(25)), ctx=8)
    assert w.shape == (3, 8) and w[1, 0] == 8 and w[-1, -1] == 23
    assert metrics.perplexity_windows(list(range(25)), ctx=8, limit=2).shape == (2, 8)
    with pytest.raises(ValueError):
        metrics.perplexity_windows([1, 2, 3], ctx=8)


def test_topk_kl_is_a_close_lower_bound_of_full_kl():
    rng = np.random.default_rng(0)
    p = metrics.log_softmax(rng.normal(size=(50, 300)).astype(np.float32) * 4)
    q = metrics.log_softmax(rng.normal(size=(50, 300)).astype(np.float32) * 4)
    full = metrics.kl_divergence(p, q)
    ids, lp = metrics.topk_reference(p, 32)
    approx = metrics.topk_kl(ids, lp, q)
    assert np.all(approx <= full + 1e-9)
    assert approx.sum() > 0.5 * full.sum()
    ids_all, lp_all = metrics.topk_reference(p, 300)
    np.testing.assert_allclose(metrics.topk_kl(ids_all, lp_all, q), full, rtol=1e-4, atol=1e-6)
    assert np.allclose(metrics.topk_kl(ids, lp, p), 0.0, atol=1e-6)


def test_perplexity_equals_exp_mean_nll_from_hf_loss(tiny_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.torch_backend import TorchBackend
    from runtime.datasets import wikitext_eval_text
    from runtime.harness import EvalLimits, eval_perplexity
    from runtime.tokenizer import TextTokenizer

    limits = EvalLimits(ctx=64, ppl_windows=5, batch_size=2, wikitext="tiny-wikitext")
    tok = TextTokenizer(tiny_checkpoint)
    backend = TorchBackend.from_pretrained(tiny_checkpoint, pad_id=tok.pad_id)
    res = eval_perplexity(backend, tok, limits, progress=False)
    assert res["windows"] == 5 and res["tokens"] == 5 * 63

    # independent: HF tokenizer + HF's own loss (mean NLL of shifted labels) window by window
    hf_tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    ids = hf_tok(wikitext_eval_text("tiny-wikitext")).input_ids
    losses = []
    with torch.no_grad():
        for i in range(5):
            x = torch.tensor([ids[i * 64 : (i + 1) * 64]])
            losses.append(model(x, labels=x).loss.item())
    assert res["ppl"] == pytest.approx(float(np.exp(np.mean(losses))), rel=1e-4)


def test_kl_of_a_model_with_itself_is_zero_and_differs_for_another(tiny_checkpoint):
    from compressor.torch_backend import TorchBackend
    from runtime.datasets import wikitext_eval_text
    from runtime.harness import EvalLimits, eval_perplexity
    from runtime.reference import Reference
    from runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(tiny_checkpoint)
    backend = TorchBackend.from_pretrained(tiny_checkpoint, pad_id=tok.pad_id)
    windows = metrics.perplexity_windows(tok.encode(wikitext_eval_text("tiny-wikitext")), 32, 4)
    logp = backend.log_probs(windows)[:, :-1]
    ids, lp = metrics.topk_reference(logp.reshape(-1, logp.shape[-1]), 16)
    ref = Reference(windows, ids.reshape(4, 31, 16), lp.reshape(4, 31, 16))
    limits = EvalLimits(ctx=32, ppl_windows=4, batch_size=2)
    same = eval_perplexity(backend, tok, limits, progress=False, reference=ref)
    assert same["kld"] == pytest.approx(0.0, abs=1e-6) and same["top1"] == 1.0

    with torch.no_grad():
        for p in backend.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other = eval_perplexity(backend, tok, limits, progress=False, reference=ref)
    assert other["kld"] > 1e-3 and other["top1"] < 1.0


def test_reference_round_trips(tmp_path):
    from runtime.reference import Reference

    rng = np.random.default_rng(1)
    ref = Reference(
        rng.integers(0, 100, (2, 8)),
        rng.integers(0, 100, (2, 7, 4)).astype(np.int32),
        rng.normal(size=(2, 7, 4)).astype(np.float32),
    )
    ref.save(tmp_path / "r.safetensors")
    back = Reference.load(tmp_path / "r.safetensors")
    assert np.array_equal(back.window_ids, ref.window_ids) and np.array_equal(back.top_logp, ref.top_logp)


def test_triviaqa_harness_runs_on_tiny_model(tiny_checkpoint):
    from compressor.torch_backend import TorchBackend
    from runtime.harness import EvalLimits, eval_triviaqa
    from runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(tiny_checkpoint)
    backend = TorchBackend.from_pretrained(tiny_checkpoint, pad_id=tok.pad_id)
    res = eval_triviaqa(
        backend,
        tok,
        EvalLimits(qa_questions=3, qa_max_new_tokens=4, triviaqa="tiny-triviaqa"),
        progress=False,
        return_predictions=True,
    )
    assert res["closed"]["n"] == res["open"]["n"] == 3
    assert [p["id"] for p in res["closed"]["predictions"]] == [p["id"] for p in res["open"]["predictions"]]
    assert 0.0 <= res["open"]["contains"] <= 1.0


def test_torch_greedy_left_padding_matches_unpadded(tiny_checkpoint):
    from compressor.torch_backend import TorchBackend

    backend = TorchBackend.from_pretrained(tiny_checkpoint)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    batched = backend.greedy(prompts, 6, stop_ids=set())
    single = [backend.greedy([p], 6, stop_ids=set())[0] for p in prompts]
    assert batched == single and all(len(x) == 6 for x in batched)


def test_torch_log_probs_in_position_chunks_equal_the_full_logits(monkeypatch):
    """TorchBackend.log_probs runs the head a few positions at a time (no full [B, T, V] logits beside the
    result); rows and the chunk edge must equal log_softmax of the model's own logits."""
    from conftest import make_tiny_llama

    from compressor import torch_backend

    monkeypatch.setattr(torch_backend, "LOGIT_CHUNK", 5)
    model = make_tiny_llama("llama32")
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (3, 12))
    got = torch_backend.TorchBackend(model, device="cpu").log_probs(ids)
    with torch.no_grad():
        want = torch.log_softmax(model(input_ids=torch.as_tensor(ids)).logits.float(), -1).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
