"""`verify` re-measures the manifest's claims; perturbed weights with forged digests fail the quality
check. Also the runtime CLI commands (generate, verify, bench) end to end on the tiny bundle."""

from __future__ import annotations

import json

import pytest

from runtime.bundle import Bundle
from runtime.cli_commands import build_parser
from runtime.errors import EdgepackError
from runtime.verify import compare, tolerance_for, verify_bundle
from tiny_bundle import copy_bundle, perturb_initializer, tiny_bundle


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_checkpoint):
    return tiny_bundle(tmp_path_factory, tiny_checkpoint)


@pytest.fixture(scope="module")
def perturbed(good, tmp_path_factory):
    d = copy_bundle(good, tmp_path_factory.mktemp("perturbed") / "bundle")
    assert perturb_initializer(d, scale=1.0) == "model.embed_tokens.weight"
    return d


def run_cli(*argv) -> int:
    args = build_parser().parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.mark.parametrize("quick", [False, True])
def test_verify_passes_on_a_good_bundle(good, quick):
    b = Bundle.open(good)
    checks = verify_bundle(b, quick=quick, progress=False)
    claims = b.manifest["quality"]["quick" if quick else "full"]
    assert {c.name for c in checks} == set(claims)
    for c in checks:
        assert c.passed, c
        assert c.measured == pytest.approx(claims[c.name]["value"], rel=1e-4, abs=1e-6)


def test_verify_fails_on_perturbed_weights_with_valid_digests(perturbed):
    b = Bundle.open(perturbed)  # the digests were forged: opening succeeds
    checks = {c.name: c for c in verify_bundle(b, progress=False)}
    for name in ("ppl", "kld", "top1"):
        assert not checks[name].passed, checks[name]
        assert abs(checks[name].measured - checks[name].claimed) > checks[name].tolerance


def test_the_bundle_claims_chat_fidelity_and_verify_remeasures_it(good, perturbed):
    claims = Bundle.open(good).manifest["quality"]
    assert {"chat_kld", "chat_top1", "chat_match32"} <= set(claims["full"]) & set(claims["quick"])
    assert claims["full"]["chat_match32"]["n"] == 3 and claims["quick"]["chat_match32"]["n"] == 2
    assert claims["full"]["chat_kld"]["value"] < 1e-3  # the fp32 ONNX export of the source itself
    bad = {c.name: c for c in verify_bundle(Bundle.open(perturbed), progress=False)}
    assert not bad["chat_kld"].passed and bad["chat_kld"].measured > bad["chat_kld"].claimed + 0.01


def test_chat_claims_without_chat_replies_in_the_reference_are_not_measured(good, tmp_path):
    import numpy as np

    from runtime.reference import Reference
    from tiny_bundle import refresh_digest

    d = copy_bundle(good, tmp_path / "bundle")
    rel = Bundle.open(d).manifest["runtime"]["reference"]
    ref = Reference.load(d / rel)
    Reference(ref.window_ids, ref.top_ids, ref.top_logp).save(d / rel)
    refresh_digest(d, rel)
    checks = {c.name: c for c in verify_bundle(Bundle.open(d), quick=True, progress=False)}
    assert checks["chat_match32"].measured is None and not checks["chat_match32"].passed
    assert "holds no chat replies" in checks["chat_match32"].detail
    assert checks["kld"].passed and np.isfinite(checks["kld"].measured)


def test_tolerance_rules():
    assert tolerance_for("ppl", 20.0, 1000) == {"kind": "relative", "value": 0.02, "rule": "relative 2 %"}
    assert tolerance_for("kld", 0.5, 1000)["value"] == pytest.approx(0.025)
    assert tolerance_for("kld", 0.01, 1000)["value"] == 0.01
    assert tolerance_for("triviaqa_closed_contains", 0.25, 400)["value"] == pytest.approx(
        2 * (0.25 * 0.75 / 400) ** 0.5, abs=1e-6
    )
    assert tolerance_for("top1", 1.0, 100)["value"] == pytest.approx(0.02)
    claim = {"value": 10.0, "n": 50, "limits": {"ctx": 512}, "tolerance": tolerance_for("ppl", 10.0, 50)}
    assert compare("ppl", claim, {"value": 10.19, "n": 50}).passed
    assert not compare("ppl", claim, {"value": 10.21, "n": 50}).passed
    assert not compare("ppl", claim, {"value": 10.0, "n": 49}).passed  # different sample: not comparable


def test_cli_verify_exit_codes_and_json(good, perturbed, capsys):
    assert run_cli("verify", good, "--quick") == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out and "checks passed" in out
    assert run_cli("verify", perturbed, "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False
    assert {c["name"] for c in report["checks"] if not c["passed"]} >= {"ppl", "kld"}
    assert all({"claimed", "measured", "tolerance", "detail"} <= set(c) for c in report["checks"])


def test_cli_generate_streams_the_same_text_as_the_api(good, capsys):
    assert (
        run_cli(
            "generate",
            good,
            "The quick brown fox",
            "--raw",
            "--temperature",
            "0",
            "--repetition-penalty",
            "1.3",
            "--max-new-tokens",
            "20",
        )
        == 0
    )
    out = capsys.readouterr().out
    b = Bundle.open(good)
    from runtime.generation import SamplingSettings

    want = b.generator().generate(
        b.tokenizer.encode("The quick brown fox"),
        SamplingSettings(temperature=0, repetition_penalty=1.3, max_new_tokens=20),
    )
    assert out == want.text + "\n"
    assert run_cli("generate", good, "hello", "--seed", "1", "--max-new-tokens", "5", "--stats") == 0
    assert "prompt +" in capsys.readouterr().err
    with pytest.raises(EdgepackError, match="top_p"):
        run_cli("generate", good, "hello", "--top-p", "1.5")


def test_cli_bench_json(good, capsys, monkeypatch):
    import runtime.bench as bench

    calls = []  # the 1 GiB bandwidth read must come after peak RSS is taken, or it would count as the bundle's
    monkeypatch.setattr(bench, "peak_rss_bytes", lambda: calls.append("rss") or 300 << 20)
    monkeypatch.setattr(bench, "read_bandwidth", lambda: calls.append("bandwidth") or 50e9)
    assert run_cli("bench", good, "--json", "--prompt-tokens", "16", "--new-tokens", "8", "--repeats", "2") == 0
    assert calls == ["rss", "bandwidth"]
    r = json.loads(capsys.readouterr().out)
    assert r["prompt_tokens"] == 16 and r["new_tokens"] == 8 and len(r["runs"]) == 2
    assert all(run["new_tokens"] == 8 for run in r["runs"])  # no EOS: every run decodes all tokens
    for key in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert 0 < r[key]["min"] <= r[key]["median"] <= r[key]["max"]
    assert 0 < r["loop_us_per_token"] < 1e6 / r["decode_tokens_per_s"]["min"] and len(r["token_ids"]) == 8
    assert r["weight_bytes"] == (good / "onnx" / "model.onnx.data").stat().st_size and r["read_bandwidth_GBps"] == 50
    assert r["bandwidth_limit_tokens_per_s"] == pytest.approx(50e9 / r["weight_bytes"])
    assert r["load_s"] > 0 and r["peak_rss_bytes"] == 300 << 20
    assert run_cli("bench", good, "--no-bandwidth", "--new-tokens", "4", "--repeats", "1") == 0
    assert "bandwidth limit" not in capsys.readouterr().out
    with pytest.raises(EdgepackError, match="exceed the model's context"):
        run_cli("bench", good, "--prompt-tokens", "500", "--new-tokens", "100")


def test_read_bandwidth_measures_something():
    from runtime.bench import read_bandwidth

    assert read_bandwidth(allocations=1, floats=1 << 22) > 1e8  # 16 MiB: a smoke test, not a measurement


def test_equal_quality_levels_are_measured_once(monkeypatch):
    """An export on the quick limits has "full" == "quick": one evaluation, two equal claim sets."""
    import runtime.verify as verify
    from runtime.harness import EvalLimits

    calls = []

    def fake_evaluate(backend, tokenizer, limits, **kw):
        calls.append(limits)
        return {"wikitext": {"ppl": 12.5, "tokens": 1000}}

    monkeypatch.setattr(verify, "evaluate", fake_evaluate)
    small, other = EvalLimits(ppl_windows=2), EvalLimits(ppl_windows=3)
    quality = verify.measure_quality(None, None, None, {"full": small, "quick": EvalLimits(ppl_windows=2)})
    assert calls == [small]
    assert quality["full"] == quality["quick"] and quality["full"] is not quality["quick"]
    assert quality["full"]["ppl"]["value"] == 12.5
    verify.measure_quality(None, None, None, {"full": small, "quick": other})
    assert calls == [small, small, other]
