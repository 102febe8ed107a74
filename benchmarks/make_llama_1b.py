"""A Llama-3.2-1B-shaped checkpoint with seeded random weights, for scale benchmarks (not a product command).

    python benchmarks/make_llama_1b.py [-o models/Llama-3.2-1B-shaped] [--seed 0] [--check]

The architecture is Llama-3.2-1B's exactly (hidden 2048, FFN 8192, 16 layers, 32 heads, 8 KV heads, head_dim 64,
vocabulary 128,256, tied embeddings, rope theta 500,000 with llama3 scaling factor 32, low/high frequency factors
1/4, original max positions 8192): time, memory, size and decode speed measured on it are real. Its weights are
random (normal, std 0.02 = the config's initializer_range; norms 1): every quality figure on it means nothing.

Tokenizer: Llama-3.2's is not reachable offline, so the directory carries SmolLM2-135M-Instruct's tokenizer (from
`edgepack import`, models/SmolLM2-135M-Instruct). Its 49,152 ids all lie below the 128,256-row vocabulary, so
every token it produces has an embedding row; rows 49,152 and above are simply never produced by the tokenizer
(the model can still predict them). bos/eos/pad ids in config.json are the tokenizer's (1, 2, 2), not Llama's.

The weights are written as one bf16 safetensors file (2.47 GB), tensor by tensor: the header is computed from the
shapes first, then each tensor is drawn, written and dropped, so the whole model never sits in memory (neither
safetensors' save_file nor transformers' save_pretrained streams; the format itself is 8 bytes of header length,
a JSON header, then the raw tensors, written here by hand). `--check` loads it with transformers and runs one
forward pass, printing each layer's hidden-state std (all finite) - about 5 GB of float32 RAM.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_SOURCE = ROOT / "models" / "SmolLM2-135M-Instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2048, 8192, 16, 32, 8, 64, 128256
INIT_STD = 0.02


def llama_1b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        hidden_act="silu",
        max_position_embeddings=131072,
        initializer_range=INIT_STD,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint in file order (tied embeddings: no lm_head.weight)."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (HIDDEN,),
                p + "self_attn.q_proj.weight": (q, HIDDEN),
                p + "self_attn.k_proj.weight": (kv, HIDDEN),
                p + "self_attn.v_proj.weight": (kv, HIDDEN),
                p + "self_attn.o_proj.weight": (HIDDEN, q),
                p + "post_attention_layernorm.weight": (HIDDEN,),
                p + "mlp.gate_proj.weight": (FFN, HIDDEN),
                p + "mlp.up_proj.weight": (FFN, HIDDEN),
                p + "mlp.down_proj.weight": (HIDDEN, FFN),
            }
        )
    shapes["model.norm.weight"] = (HIDDEN,)
    return shapes


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_bf16_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> int:
    """Stream seeded random bf16 tensors into one safetensors file; returns the parameter count."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        nbytes = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    gen = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=gen) * INIT_STD).to(torch.bfloat16)
            f.write(t.view(torch.int16).numpy().tobytes())
            del t
    tmp.replace(path)
    return sum(_numel(s) for s in shapes.values())


def make(out: Path, seed: int) -> Path:
    missing = [f for f in TOKENIZER_FILES if not (TOKENIZER_SOURCE / f).exists()]
    if missing:
        sys.exit(f"{TOKENIZER_SOURCE}: missing {', '.join(missing)} (run `edgepack import` first)")
    out.mkdir(parents=True, exist_ok=True)
    params = write_bf16_safetensors(out / "model.safetensors", tensor_shapes(), seed)
    config = llama_1b_config()
    config.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_SOURCE / name, out / name)
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}, indent=2) + "\n"
    )
    (out / "README.md").write_text(
        "Llama-3.2-1B-shaped model with seeded random weights "
        f"(benchmarks/make_llama_1b.py, seed {seed}, std {INIT_STD}, {params:,} parameters, bf16).\n"
        "Tokenizer: SmolLM2-135M-Instruct's (49,152 ids < vocabulary 128,256). Quality figures on it mean nothing.\n"
    )
    return out


def check(out: Path) -> dict:
    """One forward pass in float32: per-layer hidden-state std, all finite."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) <= VOCAB, "tokenizer ids must stay below the vocabulary"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 4)])
    with torch.no_grad():
        res = model(ids, output_hidden_states=True)
    stds = [round(float(h.std()), 4) for h in res.hidden_states]
    finite = all(bool(torch.isfinite(h).all()) for h in res.hidden_states) and bool(torch.isfinite(res.logits).all())
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "hidden_std_per_layer": stds,
        "logits_std": round(float(res.logits.std()), 4),
        "finite": finite,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default=str(ROOT / "models" / "Llama-3.2-1B-shaped"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="load it and run one forward pass (about 5 GB RAM)")
    args = ap.parse_args()
    out = Path(args.output)
    if not (out / "model.safetensors").exists():
        make(out, args.seed)
        print(f"wrote {out}")
    if args.check:
        result = check(out)
        print(json.dumps(result))
        return 0 if result["finite"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
