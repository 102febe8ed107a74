"""Open a bundle (a directory or a BUNDLE.edgepack archive) and check it before anything is parsed.

SKELETON: the public API below is fixed; bodies are being filled in.
"""
from __future__ import annotations

from pathlib import Path


class Bundle:
    """An opened, digest-checked bundle.

    Attributes: path (the bundle directory; for an archive, its extraction in the cache), manifest (the
    validated manifest.json), tokenizer (runtime.tokenizer.TextTokenizer), onnx_path, reference_path (None
    when the bundle ships no reference)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.tokenizer = None
        self.onnx_path: Path = self.path
        self.reference_path: Path | None = None

    @classmethod
    def open(cls, path, verify_digests: bool = True) -> "Bundle":
        """Open a bundle directory or archive. Every file's size and sha256 is checked against the manifest
        before any file is parsed; any problem raises one EdgepackError naming the file."""
        raise NotImplementedError

    def decoder(self, threads: int | None = None, max_len: int | None = None):
        """A fresh runtime.onnx_engine.OnnxDecoder on the bundle's ONNX model."""
        raise NotImplementedError

    def generator(self, threads: int | None = None):
        """A runtime.generation.Generator with the bundle's stop ids (manifest EOS + tokenizer EOS)."""
        raise NotImplementedError

    def sampling_defaults(self):
        """runtime.generation.SamplingSettings from the manifest's generation block."""
        raise NotImplementedError

    @property
    def system_prompt(self) -> str | None:
        """The manifest's default system prompt (None if it has none)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """For the TUI panel and `edgepack bench`: {"name", "path", "recipe": [stage strings],
        "size_bytes", "size_text", "parameters", "context_length", "quality": [{"name", "label", "value",
        "text"}], "created_by"}."""
        raise NotImplementedError
