"""GPTQ / EoRA calibration rows from chat (the source's own replies) and the chat + WikiText mix."""

from __future__ import annotations

import pytest

import compressor.training_data as td
from compressor.recipe import parse_preset
from runtime.datasets import DATA_DIR
from runtime.errors import EdgepackError
from runtime.tokenizer import TextTokenizer


def fake_chat_examples(tokenizer, source_dir, cache_path, path=None):
    train = [([7] * (20 + i), None) for i in range(6)]
    held = [([9] * 30, None)]
    return train, held, {"tasks": 7}


@pytest.mark.parametrize("dataset", ["chat", "mix"])
def test_chat_and_mix_rows(monkeypatch, tiny_checkpoint, tmp_path, dataset):
    monkeypatch.setattr(td, "chat_examples", fake_chat_examples)
    tok = TextTokenizer(tiny_checkpoint)
    rows = td.quant_calibration_rows(
        tok,
        dataset,
        6,
        24,
        str(DATA_DIR / "tiny/wiki.test.raw.first200lines"),
        source_dir=tiny_checkpoint,
        chat_cache=tmp_path / "c",
    )
    assert len(rows) == 6 and all(len(r) <= 24 for r in rows)
    chat_rows = [r for r in rows if set(r) <= {7, 9}]
    if dataset == "chat":
        assert len(chat_rows) == 6
    else:  # alternating: chat, text, chat, text ...
        assert len(chat_rows) == 3 and [set(r) <= {7, 9} for r in rows] == [True, False] * 3


def test_chat_rows_need_the_source():
    with pytest.raises(EdgepackError, match="needs the source model"):
        td.quant_calibration_rows(None, "chat", 4, 16)


def test_calib_preset_option():
    r = parse_preset("W1:8 lora=wikitext quant=eora calib=mix")
    assert (r.gptq.dataset, r.eora.dataset) == ("mix", "mix")
    assert parse_preset("W1:8 quant=eora").gptq.dataset == "wikitext"  # the seed's setting stays the default
    with pytest.raises(EdgepackError, match="calib=books"):
        parse_preset("W1:8 quant=gptq calib=books")
