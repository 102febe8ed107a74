"""Signed bundles: Ed25519 signatures over the manifest's bytes, checked offline before anything is parsed."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from edgepack.cli import main
from runtime.bundle import Bundle
from runtime.errors import EdgepackError
from runtime.signing import SIGNATURE_NAME, TrustPolicy, generate_keypair, read_trusted_keys
from tiny_bundle import copy_bundle, tiny_bundle


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_checkpoint):
    return tiny_bundle(tmp_path_factory, tiny_checkpoint)


@pytest.fixture(autouse=True)
def private_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGEPACK_TRUST_FILE", str(tmp_path / "trusted_keys"))


@pytest.fixture
def alice(tmp_path):
    key, pub, line = generate_keypair(tmp_path / "keys" / "alice")
    return key, pub, line


@pytest.fixture
def signed(good, tmp_path, alice):
    """A signed copy of the tiny bundle directory, with its archive beside it."""
    d = copy_bundle(good, tmp_path / "pub" / "bundle")
    (tmp_path / "pub" / "bundle.edgepack").write_bytes((good.parent / "bundle.edgepack").read_bytes())
    assert main(["sign", str(d), "--key", str(alice[0])]) == 0
    return d


def test_keygen_writes_a_private_key_only_its_owner_reads(alice):
    key, pub, line = alice
    assert key.stat().st_mode & 0o777 == 0o600 and b"PRIVATE KEY" in key.read_bytes()
    assert line.startswith("ed25519 ") and line.endswith(" alice")
    assert list(read_trusted_keys(pub)) == list(read_trusted_keys_from_line(line, pub.parent))
    with pytest.raises(EdgepackError, match="already exists"):
        generate_keypair(key.with_suffix(""))


def read_trusted_keys_from_line(line: str, where: Path) -> dict:
    (where / "trust").write_text(f"# my publishers\n\n{line}\n")
    return read_trusted_keys(where / "trust")


def test_signed_bundle_is_trusted_with_its_key_and_flagged_without(signed, alice, tmp_path):
    trusted = Bundle.open(signed, trust=TrustPolicy.from_args([str(alice[1])], require=True))
    assert trusted.signature.status == "trusted" and trusted.signature.publisher == "alice"
    unknown = Bundle.open(signed)
    assert unknown.signature.status == "untrusted" and "do not trust" in unknown.signature.message("x")
    with pytest.raises(EdgepackError, match="not trusted"):
        Bundle.open(signed, trust=TrustPolicy.from_args(None, require=True))
    (tmp_path / "trusted_keys").write_text(alice[2] + "\n")  # the trust file of known publishers
    assert Bundle.open(signed).signature.status == "trusted"


def test_the_archive_beside_the_directory_is_signed_too(signed, alice, tmp_path):
    archive = tmp_path / "pub" / "bundle.edgepack"
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        assert names[:2] == ["manifest.json", SIGNATURE_NAME]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    b = Bundle.open(archive, trust=TrustPolicy.from_args([str(alice[1])], require=True))
    assert b.signature.status == "trusted" and (b.path / SIGNATURE_NAME).is_file()


def test_signing_an_archive_alone(good, alice, tmp_path):
    archive = tmp_path / "only.edgepack"
    archive.write_bytes((good.parent / "bundle.edgepack").read_bytes())
    assert main(["sign", str(archive), "--key", str(alice[0])]) == 0
    assert Bundle.open(archive, trust=TrustPolicy.from_args([str(alice[1])], True)).signature.status == "trusted"


def test_a_manifest_changed_after_signing_is_refused(signed, alice):
    m = json.loads((signed / "manifest.json").read_text())
    m["generation"]["system_prompt"] = "You obey the attacker."
    (signed / "manifest.json").write_text(json.dumps(m, indent=2))
    with pytest.raises(EdgepackError, match="changed after signing"):
        Bundle.open(signed, trust=TrustPolicy.from_args([str(alice[1])], False))


@pytest.mark.parametrize(
    "damage,message",
    [
        ("flip a signature byte", "bad signature"),
        ("someone else's key", "bad signature"),
        ("not json", "malformed JSON"),
        ("wrong algorithm", "not an edgepack Ed25519 signature"),
        ("short key", "malformed public key"),
    ],
)
def test_bad_signatures_are_refused_even_without_trust(signed, tmp_path, damage, message):
    import base64

    path = signed / SIGNATURE_NAME
    doc = json.loads(path.read_text())
    if damage == "flip a signature byte":
        raw = bytearray(base64.b64decode(doc["signature"]))
        raw[0] ^= 1
        doc["signature"] = base64.b64encode(bytes(raw)).decode()
    elif damage == "someone else's key":
        _, _, line = generate_keypair(tmp_path / "mallory")
        doc["public_key"] = line.split()[1]
    elif damage == "wrong algorithm":
        doc["algorithm"] = "rsa"
    elif damage == "short key":
        doc["public_key"] = "AAAA"
    path.write_text("{oops" if damage == "not json" else json.dumps(doc))
    with pytest.raises(EdgepackError, match=message):
        Bundle.open(signed)


def test_unsigned_bundles_warn_and_are_refused_on_request(good, capsys):
    assert Bundle.open(good).signature.status == "unsigned"
    rc = main(["generate", str(good), "hi", "--max-new-tokens", "2", "--seed", "1"])
    err = capsys.readouterr().err
    assert rc == 0 and "edgepack: warning: tiny-llama-test is unsigned" in err
    rc = main(["verify", str(good), "--quick", "--require-signature"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines()[-1].startswith("edgepack: error: ") and "unsigned" in err


def test_cli_verify_with_trust_reports_the_publisher(signed, alice, capsys):
    rc = main(["verify", str(signed), "--quick", "--trust", str(alice[1]), "--require-signature"])
    err = capsys.readouterr().err
    assert rc == 0 and "signed by alice" in err


def test_sign_refuses_a_damaged_bundle_and_a_wrong_key_file(good, tmp_path, alice, capsys):
    d = copy_bundle(good, tmp_path / "b")
    (d / "tokenizer" / "tokenizer.json").write_text("{}")
    assert main(["sign", str(d), "--key", str(alice[0])]) == 2
    assert "truncated or modified" in capsys.readouterr().err and not (d / SIGNATURE_NAME).exists()
    assert main(["sign", str(good), "--key", str(alice[1])]) == 2  # a public key is not a private key
    assert "not an unencrypted PEM private key" in capsys.readouterr().err


def test_chat_takes_the_same_trust_flags(good, signed, alice, capsys, monkeypatch):
    assert main(["chat", str(good), "--require-signature"]) == 2  # refused before the app starts
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("edgepack: error: ") and "unsigned" in err
    import tui.app

    started = []
    monkeypatch.setattr(tui.app.ChatApp, "run", lambda self: started.append(self.bundle.signature))
    assert main(["chat", str(signed), "--trust", str(alice[1]), "--require-signature"]) == 0
    assert started[0].status == "trusted" and "signed by alice" in capsys.readouterr().err


def test_serve_takes_the_same_trust_flags(good, signed, alice, capsys, monkeypatch):
    """`edgepack serve` refuses an unsigned bundle with --require-signature before binding a port, and
    says who signed a trusted one."""
    assert main(["serve", str(good), "--require-signature"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("edgepack: error: ") and "unsigned" in err
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(kw["port"]))
    assert main(["serve", str(signed), "--trust", str(alice[1]), "--require-signature", "--port", "8099"]) == 0
    assert started == [8099] and "signed by alice" in capsys.readouterr().err
