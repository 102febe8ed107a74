"""Fuzzing (hypothesis): random byte and structure mutations of the tiny bundle's manifest, tokenizer files,
reference and archive. Every open / generate / verify either works or raises EdgepackError, never another
exception and never a hang (each case runs under an interval timer).

Digests are recomputed after a mutation of a listed file (as a forger would), so the mutated bytes reach the
parsers instead of stopping at the digest check. The ONNX graph is not mutated here (tests/test_security.py
crafts its external data and metadata), so one decoder session is shared by every case that opens.

Cases per run: EDGEPACK_FUZZ_EXAMPLES (default 400); the examples are derandomized so CI is reproducible
(EDGEPACK_FUZZ_RANDOM=1 draws new ones, for longer hunts by hand).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from runtime.errors import EdgepackError
from tiny_bundle import refresh_digest, tiny_bundle

EXAMPLES = int(os.environ.get("EDGEPACK_FUZZ_EXAMPLES", "400"))
CASE_SECONDS = 20  # far above a case's real cost (~0.1-0.4 s); only a hang reaches it


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    def handler(signum, frame):
        raise Hang(f"a fuzz case ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_checkpoint):
    from runtime.bundle import Bundle

    good = tiny_bundle(tmp_path_factory, tiny_checkpoint)
    work = tmp_path_factory.mktemp("fuzz")
    b = Bundle.open(good)
    return {"good": good, "work": work, "decoder": b.decoder(threads=1), "manifest": b.manifest}


# ---------------------------------------------------------------------------------------------------------
# Mutations

SPECIAL_VALUES = [
    None,
    True,
    -1,
    0,
    1,
    2**31,
    2**63,
    10**30,
    1e308,
    -1e-300,
    "",
    "../../etc/passwd",
    "/dev/zero",
    "~/.ssh/id_ed25519",
    "a" * 300,
    "\udcff" if False else "\x00",
    "<|im_end|>",
    "{{ raise_exception('x') }}",
    [],
    {},
    [[[[[[[[]]]]]]]],
]
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(SPECIAL_VALUES),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def byte_mutation(data: bytes, draw) -> bytes:
    op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate", "random"]))
    n = len(data)
    i = draw(st.integers(0, max(n - 1, 0)))
    if op == "flip" and n:
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    if op == "insert":
        return data[:i] + draw(st.binary(min_size=1, max_size=16)) + data[i:]
    if op == "delete":
        return data[:i] + data[i + draw(st.integers(1, 64)) :]
    if op == "truncate":
        return data[:i]
    if op == "duplicate":
        j = draw(st.integers(i, min(n, i + 256)))
        return data[:j] + data[i:j] + data[j:]
    return draw(st.binary(max_size=64))


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def structure_mutation(doc, draw):
    """Replace, delete or wrap one value anywhere in a JSON document."""
    paths = list(_paths(doc))
    path = paths[draw(st.integers(0, len(paths) - 1))]
    op = draw(st.sampled_from(["replace", "replace", "delete", "wrap", "add"]))
    if not path:
        return draw(JSON_VALUES) if op == "replace" else [doc]
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if op == "replace":
        parent[key] = draw(JSON_VALUES)
    elif op == "delete":
        del parent[key]
    elif op == "wrap":
        parent[key] = [parent[key]] if draw(st.booleans()) else {"x": parent[key]}
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(JSON_VALUES)
    else:
        parent.append(draw(JSON_VALUES))
    return doc


TEMPLATE_PIECES = [
    "{% for m in messages %}",
    "{% endfor %}",
    "{{ m['content'] }}",
    "{{ m.role }}",
    "<|im_start|>",
    "<|im_end|>",
    "{% if add_generation_prompt %}",
    "{% endif %}",
    "{{ bos_token }}",
    "{{",
    "}}",
    "{%",
    "{{ raise_exception('no') }}",
    "{{ messages[99] }}",
    "{{ 'x' * 99 }}",
    "{{ range(10)|list }}",
    "{% set x = messages|length %}",
    "{{ x // 0 }}",
    "{{ m.content|trim }}",
    "\n",
    "text ",
]

FILES = ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokenizer/generation_config.json"]


def mutate(case: Path, draw) -> str:
    """Mutate one part of the bundle at `case` (a copy of the good one); return what was mutated."""
    target = draw(
        st.sampled_from(
            [
                "manifest-bytes",
                "manifest-struct",
                "manifest-struct",
                "file-bytes",
                "file-struct",
                "file-struct",
                "template",
                "reference",
                "archive-bytes",
                "archive-struct",
            ]
        )
    )
    mpath = case / "bundle" / "manifest.json"
    if target == "manifest-bytes":
        mpath.write_bytes(byte_mutation(mpath.read_bytes(), draw))
    elif target == "manifest-struct":
        mpath.write_text(json.dumps(structure_mutation(json.loads(mpath.read_text()), draw)))
    elif target in ("file-bytes", "file-struct"):
        rel = draw(st.sampled_from(FILES))
        p = case / "bundle" / rel
        if target == "file-bytes":
            p.write_bytes(byte_mutation(p.read_bytes(), draw))
        else:
            p.write_text(json.dumps(structure_mutation(json.loads(p.read_text()), draw)))
        refresh_digest(case / "bundle", rel)
        target += f" {rel}"
    elif target == "template":
        pieces = draw(st.lists(st.sampled_from(TEMPLATE_PIECES), min_size=1, max_size=12))
        (case / "bundle" / "tokenizer" / "chat_template.jinja").write_text("".join(pieces))
        refresh_digest(case / "bundle", "tokenizer/chat_template.jinja")
    elif target == "reference":
        p = case / "bundle" / "reference" / "reference.safetensors"
        p.write_bytes(
            reference_mutation(p.read_bytes(), draw) if draw(st.booleans()) else byte_mutation(p.read_bytes(), draw)
        )
        refresh_digest(case / "bundle", "reference/reference.safetensors")
    elif target == "archive-bytes":
        a = case / "bundle.edgepack"
        a.write_bytes(byte_mutation(a.read_bytes(), draw))
    else:
        archive_mutation(case / "bundle.edgepack", draw)
    return target


def reference_mutation(data: bytes, draw) -> bytes:
    import numpy as np
    from safetensors.numpy import load, save

    t = dict(load(data))
    name = draw(st.sampled_from(sorted(t)))
    op = draw(st.sampled_from(["dtype", "shape", "value", "drop"]))
    if op == "dtype":
        t[name] = t[name].astype(draw(st.sampled_from([np.int8, np.int64, np.float16, np.float64])))
    elif op == "shape":
        t[name] = np.ascontiguousarray(t[name].reshape(-1)[: draw(st.integers(0, t[name].size))])
    elif op == "value" and t[name].size:
        flat = t[name].reshape(-1).copy()
        bad = draw(st.sampled_from([-1, 10**6, float("nan"), float("inf"), 2**31 - 1]))
        try:
            flat[draw(st.integers(0, flat.size - 1))] = bad
        except (OverflowError, ValueError):
            pass
        t[name] = flat.reshape(t[name].shape)
    else:
        del t[name]
    return save(t)


def archive_mutation(archive: Path, draw) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = [(i, zf.read(i)) for i in zf.infolist()]
    op = draw(st.sampled_from(["rename", "drop", "duplicate", "add", "compress", "symlink"]))
    k = draw(st.integers(0, len(members) - 1))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for j, (info, data) in enumerate(members):
            if j == k and op == "drop":
                continue
            if j == k and op == "rename":
                info.filename = draw(
                    st.sampled_from(
                        ["../x", "/abs", "MANIFEST.JSON", "a\\b", "x" * 300, "onnx", "tokenizer/", "manifest.json"]
                    )
                )
            if j == k and op == "compress":
                info.compress_type = zipfile.ZIP_DEFLATED
            if j == k and op == "symlink":
                info.external_attr = 0o120777 << 16
            zf.writestr(info, data)
            if j == k and op == "duplicate":
                zf.writestr(info, data)
        if op == "add":
            zf.writestr(draw(st.sampled_from(["extra.bin", "manifest.sig", "onnx/evil.data"])), b"{}")
    archive.write_bytes(out.getvalue())


# ---------------------------------------------------------------------------------------------------------
# The property


def exercise(source: Path, world) -> str:
    """Open (with digests), generate a two-token chat reply and a raw completion, load the reference and,
    when the claims are the original ones, verify the quick claims; returns "ok"."""
    from runtime.bundle import Bundle
    from runtime.generation import ChatSession, Generator
    from runtime.signing import TrustPolicy
    from runtime.verify import verify_bundle

    b = Bundle.open(source, trust=TrustPolicy())
    b.decoder = lambda threads=None, max_len=None: world["decoder"]  # the ONNX graph is never mutated here
    settings = replace(b.sampling_defaults(), max_new_tokens=2, seed=0)
    gen = Generator(world["decoder"], b.tokenizer, stop_ids=b.stop_ids)
    list(ChatSession(gen, b.tokenizer, b.system_prompt).stream_reply("hi <|im_end|>", settings))
    gen.generate(b.tokenizer.encode_text("Once upon a time"), settings)
    b.reference()
    if b.manifest["quality"] == world["manifest"]["quality"]:
        verify_bundle(b, quick=True, progress=False, threads=1)
    return "ok"


@pytest.mark.filterwarnings("ignore:Duplicate name")  # the archive mutation writes duplicates on purpose
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("EDGEPACK_FUZZ_RANDOM") != "1",
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_mutated_bundles_work_or_fail_with_one_error(world, data):
    case = Path(tempfile.mkdtemp(dir=world["work"]))
    cache = case / "cache"
    old_cache = os.environ.get("EDGEPACK_CACHE")
    os.environ["EDGEPACK_CACHE"] = str(cache)
    try:
        shutil.copytree(world["good"], case / "bundle")
        shutil.copy(world["good"].parent / "bundle.edgepack", case / "bundle.edgepack")
        target = mutate(case, data.draw)
        source = case / ("bundle.edgepack" if target.startswith("archive") else "bundle")
        with time_limit(CASE_SECONDS):
            try:
                outcome = exercise(source, world)
            except EdgepackError as e:
                outcome = "refused"
                assert "\n" not in str(e), f"{target}: a multi-line error: {e!r}"
        assert outcome in ("ok", "refused")
        event(f"{target.split()[0]}: {outcome}")  # pytest --hypothesis-show-statistics shows the mix
    finally:
        if old_cache is None:
            os.environ.pop("EDGEPACK_CACHE", None)
        else:
            os.environ["EDGEPACK_CACHE"] = old_cache
        shutil.rmtree(case, ignore_errors=True)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=os.environ.get("EDGEPACK_FUZZ_RANDOM") != "1",
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_mutated_conversation_files_never_stop_the_chat_store(tmp_path_factory, data):
    """tui.store: whatever a conversation file holds, listing skips it with a warning or loads it."""
    from tui.store import Conversation, ConversationStore

    store = ConversationStore(tmp_path_factory.mktemp("store"))
    good = Conversation(title="fine", messages=[{"role": "user", "content": "hi"}], settings={"top_k": 5})
    store.save(good)
    raw = json.dumps(good.to_dict()).encode()
    if data.draw(st.booleans()):
        bad = byte_mutation(raw, data.draw)
    else:
        bad = json.dumps(structure_mutation(json.loads(raw), data.draw)).encode()
    (store.conv_dir / "mutated.json").write_bytes(bad)
    convs, warnings = store.list_with_warnings()
    assert len(convs) + len(warnings) == 2 and any(c.title == "fine" for c in convs)
    for c in convs:  # what the app reads from a loaded conversation has the right types
        assert isinstance(c.title, str) and all(isinstance(m["content"], str) for m in c.chat_messages())
        assert all(v is None or isinstance(v, (int, float)) for v in c.settings.values())


def _true_depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_true_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_true_depth, value), default=0)
    return 0


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\u00e9\n', max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\k', max_size=3), inner, max_size=3)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_JSON_VALUES, ascii_only=st.booleans())
def test_json_depth_counts_brackets_outside_strings_only(value, ascii_only):
    """runtime.fileio.json_depth (the nesting-bomb check before any parser) equals the real nesting depth,
    whatever brackets, quotes and escapes the strings hold."""
    from runtime.fileio import json_depth

    assert json_depth(json.dumps(value, ensure_ascii=ascii_only)) == _true_depth(value)
