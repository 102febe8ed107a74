"""GPTQ / EoRA calibration rows from chat (the source's own replies) and the chat + WikiText mix."""

from __future__ import annotations

import pytest

import compressor.training_data as td
from compressor.recipe import parse_preset
from runtime.datasets import DATA_DIR
from runtime.errors import EdgepackError
from runtime.tokenizer import TextTokenizer


def fake_chat_examples(tokenizer, source_dir, cache_path, path=None, first=None):
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


def test_group_preset_option():
    r = parse_preset("W1:8 lora=wikitext quant=eora calib=mix group=32a")
    assert (r.gptq.group_size, r.gptq.sym, r.gptq.dataset) == (32, False, "mix")
    assert "GPTQ 4-bit g32 asymmetric calibrated on mix; EoRA r32 on mix" in r.describe()
    g = parse_preset("D2 quant=gptq group=64").gptq
    assert (g.group_size, g.sym) == (64, True)
    assert (parse_preset("W1:8 quant=eora").gptq.group_size, parse_preset("W1:8 quant=eora").gptq.sym) == (128, True)
    for bad, msg in (
        ("W1:8 quant=eora group=32b", "group=32b"),
        ("W1:8 quant=eora group=0", "group=0"),
        ("W1:8 group=32a", "needs quant="),
    ):
        with pytest.raises(EdgepackError, match=msg):
            parse_preset(bad)


class CountingBackend:
    """Stands in for the torch source model: a reply is the prompt's last token repeated; counts prompts."""

    generated: list = []
    fail_after: int | None = None

    def __init__(self):
        self.model = type("M", (), {"generation_config": type("G", (), {"eos_token_id": None})()})()

    @classmethod
    def from_pretrained(cls, source_dir, pad_id=None):
        return cls()

    def greedy(self, prompts, max_new_tokens, stop):
        if self.fail_after is not None and len(self.generated) >= self.fail_after:
            raise KeyboardInterrupt
        self.generated.extend(tuple(p) for p in prompts)
        return [[p[-1]] * 3 for p in prompts]


def test_source_replies_are_cached_per_prompt_and_resume(monkeypatch, tiny_checkpoint, tmp_path):
    """Calibration needs a few replies, LoRA all of them: each reply is cached on its own, so a superset reuses
    the subset's replies, and an interrupted generation keeps the batches it finished."""
    import compressor.torch_backend as tb

    monkeypatch.setattr(tb, "TorchBackend", CountingBackend)
    CountingBackend.generated, CountingBackend.fail_after = [], None
    tok = TextTokenizer(tiny_checkpoint)
    prompts = [[5, i] for i in range(40)]
    cache = tmp_path / "replies.json"
    assert td.source_chat_replies(tiny_checkpoint, tok, prompts[:4], cache) == [[i] * 3 for i in range(4)]
    assert len(CountingBackend.generated) == 4
    CountingBackend.generated, CountingBackend.fail_after = [], 16  # the second batch of 16 is interrupted
    with pytest.raises(KeyboardInterrupt):
        td.source_chat_replies(tiny_checkpoint, tok, prompts, cache)
    assert len(CountingBackend.generated) == 16 and not set(CountingBackend.generated) & {tuple(p) for p in prompts[:4]}
    CountingBackend.generated, CountingBackend.fail_after = [], None
    assert td.source_chat_replies(tiny_checkpoint, tok, prompts, cache) == [[i] * 3 for i in range(40)]
    assert len(CountingBackend.generated) == 40 - 4 - 16  # only what no finished batch had made
    assert td.source_chat_replies(tiny_checkpoint, tok, prompts[::-1], cache) == [[i] * 3 for i in range(40)][::-1]
    assert len(CountingBackend.generated) == 20


def test_calibration_asks_only_for_the_replies_it_uses(monkeypatch, tiny_checkpoint, tmp_path):
    seen = {}

    def recording_chat_examples(tokenizer, source_dir, cache_path, path=None, first=None):
        seen["first"] = first
        return fake_chat_examples(tokenizer, source_dir, cache_path)

    monkeypatch.setattr(td, "chat_examples", recording_chat_examples)
    tok = TextTokenizer(tiny_checkpoint)
    wiki = str(DATA_DIR / "tiny/wiki.test.raw.first200lines")
    td.quant_calibration_rows(tok, "mix", 6, 24, wiki, source_dir=tiny_checkpoint, chat_cache=tmp_path / "c")
    assert seen["first"] == 3
    td.quant_calibration_rows(tok, "chat", 5, 24, wiki, source_dir=tiny_checkpoint, chat_cache=tmp_path / "c")
    assert seen["first"] == 5


def test_lora_chat_data_asks_only_for_the_replies_it_trains_on(monkeypatch, tiny_checkpoint, tmp_path):
    """A LoRA run on `samples` chat/mix examples generates the source's replies for the tasks it trains on and
    the held-out tasks, not for every seed task; the examples it gets are the ones a full run would start with."""
    import compressor.torch_backend as tb

    monkeypatch.setattr(tb, "TorchBackend", CountingBackend)
    CountingBackend.generated, CountingBackend.fail_after = [], None
    tok = TextTokenizer(tiny_checkpoint)
    train, held, record = td.chat_examples(tok, tiny_checkpoint, tmp_path / "a.json", train_limit=10)
    assert (len(train), len(held), record["train"], record["heldout"]) == (10, td.HELDOUT_CHAT, 10, td.HELDOUT_CHAT)
    assert len(CountingBackend.generated) == 10 + td.HELDOUT_CHAT
    CountingBackend.generated = []
    full_train, full_held, full_record = td.chat_examples(tok, tiny_checkpoint, tmp_path / "b.json")
    assert full_record["tasks"] == len(CountingBackend.generated) == 175
    assert full_train[:10] == train and full_held == held
