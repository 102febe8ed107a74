"""The whole edgepack chain on the Llama-3.2-1B-shaped model (benchmarks/make_llama_1b.py), stage by stage,
with each stage's wall time and peak RSS. Resumable: a stage already recorded in the JSON is skipped.

    flock /work/heavy.lock python benchmarks/scale_1b.py [--stages depth,width] [--json docs/scale_1b.json]

Stages, in order: make (the checkpoint), depth, width, lora, gptq (the recipe `D2+W1:8 lora=wikitext
quant=eora` with small budgets, see BUDGETS), export_gptq (the bundle without EoRA), eora, export (with EoRA),
export_int4head (with EoRA, int4 embedding and LM head), export_b32 (that one with GPTQ's blocks split to 32), verify (`edgepack verify --quick`), bench (`edgepack
bench`), then in the benchmark environment (/work/benchenv, never an edgepack dependency): gguf (llama.cpp's convert_hf_to_gguf.py, F16), genai (onnxruntime-genai's builder,
int4), decode (benchmarks/bench_decode.py: both bundles, llama.cpp Q4_0 / Q4_K_M quantized by llama.cpp from
the F16 GGUF, genai; 1 and 2 threads; docs/bench_decode_1b.json), parity_fp32 / parity_int4 (ONNX logits vs
torch at the 1B shape, benchmarks/parity_1b.py).
Every stage runs as its own process under `/usr/bin/time -v`, so its peak RSS is that process's own maximum
resident set (what a 16 GB laptop must hold), not this driver's. A compress stage is the pipeline run with the
recipe cut after that stage: the pipeline's fingerprints make it reuse the stages before it, so each process
does exactly one stage (plus loading its input). Per-stage evaluation is off: quality on random weights
means nothing (the export still measures the bundle's claims, on the `quick` limits).

Run it in pieces (`--stages`), each under the heavy lock; a stage that fails is recorded with its exit code
and the tail of its log, and the next call retries it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = ROOT / "models" / "Llama-3.2-1B-shaped"
WORKDIR = ROOT / "models" / "runs" / "scale-1b-D2-W1-8-lora-eora"
BUNDLE = ROOT / "models" / "bundles" / "Llama-3.2-1B-shaped-D2-W1-8-lora-eora"
BUNDLE_NO_EORA = ROOT / "models" / "bundles" / "Llama-3.2-1B-shaped-D2-W1-8-lora-gptq"
# The EoRA bundle again with an int4 embedding / LM head (`edgepack export --embedding int4 --lm-head int4`): the
# tied 128,256 x 2048 head is a third of what a 1B token reads at int8; onnxruntime-genai's builder makes it int4.
BUNDLE_INT4_HEAD = ROOT / "models" / "bundles" / "Llama-3.2-1B-shaped-D2-W1-8-lora-eora-int4head"
# ...and with GPTQ's group-128 blocks split into blocks of 32 (`--max-gptq-block 32`: the same weights, faster kernels)
BUNDLE_B32 = ROOT / "models" / "bundles" / "Llama-3.2-1B-shaped-D2-W1-8-lora-eora-int4head-b32"
INT4_HEAD = {"embedding": "int4", "lm_head": "int4"}
# export stage -> (the compress stage it exports, the bundle, GraphOptions changed from the shipping graph)
EXPORT_STAGES = {
    "export_gptq": ("gptq", BUNDLE_NO_EORA, {}),
    "export": ("eora", BUNDLE, {}),
    "export_int4head": ("eora", BUNDLE_INT4_HEAD, INT4_HEAD),
    "export_b32": ("eora", BUNDLE_B32, {**INT4_HEAD, "max_gptq_block": 32}),
}
BENCH_DIR = ROOT / "models" / "bench" / "scale-1b"
# The peers get the same weights as the bundle: the float checkpoint GPTQ quantized (depth- and width-pruned,
# LoRA merged; 14 layers), not the 16-layer source.
PEER_SOURCE = WORKDIR / "03-lora" / "model"
GGUF_F16 = BENCH_DIR / "Llama-3.2-1B-shaped.F16.gguf"
GENAI_DIR = BENCH_DIR / "genai-int4"
BENCHENV = Path(os.environ.get("EDGEPACK_BENCHENV", "/work/benchenv"))
PRESET = "D2+W1:8 lora=wikitext quant=eora"
COMPRESS_STAGES = ("depth", "width", "lora", "gptq", "eora")
STAGES = (
    "make",
    "depth",
    "width",
    "lora",
    "gptq",
    "export_gptq",  # the bundle without EoRA, for the decode comparison
    "eora",
    "export",
    "export_int4head",  # the EoRA bundle with an int4 embedding / head, for the decode comparison
    "export_b32",  # that one with GPTQ's blocks split to 32
    "verify",
    "bench",
    "gguf",  # llama.cpp's convert_hf_to_gguf.py on the same HF directory (benchmark environment)
    "genai",  # onnxruntime-genai's builder, int4, on the same HF directory (benchmark environment)
    "decode",  # benchmarks/bench_decode.py: every engine, 1 and 2 threads
    "parity_fp32",  # benchmarks/parity_1b.py: fp32 graph of the source vs transformers
    "parity_int4",  # the GPTQ + EoRA graph (fp32 activations) vs transformers on the dequantized weights
)
# Small budgets: the point is time and memory at the 1B shape, not quality (random weights).
BUDGETS = {
    "calibration": {"samples": 2, "seqlen": 256, "batch_size": 2},  # depth scoring and WANDA (2 x 256 tokens)
    "lora": {"samples": 4, "batch_size": 2, "seqlen": 256},  # 2 LoRA steps
    "gptq": {"samples": 8, "seqlen": 512},  # 32 x 512 did not fit the session's shared-CPU time
    "eora": {"samples": 8, "seqlen": 512},
}


def scale_recipe(upto: str | None = None):
    """The recipe with the small budgets; `upto` cuts it after that stage (later stages absent)."""
    import dataclasses

    from compressor.recipe import parse_preset

    recipe = parse_preset(PRESET, model=str(MODEL))
    recipe.name = WORKDIR.name
    for section, values in BUDGETS.items():
        setattr(recipe, section, dataclasses.replace(getattr(recipe, section), **values))
    if upto is not None:
        for later in COMPRESS_STAGES[COMPRESS_STAGES.index(upto) + 1 :]:
            setattr(recipe, later, None)
    return recipe


def run_compress_stage(stage: str) -> int:
    """Inside the stage's own process: the pipeline up to `stage`, no evaluation (reuses finished stages and
    leaves the work directory's summary at `stage`); export_gptq / export: then export that summary."""
    from compressor.pipeline import run_pipeline

    upto = EXPORT_STAGES[stage][0] if stage in EXPORT_STAGES else stage
    log = lambda m: print(m, flush=True)  # noqa: E731
    summary = run_pipeline(scale_recipe(upto), workdir=WORKDIR, final_eval=False, stage_eval=False, log=log)
    if stage.startswith("export"):
        import dataclasses

        from exporter.export import ExportOptions, export_run, shipping_graph

        _, bundle, changes = EXPORT_STAGES[stage]
        graph = dataclasses.replace(shipping_graph(), **changes)
        export_run(WORKDIR, bundle, ExportOptions(graph, limits="quick", archive=False), log=log)
    print(json.dumps({"final_model": summary["final_model"]}))
    return 0


def measured_bundle() -> Path:
    """The EoRA bundle, or the GPTQ one where the EoRA stage has not run (verify, bench and decode use it)."""
    return BUNDLE if BUNDLE.exists() or not BUNDLE_NO_EORA.exists() else BUNDLE_NO_EORA


def extra_bundles() -> list[Path]:
    """Decoded beside the measured bundle: the GPTQ bundle and the int4-head one, where they exist."""
    if measured_bundle() != BUNDLE:
        return []
    return [b for b in (BUNDLE_NO_EORA, BUNDLE_INT4_HEAD, BUNDLE_B32) if b.exists()]


def stage_command(stage: str) -> list[str]:
    py, edgepack = sys.executable, str(Path(sys.executable).with_name("edgepack"))
    if stage == "make":
        return [py, str(ROOT / "benchmarks" / "make_llama_1b.py"), "-o", str(MODEL)]
    if stage in COMPRESS_STAGES or stage.startswith("export"):
        return [py, __file__, "--run-stage", stage]
    if stage == "verify":
        return [edgepack, "verify", str(measured_bundle()), "--quick"]
    if stage == "bench":
        return [edgepack, "bench", str(measured_bundle()), "--json"]
    bench_py = str(BENCHENV / "venv" / "bin" / "python")
    if stage == "gguf":
        convert = BENCHENV / "src" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
        return [bench_py, str(convert), str(PEER_SOURCE), "--outtype", "f16", "--outfile", str(GGUF_F16)]
    if stage == "genai":
        builder = ["-m", "onnxruntime_genai.models.builder", "-m", str(PEER_SOURCE), "-o", str(GENAI_DIR)]
        return [bench_py, *builder, "-p", "int4", "-e", "cpu", "-c", str(BENCH_DIR / "genai-cache")]
    if stage == "decode":
        return [
            py,
            str(ROOT / "benchmarks" / "bench_decode.py"),
            str(measured_bundle()),
            *[a for b in extra_bundles() for a in ("--extra-bundle", str(b))],
            "--gguf-source",
            str(GGUF_F16),
            "--quantize",
            "Q4_0,Q4_K_M",
            "--ortgenai-dir",
            str(GENAI_DIR),
            "--bench-python",
            bench_py,
            "--repeats",
            "2",
            "--work-dir",
            str(BENCH_DIR),
            "--json",
            str(ROOT / "docs" / "bench_decode_1b.json"),
        ]
    if stage == "parity_fp32":
        return [py, str(ROOT / "benchmarks" / "parity_1b.py"), "fp32", str(MODEL)]
    if stage == "parity_int4":
        gptq = next(WORKDIR.glob("*-gptq"), WORKDIR / "missing_gptq") / "model"
        eora = next(WORKDIR.glob("*-eora"), WORKDIR / "missing_eora") / "adapter"
        return [py, str(ROOT / "benchmarks" / "parity_1b.py"), "int4", str(gptq), "--eora", str(eora)]
    raise ValueError(stage)


def timed(cmd: list[str], log_path: Path) -> dict:
    """Run `cmd` under /usr/bin/time -v; wall seconds, peak RSS of that process, exit code."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "GPTQMODEL_CPU_WORKERS": "2"}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(int(m.group(1)) * 1024 / 1e9, 2) if m else None,
        "exit_code": rc,
        "log_tail": text.splitlines()[-25:] if rc else None,
    }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def stage_facts(stage: str, log_path: Path) -> dict:
    facts = {}
    if stage == "make":
        facts["checkpoint_bytes"] = dir_bytes(MODEL)
    if stage in COMPRESS_STAGES:
        record = next(WORKDIR.glob(f"*-{stage}/record.json"), None)
        if record:
            rec = json.loads(record.read_text())
            facts["stage_seconds"] = rec.get("seconds")
            facts.update({k: rec[k] for k in ("dropped", "dropped_layers", "steps", "loss") if k in rec})
    bundle = EXPORT_STAGES[stage][1] if stage in EXPORT_STAGES else None
    if bundle and bundle.exists():
        facts["bundle_bytes"] = dir_bytes(bundle)
        facts["onnx_bytes"] = sum(f.stat().st_size for f in bundle.rglob("*.onnx*") if f.is_file())
    if stage == "gguf" and GGUF_F16.exists():
        facts["gguf_bytes"] = GGUF_F16.stat().st_size
    if stage == "genai" and GENAI_DIR.exists():
        facts["genai_bytes"] = dir_bytes(GENAI_DIR)
    if stage.startswith("parity"):
        lines = [x for x in log_path.read_text(errors="replace").splitlines() if x.startswith('{"mode"')]
        if lines:
            facts["parity"] = json.loads(lines[-1])
    if stage in ("verify", "bench", "decode"):
        facts["bundle"] = measured_bundle().name
    if stage == "bench":
        text = log_path.read_text(errors="replace")
        start = text.find("{")
        try:
            facts["bench"] = json.JSONDecoder().raw_decode(text[start:])[0]
        except (ValueError, IndexError):
            pass
    return facts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    ap.add_argument("--json", default=str(ROOT / "docs" / "scale_1b.json"))
    ap.add_argument("--redo", action="store_true", help="run the stages again even if recorded")
    ap.add_argument("--table", action="store_true", help="print the README's stage table from the JSON and stop")
    ap.add_argument("--run-stage", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_stage:
        return run_compress_stage(args.run_stage)
    if args.table:
        print_stage_table(json.loads(Path(args.json).read_text()))
        return 0

    from runtime.fileio import atomic_write_json

    out = Path(args.json)
    data = json.loads(out.read_text()) if out.exists() else {}
    data.setdefault("model", "Llama-3.2-1B-shaped, seeded random weights (benchmarks/make_llama_1b.py)")
    data.update({"preset": PRESET, "budgets": BUDGETS, "cpu": _cpu_name()})
    data.setdefault("stages", {})
    logs = WORKDIR.parent / "scale-1b-logs"
    logs.mkdir(parents=True, exist_ok=True)
    BENCH_DIR.mkdir(parents=True, exist_ok=True)  # the converter and the builder write into it
    for stage in args.stages.split(","):
        if stage not in STAGES:
            sys.exit(f"unknown stage {stage!r} ({', '.join(STAGES)})")
        done = data["stages"].get(stage, {})
        if done.get("exit_code") == 0 and not args.redo:
            print(f"{stage}: recorded earlier ({done['wall_s']} s, {done['peak_rss_gb']} GB), skipping")
            continue
        print(f"{stage}: running ({' '.join(stage_command(stage))})", flush=True)
        log_path = logs / f"{stage}.log"
        result = timed(stage_command(stage), log_path)
        result.update(stage_facts(stage, log_path))
        result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        result["load_average"] = os.getloadavg()[0]
        data["stages"][stage] = result
        atomic_write_json(out, data)
        print(f"{stage}: exit {result['exit_code']}, {result['wall_s']} s, peak RSS {result['peak_rss_gb']} GB")
        if result["exit_code"]:
            print("\n".join(result["log_tail"] or []))
            return 1
    return 0


def print_stage_table(data: dict) -> None:
    """Markdown: wall time, peak RSS of the stage's own process, and what it made, per recorded stage."""
    print(f"{data.get('cpu', '?')}; preset `{data.get('preset')}`")
    print("| stage | wall | peak RSS | notes |")
    print("| --- | ---: | ---: | --- |")
    for stage, r in data.get("stages", {}).items():
        notes = []
        if r.get("exit_code"):
            notes.append(f"FAILED (exit {r['exit_code']})")
        if r.get("stage_seconds") is not None:
            notes.append(f"stage {r['stage_seconds']:.0f} s")
        for key, label in (("checkpoint_bytes", "checkpoint"), ("bundle_bytes", "bundle"), ("onnx_bytes", "ONNX")):
            if r.get(key):
                notes.append(f"{label} {r[key] / 1e9:.2f} GB")
        for key, label in (("gguf_bytes", "F16 GGUF"), ("genai_bytes", "genai int4")):
            if r.get(key):
                notes.append(f"{label} {r[key] / 1e9:.2f} GB")
        if r.get("dropped_layers") or r.get("dropped"):
            notes.append(f"dropped layers {r.get('dropped_layers') or r.get('dropped')}")
        if r.get("parity"):
            notes.append(", ".join(f"{k} {v}" for k, v in r["parity"].items() if k != "mode"))
        wall = f"{int(r['wall_s'] // 60)} min {r['wall_s'] % 60:.0f} s"
        print(f"| {stage} | {wall} | {r['peak_rss_gb']} GB | {'; '.join(notes)} |")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return f"unknown CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
