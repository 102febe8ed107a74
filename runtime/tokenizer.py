"""Tokenizer and chat template, from a model's or bundle's tokenizer files.

Both the torch side (compressor) and the ONNX side (runtime) tokenize through this class, so the
quality harness sees exactly the same token ids on both sides.

Untrusted input on both ends:
- The files come from a bundle: only those named in `files` are read (the bundle passes the ones its
  manifest lists), JSON goes through runtime.fileio.read_json, and the chat template runs in jinja2's
  immutable sandbox with a step budget (MAX_TEMPLATE_STEPS), an output cap (MAX_RENDERED_CHARS) and caps on
  `*`/`**`, so a template that loops forever or builds a huge string fails with one error line.
- The text comes from a user: `encode_text` and `encode_chat` encode it as plain text, so a special token
  typed by the user (e.g. the template's end-of-turn marker "<|im_end|>") is spelled out in ordinary tokens
  and never acts as a control token; only the template's own markup produces special tokens.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from tokenizers import Tokenizer

from runtime.errors import EdgepackError

MAX_TEMPLATE_STEPS = 2_000_000  # template lines executed per render (a real chat needs a few thousand)
MAX_TEMPLATE_SECONDS = 5.0  # a second guard against slow steps (a single huge join, say)
MAX_RENDERED_CHARS = 8_000_000
MAX_TEMPLATE_CHARS = 1 << 20
# Private-use characters around the index of a protected literal while the template renders (see encode_chat).
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARK = re.compile(f"{_MARK_OPEN}([0-9]+){_MARK_CLOSE}")


class TextTokenizer:
    def __init__(self, directory: str | Path, files: set[str] | None = None):
        """`files`: the file names in `directory` that may be read (None: any; a bundle passes the ones its
        manifest lists, so an unlisted file lying in the directory is never read)."""
        from runtime.fileio import check_json_text, read_json

        directory = Path(directory)

        def readable(name: str) -> bool:
            return (files is None or name in files) and (directory / name).is_file()

        tok_file = directory / "tokenizer.json"
        if not readable("tokenizer.json"):
            raise EdgepackError(f"{tok_file}: tokenizer file not found")
        check_json_text(tok_file)  # size, UTF-8 and nesting bombs first; the Rust parser reports malformed JSON
        try:
            self.tok = Tokenizer.from_file(str(tok_file))
            self._plain = Tokenizer.from_file(str(tok_file))  # the same, with special tokens as plain text
            self._plain.encode_special_tokens = True
        except Exception as e:  # the Rust parser raises its own exception type
            raise EdgepackError(f"{tok_file}: not a valid tokenizers file ({str(e).splitlines()[0][:200]})") from None
        cfg = read_json(directory / "tokenizer_config.json") if readable("tokenizer_config.json") else {}
        if not isinstance(cfg, dict):
            raise EdgepackError(f"{directory / 'tokenizer_config.json'}: must be a JSON object")
        self.config = cfg
        template = cfg.get("chat_template")
        if template is None and readable("chat_template.jinja"):
            template = _read_text(directory / "chat_template.jinja", MAX_TEMPLATE_CHARS)
        self.chat_template: str | None = template if isinstance(template, str) else None
        if self.chat_template is not None and len(self.chat_template) > MAX_TEMPLATE_CHARS:
            raise EdgepackError(f"{directory}: chat template longer than {MAX_TEMPLATE_CHARS} characters")
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.pad_token = _token_str(cfg.get("pad_token"))
        self.bos_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        pad = self.tok.token_to_id(self.pad_token) if self.pad_token else None
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        specials = [t.content for t in self.tok.get_added_tokens_decoder().values() if t.special and t.content]
        # Longest first, so "<|im_end|>" is protected before any shorter special it contains.
        literals = sorted(set(specials) | {_MARK_OPEN}, key=len, reverse=True)
        self._protect = re.compile("|".join(re.escape(s) for s in literals))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Trusted text (evaluation sets, rendered templates): special-token strings become special tokens."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A user's text: special-token strings in it are encoded as plain text, never as control tokens
        (the tokenizer's own BOS is still added with add_special_tokens=True)."""
        check_text(text, "prompt")
        return self._plain.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat rendered with the template, every message's content encoded as plain text.

        Each special-token string inside a content is swapped for a private-use marker before rendering
        (so filters such as `trim` still see the real text), the rendered text is split at the markers, the
        template's text is encoded as usual (its markup gives the special tokens) and each protected
        literal is encoded as plain text. A chat with no special-token strings in it encodes exactly as
        before, in one piece. The template writes any BOS itself (as transformers assumes)."""
        literals: list[str] = []

        def mark(m: re.Match) -> str:
            literals.append(m.group())
            return f"{_MARK_OPEN}{len(literals) - 1}{_MARK_CLOSE}"

        safe = []
        for m in messages:
            content = m.get("content", "")
            check_text(content, f"{m.get('role', 'message')} message")
            safe.append({**m, "content": self._protect.sub(mark, content)})
        text = self.apply_chat_template(safe, add_generation_prompt=add_generation_prompt)
        if not literals:
            return self.encode(text, add_special_tokens=False)
        ids: list[int] = []
        pos = 0
        for m in _MARK.finditer(text):
            i = int(m.group(1))
            if i >= len(literals):
                continue
            ids += self.encode(text[pos : m.start()], add_special_tokens=False) if m.start() > pos else []
            ids += self._plain.encode(literals[i], add_special_tokens=False).ids
            pos = m.end()
        if pos < len(text):
            ids += self.encode(text[pos:], add_special_tokens=False)
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a chat with the model's own jinja2 template (as transformers does), sandboxed and bounded."""
        if not self.chat_template:
            # No template: a plain transcript the model can still continue.
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join(lines) + ("\nassistant:" if add_generation_prompt else "")
        return render_template(
            self.chat_template,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


def check_text(text, what: str) -> str:
    """A user's text must be a str of valid Unicode (no lone surrogates, which is how Python carries bytes
    that were not UTF-8 in argv)."""
    if not isinstance(text, str):
        raise EdgepackError(f"{what}: expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EdgepackError(f"{what}: not valid UTF-8 text (character {e.start})") from None
    return text


def _read_text(path: Path, max_chars: int) -> str:
    try:
        if path.stat().st_size > 4 * max_chars:
            raise EdgepackError(f"{path}: longer than {max_chars} characters")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgepackError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise EdgepackError(f"{path}: cannot read ({e.strerror or e})") from None


class _Budget(Exception):
    pass


def _sandbox():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """jinja2's immutable sandbox, with `*` and `**` refusing results over the output cap (a template
        could otherwise build a string of gigabytes in one expression)."""

        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "**":
                if isinstance(right, (int, float)) and abs(right) > 64:
                    raise _Budget("exponent too large")
                return left**right
            for a, b in ((left, right), (right, left)):
                if isinstance(a, (str, list, tuple)) and isinstance(b, int) and len(a) * max(b, 0) > MAX_RENDERED_CHARS:
                    raise _Budget("a repeated string or list too large")
            return left * right

    return BoundedSandbox(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)


def render_template(source: str, **variables) -> str:
    """Render an untrusted jinja2 template: any error, more than MAX_TEMPLATE_STEPS executed template lines,
    MAX_TEMPLATE_SECONDS, or more than MAX_RENDERED_CHARS of output raises one EdgepackError.

    The step budget is counted with sys.settrace on the template's own compiled frames (jinja2 compiles
    templates to Python functions in "<template>"); written by hand because jinja2's sandbox limits what a
    template may touch, not how long it runs."""
    env = _sandbox()

    def raise_exception(msg):
        raise EdgepackError(f"chat template: {str(msg)[:200]}")

    env.globals["raise_exception"] = raise_exception
    steps = 0
    deadline = time.monotonic() + MAX_TEMPLATE_SECONDS

    def local(frame, event, arg):
        nonlocal steps
        steps += 1
        if steps > MAX_TEMPLATE_STEPS or (steps % 4096 == 0 and time.monotonic() > deadline):
            raise _Budget(f"ran more than {MAX_TEMPLATE_STEPS} steps or {MAX_TEMPLATE_SECONDS:.0f} s")
        return local

    def global_trace(frame, event, arg):
        return local if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    out, size = [], 0
    try:
        template = env.from_string(source)
        sys.settrace(global_trace)
        try:
            for chunk in template.generate(**variables):
                size += len(chunk)
                if size > MAX_RENDERED_CHARS:
                    raise _Budget(f"wrote more than {MAX_RENDERED_CHARS} characters")
                out.append(chunk)
        finally:
            sys.settrace(previous)
    except EdgepackError:
        raise
    except _Budget as e:
        raise EdgepackError(f"chat template stopped: it {e} (refused)") from None
    except Exception as e:  # TemplateError, SecurityError, TypeError, RecursionError, MemoryError ...
        raise EdgepackError(
            f"chat template failed to render ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from None
    return "".join(out)


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):  # older tokenizer_config.json stores AddedToken dicts
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None
