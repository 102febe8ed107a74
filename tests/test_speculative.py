"""runtime.speculative: greedy speculative output equals plain greedy token for token (drafts always right,
always wrong, random, prompt lookup, a draft model), the KV cache after rollback equals plain decoding's,
sampling keeps the target distribution (exact enumeration vs counts on a tiny vocabulary), k adapts, and a
bundle's draft/ part is checked like every bundle file."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest

from runtime.bundle import Bundle
from runtime.errors import EdgepackError
from runtime.generation import ChatSession, Generator, Sampler, SamplingSettings
from runtime.speculative import (
    AdaptiveK,
    DraftModel,
    PromptLookup,
    Proposal,
    SpeculationSettings,
    accept_sampled,
    make_proposer,
    measure_acceptance,
    target_probs,
)
from tiny_bundle import MAX_LEN, copy_bundle, hf_model, refresh_digest, tiny_bundle

GREEDY = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=48)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, tiny_checkpoint):
    return tiny_bundle(tmp_path_factory, tiny_checkpoint)


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return Bundle.open(bundle_dir)


@pytest.fixture(scope="module")
def draft_onnx_dir(tmp_path_factory, tiny_checkpoint):
    """A depth-pruned copy of the tiny model (layers 1 and 2 of 4 dropped), exported like the bundle's."""
    from exporter.onnx_graph import GraphOptions, build_decoder, spec_from_hf_config

    model = hf_model(tiny_checkpoint)
    sd = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    keep = [0, 3]
    weights = {k: v for k, v in sd.items() if not k.startswith("model.layers.")}
    for new, old in enumerate(keep):
        for k, v in sd.items():
            if k.startswith(f"model.layers.{old}."):
                weights[f"model.layers.{new}." + k[len(f"model.layers.{old}.") :]] = v
    config = model.config.to_dict() | {"num_hidden_layers": len(keep)}
    out = tmp_path_factory.mktemp("draft") / "onnx"
    build_decoder(
        weights, spec_from_hf_config(config, weights), out / "model.onnx", GraphOptions(max_len=MAX_LEN), progress=False
    )
    return out


@pytest.fixture(scope="module")
def draft_bundle_dir(bundle_dir, draft_onnx_dir, tmp_path_factory):
    from exporter.draft import add_draft

    d = copy_bundle(bundle_dir, tmp_path_factory.mktemp("with_draft") / "bundle")
    return add_draft(d, draft_onnx_dir, {"recipe": "test: layers 0 and 3", "cost_per_token": 0.5}, archive=False)


def prompts(bundle) -> list[list[int]]:
    chat = ChatSession(bundle.generator(draft="none"), bundle.tokenizer, "You are tiny.")
    return [
        chat.build_prompt([{"role": "user", "content": "Tell me about the Cotswolds."}], 16)[0],
        bundle.tokenizer.encode("The quick brown fox jumps over the lazy dog. The quick brown fox"),
        bundle.tokenizer.encode("abc abc abc abc abc abc"),
    ]


class Scripted:
    """A proposer that knows the plain answer: "right" proposes it, "wrong" proposes other tokens, "random"
    mixes right and random tokens."""

    name = "scripted"
    cost_per_token = 0.0

    def __init__(self, prompt_len: int, answer: list[int], mode: str, vocab: int, seed: int = 0):
        self.prompt_len, self.answer, self.mode, self.vocab = prompt_len, answer, mode, vocab
        self.rng = np.random.default_rng(seed)

    def reset(self):
        pass

    def propose(self, context, k, sampler):
        pos = len(context) - self.prompt_len  # answer tokens already in the context (the pending one included)
        right = (self.answer[pos : pos + k] + [2] * k)[:k]  # past the answer: the EOS id of the tiny model
        if self.mode == "right":
            return Proposal(right)
        if self.mode == "wrong":
            return Proposal([(t + 1 + int(self.rng.integers(0, self.vocab - 1))) % self.vocab for t in right])
        return Proposal([t if self.rng.random() < 0.6 else int(self.rng.integers(0, self.vocab)) for t in right])


def kv_rows(dec) -> list[np.ndarray]:
    return [v.numpy()[:, :, : dec.length].copy() for v in dec._cache.values.values()]


# ---------------------------------------------------------------------------------------------------------
# Engine: multi-token scoring and rewind


def test_score_equals_decode_steps_and_rewind_overwrites(bundle):
    a, b = bundle.decoder(threads=1), bundle.decoder(threads=1)
    ids = prompts(bundle)[1]
    a.prefill(ids[:10])
    b.prefill(ids[:10])
    want = np.stack([a.decode(t) for t in ids[10:16]])
    got = b.score(ids[10:16])
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert (got.argmax(-1) == want.argmax(-1)).all() and b.length == a.length == 16
    b.rewind(12)  # drop 4 tokens, append other ones in their place, then the right ones again
    b.score([5, 6, 7])
    b.rewind(12)
    np.testing.assert_allclose(b.score(ids[12:16]), want[2:], atol=1e-4)
    for x, y in zip(kv_rows(a), kv_rows(b)):
        np.testing.assert_allclose(x, y, atol=1e-5)
    with pytest.raises(EdgepackError, match="rewind"):
        b.rewind(17)


# ---------------------------------------------------------------------------------------------------------
# Greedy: exactly plain greedy


@pytest.mark.parametrize("mode", ["right", "wrong", "random"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_speculative_equals_plain_with_scripted_drafts(bundle, mode, penalty):
    settings = SamplingSettings(temperature=0.0, repetition_penalty=penalty, max_new_tokens=48)
    plain = bundle.generator(threads=1, draft="none")
    for i, ids in enumerate(prompts(bundle)):
        want = plain.generate(ids, settings)
        answer = want.token_ids + ([2] if want.stop_reason == "eos" else [])
        gen = Generator(
            bundle.decoder(threads=1),
            bundle.tokenizer,
            bundle.stop_ids,
            draft=Scripted(len(ids), answer, mode, 288, seed=i),
        )
        got = gen.generate(ids, settings)
        assert got.token_ids == want.token_ids and got.stop_reason == want.stop_reason and got.text == want.text
        assert got.drafted_tokens > 0
        if mode == "right":
            assert got.accepted_tokens == got.drafted_tokens
        elif mode == "wrong":
            assert got.accepted_tokens == 0
        # the cache is rolled back to exactly what plain decoding left in it
        assert (
            gen.decoder.length == plain.decoder.length == len(ids) + len(want.token_ids) - (want.stop_reason != "eos")
        )
        for x, y in zip(kv_rows(plain.decoder), kv_rows(gen.decoder)):
            np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("draft", ["lookup", "model", "self"])
def test_greedy_speculative_equals_plain_with_real_proposers(draft_bundle_dir, draft, tmp_path):
    b = Bundle.open(draft_bundle_dir)
    plain = b.generator(threads=1, draft="none")
    if draft == "self":  # the model drafting for itself: every guess is right
        from runtime.onnx_engine import OnnxDecoder

        gen = Generator(b.decoder(threads=1), b.tokenizer, b.stop_ids, draft=DraftModel(OnnxDecoder(b.onnx_path)))
    else:
        gen = b.generator(threads=1, draft=draft)
    assert gen.draft.name == ("lookup" if draft == "lookup" else "model")
    drafted = 0
    for ids in prompts(b):
        for settings in (GREEDY, SamplingSettings(temperature=0.0, repetition_penalty=1.2, max_new_tokens=40)):
            want = plain.generate(ids, settings)
            got = gen.generate(ids, settings)
            assert got.token_ids == want.token_ids and got.stop_reason == want.stop_reason
            drafted += got.drafted_tokens
            if draft == "self":
                assert got.accepted_tokens == got.drafted_tokens
    assert drafted > 0


def test_chat_turns_stop_strings_and_context_full_match_plain(draft_bundle_dir):
    """Cache reuse across chat turns, verified tokens left unconsumed by a stop, and the context limit."""
    b = Bundle.open(draft_bundle_dir)
    settings = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=30, stop_strings=("e ",))
    for draft in ("lookup", "model"):
        plain = ChatSession(b.generator(threads=1, draft="none"), b.tokenizer, "You are tiny.")
        spec = ChatSession(b.generator(threads=1, draft=draft), b.tokenizer, "You are tiny.")
        for text in ("Hello there.", "Tell me more about it.", "And again?"):
            want = "".join(e.text for e in plain.stream_reply(text, GREEDY))
            got = "".join(e.text for e in spec.stream_reply(text, GREEDY))
            assert got == want and spec.generator.last_result.cached_tokens == plain.generator.last_result.cached_tokens
            want = plain.generator.generate(prompts(b)[1], settings)
            got = spec.generator.generate(prompts(b)[1], settings)
            assert (got.text, got.stop_reason) == (want.text, want.stop_reason)
            assert spec.generator.decoder.length == plain.generator.decoder.length
    long = list(prompts(b)[2]) * 60
    long = long[: MAX_LEN - 5]
    want = b.generator(threads=1, draft="none").generate(long, GREEDY)
    got = b.generator(threads=1, draft="lookup").generate(long, GREEDY)
    assert got.stop_reason == want.stop_reason == "context_full" and got.token_ids == want.token_ids


def test_prompt_lookup_proposes_the_latest_continuation():
    lookup = PromptLookup(ngram_max=3, ngram_min=1)
    assert lookup.propose([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 1, 2, 3], 3).tokens == [5, 6, 1]
    assert lookup.propose([7, 8, 9], 4).tokens == []
    assert lookup.propose([4, 5, 4], 4).tokens == [5, 4]  # a 1-gram match, cut at the context's end
    assert PromptLookup(ngram_max=3, ngram_min=2).propose([4, 5, 6, 4], 4).tokens == []


def test_prompt_lookup_treats_an_unseen_last_token_as_a_wildcard():
    # "... 2 0 0 5 film The ... 2 0 0 6": nothing after "6" was seen, so "0 0" + one wildcard is matched
    ctx = [7, 2, 0, 0, 5, 11, 12, 13, 2, 0, 0, 6]
    assert PromptLookup(skip_ngram=2).propose(ctx, 3).tokens == [11, 12, 13]
    assert PromptLookup(skip_ngram=0).propose(ctx, 3).tokens == []  # off
    assert PromptLookup(skip_ngram=2).propose([1, 2, 3, 9], 3).tokens == []  # "2 3" never seen before
    # an exact match of the last token wins over the wildcard
    assert PromptLookup(skip_ngram=2).propose([2, 0, 5, 8, 6, 4, 2, 0, 6], 2).tokens == [4, 2]
    assert SpeculationSettings().skip_ngram == PromptLookup().skip_ngram == 2


def test_one_guess_is_free_with_two_token_steps():
    from runtime.speculative import VERIFY_COST_PER_TOKEN, best_k, round_cost

    assert round_cost(1, 0.0, free_guesses=1) == 1.0 and round_cost(1, 0.0) == 1.0 + VERIFY_COST_PER_TOKEN
    assert round_cost(3, 0.3, free_guesses=1) == pytest.approx(1.0 + 0.9 + 2 * VERIFY_COST_PER_TOKEN)
    assert best_k(0.05, 0.0)[1] < 1.0 < best_k(0.05, 0.0, free_guesses=1)[1]  # a poor guess pays only when free
    k = AdaptiveK(SpeculationSettings(k_start=4), cost_per_token=0.0, free_guesses=1)
    for _ in range(30):
        k.update(k.k, 0)  # every guess wrong: k drops to one free guess per round, never pauses
        assert k.next_k() >= 1
    assert k.k == 1
    paid = AdaptiveK(SpeculationSettings(k_start=4), cost_per_token=0.0)
    for _ in range(30):
        paid.update(max(paid.k, 1), 0)
    assert paid.k == 0  # with one-token steps the same stream pauses guessing


def test_k_adapts_to_acceptance():
    s = SpeculationSettings(k_start=4, k_min=1, k_max=8)
    k = AdaptiveK(s, cost_per_token=0.0)
    for _ in range(20):
        k.update(k.k, k.k)
    assert k.k == 8 and k.alpha > 0.99
    rounds = 0
    while k.k:
        k.update(k.k, 0)
        rounds += 1
    assert rounds <= 5 and k.alpha < 0.3  # guessing no longer pays: paused, with a probe every 8th round
    assert [k.next_k() for _ in range(8)] == [0] * 7 + [1]
    k.update(1, 0)  # the probe failed: the next one comes twice as late
    assert [k.next_k() for _ in range(16)] == [0] * 15 + [1]
    k.update(1, 1)
    for _ in range(10):
        k.update(max(k.k, 1), max(k.k, 1))
    assert k.k == 8  # resumed
    with pytest.raises(EdgepackError, match="k_min"):
        SpeculationSettings(k_start=9, k_max=8).check()


def test_measure_acceptance_and_draft_choices(draft_bundle_dir, bundle):
    b = Bundle.open(draft_bundle_dir)
    assert b.has_draft and b.draft_cost == 0.5
    rec = measure_acceptance(b.generator(threads=1, draft="model"), prompts(b), max_new_tokens=24)
    assert rec["drafted"] > 0 and 0 < rec["greedy"] <= 1 and rec["prompts"] == 3
    assert b.generator(draft="auto").draft.name == "model"  # no acceptance recorded: trusted
    m = json.loads((draft_bundle_dir / "manifest.json").read_text())
    for rate, chosen in ((0.05, "lookup"), (0.9, "model")):  # auto takes the draft model only where it pays
        m["runtime"]["draft"]["acceptance"] = {"greedy": rate}
        b.manifest = m
        assert make_proposer("auto", b).name == chosen
    assert bundle.generator(draft="auto").draft.name == "lookup"
    assert bundle.generator(draft="none").draft is None
    with pytest.raises(EdgepackError, match="no draft model"):
        make_proposer("model", bundle)
    with pytest.raises(EdgepackError, match="use one of"):
        make_proposer("fast", bundle)


# ---------------------------------------------------------------------------------------------------------
# Sampling: the output distribution is the target's


class MarkovDecoder:
    """A decoder whose next-token logits depend only on the last token (a table), with the OnnxDecoder's
    interactive interface; the cache is just a length."""

    def __init__(self, table: np.ndarray, max_len: int = 64):
        self.table, self.max_len, self.length, self.eos_token_ids = table.astype(np.float32), max_len, 0, []

    def reset(self):
        self.length = 0

    def rewind(self, n):
        assert 0 <= n <= self.length
        self.length = n

    def prefill(self, ids, all_logits=False):
        self.length += len(ids)
        return self.table[ids].copy() if all_logits else self.table[ids[-1]].copy()

    def decode(self, tok):
        return self.score([tok])[0]

    def score(self, ids):
        assert self.length > 0
        self.length += len(ids)
        return self.table[list(ids)].copy()


class CharTokenizer:
    eos_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join("abcd"[i] for i in ids)


def exact_distribution(table, prompt, settings, n) -> dict[tuple, float]:
    """P(x1..xn) by enumeration, with the sampler's own processing (penalty over the path so far)."""
    out = {}
    for path in itertools.product(range(table.shape[0]), repeat=n):
        sampler, last, prob = Sampler(settings, table.shape[0], prompt), prompt[-1], 1.0
        for tok in path:
            prob *= target_probs(sampler, table[last].astype(np.float32).copy())[tok]
            sampler.observe(tok)
            last = tok
        out[path] = prob
    return out


def chi2_quantile(dof: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of chi2(dof)'s quantile at the standard normal's z (3.719: 99.99 %)."""
    h = 2.0 / (9.0 * dof)
    return dof * (1.0 - h + z * h**0.5) ** 3


@pytest.mark.parametrize("proposer", ["model", "lookup"])
@pytest.mark.parametrize(
    "settings",
    [
        SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
        SamplingSettings(temperature=0.8, top_k=3, top_p=0.95, repetition_penalty=1.5),
    ],
    ids=["plain", "topk_topp_penalty"],
)
def test_sampling_keeps_the_target_distribution(proposer, settings):
    """5000 seeded runs of 4 tokens over a 4-token vocabulary: the counts of the 256 sequences fit the exact
    distribution (Pearson chi-square, cells expecting < 5 pooled, below chi2's 99.99th percentile: the seeds
    are fixed, so the outcome is deterministic; a biased rule, e.g. keeping every guess, fails it by far)."""
    rng = np.random.default_rng(5)
    target = rng.standard_normal((4, 4)) * 1.5
    draft_table = target + rng.standard_normal((4, 4)) * 1.5  # a draft that is often wrong
    prompt = [0, 1, 2, 0, 1, 3, 0, 2]
    runs, n = 5000, 4
    counts: dict[tuple, int] = {}
    kept = drafted = 0
    for seed in range(runs):
        s = SamplingSettings(**{**settings.__dict__, "seed": seed, "max_new_tokens": n})
        draft = DraftModel(MarkovDecoder(draft_table)) if proposer == "model" else PromptLookup(3, 1)
        gen = Generator(MarkovDecoder(target), CharTokenizer(), stop_ids=set(), draft=draft)
        r = gen.generate(prompt, s)
        counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
        kept, drafted = kept + r.accepted_tokens, drafted + r.drafted_tokens
    exact = exact_distribution(target, prompt, settings, n)
    assert abs(sum(exact.values()) - 1) < 1e-9
    assert drafted > runs and 0 < kept < drafted  # guesses were made, and both kept and rejected
    assert sum(counts.get(path, 0) for path, p in exact.items() if p == 0) == 0
    cells = [(counts.get(path, 0), runs * p) for path, p in exact.items() if runs * p >= 5]
    pooled = [(counts.get(path, 0), runs * p) for path, p in exact.items() if 0 < runs * p < 5]
    if pooled:
        cells.append((sum(o for o, _ in pooled), sum(e for _, e in pooled)))
    chi2 = sum((o - e) ** 2 / e for o, e in cells)
    assert chi2 < chi2_quantile(len(cells) - 1), (chi2, len(cells))


def test_acceptance_rule_on_one_position():
    """Guess from q, keep or replace: the token's distribution is p (100k draws, 5 tokens)."""
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    q = np.array([0.1, 0.1, 0.6, 0.1, 0.1])
    draws = 100_000
    out = np.zeros(5)
    for _ in range(draws):
        guess = int(rng.choice(5, p=q))
        tok = accept_sampled(p, guess, q, rng)
        out[guess if tok is None else tok] += 1
    assert np.abs(out / draws - p).max() < 0.006  # ~4 standard errors of the largest cell


def test_seeded_speculative_sampling_is_reproducible(draft_bundle_dir):
    b = Bundle.open(draft_bundle_dir)
    s = SamplingSettings(temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=30, seed=7)
    gen = b.generator(threads=1, draft="model")
    ids = prompts(b)[0]
    first = gen.generate(ids, s).token_ids
    gen.reset()
    assert gen.generate(ids, s).token_ids == first and len(first) > 0


# ---------------------------------------------------------------------------------------------------------
# The bundle's draft/ part is checked like every file


def test_draft_is_listed_and_digest_checked(draft_bundle_dir, tmp_path):
    manifest = json.loads((draft_bundle_dir / "manifest.json").read_text())
    assert manifest["runtime"]["draft"]["onnx"] == "draft/model.onnx"
    assert {"draft/model.onnx", "draft/model.onnx.data"} <= set(manifest["files"])

    damaged = copy_bundle(draft_bundle_dir, tmp_path / "damaged")
    data = damaged / "draft" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(EdgepackError, match="sha256 does not match"):
        Bundle.open(damaged)

    unlisted = copy_bundle(draft_bundle_dir, tmp_path / "unlisted")
    shutil.copyfile(unlisted / "draft" / "model.onnx.data", unlisted / "draft" / "extra.data")
    with pytest.raises(EdgepackError, match="not listed in the manifest"):
        Bundle.open(unlisted)

    unnamed = copy_bundle(draft_bundle_dir, tmp_path / "unnamed")
    m = json.loads((unnamed / "manifest.json").read_text())
    del m["files"]["draft/model.onnx"]
    (unnamed / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EdgepackError, match="runtime.draft.onnx"):
        Bundle.open(unnamed)

    outside = copy_bundle(draft_bundle_dir, tmp_path / "outside")
    m = json.loads((outside / "manifest.json").read_text())
    m["runtime"]["draft"]["onnx"] = "onnx/model.onnx"
    (outside / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EdgepackError, match="under draft/"):
        Bundle.open(outside)


def test_forged_draft_with_refreshed_digest_is_a_different_model_but_still_exact(draft_bundle_dir, tmp_path):
    """A draft can only change speed, never the output: even a draft whose weights are half random bytes
    (digest re-signed by a forger) gives plain greedy output."""
    forged = copy_bundle(draft_bundle_dir, tmp_path / "forged")
    data = forged / "draft" / "model.onnx.data"
    raw = np.frombuffer(data.read_bytes(), np.uint8).copy()
    raw[: raw.size // 2] = np.random.default_rng(0).integers(0, 255, raw.size // 2, dtype=np.uint8)
    data.write_bytes(raw.tobytes())
    refresh_digest(forged, "draft/model.onnx.data")
    b = Bundle.open(forged)
    plain = b.generator(threads=1, draft="none")
    spec = b.generator(threads=1, draft="model")
    for ids in prompts(b):
        assert spec.generate(ids, GREEDY).token_ids == plain.generate(ids, GREEDY).token_ids


# ---------------------------------------------------------------------------------------------------------
# Where it is used: `edgepack generate --draft`, `edgepack bench --draft`


def test_generate_command_with_and_without_draft(draft_bundle_dir, capsys):
    from runtime.cli_commands import build_parser

    outputs = {}
    for draft in ("none", "lookup", "model"):
        args = build_parser().parse_args(
            [
                "generate",
                str(draft_bundle_dir),
                "Hello there.",
                "--temperature",
                "0",
                "--max-new-tokens",
                "24",
                "--draft",
                draft,
                "--stats",
                "--threads",
                "1",
            ]
        )
        assert args.func(args) == 0
        captured = capsys.readouterr()
        outputs[draft] = captured.out
        assert ("guesses kept" in captured.err) == (draft != "none")
    assert outputs["lookup"] == outputs["none"] == outputs["model"] and outputs["none"].strip()


def test_bench_times_speculative_decoding_next_to_plain(draft_bundle_dir):
    from runtime.bench import bench_bundle, format_bench

    b = Bundle.open(draft_bundle_dir)
    result = bench_bundle(b, prompt_tokens=32, new_tokens=24, repeats=2, threads=1, draft="model")
    spec = result["speculative"]
    assert spec["draft"] == "model" and spec["same_tokens"] and spec["drafted_tokens"] > 0
    assert len(spec["runs"]) == len(result["runs"]) == 2 and 0 <= spec["acceptance_rate"] <= 1
    assert "decode, draft=model" in format_bench(result)
    assert "speculative" not in bench_bundle(b, prompt_tokens=16, new_tokens=8, repeats=1, threads=1)


def test_chat_instructions_are_shipped():
    from runtime.speculative import chat_instructions

    turns = chat_instructions()
    assert len(turns) == 202 and all(t.strip() for t in turns)
    assert chat_instructions(3) == turns[:3]


# ---------------------------------------------------------------------------------------------------------
# `edgepack export --draft RECIPE`


def test_export_draft_builds_measures_and_ships_a_draft(tiny_checkpoint, tmp_path):
    """A tiny run exported, then a D2 draft (2 of 4 layers) built from the same source with the compressor
    pipeline: listed under draft/, acceptance and cost recorded, used by `auto`, output unchanged."""
    from dataclasses import replace

    from compressor import pipeline
    from compressor.recipe import Calibration, Recipe
    from exporter.draft import export_draft
    from exporter.export import ExportOptions, export_run, shipping_graph
    from test_export import LIMITS as limits, QUICK

    recipe = Recipe(name="tiny-base", model=str(tiny_checkpoint), calibration=Calibration(samples=2, seqlen=32))
    pipeline.run_pipeline(
        recipe, tmp_path / "run", eval_limits=limits, final_eval=False, stage_eval=False, log=lambda m: None
    )
    graph = replace(shipping_graph(), embedding="fp32", lm_head="fp32")
    options = ExportOptions(graph=graph, limits=limits, quick_limits=QUICK, archive=True)
    out = export_run(tmp_path / "run", tmp_path / "bundle", options, log=lambda m: None)
    record = export_draft(out, "D2", tmp_path / "run", options, prompts=3, new_tokens=16, log=lambda m: None)
    assert record["layers"] == 2 and len(record["dropped_layers"]) == 2 and record["cost_per_token"] > 0
    assert record["acceptance"]["prompts"] == 3 and 0 <= record["acceptance"]["greedy"] <= 1
    for path in (out, tmp_path / "bundle.edgepack"):  # the directory and the re-written archive
        b = Bundle.open(path)
        assert b.has_draft and b.manifest["runtime"]["draft"]["acceptance"] == record["acceptance"]
        gen = b.generator(threads=1, draft="auto")
        assert gen.draft.name == "model"
        ids = b.tokenizer.encode("The quick brown fox")
        assert (
            gen.generate(ids, GREEDY).token_ids == b.generator(threads=1, draft="none").generate(ids, GREEDY).token_ids
        )


def test_speculation_is_on_by_default_for_greedy_requests_only(draft_bundle_dir):
    """`auto` is the default everywhere (generate, chat, the Python API): it speculates on greedy requests,
    where its guesses are kept often, and leaves sampled ones to plain decoding."""
    from runtime.cli_commands import build_parser
    from tui.app import chat_generator

    b = Bundle.open(draft_bundle_dir)
    gen = b.generator(threads=1)
    assert gen.draft is not None and gen.draft.greedy_only
    assert chat_generator(b, threads=1).draft.greedy_only
    assert build_parser().parse_args(["generate", str(draft_bundle_dir), "hi"]).draft == "auto"
    assert not b.generator(threads=1, draft="lookup").draft.greedy_only
    ids = b.tokenizer.encode("The quick brown fox")
    greedy = gen.generate(ids, GREEDY)
    assert greedy.drafted_tokens > 0
    assert greedy.token_ids == b.generator(threads=1, draft="none").generate(ids, GREEDY).token_ids
    sampled = SamplingSettings(temperature=0.8, top_p=0.9, max_new_tokens=24, seed=3)
    gen.reset()
    assert gen.generate(ids, sampled).drafted_tokens == 0


# ---------------------------------------------------------------------------------------------------------
# int8-activation graphs: greedy requests take two-token steps, so a draft never changes the tokens


@pytest.fixture(scope="module")
def int8_graph(tmp_path_factory, tiny_checkpoint):
    """The tiny model with int4 projections, int8 embedding and head, MatMulNBits accuracy_level 4 (int8
    activations), as the shipped bundles are."""
    from exporter.onnx_graph import GraphOptions, build_decoder, spec_from_hf_config

    model = hf_model(tiny_checkpoint)
    sd = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    options = GraphOptions(max_len=MAX_LEN, projections="int4", embedding="int8", lm_head="int8", accuracy_level=4)
    out = tmp_path_factory.mktemp("int8_graph") / "onnx" / "model.onnx"
    build_decoder(sd, spec_from_hf_config(model.config.to_dict(), sd), out, options, progress=False)
    return out


def test_two_token_steps_equal_the_multi_token_pass_bit_for_bit(int8_graph, bundle):
    from runtime.onnx_engine import OnnxDecoder

    a = OnnxDecoder(int8_graph, threads=1, step_tokens=2)
    b = OnnxDecoder(int8_graph, threads=1)
    assert a.quantizes_activations and not bundle.decoder(threads=1).quantizes_activations  # fp32 bundle
    ids = prompts(bundle)[1]
    a.prefill(ids[:10])
    b.prefill(ids[:10])
    steps = np.stack([a.decode(t) for t in ids[10:17]])
    assert a.length == 17
    np.testing.assert_array_equal(b.score(ids[10:17]), steps)
    for x, y in zip(kv_rows(a), kv_rows(b)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(EdgepackError, match="step_tokens"):
        OnnxDecoder(int8_graph, step_tokens=3)


@pytest.mark.parametrize("mode", ["right", "wrong", "random"])
def test_greedy_on_int8_graphs_is_the_same_with_and_without_a_draft(int8_graph, bundle, mode):
    from runtime.generation import exact_step_tokens
    from runtime.onnx_engine import OnnxDecoder

    dec = OnnxDecoder(int8_graph, threads=1)
    assert exact_step_tokens(dec, GREEDY) == 2
    assert exact_step_tokens(dec, SamplingSettings(temperature=0.7)) == 1
    plain = Generator(dec, bundle.tokenizer)
    spec = Generator(OnnxDecoder(int8_graph, threads=1), bundle.tokenizer)
    for i, ids in enumerate(prompts(bundle)):
        want = plain.generate(ids, GREEDY)
        assert dec.step_tokens == 2
        spec.draft = Scripted(len(ids), want.token_ids, mode, bundle.tokenizer.vocab_size, seed=i)
        spec.reset()
        got = spec.generate(ids, GREEDY)
        assert got.token_ids == want.token_ids and got.drafted_tokens > 0
        if mode == "wrong":  # a guess rides in the pad's place every round: guessing never pauses
            assert got.drafted_tokens >= got.new_tokens - 2 - SpeculationSettings().k_start
