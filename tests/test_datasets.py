"""Shipped data loaders and user-file loaders."""

from __future__ import annotations

import hashlib

import pytest

from runtime import datasets
from runtime.errors import EdgepackError


def test_shipped_wikitext_test_is_the_canonical_file():
    digest = hashlib.sha256(datasets.WIKITEXT_TEST.read_bytes()).hexdigest()
    assert digest == "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
    rows = datasets.wikitext_rows()
    assert len(rows) == 4358
    assert len(datasets.wikitext_eval_text()) == 1294336  # the GPTQ-style "\n\n" join, per PROVENANCE.md


def test_calibration_text_has_no_unk_markers():
    text = datasets.calibration_text()
    assert "<unk>" not in text and " @-@ " not in text and len(text) > 900_000


def test_triviaqa_records():
    recs = datasets.triviaqa_records()
    assert len(recs) == 1000
    with_ctx = datasets.triviaqa_records(with_context_only=True)
    assert len(with_ctx) == 728 and all(r.context for r in with_ctx)
    first = recs[0]
    assert first.question.startswith('Who wrote "A cauliflower') and "Mark Twain" in first.answers


def test_user_jsonl_and_errors(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text(
        '{"question": "Q1?", "answer": "A"}\n\n{"question": "Q2?", "answers": ["B", "b"], "context": "B is"}\n'
    )
    recs = datasets.triviaqa_records(f)
    assert [r.answers for r in recs] == [["A"], ["B", "b"]] and recs[1].context == "B is"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": 1}\n')
    with pytest.raises(EdgepackError, match="bad.jsonl:1"):
        datasets.triviaqa_records(bad)
    with pytest.raises(EdgepackError, match="not found"):
        datasets.wikitext_rows(tmp_path / "missing.txt")
