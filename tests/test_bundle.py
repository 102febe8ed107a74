"""Opening bundles: digests before parsing, one clear error per kind of damage, safe archive extraction."""

from __future__ import annotations

import json
import zipfile

import pytest

from exporter.bundle_writer import write_archive, write_bundle
from runtime.bundle import Bundle, extract_archive
from runtime.errors import EdgepackError
from runtime.manifest import FORMAT_VERSION, validate_manifest
from tiny_bundle import copy_bundle, refresh_digest, tiny_bundle


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_checkpoint):
    return tiny_bundle(tmp_path_factory, tiny_checkpoint)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "bundles"


def manifest_of(d):
    return json.loads((d / "manifest.json").read_text())


def write_manifest(d, m):
    (d / "manifest.json").write_text(json.dumps(m))


def test_good_bundle_opens_from_directory_and_archive(good, private_cache):
    b = Bundle.open(good)
    info = b.describe()
    assert info["name"] == "tiny-llama-test" and info["context_length"] == 512
    assert info["size_bytes"] == sum((good / f).stat().st_size for f in b.manifest["files"])
    assert {q["metric"] for q in info["quality"]} >= {"ppl", "kld", "top1", "triviaqa_closed_contains"}
    assert b.manifest["format_version"] == FORMAT_VERSION
    a = Bundle.open(good.parent / "bundle.edgepack")
    assert a.path.parent == private_cache and a.manifest == b.manifest
    assert sorted(p.relative_to(a.path).as_posix() for p in a.path.rglob("*") if p.is_file()) == sorted(
        [*b.manifest["files"], "manifest.json"]
    )
    assert Bundle.open(good.parent / "bundle.edgepack").path == a.path  # extracted once, reused
    assert a.generator().generate(a.tokenizer.encode("hi"), a.sampling_defaults()).new_tokens > 0


def test_archive_is_reproducible(good, tmp_path):
    one = write_archive(good, tmp_path / "one.edgepack")
    two = write_archive(good, tmp_path / "two.edgepack")
    assert one.read_bytes() == two.read_bytes()
    with zipfile.ZipFile(one) as zf:
        assert zf.namelist()[0] == "manifest.json"
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())


def test_tampered_file_is_caught_before_parsing(good, tmp_path):
    d = copy_bundle(good, tmp_path / "b")
    tok = d / "tokenizer" / "tokenizer.json"
    raw = bytearray(tok.read_bytes())
    raw[100] ^= 0x20  # same size, different content
    tok.write_bytes(bytes(raw))
    with pytest.raises(EdgepackError, match=r"tokenizer/tokenizer\.json: sha256 does not match"):
        Bundle.open(d)
    # unchecked, it reaches the tokenizers parser, whose error is still one line naming the file
    with pytest.raises(EdgepackError, match=r"tokenizer\.json: not a valid tokenizers file \(expected value"):
        Bundle.open(d, verify_digests=False)


def test_truncated_and_missing_files(good, tmp_path):
    d = copy_bundle(good, tmp_path / "b")
    data = d / "onnx" / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(EdgepackError, match=r"model\.onnx\.data: \d+ bytes, the manifest says \d+ \(truncated"):
        Bundle.open(d)
    data.unlink()
    with pytest.raises(EdgepackError, match=r"model\.onnx\.data: file listed in the manifest is missing"):
        Bundle.open(d)


def test_wrong_manifest_version_and_malformed_manifest(good, tmp_path):
    d = copy_bundle(good, tmp_path / "b")
    m = manifest_of(d)
    write_manifest(d, {**m, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(EdgepackError, match=r"manifest\.json: manifest field 'format_version' is 2: .*upgrade"):
        Bundle.open(d)
    (d / "manifest.json").write_text('{"format": "edgepack.bundle", ')
    with pytest.raises(EdgepackError, match=r"manifest\.json: malformed JSON"):
        Bundle.open(d)
    (d / "manifest.json").unlink()
    with pytest.raises(EdgepackError, match="manifest not found"):
        Bundle.open(d)


def test_crafted_tokenizer_json_cannot_stall_the_nesting_check(good, tmp_path):
    """An open string followed by 300k escaped quotes made the nesting-bomb scan retry from every quote
    (quadratic: about 15 min here); it is now one linear pass and the file gets its one error line.
    SIGALRM turns a regression into a failure instead of a stalled suite."""
    import signal

    d = copy_bundle(good, tmp_path / "b")
    (d / "tokenizer" / "tokenizer.json").write_text('{"model": "' + '\\"' * 300_000)
    refresh_digest(d, "tokenizer/tokenizer.json")

    def stalled(signum, frame):
        raise TimeoutError("the tokenizer.json checks ran longer than 60 s")

    old = signal.signal(signal.SIGALRM, stalled)
    signal.alarm(60)
    try:
        with pytest.raises(EdgepackError, match=r"tokenizer\.json: not a valid tokenizers file"):
            Bundle.open(d)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_malformed_json_and_onnx_behind_valid_digests(good, tmp_path):
    """A forger who also fixes the digests still gets a clear error naming the file, not a traceback."""
    d = copy_bundle(good, tmp_path / "b")
    (d / "tokenizer" / "tokenizer_config.json").write_text("{not json")
    refresh_digest(d, "tokenizer/tokenizer_config.json")
    with pytest.raises(EdgepackError, match=r"tokenizer_config\.json: malformed JSON"):
        Bundle.open(d)
    d2 = copy_bundle(good, tmp_path / "c")
    (d2 / "onnx" / "model.onnx").write_bytes(b"\x08\x07garbage" * 10)
    refresh_digest(d2, "onnx/model.onnx")
    with pytest.raises(EdgepackError, match=r"model\.onnx: not a valid ONNX model"):  # checked at open now
        Bundle.open(d2)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("files", {"../escape.bin": {"size": 1, "sha256": "0" * 64}}, "unsafe path"),
        ("files", {"/etc/passwd": {"size": 1, "sha256": "0" * 64}}, "unsafe path"),
        ("files", {"onnx/model.onnx": {"size": 1, "sha256": "xyz"}}, "64 lowercase hex"),
        ("format", "something.else", "not an edgepack bundle"),
        ("generation", {"eos_token_ids": "2", "context_length": 512}, "generation.eos_token_ids"),
    ],
)
def test_manifest_validation_names_the_field(good, field, value, message):
    m = manifest_of(good)
    m[field] = value
    with pytest.raises(EdgepackError, match=message):
        validate_manifest(m, "x/manifest.json")
    m = manifest_of(good)
    del m["quality"]["full"]["ppl"]["tolerance"]
    with pytest.raises(EdgepackError, match=r"'quality\.full\.ppl\.tolerance' is missing"):
        validate_manifest(m, "x/manifest.json")


def _zip(path, members: dict, symlink: str | None = None):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    return path


def _members(good) -> dict:
    m = manifest_of(good)
    return {"manifest.json": json.dumps(m), **{f: (good / f).read_bytes() for f in m["files"]}}


def test_path_traversal_archive_is_rejected(good, tmp_path, private_cache):
    for evil in ("../evil.txt", "/tmp/evil.txt", "onnx/../../evil.txt", "tokenizer\\..\\evil.txt"):
        arc = _zip(tmp_path / "evil.edgepack", {**_members(good), evil: b"pwned"})
        with pytest.raises(EdgepackError, match="unsafe archive member path"):
            Bundle.open(arc)
    arc = _zip(tmp_path / "link.edgepack", _members(good), symlink="onnx/link")
    with pytest.raises(EdgepackError, match="onnx/link: archive member is a symlink"):
        Bundle.open(arc)
    assert not (tmp_path / "evil.txt").exists() and not (private_cache.parent / "evil.txt").exists()
    assert not any(private_cache.glob("*/manifest.json"))  # nothing was extracted


def test_archive_limits_extra_members_and_tampering(good, tmp_path, private_cache):
    arc = _zip(tmp_path / "extra.edgepack", {**_members(good), "notes/readme.txt": b"hi"})
    with pytest.raises(EdgepackError, match=r"notes/readme\.txt: archive member not listed in the manifest"):
        Bundle.open(arc)
    with pytest.raises(EdgepackError, match="more than the limit of 3"):
        extract_archive(good.parent / "bundle.edgepack", max_files=3)
    with pytest.raises(EdgepackError, match="over the limit"):
        extract_archive(good.parent / "bundle.edgepack", max_total_bytes=1000)
    members = _members(good)
    raw = bytearray(members["onnx/model.onnx.data"])
    raw[-5] ^= 1
    arc = _zip(tmp_path / "tampered.edgepack", {**members, "onnx/model.onnx.data": bytes(raw)})
    with pytest.raises(EdgepackError, match=r"tampered\.edgepack!onnx/model\.onnx\.data: sha256 does not match"):
        Bundle.open(arc)
    assert not any(private_cache.glob("*/manifest.json"))  # the partial extraction was removed
    (tmp_path / "junk.edgepack").write_bytes(b"not a zip")
    with pytest.raises(EdgepackError, match="not a bundle archive"):
        Bundle.open(tmp_path / "junk.edgepack")


def test_writer_refuses_pickles_and_validates_fields(good, tmp_path):
    st = tmp_path / "st"
    st.mkdir()
    (st / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    m = manifest_of(good)
    fields = {k: m[k] for k in ("model", "recipe", "generation", "quality", "created_by")}
    b = copy_bundle(good, tmp_path / "src")
    common = dict(
        onnx_dir=b / "onnx", tokenizer_dir=b / "tokenizer", reference_path=b / "reference" / "reference.safetensors"
    )
    with pytest.raises(EdgepackError, match=r"pytorch_model\.bin: not allowed in a bundle"):
        write_bundle(tmp_path / "out", safetensors_dir=st, manifest_fields=fields, **common)
    with pytest.raises(EdgepackError, match="'model.parameters' is missing"):
        write_bundle(
            tmp_path / "out",
            safetensors_dir=None,
            manifest_fields={**fields, "model": {"name": "x", "source": "y"}},
            **common,
        )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))  # no half-written bundle
    (st / "pytorch_model.bin").unlink()
    (st / "model.safetensors").write_bytes((good / "reference" / "reference.safetensors").read_bytes())
    out = write_bundle(tmp_path / "out", safetensors_dir=st, manifest_fields=fields, archive=False, **common)
    opened = Bundle.open(out)
    assert opened.manifest["runtime"]["safetensors"] == "safetensors"
    assert "safetensors/model.safetensors" in opened.manifest["files"]
    assert not (tmp_path / "out.edgepack").exists()


def test_damaged_cache_extraction_is_redone(good):
    a = Bundle.open(good.parent / "bundle.edgepack")
    cached = a.path / "tokenizer" / "tokenizer.json"
    original = cached.read_bytes()
    cached.write_bytes(original.replace(b"<|im_end|>", b"<|im_END|>"))
    again = Bundle.open(good.parent / "bundle.edgepack")
    assert again.path == a.path and cached.read_bytes() == original


def test_requirements_and_no_pickle(good, tmp_path, monkeypatch):
    d = copy_bundle(good, tmp_path / "b")
    m = manifest_of(d)
    m["runtime"]["requires"] = {"onnxruntime": ">=99.0"}
    write_manifest(d, m)
    with pytest.raises(EdgepackError, match=r"needs onnxruntime>=99\.0, installed is 1\."):
        Bundle.open(d)
    import pickle

    def refuse(*a, **k):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    b = Bundle.open(good)
    assert b.reference().k == 16 and b.decoder().vocab_size == 288
