"""`edgepack eval BUNDLE`: the harness through the runtime (no torch) on the tiny bundle: its numbers equal the
manifest's claims at the same limits, a user's own text and questions work, chat fidelity comes from the
bundle's reference (or another reference file), and torch is never imported."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from edgepack.cli import main
from runtime.bundle import Bundle
from tiny_bundle import QUICK, copy_bundle, refresh_digest, tiny_bundle

# the manifest's quick limits on the command line (quick preset + overrides)
QUICK_ARGS = ["--limits", "quick", "--ctx", "64", "--windows", "2", "--questions", "2", "--chat-prompts", "2"]


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_checkpoint):
    return tiny_bundle(tmp_path_factory, tiny_checkpoint)


def run_eval(tmp_path, *argv) -> dict:
    out = tmp_path / "result.json"
    assert main(["eval", *map(str, argv), "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_eval_bundle_reproduces_the_claims(good, tmp_path):
    r = run_eval(tmp_path, good, *QUICK_ARGS, "--tasks", "ppl,chat")
    claims = Bundle.open(good).manifest["quality"]["quick"]
    assert r["wikitext"]["text"] == QUICK.wikitext  # the set the claims name, not the WikiText-2 default
    assert r["wikitext"]["ppl"] == pytest.approx(claims["ppl"]["value"], rel=1e-5)
    assert r["wikitext"]["kld"] == pytest.approx(claims["kld"]["value"], abs=1e-6)
    for key in ("kld", "top1", "match32"):
        assert r["chat"][key] == pytest.approx(claims[f"chat_{key}"]["value"], abs=1e-6)
    assert r["chat"]["replies"] == 2 and r["notes"] == []


def test_eval_bundle_on_the_users_text_and_questions(good, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    qa = tmp_path / "qa.jsonl"
    rows = [
        {"question": "What colour is the sky?", "answers": ["blue"]},
        {"question": "Capital of France?", "answers": ["Paris"], "context": "Paris is the capital of France."},
        {"question": "2+2?", "answer": "4"},
    ]
    qa.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    r = run_eval(tmp_path, good, "--ctx", "64", "--windows", "3", "--text", text, "--qa", qa, "--chat-prompts", "1")
    assert r["wikitext"]["text"] == str(text) and r["wikitext"]["windows"] == 3 and "kld" not in r["wikitext"]
    assert np.isfinite(r["wikitext"]["ppl"]) and r["wikitext"]["ppl"] > 1
    assert r["triviaqa_closed"]["n"] == 3 and r["triviaqa_open"]["n"] == 1  # open book where a passage exists
    assert r["chat"]["replies"] == 1


def test_chat_from_another_reference_file_and_a_bundle_without_one(good, tmp_path):
    from runtime.reference import Reference

    d = copy_bundle(good, tmp_path / "bundle")
    rel = Bundle.open(d).manifest["runtime"]["reference"]
    full = Reference.load(d / rel)
    Reference(full.window_ids, full.top_ids, full.top_logp).save(d / rel)  # no chat replies
    refresh_digest(d, rel)
    r = run_eval(tmp_path, d, *QUICK_ARGS, "--tasks", "ppl")
    assert "chat" not in r
    r = run_eval(tmp_path, d, *QUICK_ARGS, "--tasks", "chat", "--reference", good / rel)
    assert r["chat"]["replies"] == 2
    from runtime.bundle_eval import evaluate_bundle
    from runtime.harness import limits_from

    limits = limits_from("quick", ctx=64, ppl_windows=2, qa_questions=1)
    r = evaluate_bundle(Bundle.open(d), limits, tasks=("ppl",), progress=False)  # no chat, and said so
    assert "chat" not in r and "wikitext" in r
    assert any("no source chat replies" in n for n in r["notes"])
    assert main(["eval", str(d), *QUICK_ARGS, "--tasks", "chat"]) == 2  # asked for, impossible: one error line
    assert main(["eval", str(d), "--tasks", "ppl,bogus"]) == 2


def test_more_chat_replies_than_stored_uses_them_all_with_a_note(good, tmp_path):
    r = run_eval(tmp_path, good, *QUICK_ARGS, "--tasks", "chat", "--chat-prompts", "50")
    assert r["chat"]["replies"] == 3 and "all 3 replies" in r["notes"][0]


def test_eval_bundle_imports_no_torch(good, tmp_path):
    code = (
        "import sys; from edgepack.cli import main\n"
        f"rc = main(['eval', {str(good)!r}, *{QUICK_ARGS!r}, '--tasks', 'ppl,chat'])\n"
        "print(rc, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "0 False", out.stderr[-2000:]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("chat", "/etc/passwd", "only the built-in evaluation sets"),
        ("chat_prompts", -1, "must be in"),
        ("chat_max_new_tokens", 0, "must be in"),
        ("chat_prompt_tokens", True, "not a boolean"),
    ],
)
def test_a_claims_chat_limits_are_validated(good, key, value, message):
    from runtime.errors import EdgepackError
    from runtime.manifest import validate_manifest

    manifest = json.loads((good / "manifest.json").read_text())
    manifest["quality"]["quick"]["chat_match32"]["limits"][key] = value
    with pytest.raises(EdgepackError, match=message) as e:
        validate_manifest(manifest, "manifest.json")
    assert f"chat_match32.limits.{key}" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kind, content",
    [
        ("text", b"\xff\xfe not utf-8 \x80"),
        ("qa", b'{"question": "q", "answers": ["a"]}\n{not json\n'),
        ("qa", b'{"question": 3}\n'),
        ("reference", b"this is not a safetensors file"),
        ("text", None),  # a path that does not exist
    ],
)
def test_a_broken_user_file_is_one_error_line(good, tmp_path, capsys, kind, content):
    path = tmp_path / f"broken.{kind}"
    if content is not None:
        path.write_bytes(content)
    assert (
        main(["eval", str(good), "--ctx", "64", "--windows", "2", "--chat-prompts", "1", f"--{kind}", str(path)]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("edgepack: error:") and "Traceback" not in "\n".join(err), err
