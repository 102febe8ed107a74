"""runtime/ and tui/ must never import the heavy stack: a laptop runs a bundle with a small install."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

from conftest import ROOT

HEAVY = ("torch", "transformers", "peft", "gptqmodel", "optimum", "accelerate")


def test_importing_runtime_loads_no_torch():
    import runtime

    mods = [f"runtime.{m.name}" for m in pkgutil.iter_modules(runtime.__path__)]
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        f"bad = [h for h in {HEAVY!r} if h in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"runtime imported {out.stdout.strip()}"
    assert len(mods) >= 5


def test_cli_help_starts_without_torch():
    code = "import sys; from edgepack.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_importing_server_loads_no_torch():
    """server/ (FastAPI front end over runtime/) has the same floor as runtime/ and tui/."""
    import server

    mods = [f"server.{m.name}" for m in pkgutil.iter_modules(server.__path__)]
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        f"bad = [h for h in {HEAVY!r} if h in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"server imported {out.stdout.strip()}"
    assert {"server.app", "server.run", "server.cli"} <= set(mods)
