"""Prove a refactor of exporter/onnx_graph.py writes the same ONNX bytes: build a set of tiny decoders (the
test fixtures' models under several GraphOptions) and print the sha256 of every model.onnx and .data file.

    python scripts/graph_parity.py OUT.json                       # the current tree
    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before python scripts/graph_parity.py BEFORE.json --src /tmp/before
    diff BEFORE.json OUT.json                                     # empty: byte-identical graphs

ONNX serialization of the same graph is deterministic, so equal digests mean equal graphs. The fixtures
are random-initialized with fixed seeds (tests/conftest.py) and need torch + transformers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "-"


def cases():
    """(name, weights, config, GraphOptions kwargs, eora) for each parity case."""
    import numpy as np
    from conftest import make_tiny_llama
    from test_onnx_graph import channel_pruned, depth_pruned, gptq_weights, numpy_state

    plain = make_tiny_llama("plain")
    w, cfg = numpy_state(plain), plain.config
    llama32 = make_tiny_llama("llama32")
    w32, cfg32 = numpy_state(llama32), llama32.config
    rng = np.random.default_rng(11)
    quant, _ = gptq_weights(w, 32, rng)
    quant_act, _ = gptq_weights(w, 32, np.random.default_rng(12), act_order=True)
    eora = {}
    for i in range(cfg.num_hidden_layers):
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ):
            n, k = w[f"model.layers.{i}.{m}.weight"].shape
            eora[f"model.layers.{i}.{m}"] = (
                rng.standard_normal((4, k)).astype(np.float32) * 0.01,
                rng.standard_normal((n, 4)).astype(np.float32) * 0.01,
            )
    _, wd, cfgd = depth_pruned()
    _, wc, cfgc = channel_pruned()
    yield "fp32", w, cfg, {}, None
    yield "fp32-unfused", w, cfg, {"fuse_qkv": False, "fuse_gate_up": False}, None
    yield "int4-rtn", w, cfg, {"projections": "int4"}, None
    yield "int8-tied-head", w, cfg, {"projections": "int4", "embedding": "int8", "lm_head": "int8"}, None
    yield "int4-embed-int8-head", w, cfg, {"embedding": "int4", "lm_head": "int8"}, None
    yield "llama32-shaped", w32, cfg32, {"projections": "int4", "embedding": "int8", "lm_head": "int8"}, None
    yield "llama32-fp32", w32, cfg32, {}, None
    gptq = {"gptq": "GPTQ"}
    yield "gptq-int4", quant, cfg, gptq, None
    yield "gptq-act-order-eora", quant_act, cfg, {**gptq, "eora_bits": 8}, eora
    yield "gptq-eora-fp32", quant, cfg, gptq, eora
    yield "gptq-eora-int8-separate", quant, cfg, {**gptq, "eora_bits": 8}, eora
    yield (
        "gptq-eora-int8-fused",
        quant,
        cfg,
        {**gptq, "eora_bits": 8, "eora_fuse_a": True, "embedding": "int8", "lm_head": "int8"},
        eora,
    )
    yield (
        "gptq-eora-int4-fused-unfused-qkv",
        quant,
        cfg,
        {**gptq, "eora_bits": 4, "eora_fuse_a": True, "fuse_qkv": False},
        eora,
    )
    yield "depth-pruned", wd, cfgd, {"projections": "int4"}, None
    yield "channel-pruned", wc, cfgc, {"projections": "int4", "lm_head": "int8"}, None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", help="JSON file of digests")
    ap.add_argument("--src", help="source tree to build with (default: this one)")
    args = ap.parse_args()
    root = Path(args.src or Path(__file__).resolve().parents[1])
    sys.path[:0] = [str(root), str(root / "tests")]
    from exporter.onnx_graph import GptqFormat, GraphOptions, build_decoder, spec_from_hf_config

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, weights, config, opts, eora in cases():
            if opts.get("gptq") == "GPTQ":
                opts = {**opts, "gptq": GptqFormat(bits=4, group_size=32, zero_offset=1)}
            path = Path(tmp) / name / "model.onnx"
            meta = build_decoder(
                weights,
                spec_from_hf_config(config, weights),
                path,
                GraphOptions(max_len=96, **opts),
                eora=eora,
                progress=False,
            )
            result[name] = {
                "onnx": digest(path),
                "data": digest(path.parent / "model.onnx.data"),
                "metadata": hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest(),
            }
            print(name, result[name]["onnx"][:16], result[name]["data"][:16], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
