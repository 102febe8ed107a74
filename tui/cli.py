"""`edgepack chat BUNDLE`: argument parsing only, so registering the command imports no Textual."""

from __future__ import annotations

import argparse


def add_chat_command(subparsers) -> argparse.ArgumentParser:
    """Register `chat BUNDLE [--data-dir DIR] [--threads N]` on the CLI's subparsers."""
    p = subparsers.add_parser("chat", help="private offline chat with a bundle, in the terminal")
    p.add_argument("bundle", help="bundle directory or BUNDLE.edgepack archive")
    p.add_argument(
        "--data-dir",
        help="where conversations are kept (default: $EDGEPACK_DATA_DIR, else the user data directory for edgepack)",
    )
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: one per physical core)")
    from runtime.cli_commands import DRAFT_CHOICES, DRAFT_HELP, add_trust_args

    p.add_argument("--draft", choices=DRAFT_CHOICES, default="auto", help=DRAFT_HELP)
    add_trust_args(p)
    p.set_defaults(func=_cmd_chat)
    return p


def _cmd_chat(args) -> int:
    from runtime.cli_commands import trust_policy
    from tui.app import run_chat

    return run_chat(args.bundle, args.data_dir, threads=args.threads, trust=trust_policy(args), draft=args.draft)
