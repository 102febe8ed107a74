"""A tiny but complete bundle, built in the test the way the exporter builds a real one: the imported tiny
GGUF checkpoint (`tiny_checkpoint` fixture: byte-level tokenizer, vocab 288, chat template) → fp32 ONNX
decoder via exporter.onnx_graph.build_decoder → reference top-k log-probs from the PyTorch model (WikiText
windows, and the model's greedy chat replies: compressor.chat_reference) → quality
claims measured on the ONNX model with runtime.verify.measure_quality → exporter.bundle_writer.write_bundle.

Built once per test session (module-level cache); tests that modify a bundle work on `copy_bundle`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from runtime.harness import EvalLimits

FULL = EvalLimits(
    ctx=64,
    ppl_windows=4,
    qa_questions=4,
    qa_max_new_tokens=4,
    chat_prompts=3,
    batch_size=4,
    wikitext="tiny-wikitext",
    triviaqa="tiny-triviaqa",
    chat_max_new_tokens=16,
    chat_prompt_tokens=400,
)
QUICK = EvalLimits(
    ctx=64,
    ppl_windows=2,
    qa_questions=2,
    qa_max_new_tokens=4,
    chat_prompts=2,
    batch_size=4,
    wikitext="tiny-wikitext",
    triviaqa="tiny-triviaqa",
    chat_max_new_tokens=16,
    chat_prompt_tokens=400,
)
TASKS = ("ppl", "closed")  # open book passages do not fit the tiny model's 512-token context
MAX_LEN = 512

_BUILT: dict[str, Path] = {}


def hf_model(checkpoint: Path):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def make_reference(model, tokenizer, limits: EvalLimits, k: int = 16):
    import torch

    from compressor.chat_reference import build_chat_reference
    from runtime import metrics
    from runtime.datasets import wikitext_eval_text
    from runtime.reference import Reference

    windows = metrics.perplexity_windows(
        tokenizer.encode(wikitext_eval_text(limits.wikitext)), limits.ctx, limits.ppl_windows
    )
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.from_numpy(windows)).logits.float(), -1).numpy()[:, :-1]
    ids, lp = metrics.topk_reference(logp.reshape(-1, logp.shape[-1]), k)
    chat = build_chat_reference(model, tokenizer, limits, k, progress=False)
    return Reference(windows, ids.reshape(*logp.shape[:2], k), lp.reshape(*logp.shape[:2], k), chat)


def build_tiny_bundle(checkpoint: Path, work: Path, archive: bool = True) -> Path:
    """The bundle directory (with BUNDLE.edgepack next to it when archive=True)."""
    from exporter.bundle_writer import write_bundle
    from exporter.onnx_graph import GraphOptions, build_decoder, spec_from_hf_config
    from runtime.onnx_engine import OnnxDecoder
    from runtime.tokenizer import TextTokenizer
    from runtime.verify import measure_quality

    model = hf_model(checkpoint)
    weights = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    spec = spec_from_hf_config(model.config, weights)
    onnx_dir = work / "onnx"
    meta = build_decoder(weights, spec, onnx_dir / "model.onnx", GraphOptions(max_len=MAX_LEN), progress=False)
    tokenizer = TextTokenizer(checkpoint)
    reference = make_reference(model, tokenizer, FULL)
    ref_path = work / "reference.safetensors"
    reference.save(ref_path)
    quality = measure_quality(
        OnnxDecoder(onnx_dir / "model.onnx", threads=1),
        tokenizer,
        reference,
        {"full": FULL, "quick": QUICK},
        tasks=TASKS,
        progress=False,
    )
    fields = {
        "model": {
            "name": "tiny-llama-test",
            "source": str(checkpoint),
            "architecture": "llama",
            "parameters": int(sum(v.size for v in weights.values())),
            "vocab_size": spec.vocab_size,
            "layers": spec.n_layers,
        },
        "recipe": {"name": "none", "stages": [{"stage": "export", "projections": "fp32"}]},
        "generation": {
            "eos_token_ids": list(meta["eos_token_ids"]),
            "bos_token_id": meta["bos_token_id"],
            "context_length": MAX_LEN,
            "temperature": 0.7,
            "top_k": 50,
            "top_p": 0.9,
            "repetition_penalty": 1.1,
            "max_new_tokens": 64,
            "system_prompt": "You are tiny.",
        },
        "quality": quality,
        "runtime": {"accuracy_level": meta["weights"]["accuracy_level"]},
        "created_by": "edgepack tests",
    }
    return write_bundle(
        work / "bundle",
        onnx_dir=onnx_dir,
        tokenizer_dir=checkpoint,
        reference_path=ref_path,
        safetensors_dir=None,
        manifest_fields=fields,
        archive=archive,
    )


def tiny_bundle(tmp_path_factory, checkpoint: Path) -> Path:
    """Session-wide cached tiny bundle directory (do not modify it: use copy_bundle)."""
    key = str(checkpoint)
    if key not in _BUILT:
        _BUILT[key] = build_tiny_bundle(Path(checkpoint), tmp_path_factory.mktemp("tiny_bundle"))
    return _BUILT[key]


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def refresh_digest(bundle_dir: Path, rel: str) -> None:
    """Recompute one file's size and sha256 in manifest.json, as a forger would."""
    from runtime.fileio import atomic_write_json, sha256_file

    mpath = bundle_dir / "manifest.json"
    manifest = json.loads(mpath.read_text())
    f = bundle_dir / rel
    manifest["files"][rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    atomic_write_json(mpath, manifest)


def perturb_initializer(bundle_dir: Path, scale: float = 0.5, seed: int = 0) -> str:
    """Add noise (scale × the tensor's std) to the largest float initializer stored in the ONNX external data
    file, in place, and fix the manifest's digest of that file. Returns the initializer's name."""
    import onnx

    onnx_path = bundle_dir / "onnx" / "model.onnx"
    model = onnx.load(str(onnx_path), load_external_data=False)
    best = None
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL or init.data_type != onnx.TensorProto.FLOAT:
            continue
        info = {e.key: e.value for e in init.external_data}
        if best is None or int(info["length"]) > int(best[1]["length"]):
            best = (init.name, info)
    name, info = best
    data_path = onnx_path.parent / info["location"]
    offset, length = int(info.get("offset", 0)), int(info["length"])
    raw = bytearray(data_path.read_bytes())
    w = np.frombuffer(bytes(raw[offset : offset + length]), np.float32).copy()
    w += np.random.default_rng(seed).standard_normal(w.shape).astype(np.float32) * (scale * float(w.std()))
    raw[offset : offset + length] = w.tobytes()
    data_path.write_bytes(bytes(raw))
    refresh_digest(bundle_dir, f"onnx/{info['location']}")
    return name
