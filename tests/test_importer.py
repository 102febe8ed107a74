"""`edgepack import` on GGUF files and HF directories written in the test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_tiny_llama
from gguf_fixture import write_tiny_llama_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model = make_tiny_llama("plain", vocab_size=288, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_tiny_llama_gguf(model, path)
    return model, path


def test_gguf_import_gives_same_logits(tiny_gguf, tmp_path):
    from compressor.importer import import_model
    from transformers import AutoModelForCausalLM

    model, path = tiny_gguf
    out = import_model(path, tmp_path / "imported")
    record = json.loads((out / "edgepack_import.json").read_text())
    assert record["source_kind"] == "gguf" and len(record["source_sha256"]) == 64
    assert (out / "tokenizer.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(3, 259, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)


def test_imported_tokenizer_and_chat_template(tiny_gguf, tmp_path):
    from compressor.importer import import_model
    from runtime.tokenizer import TextTokenizer

    _, path = tiny_gguf
    out = import_model(path, tmp_path / "imported")
    tok = TextTokenizer(out)
    assert tok.decode(tok.encode("hello world", add_special_tokens=False)) == "hello world"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>assistant\n") and "hi" in text


def test_hf_directory_import(tmp_path):
    from compressor.importer import import_model

    model = make_tiny_llama("llama32")
    src = tmp_path / "src"
    model.save_pretrained(src)
    # a tokenizer is required: borrow the GGUF fixture's by importing a GGUF first is overkill; write one
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w2", bos_token="w1").save_pretrained(src)
    out = import_model(src, tmp_path / "out")
    record = json.loads((out / "edgepack_import.json").read_text())
    assert record["source_kind"] == "hf"
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgepack", *args], cwd=ROOT, capture_output=True, text=True)


def test_bad_inputs_get_one_clear_line(tmp_path, tiny_gguf):
    missing = _cli("import", str(tmp_path / "nope.gguf"))
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr

    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 40)
    bad = _cli("import", str(corrupt))
    assert bad.returncode == 2 and "not a readable GGUF" in bad.stderr and "Traceback" not in bad.stderr

    model, _ = tiny_gguf
    other = tmp_path / "other.gguf"
    write_tiny_llama_gguf(model, other, arch="gpt2")
    wrong = _cli("import", str(other))
    assert wrong.returncode == 2 and "is not supported (supported: llama" in wrong.stderr

    hf = tmp_path / "bert"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "bert"}))
    res = _cli("import", str(hf))
    assert res.returncode == 2 and "is not supported (supported: llama" in res.stderr
