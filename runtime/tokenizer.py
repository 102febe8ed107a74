"""Tokenizer and chat template, from a model's or bundle's tokenizer files.

Both the torch side (compressor) and the ONNX side (runtime) tokenize through this class, so the
quality harness sees exactly the same token ids on both sides.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from runtime.errors import EdgepackError


class TextTokenizer:
    def __init__(self, directory: str | Path):
        directory = Path(directory)
        tok_file = directory / "tokenizer.json"
        if not tok_file.exists():
            raise EdgepackError(f"{tok_file}: tokenizer file not found")
        try:
            self.tok = Tokenizer.from_file(str(tok_file))
        except Exception as e:
            raise EdgepackError(f"{tok_file}: not a valid tokenizers file ({e})") from None
        cfg = {}
        cfg_file = directory / "tokenizer_config.json"
        if cfg_file.exists():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        self.config = cfg
        template = cfg.get("chat_template")
        jinja_file = directory / "chat_template.jinja"
        if template is None and jinja_file.exists():
            template = jinja_file.read_text(encoding="utf-8")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.pad_token = _token_str(cfg.get("pad_token"))
        self.bos_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        pad = self.tok.token_to_id(self.pad_token) if self.pad_token else None
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a chat with the model's own jinja2 template (as transformers does)."""
        if not self.chat_template:
            # No template: a plain transcript the model can still continue.
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join(lines) + ("\nassistant:" if add_generation_prompt else "")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)

        def raise_exception(msg):
            raise EdgepackError(f"chat template: {msg}")

        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:
            raise EdgepackError(f"chat template failed to render: {e}") from None


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):  # older tokenizer_config.json stores AddedToken dicts
        return tok.get("content")
    return tok
