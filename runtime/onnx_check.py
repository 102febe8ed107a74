"""Check a bundle's ONNX model before onnxruntime sees it: where its tensors' external data lives, and the
edgepack metadata the engine relies on.

An ONNX tensor may keep its bytes in another file (`external_data`: location, offset, length). A crafted
model can name "../../home/user/.ssh/id_ed25519" or an absolute path there, and older onnxruntime releases
read whatever it names (fixed step by step in 1.24-1.27). edgepack does not rely on the installed version:
every external-data location of every tensor (initializers, sparse initializers, Constant-node attributes,
subgraphs, functions, training graphs) must be a plain relative name inside the model's own directory and
a file the manifest lists (so its digest was checked and no link is involved), with offset + length inside
that file. The metadata_props["edgepack"] JSON is validated field by field, since a bundle's author
writes it too.

The protobuf walker is written by hand: `onnx` (the one library that parses ModelProto) is not a runtime
dependency, and onnxruntime offers no way to list external-data locations without loading them. The walker
reads only the fields above from the protobuf wire format (varints and length-delimited fields; every
other field is skipped by its wire type), with bounds checked on every read and a nesting limit.
"""

from __future__ import annotations

import math
import stat
from pathlib import Path, PurePosixPath

from runtime.contract import FORMAT, METADATA_KEY
from runtime.errors import EdgepackError

# The first onnxruntime release with external-data path validation on every loading path (files, bytes,
# sparse tensors: microsoft/onnxruntime#26776, #27430, #28709); bundles and pyproject require at least it.
ORT_MIN_VERSION = "1.27"
MAX_MODEL_BYTES = 2 << 30  # protobuf's own limit for one message
MAX_NESTING = 32
MAX_KV_BYTES = (
    32 << 30
)  # one sequence's float32 KV cache at max_len; a 7B model at 8k context needs ~4 GiB  # graphs inside attributes inside graphs ...
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# Field numbers from onnx.proto: message -> {field: message kind of that (length-delimited) field}.
_SCHEMA = {
    "model": {7: "graph", 20: "training", 25: "function", 14: "entry"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "function": {7: "node"},
    "training": {1: "graph", 2: "graph"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
}
_TENSOR_NAME, _TENSOR_LOCATION = 8, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_MODEL_METADATA = 14


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Malformed("truncated or over-long varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview):
    """(field number, wire type, value) for each field of one message: an int for varints, a memoryview
    for length-delimited fields, None for fixed-size ones (skipped)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _Malformed("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
            value = None
        elif wire == 5:
            pos += 4
            value = None
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if n > len(buf) - pos:
                raise _Malformed("length-delimited field runs past its message")
            value = buf[pos : pos + n]
            pos += n
        else:  # 3/4: protobuf groups, never used by ONNX
            raise _Malformed(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise _Malformed("truncated field")
        yield field, wire, value


def _entry(buf: memoryview) -> tuple[str, str]:
    key = value = ""
    for field, wire, v in _fields(buf):
        if wire == 2 and field == _ENTRY_KEY:
            key = bytes(v).decode("utf-8")
        elif wire == 2 and field == _ENTRY_VALUE:
            value = bytes(v).decode("utf-8")
    return key, value


def _walk(buf: memoryview, kind: str, depth: int, tensors: list, metadata: dict) -> None:
    if depth > MAX_NESTING:
        raise _Malformed(f"messages nested deeper than {MAX_NESTING} levels")
    schema = _SCHEMA[kind]
    if kind == "tensor":
        name, location, entries = "", 0, {}
        for field, wire, v in _fields(buf):
            if field == _TENSOR_NAME and wire == 2:
                name = bytes(v).decode("utf-8", "replace")
            elif field == _TENSOR_LOCATION and wire == 0:
                location = v
            elif field in schema and wire == 2:
                k, val = _entry(v)
                entries[k] = val
        if location == EXTERNAL or entries:
            tensors.append((name, location, entries))
        return
    for field, wire, v in _fields(buf):
        sub = schema.get(field)
        if sub is None or wire != 2:
            continue
        if sub == "entry":  # only ModelProto.metadata_props reaches here
            k, val = _entry(v)
            metadata[k] = val
        else:
            _walk(v, sub, depth + 1, tensors, metadata)


def read_model_facts(model_path: Path) -> tuple[list[tuple[str, int, dict]], dict[str, str]]:
    """([(tensor name, data_location, external_data entries)] for every tensor that has external data,
    the model's metadata_props) from the protobuf, without loading any tensor."""
    model_path = Path(model_path)
    try:
        st = model_path.lstat()
        if not stat.S_ISREG(st.st_mode):
            raise EdgepackError(f"{model_path}: the ONNX model is not a regular file")
        if st.st_size > MAX_MODEL_BYTES:
            raise EdgepackError(f"{model_path}: the ONNX model is larger than 2 GiB (protobuf's limit)")
        data = model_path.read_bytes()
    except OSError as e:
        raise EdgepackError(f"{model_path}: cannot read the ONNX model ({e.strerror or e})") from None
    tensors: list = []
    metadata: dict = {}
    try:
        _walk(memoryview(data), "model", 0, tensors, metadata)
    except (_Malformed, UnicodeDecodeError) as e:
        raise EdgepackError(f"{model_path}: not a valid ONNX model ({e})") from None
    return tensors, metadata


def check_onnx_model(model_path: Path, model_rel: str, files: dict) -> dict:
    """Refuse external data outside the manifest's files (see module docstring) and malformed edgepack
    metadata; return the metadata. model_rel: the model's path in the bundle; files: the manifest's."""
    tensors, metadata = read_model_facts(model_path)
    model_dir = PurePosixPath(model_rel).parent
    for name, location, entries in tensors:
        what = f"{model_path}: tensor {name[:80]!r}"
        if location != EXTERNAL:
            raise EdgepackError(f"{what} has external_data entries but is not marked EXTERNAL")
        loc = entries.get("location", "")
        if (
            not loc
            or "\\" in loc
            or loc.startswith("/")
            or any(p in ("", ".", "..") for p in loc.split("/"))
            or any(ord(c) < 32 for c in loc)
            or (len(loc) > 1 and loc[1] == ":")
        ):
            raise EdgepackError(
                f"{what}: external data location {loc[:80]!r} is not a plain relative path inside "
                "the model's directory (refused: it could read files outside the bundle)"
            )
        rel = (model_dir / loc).as_posix()
        if rel not in files:
            raise EdgepackError(f"{what}: external data file {rel[:80]!r} is not listed in the manifest (refused)")
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries["length"]) if "length" in entries else files[rel]["size"] - offset
        except ValueError:
            raise EdgepackError(f"{what}: external data offset/length are not integers") from None
        if offset < 0 or length < 0 or offset + length > files[rel]["size"]:
            raise EdgepackError(
                f"{what}: external data [{offset}, {offset}+{length}) lies outside {rel} ({files[rel]['size']} bytes)"
            )
    return check_metadata(metadata.get(METADATA_KEY), model_path)


def _int(meta: dict, key: str, lo: int, hi: int, where, optional: bool = False):
    v = meta.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise EdgepackError(f"{where}: metadata field {key!r} must be an integer in [{lo}, {hi}], got {str(v)[:40]}")
    return v


def check_metadata(raw: str | None, where) -> dict:
    """The model's "edgepack" metadata (runtime.onnx_engine reads it): present, JSON, the right format, and
    every field the engine uses of the right type and range."""
    from runtime.fileio import parse_json

    if raw is None:
        raise EdgepackError(f"{where}: no '{METADATA_KEY}' metadata; not an edgepack decoder graph")
    meta = parse_json(raw.encode("utf-8"), f"{where} (edgepack metadata)")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EdgepackError(f"{where}: metadata is not an {FORMAT} description")
    _int(meta, "max_len", 2, 1 << 20, where)
    _int(meta, "vocab_size", 1, 1 << 24, where)
    _int(meta, "head_dim", 1, 4096, where)
    _int(meta, "bos_token_id", 0, (1 << 31) - 1, where, optional=True)
    eos = meta.get("eos_token_ids") or []
    if not isinstance(eos, list) or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos):
        raise EdgepackError(f"{where}: metadata field 'eos_token_ids' must be a list of token ids")
    kv = meta.get("kv_cache")
    if not isinstance(kv, list) or len(kv) > 4096:
        raise EdgepackError(f"{where}: metadata field 'kv_cache' must be a list of layers")
    for layer in kv:
        if not isinstance(layer, dict) or not all(
            isinstance(layer.get(k), str) for k in ("past_key", "past_value", "present_key", "present_value")
        ):
            raise EdgepackError(f"{where}: metadata 'kv_cache' entries need past/present key/value names")
        _int(layer, "kv_heads", 1, 4096, where)
    kv_bytes = sum(2 * layer["kv_heads"] * meta["max_len"] * meta["head_dim"] * 4 for layer in kv)
    if kv_bytes > MAX_KV_BYTES:
        raise EdgepackError(
            f"{where}: its KV cache would take {kv_bytes / 2**30:.0f} GiB for one sequence "
            f"(max_len={meta['max_len']}), more than the {MAX_KV_BYTES >> 30} GiB edgepack allows"
        )
    weights = meta.get("weights", {})
    if not isinstance(weights, dict):
        raise EdgepackError(f"{where}: metadata field 'weights' must be an object")
    _int(weights, "accuracy_level", 0, 4, where, optional=True)
    for key, value in meta.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise EdgepackError(f"{where}: metadata field {key!r} is not finite")
    return meta
