"""The runtime's subcommands: `generate`, `verify`, `bench`, `sign`, `keygen`. edgepack/cli.py registers them with
`add_runtime_commands(sub)`; each handler imports what it needs when it runs, so `--help` stays instant."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


DRAFT_CHOICES = ("none", "auto", "lookup", "model")
DRAFT_HELP = (
    "speculative decoding (default auto): 'lookup' guesses from the prompt and conversation, 'model' uses the "
    "bundle's draft model, 'auto' the draft model where its measured acceptance pays, else lookup, for greedy "
    "requests only (--temperature 0); 'none' turns it off. It changes the speed, never the output: greedy "
    "tokens are the same with or without it, sampling keeps the model's distribution (README: Speculative "
    "decoding)"
)


def add_runtime_commands(subparsers) -> None:
    p = subparsers.add_parser("generate", help="stream a reply from a bundle (ONNX runtime, no torch)")
    p.add_argument("bundle", help="bundle directory or .edgepack archive")
    p.add_argument("prompt", nargs="?", default="-", help="prompt text ('-' or omitted: read stdin)")
    p.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    p.add_argument("--system", help="system prompt (default: the bundle's)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the bundle's)")
    p.add_argument("--top-k", type=int, help="0 = off")
    p.add_argument("--top-p", type=float, help="1 = off")
    p.add_argument("--repetition-penalty", type=float, help="1 = off")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--seed", type=int, help="same seed, prompt and settings = same output")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); never printed")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")
    p.add_argument("--draft", choices=DRAFT_CHOICES, default="auto", help=DRAFT_HELP)
    add_trust_args(p)
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("verify", help="re-measure a bundle's quality claims here; exit 1 on any failure")
    p.add_argument("bundle", help="bundle directory or .edgepack archive")
    p.add_argument("--quick", action="store_true", help="check the manifest's quick claims (its smaller limits)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON on stdout")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    add_trust_args(p)
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("bench", help="load time, time to first token, prefill/decode tokens/s, memory")
    p.add_argument("bundle", help="bundle directory or .edgepack archive")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument(
        "--no-bandwidth",
        action="store_true",
        help="skip measuring memory bandwidth (the decode limit; a few seconds and 1 GiB of RAM)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument(
        "--draft",
        choices=DRAFT_CHOICES,
        default="none",
        help="also time speculative decoding with this draft, interleaved with plain decoding "
        "(auto: the bundle's draft model if it has one, else prompt lookup)",
    )
    add_trust_args(p)
    p.set_defaults(func=cmd_bench)

    p = subparsers.add_parser("sign", help="sign a bundle's manifest with your Ed25519 key (writes manifest.sig)")
    p.add_argument("bundle", help="bundle directory (its .edgepack archive beside it is re-written too) or archive")
    p.add_argument("--key", required=True, help="private key file (PEM, Ed25519; `edgepack keygen` makes one)")
    p.set_defaults(func=cmd_sign)

    p = subparsers.add_parser("keygen", help="make an Ed25519 key pair for signing bundles: NAME.key, NAME.pub")
    p.add_argument("name", help="path prefix of the key files, e.g. ~/.config/edgepack/alice")
    p.set_defaults(func=cmd_keygen)


def add_trust_args(p: argparse.ArgumentParser) -> None:
    """--trust and --require-signature (verify, generate, bench, chat)."""
    p.add_argument(
        "--trust",
        action="append",
        metavar="PUBLIC_KEY",
        help="trust bundles signed by this key (PEM public key or trust file; repeatable), besides "
        "the keys in your trust file",
    )
    p.add_argument(
        "--require-signature",
        action="store_true",
        help="refuse a bundle unless it is signed by a trusted key (default: unsigned runs, with a warning)",
    )


def trust_policy(args):
    from runtime.signing import TrustPolicy

    return TrustPolicy.from_args(getattr(args, "trust", None), getattr(args, "require_signature", False))


def open_bundle(args):
    """Bundle.open with the command's trust flags; says on stderr who signed it, or warns that nobody did."""
    from runtime.bundle import Bundle

    bundle = Bundle.open(args.bundle, trust=trust_policy(args))
    print(f"edgepack: {bundle.signature.message(bundle.name)}", file=sys.stderr)
    return bundle


def read_prompt(prompt: str) -> str:
    """The prompt argument, or stdin for '-': valid UTF-8 text, else one error line."""
    from runtime.tokenizer import check_text

    if prompt != "-":
        return check_text(prompt, "prompt")
    data = (
        sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8", "surrogateescape")
    )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        from runtime.errors import EdgepackError

        raise EdgepackError(f"prompt (stdin): not valid UTF-8 text (byte {e.start})") from None


def _settings(args, bundle):
    from dataclasses import replace

    s = bundle.sampling_defaults()
    overrides = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
    }
    s = replace(s, **{k: v for k, v in overrides.items() if v is not None}, stop_strings=tuple(args.stop))
    s.check()
    return s


def cmd_generate(args) -> int:
    prompt = read_prompt(args.prompt)
    bundle = open_bundle(args)
    settings = _settings(args, bundle)
    gen = bundle.generator(args.threads, draft=args.draft)
    if args.raw:
        ids = bundle.tokenizer.encode_text(prompt, add_special_tokens=True)  # special tokens typed stay text
        events = gen.stream(ids, settings)
    else:
        from runtime.generation import ChatSession

        system = args.system if args.system is not None else bundle.system_prompt
        events = ChatSession(gen, bundle.tokenizer, system).stream_reply(prompt, settings)
    try:
        for event in events:
            if event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130
    sys.stdout.write("\n")
    sys.stdout.flush()
    r = gen.last_result
    if args.stats and r is not None:
        print(
            f"[{r.prompt_tokens} prompt + {r.new_tokens} new tokens, stop: {r.stop_reason}, "
            f"first token {1000 * r.ttft_s:.0f} ms, prefill {r.prefill_tokens_per_s:.0f} tok/s, "
            f"decode {r.decode_tokens_per_s:.1f} tok/s"
            + (f", draft={r.draft}: {r.accepted_tokens}/{r.drafted_tokens} guesses kept" if r.drafted_tokens else "")
            + "]",
            file=sys.stderr,
        )
    return 0


def cmd_verify(args) -> int:
    from runtime.verify import checks_to_json, format_checks, verify_bundle

    bundle = open_bundle(args)
    d = bundle.describe()
    print(
        f"verifying {d['name']} ({d['size_text']}, {'quick' if args.quick else 'full'} claims); "
        "all file digests match the manifest",
        file=sys.stderr,
    )
    checks = verify_bundle(bundle, quick=args.quick, progress=True, threads=args.threads)
    if args.json:
        print(json.dumps(checks_to_json(checks), indent=2))
    else:
        print(format_checks(checks))
    return 0 if all(c.passed for c in checks) else 1


def cmd_bench(args) -> int:
    from runtime.bench import bench_bundle, format_bench

    import time

    t = time.perf_counter()
    bundle = open_bundle(args)
    open_s = time.perf_counter() - t
    result = {"open_s": open_s}  # digest checks (and extraction, for an archive seen the first time)
    result |= bench_bundle(
        bundle,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        threads=args.threads,
        bandwidth=not args.no_bandwidth,
        draft=args.draft,
    )
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def cmd_sign(args) -> int:
    from runtime.signing import sign_bundle

    for path in sign_bundle(args.bundle, args.key):
        print(path)
    return 0


def cmd_keygen(args) -> int:
    from runtime.signing import generate_keypair, trust_file_path

    key, pub, line = generate_keypair(Path(args.name).expanduser())
    print(
        f"private key: {key} (keep it secret)\npublic key:  {pub} (give it to your users: --trust {pub.name})",
        file=sys.stderr,
    )
    print(f"users can trust it for good by adding this line to {trust_file_path()}:", file=sys.stderr)
    print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A parser with only the runtime commands (tests; edgepack/cli.py has the full one)."""
    parser = argparse.ArgumentParser(prog="edgepack")
    add_runtime_commands(parser.add_subparsers(dest="command", required=True))
    return parser
