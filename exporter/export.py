"""`edgepack export WORKDIR -o BUNDLE`: a finished pipeline run -> a self-checking bundle.

    BUNDLE/
      manifest.json      written last (runtime.manifest schema)
      onnx/              model.onnx + model.onnx.data: the fused int4 decoder (exporter.onnx_graph)
      safetensors/       the GPTQ checkpoint and EoRA adapter as GPTQModel / transformers load them
                         (or the float checkpoint, for recipes without stage 4)
      tokenizer/         tokenizer.json, tokenizer_config.json, chat template
      reference/         top-k log-probabilities of the *source* (uncompressed) model on the evaluation
                         windows, so `edgepack verify` computes KL divergence with no torch and no source;
                         and the source's greedy chat replies with its top-k log-probs on them (chat fidelity)

LoRA is already merged by the pipeline (in float, before GPTQ, mask-aware); EoRA cannot be merged into int4
weights and ships as its own low-rank pair per projection. The quality block of the manifest is measured
here on the ONNX model through the runtime's harness, i.e. with the same code `edgepack verify` runs.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from compressor.workdir import Workdir
from exporter.onnx_graph import GptqFormat, GraphOptions
from runtime.contract import TOKENIZER_FILES
from runtime.errors import EdgepackError
from runtime.fileio import read_json
from runtime.harness import PRESETS, EvalLimits
from runtime.tokenizer import TextTokenizer

CHECKPOINT_FILES = ("config.json", "quantize_config.json", "generation_config.json")


def shipping_graph() -> GraphOptions:
    """The graph a bundle ships with (measured choices, docs/graph_benchmarks.md and README "The last levers"):
    int8 embedding and LM head in blocks of 64 (the tied 49152x576 table is a fifth of SmolLM2; int8 keeps the
    head exact to ~1e-3 at 1/4 the bytes; block 64 halves its fp32 scales, -1.8 MB, for no measurable KL), RTN
    int4 projections for recipes without GPTQ, int8-activation MatMulNBits (accuracy_level 4, fastest on CPU),
    EoRA with A stacked under the int4 weight's kernel and B in 4 bits (-4.9 MB on SmolLM2's main job against
    8 bits, full KL 0.0573 -> 0.0582, decode 1.10x with the head change), one B kernel per fused part so that
    no zero block is stored (-2.9 MB, the same numbers, decode 0.98x)."""
    return GraphOptions(
        max_len=2048,
        embedding="int8",
        lm_head="int8",
        head_block_size=64,
        projections="int4",
        accuracy_level=4,
        eora_bits=4,
        eora_fuse_a=True,
        eora_split_b=True,
    )


@dataclass
class ExportOptions:
    graph: GraphOptions = field(default_factory=shipping_graph)  # gptq is filled in from the checkpoint
    limits: str | EvalLimits = "standard"  # limits of the claimed quality (a preset name or EvalLimits)
    quick_limits: str | EvalLimits = "quick"  # the second, smaller claim that `edgepack verify --quick` checks
    reference_k: int = 32
    archive: bool = True


def _load_weights(model_dir: Path) -> dict:
    from safetensors.numpy import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise EdgepackError(f"{model_dir}: no safetensors weights")
    weights = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def _eora_numpy(adapter_dir: Path) -> dict:
    from compressor.eora import load_eora

    return {name: (a.float().numpy(), b.float().numpy()) for name, (a, b) in load_eora(adapter_dir).items()}


def build_onnx(workdir: Path, summary: dict, out_dir: Path, options: ExportOptions) -> dict:
    """Write onnx/model.onnx for the run's final model; returns the graph metadata."""
    from exporter.onnx_graph import build_decoder, spec_from_hf_config

    dirs = Workdir(workdir).stage_dirs(summary)
    eora = None
    if "gptq" in dirs:
        model_dir = dirs["gptq"] / "model"
        qcfg = read_json(model_dir / "quantize_config.json")
        # act-order checkpoints need nothing here: g_idx travels with the weights and the re-packing
        # permutes K accordingly (exporter.int4)
        fmt = str(qcfg.get("checkpoint_format", qcfg.get("format", "gptq"))).lower()
        gptq = GptqFormat(
            bits=int(qcfg["bits"]), group_size=int(qcfg["group_size"]), zero_offset=1 if fmt == "gptq" else 0
        )
        if "eora" in dirs:
            eora = _eora_numpy(dirs["eora"] / "adapter")
    else:
        model_dir = Path(summary["final_model"])
        gptq = None
    weights = _load_weights(model_dir)
    config = read_json(model_dir / "config.json")
    spec = spec_from_hf_config(config, weights)
    # GPTQ codes are re-packed as they are: RTN applies only to recipes without GPTQ
    graph_options = replace(options.graph, gptq=gptq, projections="keep" if gptq else options.graph.projections)
    meta = build_decoder(weights, spec, out_dir / "onnx" / "model.onnx", graph_options, eora=eora)
    meta["source_checkpoint"] = str(model_dir)
    return meta


def copy_checkpoints(workdir: Path, summary: dict, out_dir: Path) -> None:
    """safetensors/: the GPTQ checkpoint (or the float one) and the EoRA adapter, minus logs."""
    dirs = Workdir(workdir).stage_dirs(summary)
    model_dir = dirs["gptq"] / "model" if "gptq" in dirs else Path(summary["final_model"])
    dst = out_dir / "safetensors"
    dst.mkdir(parents=True)
    for f in sorted(model_dir.iterdir()):
        if f.suffix == ".safetensors":
            _copy_as_fp16(f, dst / f.name)
        elif f.name in CHECKPOINT_FILES or f.name in TOKENIZER_FILES:
            shutil.copy2(f, dst / f.name)
    if "eora" in dirs:
        adapter = dst / "eora"
        adapter.mkdir()
        for f in sorted((dirs["eora"] / "adapter").iterdir()):
            if f.suffix in (".safetensors", ".json"):
                shutil.copy2(f, adapter / f.name)
        cfg_file = adapter / "adapter_config.json"
        if cfg_file.exists():  # gptqmodel records the absolute local path of the float model: make it relative
            cfg = json.loads(cfg_file.read_text())
            cfg["base_model_name_or_path"] = ".."
            cfg_file.write_text(json.dumps(cfg, indent=2))


def _copy_as_fp16(src: Path, dst: Path) -> None:
    """Copy a checkpoint file with its float32 tensors (embedding, norms: gptqmodel saves what it loaded,
    float32 here) stored as float16, as HF releases are: the tied 49152x576 embedding alone is 113 MB in
    float32. Quantized tensors (int32 codes, fp16 scales) are copied as they are."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(src), framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()}
    save_file(tensors, str(dst), metadata=meta)


def export_run(workdir: str | Path, out_dir: str | Path, options: ExportOptions | None = None, log=print) -> Path:
    """Export the finished run in `workdir` into the bundle directory `out_dir` (and `out_dir`.edgepack)."""
    from compressor.pipeline import reference_for
    from exporter.bundle_writer import write_bundle
    from runtime.onnx_engine import OnnxDecoder
    from runtime.verify import measure_quality

    options = options or ExportOptions()
    workdir, out_dir = Path(workdir), Path(out_dir)
    summary = Workdir(workdir).summary()
    source = Path(summary["recipe"]["model"])
    limits = PRESETS[options.limits] if isinstance(options.limits, str) else options.limits
    quick = PRESETS[options.quick_limits] if isinstance(options.quick_limits, str) else options.quick_limits
    stage_dir = Path(tempfile.mkdtemp(prefix=".export-", dir=workdir))
    try:
        log("building the ONNX decoder graph")
        graph = build_onnx(workdir, summary, stage_dir, options)
        copy_checkpoints(workdir, summary, stage_dir)
        tok_dir = stage_dir / "tokenizer"
        tok_dir.mkdir()
        for name in TOKENIZER_FILES:
            if (source / name).exists():
                shutil.copy2(source / name, tok_dir / name)
        tokenizer = TextTokenizer(tok_dir)
        log(f"reference log-probabilities of the source model {source}")
        reference = reference_for(source, workdir, limits, tokenizer, log=log, k=options.reference_k)
        ref_path = stage_dir / "reference" / "reference.safetensors"
        ref_path.parent.mkdir()
        if wants_chat(limits, tokenizer):
            from compressor.chat_reference import chat_reference_for

            log(f"greedy chat replies of the source model ({limits.chat_prompts or 'all'} prompts, cached)")
            reference.chat = chat_reference_for(source, workdir, limits, tokenizer, k=options.reference_k, log=log)
        reference.save(ref_path)
        log(f"measuring the ONNX model ({limits.describe()})")
        decoder = OnnxDecoder(stage_dir / "onnx" / "model.onnx", pad_id=tokenizer.pad_id)
        quality = measure_quality(decoder, tokenizer, reference, {"full": limits, "quick": quick})
        del decoder
        fields = manifest_fields(summary, graph, quality, tokenizer, source, options)
        bundle = write_bundle(
            out_dir,
            onnx_dir=stage_dir / "onnx",
            tokenizer_dir=tok_dir,
            reference_path=ref_path,
            safetensors_dir=stage_dir / "safetensors",
            manifest_fields=fields,
            archive=options.archive,
        )
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
    return bundle


def wants_chat(limits: EvalLimits, tokenizer: TextTokenizer) -> bool:
    """Chat fidelity claims need a chat template; --chat-prompts 0 turns them off (limits made before the
    chat metric existed carry no chat sizes and count as off)."""
    return bool(tokenizer.chat_template) and getattr(limits, "chat_prompts", 0) != 0


def manifest_fields(
    summary: dict, graph: dict, quality: dict, tokenizer: TextTokenizer, source: Path, options: ExportOptions
) -> dict:
    from importlib.metadata import version

    import onnxruntime

    from runtime.generation import SamplingSettings

    import_record = source / "edgepack_import.json"
    source_info = read_json(import_record) if import_record.exists() else {"path": str(source)}
    params = next((s["params"] for s in reversed(summary["stages"]) if s.get("params")), None)
    dense = int(params["dense"]) if params else int(source_info.get("parameters", 0))
    nonzero = params.get("nonzero") if params else dense
    layers = graph.get("num_layers")
    sampling = SamplingSettings()  # the bundle's suggested sampling: the runtime's defaults
    return {
        "model": {
            "name": summary["recipe"].get("name"),
            "source": source_info,
            "architecture": graph.get("architecture", "LlamaForCausalLM"),  # exporter.families
            "parameters": dense,
            "parameters_nonzero": int(nonzero) if nonzero is not None else None,
            "vocab_size": graph.get("vocab_size"),
            "layers": layers,
            "hidden_size": graph.get("hidden_size"),
            "head_dim": graph.get("head_dim"),
            "graph": graph,
        },
        "recipe": {
            "name": summary["recipe"].get("name"),
            "description": summary["description"],
            "recipe": summary["recipe"],
            "stages": summary["stages"],
        },
        "generation": {
            "eos_token_ids": list(graph.get("eos_token_ids") or []),
            "bos_token_id": graph.get("bos_token_id"),
            "context_length": int(graph["max_len"]),
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "repetition_penalty": sampling.repetition_penalty,
            "max_new_tokens": sampling.max_new_tokens,
        },
        "quality": quality,
        "runtime": {
            "requires": {"onnxruntime": ">=1.20"},
            "accuracy_level": options.graph.accuracy_level,
            "built_with": {"onnxruntime": onnxruntime.__version__},
        },
        "tokenizer": {
            "chat_template": bool(tokenizer.chat_template),
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "vocab_size": tokenizer.vocab_size,
        },
        "created_by": f"edgepack {version('edgepack')}",
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
