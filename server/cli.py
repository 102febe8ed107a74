"""`edgepack serve BUNDLE`: argument parsing only, so registering the command imports no FastAPI."""

from __future__ import annotations

import argparse
import os
import sys


def add_serve_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server for a bundle (concurrent requests batched)")
    p.add_argument("bundle", help="bundle directory or BUNDLE.edgepack archive")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; any other address requires an API key)",
    )
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $EDGEPACK_API_KEY if set)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: one per physical core)")
    p.add_argument("--parallel", type=int, default=4, help="requests decoding together (KV-cache slots)")
    p.add_argument("--queue", type=int, default=16, help="requests that may wait for a slot; beyond: 429")
    p.add_argument("--context", type=int, help="KV positions per slot (default: the model's context)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="request body limit in bytes (default 1 MiB)")
    p.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="prefill every prompt whole (default: the KV cache of the chat template's system part is computed "
        "once and copied into each request that starts with it)",
    )
    from runtime.cli_commands import add_trust_args

    add_trust_args(p)
    p.set_defaults(func=_cmd_serve)
    return p


def _cmd_serve(args) -> int:
    from runtime.errors import EdgepackError
    from server.config import ServeConfig

    config = ServeConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("EDGEPACK_API_KEY"),
        threads=args.threads,
        parallel=args.parallel,
        queue=args.queue,
        context=args.context,
        max_body_bytes=args.max_body,
        prefix_cache=not args.no_prefix_cache,
    )
    config.check()  # before the bundle is opened: a refused start costs nothing
    try:
        from server.run import serve
    except ImportError as e:
        raise EdgepackError(
            f"edgepack serve needs the 'serve' extra ({e.name} is missing): pip install 'edgepack[serve]'"
        ) from None
    from runtime.cli_commands import trust_policy

    return serve(args.bundle, config, log=lambda m: print(m, file=sys.stderr, flush=True), trust=trust_policy(args))
