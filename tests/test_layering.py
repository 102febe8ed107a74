"""runtime/, tui/ and server/ must never import the heavy stack: a laptop runs a bundle with a small install."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest
from conftest import ROOT

HEAVY = ("torch", "transformers", "peft", "gptqmodel", "optimum", "accelerate")


@pytest.mark.parametrize(
    "package, must_have",
    [
        ("runtime", {"runtime.bundle", "runtime.onnx_engine", "runtime.generation", "runtime.batching"}),
        ("tui", {"tui.app", "tui.reply", "tui.store", "tui.cli"}),
        ("server", {"server.app", "server.run", "server.cli"}),
    ],
)
def test_importing_the_light_packages_loads_no_torch(package, must_have):
    """Every module of the package imported in a fresh interpreter; none of HEAVY may show up."""
    mods = [f"{package}.{m.name}" for m in pkgutil.iter_modules(importlib.import_module(package).__path__)]
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        f"bad = [h for h in {HEAVY!r} if h in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{package} imported {out.stdout.strip()}"
    assert must_have <= set(mods)


def test_cli_help_starts_without_torch():
    code = "import sys; from edgepack.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
