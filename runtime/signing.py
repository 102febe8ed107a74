"""Signed bundles: who published a bundle, checked offline with Ed25519 keys.

The manifest lists every file of the bundle with its sha256, so signing the manifest's exact bytes signs
the whole bundle. The signature lives beside it, in `manifest.sig` (in the bundle directory and as an
archive member; it is the one file the manifest cannot list). Format, UTF-8 JSON:

    {"format": "edgepack.signature", "version": 1, "algorithm": "ed25519",
     "public_key": base64 of the 32-byte raw Ed25519 public key,
     "key_id": first 16 hex digits of sha256(raw public key),
     "manifest_sha256": hex sha256 of manifest.json's bytes,
     "signature": base64 of the 64-byte Ed25519 signature of
                  b"edgepack-manifest-signature-v1\\n" + manifest_sha256 (ASCII hex)}

Keys are ordinary PEM files (PKCS#8 private key, SubjectPublicKeyInfo public key), the same as
`openssl genpkey -algorithm ed25519` and `openssl pkey -pubout` write, or `edgepack keygen`. Trusted
publishers: `--trust KEY.pub` (repeatable), plus a trust file (EDGEPACK_TRUST_FILE, else
trusted_keys in the platform's user config dir for edgepack) with one key a line,
`ed25519 BASE64_RAW_PUBLIC_KEY publisher name`, '#' starting a comment.

Policy (runtime.bundle.Bundle.open applies it before anything else of the bundle is parsed):
- a signature that does not verify, or that signs other manifest bytes, is always refused;
- signed by a trusted key: "trusted"; unsigned, or signed by a key not trusted: runs with a warning
  ("unsigned" / "untrusted"), or is refused with require=True (`--require-signature`).

Why not OpenSSF model-signing: it depends on sigstore (network-oriented, many packages) even for
key-based signing; Ed25519 from `cryptography` (one wheel) keeps the runtime install light and offline.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from runtime.errors import EdgepackError

SIGNATURE_NAME = "manifest.sig"
SIGNATURE_FORMAT = "edgepack.signature"
SIGNATURE_VERSION = 1
PAYLOAD_PREFIX = b"edgepack-manifest-signature-v1\n"
TRUST_FILE_ENV = "EDGEPACK_TRUST_FILE"
MAX_SIGNATURE_BYTES = 64 << 10
MAX_KEY_BYTES = 64 << 10


@dataclass(frozen=True)
class SignatureCheck:
    """What Bundle.open found: status, the signing key's id and, when trusted, the publisher's name."""

    status: Literal["trusted", "untrusted", "unsigned"]
    key_id: str | None = None
    publisher: str | None = None

    def message(self, bundle_name: str) -> str:
        """One line for the user: informative when trusted, a warning otherwise."""
        if self.status == "trusted":
            return f"{bundle_name}: signed by {self.publisher or 'a trusted key'} (key {self.key_id})"
        if self.status == "untrusted":
            return (
                f"warning: {bundle_name} is signed by key {self.key_id}, which you do not trust "
                "(--trust KEY.pub, or add it to your trust file); its publisher is unknown"
            )
        return (
            f"warning: {bundle_name} is unsigned: nothing says who published it "
            "(--require-signature refuses unsigned bundles)"
        )


@dataclass
class TrustPolicy:
    """Keys accepted as publishers ({key_id: (raw public key, name)}) and whether a trusted signature is
    required."""

    keys: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    require: bool = False

    @classmethod
    def default(cls, require: bool = False) -> TrustPolicy:
        """The user's trust file (if there is one)."""
        policy = cls(require=require)
        path = trust_file_path()
        if path.is_file():
            policy.keys.update(read_trust_file(path))
        return policy

    @classmethod
    def from_args(cls, trust: list[str] | None, require: bool) -> TrustPolicy:
        """The trust file plus each --trust FILE (a PEM public key or a trust file)."""
        policy = cls.default(require)
        for item in trust or []:
            policy.keys.update(read_trusted_keys(Path(item).expanduser()))
        return policy


def trust_file_path() -> Path:
    if os.environ.get(TRUST_FILE_ENV):
        return Path(os.environ[TRUST_FILE_ENV]).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("edgepack", appauthor=False)) / "trusted_keys"


def key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


def _payload(manifest_sha256: str) -> bytes:
    return PAYLOAD_PREFIX + manifest_sha256.encode("ascii")


def _read_small(path: Path, cap: int, what: str) -> bytes:
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise EdgepackError(f"{path}: {what} is not a regular file")
        if st.st_size > cap:
            raise EdgepackError(f"{path}: {what} larger than {cap >> 10} KiB")
        return path.read_bytes()
    except FileNotFoundError:
        raise EdgepackError(f"{path}: {what} not found") from None
    except OSError as e:
        raise EdgepackError(f"{path}: cannot read {what} ({e.strerror or e})") from None


# ---------------------------------------------------------------------------------------------------------
# Keys


def generate_keypair(prefix: str | os.PathLike) -> tuple[Path, Path, str]:
    """PREFIX.key (PKCS#8 PEM, mode 0600) and PREFIX.pub (PEM); returns them and the trust-file line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from runtime.fileio import atomic_write_bytes

    prefix = Path(prefix)
    key_path, pub_path = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    for p in (key_path, pub_path):
        if p.exists():
            raise EdgepackError(f"{p}: already exists (not overwritten)")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        atomic_write_bytes(key_path, pem)
        os.chmod(key_path, 0o600)
        public = private.public_key()
        atomic_write_bytes(
            pub_path, public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
    except OSError as e:
        raise EdgepackError(f"{prefix}: cannot write the key files ({e.strerror or e})") from None
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key_path, pub_path, trust_line(raw, prefix.name)


def trust_line(raw_public: bytes, name: str) -> str:
    return f"ed25519 {base64.b64encode(raw_public).decode()} {name}"


def load_private_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_small(Path(path), MAX_KEY_BYTES, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise EdgepackError(f"{path}: not an unencrypted PEM private key ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgepackError(f"{path}: not an Ed25519 key (edgepack signs with Ed25519 only)")
    return key


def _raw_public(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def read_trusted_keys(path: Path) -> dict[str, tuple[bytes, str]]:
    """{key_id: (raw key, name)} from a PEM public key file or a trust file."""
    data = _read_small(path, MAX_KEY_BYTES, "trusted key file")
    if b"-----BEGIN PUBLIC KEY-----" in data:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as e:
            raise EdgepackError(f"{path}: not a PEM public key ({str(e).splitlines()[0][:120]})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise EdgepackError(f"{path}: not an Ed25519 public key")
        raw = _raw_public(key)
        return {key_id(raw): (raw, path.stem)}
    return read_trust_file(path)


def read_trust_file(path: Path) -> dict[str, tuple[bytes, str]]:
    """Lines `ed25519 BASE64 name`; blank lines and '#' comments skipped; anything else is an error."""
    data = _read_small(Path(path), 1 << 20, "trust file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise EdgepackError(f"{path}: trust file is not UTF-8 text") from None
    keys = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 2)
        raw = _b64(parts[1], 32) if len(parts) >= 2 and parts[0] == "ed25519" else None
        if raw is None:
            raise EdgepackError(f"{path}:{lineno}: expected 'ed25519 BASE64_PUBLIC_KEY name'")
        keys[key_id(raw)] = (raw, parts[2] if len(parts) == 3 else key_id(raw))
    return keys


def _b64(text, length: int) -> bytes | None:
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", text):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == length else None


# ---------------------------------------------------------------------------------------------------------
# Signing and checking


def signature_document(manifest_bytes: bytes, private_key) -> bytes:
    """The manifest.sig bytes for these manifest bytes."""
    import json

    digest = hashlib.sha256(manifest_bytes).hexdigest()
    raw = _raw_public(private_key.public_key())
    doc = {
        "format": SIGNATURE_FORMAT,
        "version": SIGNATURE_VERSION,
        "algorithm": "ed25519",
        "public_key": base64.b64encode(raw).decode(),
        "key_id": key_id(raw),
        "manifest_sha256": digest,
        "signature": base64.b64encode(private_key.sign(_payload(digest))).decode(),
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def check_signature(directory: Path, manifest_bytes: bytes, trust: TrustPolicy) -> SignatureCheck:
    """Check DIRECTORY/manifest.sig against the manifest's bytes under `trust` (module docstring)."""
    path = Path(directory) / SIGNATURE_NAME
    if not os.path.lexists(path):
        if trust.require:
            raise EdgepackError(
                f"{directory}: the bundle is unsigned, and a signature is required (--require-signature)"
            )
        return SignatureCheck("unsigned")
    if path.is_symlink():
        raise EdgepackError(f"{path}: is a symlink (refused)")
    raw_key, kid = verify_signature_bytes(
        _read_small(path, MAX_SIGNATURE_BYTES, "signature"), manifest_bytes, str(path)
    )
    if kid in trust.keys and trust.keys[kid][0] == raw_key:
        return SignatureCheck("trusted", kid, trust.keys[kid][1])
    if trust.require:
        raise EdgepackError(
            f"{path}: signed by key {kid}, which is not trusted, and a trusted signature is required (--trust KEY.pub)"
        )
    return SignatureCheck("untrusted", kid)


def verify_signature_bytes(sig_bytes: bytes, manifest_bytes: bytes, where: str) -> tuple[bytes, str]:
    """(raw public key, key id) when the signature document is well-formed and verifies for these
    manifest bytes; EdgepackError otherwise."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from runtime.fileio import parse_json

    doc = parse_json(sig_bytes, where)
    if not isinstance(doc, dict) or doc.get("format") != SIGNATURE_FORMAT or doc.get("algorithm") != "ed25519":
        raise EdgepackError(f"{where}: not an edgepack Ed25519 signature (refused)")
    if doc.get("version") != SIGNATURE_VERSION:
        raise EdgepackError(f"{where}: signature version {str(doc.get('version'))[:20]} is not supported (refused)")
    raw_key, sig = _b64(doc.get("public_key"), 32), _b64(doc.get("signature"), 64)
    if raw_key is None or sig is None:
        raise EdgepackError(f"{where}: malformed public key or signature (refused)")
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    if doc.get("manifest_sha256") != digest:
        raise EdgepackError(
            f"{where}: the signature is for other manifest bytes: the manifest was changed after signing (refused)"
        )
    try:
        Ed25519PublicKey.from_public_bytes(raw_key).verify(sig, _payload(digest))
    except (InvalidSignature, ValueError):
        raise EdgepackError(f"{where}: bad signature: it does not verify with its key (refused)") from None
    return raw_key, key_id(raw_key)


def sign_bundle(path: str | os.PathLike, key_path: str | os.PathLike) -> list[Path]:
    """Sign a bundle directory (writes DIR/manifest.sig, and re-writes DIR.edgepack beside it if there is
    one) or a .edgepack archive (re-written with the manifest.sig member). The bundle is opened and every
    digest checked first, so a damaged bundle is never signed. Returns the paths written."""
    from runtime.bundle import Bundle, archive_with_signature
    from runtime.fileio import atomic_write_bytes

    path = Path(path).expanduser()
    key = load_private_key(Path(key_path).expanduser())
    bundle = Bundle.open(path, trust=TrustPolicy())  # full check; an existing signature must still verify
    manifest_bytes = (bundle.path / "manifest.json").read_bytes()
    doc = signature_document(manifest_bytes, key)
    written = []
    try:
        if path.is_dir():
            written.append(atomic_write_bytes(path / SIGNATURE_NAME, doc))
            sibling = path.parent / f"{path.name}.edgepack"
            if sibling.is_file():
                written.append(archive_with_signature(sibling, doc))
        else:
            written.append(archive_with_signature(path, doc))
    except OSError as e:
        raise EdgepackError(f"{path}: cannot write the signature ({e.strerror or e})") from None
    return written
