"""ONNX vs torch logits at the Llama-3.2-1B shape (a check run by benchmarks/scale_1b.py, stage `parity`).

    python benchmarks/parity_1b.py fp32 MODEL_DIR
    python benchmarks/parity_1b.py int4 GPTQ_MODEL_DIR [--eora ADAPTER_DIR]

fp32: the float graph (fp32 projections, embedding and head) of the HF checkpoint against transformers on it.
int4: the graph of a GPTQ checkpoint (+ EoRA as exact fp32 factors), with fp32 activations (accuracy_level 1)
and an fp32 embedding/head, against transformers on the dequantized weights (+ B·A): the same numbers, so the
two must agree to float32 rounding. (The shipped bundle uses int8 activations, embedding and head: close, not
equal, and tested on tiny models in tests/test_onnx_graph.py.) Three fixed prompts, every position's logits;
prints one JSON line with the max absolute difference and the top-1 agreement, exit 1 past the tolerance.
The ONNX session is closed before torch loads, so the two copies of the weights are never resident together.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENIZER_IDS = 49152  # prompts use ids the 1B-shaped model's tokenizer (SmolLM2's) can produce
TOLERANCE = {"fp32": 2e-3, "int4": 2e-3}


def onnx_logits(path: Path, meta: dict, ids: np.ndarray) -> np.ndarray:
    """All-position logits of one cache-less forward pass (the graph's own inputs, as runtime.onnx_engine)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    b, t = ids.shape
    feeds = {
        "input_ids": ids.astype(np.int64),
        "seqlens_k": np.full(b, t - 1, np.int32),
        "total_sequence_length": np.array(t, np.int32),
        "logits_positions": np.tile(np.arange(t, dtype=np.int64), (b, 1)),
    }
    for kv in meta["kv_cache"]:
        feeds[kv["past_key"]] = feeds[kv["past_value"]] = np.zeros((b, kv["kv_heads"], 0, meta["head_dim"]), np.float32)
    out = sess.run(["logits"], feeds)[0]
    del sess
    return out


def parity(mode: str, model_dir: Path, eora_dir: Path | None, max_id: int = TOKENIZER_IDS) -> dict:
    import torch
    from safetensors.torch import load_file

    from exporter.onnx_graph import GptqFormat, GraphOptions, build_decoder, spec_from_hf_config

    prompts = np.random.default_rng(12).integers(3, max_id, (3, 24))
    config = json.loads((model_dir / "config.json").read_text())
    with tempfile.TemporaryDirectory(prefix="parity-1b-") as tmp:
        weights = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            weights.update(load_file(str(f)))
        path = Path(tmp) / "model.onnx"
        graph, eora = {}, None
        if mode == "int4":
            from compressor.gptq import read_quantize_config

            q = read_quantize_config(model_dir)
            fmt = str(q.get("checkpoint_format", q.get("format", "gptq"))).lower()
            graph["gptq"] = GptqFormat(
                bits=int(q["bits"]), group_size=int(q["group_size"]), zero_offset=int(fmt == "gptq")
            )
            if eora_dir:
                from compressor.eora import load_eora

                eora = {k: (a.float().numpy(), b.float().numpy()) for k, (a, b) in load_eora(eora_dir).items()}
        options = GraphOptions(max_len=64, embedding="fp32", lm_head="fp32", accuracy_level=1, eora_bits=None, **graph)
        meta = build_decoder(weights, spec_from_hf_config(config, weights), path, options, eora=eora)
        del weights
        gc.collect()
        got = onnx_logits(path, meta, prompts)
    gc.collect()
    if mode == "fp32":
        from compressor.torch_backend import load_causal_lm

        model = load_causal_lm(model_dir)
    else:
        from compressor.gptq import load_quantized

        model = load_quantized(model_dir, device="cpu")
        if eora_dir:
            from compressor.eora import apply_eora_to_dequantized, load_eora

            sd = apply_eora_to_dequantized(model.state_dict(), load_eora(eora_dir))
            model.load_state_dict(sd)
    with torch.no_grad():
        want = model(torch.from_numpy(prompts)).logits.float().numpy()
    diff = float(np.abs(got - want).max())
    return {
        "mode": mode,
        "model": str(model_dir),
        "eora": str(eora_dir) if eora_dir else None,
        "prompts": list(prompts.shape),
        "max_abs_diff": diff,
        "logits_abs_max": float(np.abs(want).max()),
        "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
        "tolerance": TOLERANCE[mode],
        "ok": diff <= TOLERANCE[mode],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["fp32", "int4"])
    ap.add_argument("model_dir")
    ap.add_argument("--eora", help="EoRA adapter directory (int4 mode)")
    ap.add_argument("--max-id", type=int, default=TOKENIZER_IDS, help="prompt token ids are drawn below this")
    args = ap.parse_args()
    result = parity(args.mode, Path(args.model_dir), Path(args.eora) if args.eora else None, args.max_id)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
