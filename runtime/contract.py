"""What the exporter writes and the runtime reads, defined once: the decoder graph's input/output names, its
metadata key and format, and the tokenizer files a checkpoint or bundle carries.

exporter.onnx_graph builds the graph against these names and runtime.onnx_engine binds them; neither spells
a name of its own. The graph's I/O (batch = rows, seq = this step's tokens):

    input_ids             int64  [batch, seq]
    seqlens_k             int32  [batch]        per row: tokens in the cache after this step, minus 1
    total_sequence_length int32  []             max over rows of seqlens_k + 1
    logits_positions      int64  [batch, n_out] positions within this step's `seq` whose logits are wanted
    past_key_values.{i}.key / .value  float32 [batch, kv_heads_i, past_len, head_dim]  (layers with attention)
    logits                float32 [batch, n_out, vocab]
    present.{i}.key / .value          float32 [batch, kv_heads_i, present_len, head_dim]
"""

from __future__ import annotations

FORMAT = "edgepack.decoder"  # metadata["format"]
FORMAT_VERSION = 1  # metadata["format_version"]
METADATA_KEY = "edgepack"  # the ONNX model's metadata_props key holding the metadata JSON

INPUT_IDS = "input_ids"
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
LOGITS_POSITIONS = "logits_positions"
LOGITS = "logits"

# What the metadata's "inputs" / "outputs" describe (documentation carried inside the graph).
INPUT_DOCS = {
    INPUT_IDS: "int64 [batch, seq]",
    SEQLENS_K: "int32 [batch]: tokens in the cache after this step - 1",
    TOTAL_SEQUENCE_LENGTH: "int32 []: max(seqlens_k) + 1",
    LOGITS_POSITIONS: "int64 [batch, n_out]: positions of this step to compute logits for",
    "past_key_values.{i}.key/.value": "float32 [batch, kv_heads_i, past_len, head_dim]",
}
OUTPUT_DOCS = {
    LOGITS: "float32 [batch, n_out, vocab]",
    "present.{i}.key/.value": "float32 [batch, kv_heads_i, present_len, head_dim]",
}

# Tokenizer files copied with a checkpoint and into a bundle's tokenizer/ (those that exist).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)


def kv_names(layer: int) -> dict[str, str]:
    """The cache tensors of one attention layer, by role (the metadata's "kv_cache" entries use these keys)."""
    return {
        "past_key": f"past_key_values.{layer}.key",
        "past_value": f"past_key_values.{layer}.value",
        "present_key": f"present.{layer}.key",
        "present_value": f"present.{layer}.value",
    }
