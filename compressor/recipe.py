"""Recipes: which source model, which calibration data, and the settings of each stage. A stage that is
absent (None) is skipped.

A recipe is a small TOML file (read with the stdlib's tomllib) or a named preset. Preset names follow the
seed study: `D2` removes 2 decoder layers; `W1:8` is N:M width pruning where **N:M means N weights PRUNED in
every group of M consecutive input weights** (W1:2 and W2:4 are both 50 % sparse, W1:8 is 12.5 %, W12:16 is
75 %; NVIDIA's "2:4" counts the weights kept, this notation counts the ones removed). `C75` keeps 75 % of
the FFN channels of every layer (structured pruning that really shrinks the matrices), `C75A2` also keeps
only 2 KV-head groups per layer. Options follow the name: `D2+W1:8 lora=wikitext quant=eora order=DLW`.

Example TOML:

    name = "my-run"
    model = "models/SmolLM2-135M-Instruct"
    order = "DWL"                  # depth -> width -> LoRA (default) or "DLW"
    [calibration]
    dataset = "wikitext2-valid"    # or a path to a text file
    samples = 32
    seqlen = 512
    [depth]
    remove = 2
    [width]
    n = 1                          # pruned ...
    m = 8                          # ... in every group of m
    [lora]
    dataset = "wikitext"           # or "triviaqa"
    [gptq]
    bits = 4
    [eora]
    rank = 32
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import EdgepackError

DEFAULT_MODEL = "models/SmolLM2-135M-Instruct"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Calibration:
    """Calibration windows for depth scoring and WANDA / channel norms. 8 x 512 tokens keeps depth scoring
    (one forward pass per layer) to minutes on a 2-core CPU; WANDA's paper used 128 x 2048: one option away."""

    dataset: str = "wikitext2-valid"  # a shipped name or a text file path
    samples: int = 8
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 4


@dataclass
class DepthStage:
    remove: int = 2  # number of decoder layers to drop
    method: str = "oneshot"  # "oneshot" ranking, or "iterative" greedy re-scoring


@dataclass
class WidthStage:
    n: int = 1  # weights PRUNED ...
    m: int = 8  # ... in every group of m consecutive input weights
    targets: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    method: str = "wanda"

    @property
    def sparsity(self) -> float:
        return self.n / self.m


@dataclass
class ChannelStage:
    ffn_keep: float = 0.75  # fraction of FFN channels kept per layer
    kv_groups_keep: int | None = None  # KV-head groups kept per layer (None = attention untouched)


@dataclass
class LoraStage:
    dataset: str = "wikitext"  # "wikitext" (causal LM on packed text) or "triviaqa" (answer-only loss)
    triviaqa_mode: str = "closed"  # prompts for TriviaQA training: "closed" or "open"
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    samples: int = 256  # the seed used 8192 (hours on a 2-core CPU): one option away
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    seqlen: int = 256
    keep_dense: bool = False  # False: re-apply the N:M mask after merging


@dataclass
class GptqStage:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False  # act-order
    damp: float = 0.01
    samples: int = 32
    seqlen: int = 512
    dataset: str = "wikitext"


@dataclass
class EoraStage:
    rank: int = 32
    dataset: str = "wikitext"  # or "triviaqa"
    samples: int = 32
    seqlen: int = 512


@dataclass
class Recipe:
    name: str = "baseline"
    model: str = DEFAULT_MODEL
    order: str = "DWL"
    calibration: Calibration = field(default_factory=Calibration)
    depth: DepthStage | None = None
    width: WidthStage | None = None
    channels: ChannelStage | None = None
    lora: LoraStage | None = None
    gptq: GptqStage | None = None
    eora: EoraStage | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def stage_names(self) -> list[str]:
        structural = ["depth"]
        if self.order == "DLW":
            structural += ["lora", "width", "channels"]
        else:
            structural += ["width", "channels", "lora"]
        return [s for s in structural + ["gptq", "eora"] if getattr(self, s) is not None]

    def describe(self) -> str:
        parts = []
        if self.depth:
            parts.append(f"remove {self.depth.remove} layers ({self.depth.method})")
        if self.width:
            w = self.width
            parts.append(f"WANDA {w.n}:{w.m} = {w.n} pruned of every {w.m} ({100 * w.sparsity:.1f} % sparse)")
        if self.channels:
            c = self.channels
            s = f"keep {100 * c.ffn_keep:.0f} % of FFN channels"
            if c.kv_groups_keep:
                s += f" and {c.kv_groups_keep} KV groups per layer"
            parts.append(s)
        if self.lora:
            parts.append(f"LoRA r{self.lora.rank} on {self.lora.dataset} ({self.lora.samples} samples)")
        if self.gptq:
            parts.append(f"GPTQ {self.gptq.bits}-bit g{self.gptq.group_size}")
        if self.eora:
            parts.append(f"EoRA r{self.eora.rank}")
        if self.lora and (self.width or self.channels):
            parts.append(f"order {'depth→LoRA→width' if self.order == 'DLW' else 'depth→width→LoRA'}")
        return "; ".join(parts) or "no compression (baseline)"


def settings_hash(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# ------------------------------------------------------------------ presets
PRUNED_DEPTH = ["D2", "D4", "D6", "D8"]
PRUNED_WIDTH = ["W1:2", "W2:4", "W1:8", "W4:8", "W1:16", "W8:16", "W12:16", "W3:4", "W6:8"]
PRUNED_COMBOS = ["D2+W1:2", "D2+W2:4", "D2+W1:8", "D2+W4:8", "D2+W1:16", "D2+W8:16", "D4+W1:8", "D4+W4:8",
                 "D4+W1:16", "D4+W8:16", "D6+W1:8", "D6+W4:8", "D6+W1:16", "D6+W6:8", "D8+W1:8", "D8+W4:8",
                 "D8+W3:4"]
CHANNEL_PRESETS = ["C90", "C75", "C50", "C75A2"]
PRUNED_PRESETS = PRUNED_DEPTH + PRUNED_WIDTH + PRUNED_COMBOS


_PART = re.compile(r"^(?:D(?P<d>\d+)|W(?P<n>\d+):(?P<m>\d+)|C(?P<c>\d+)(?:A(?P<a>\d+))?)$")


def parse_preset(text: str, model: str = DEFAULT_MODEL) -> Recipe:
    """`D2+W1:8 lora=wikitext quant=eora order=DLW` -> Recipe. `baseline` is the empty recipe."""
    tokens = text.split()
    if not tokens:
        raise EdgepackError("empty preset name")
    recipe = Recipe(name=text.strip(), model=model)
    if tokens[0] != "baseline":
        for part in tokens[0].split("+"):
            mt = _PART.match(part)
            if not mt:
                raise EdgepackError(f"unknown preset part {part!r} in {text!r} (see `edgepack recipes`)")
            if mt["d"]:
                recipe.depth = DepthStage(remove=int(mt["d"]))
            elif mt["n"]:
                n, m = int(mt["n"]), int(mt["m"])
                if not 0 < n < m:
                    raise EdgepackError(f"{part}: N:M needs 0 < N < M (N pruned of every M)")
                recipe.width = WidthStage(n=n, m=m)
            else:
                keep = int(mt["c"])
                if not 0 < keep <= 100:
                    raise EdgepackError(f"{part}: C<percent> keeps 1-100 % of FFN channels")
                recipe.channels = ChannelStage(ffn_keep=keep / 100, kv_groups_keep=int(mt["a"]) if mt["a"] else None)
    for opt in tokens[1:]:
        key, _, value = opt.partition("=")
        if key == "lora":
            if value not in ("wikitext", "triviaqa"):
                raise EdgepackError(f"lora={value}: expected wikitext or triviaqa")
            recipe.lora = LoraStage(dataset=value)
        elif key == "quant":
            if value not in ("gptq", "eora", "none"):
                raise EdgepackError(f"quant={value}: expected gptq, eora or none")
            recipe.gptq = GptqStage() if value in ("gptq", "eora") else None
            recipe.eora = EoraStage() if value == "eora" else None
        elif key == "order":
            if value not in ("DWL", "DLW"):
                raise EdgepackError(f"order={value}: expected DWL (depth→width→LoRA) or DLW (depth→LoRA→width)")
            recipe.order = value
        else:
            raise EdgepackError(f"unknown preset option {opt!r} (lora=, quant=, order=)")
    return recipe


_SECTIONS = {"calibration": Calibration, "depth": DepthStage, "width": WidthStage, "channels": ChannelStage,
             "lora": LoraStage, "gptq": GptqStage, "eora": EoraStage}


def _build(cls, data: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise EdgepackError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(names))})")
    return cls(**data)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgepackError(f"{path}: recipe file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise EdgepackError(f"{path}: invalid TOML ({e})") from None
    top = {k: v for k, v in data.items() if k not in _SECTIONS}
    unknown = set(top) - {"name", "model", "order", "preset"}
    if unknown:
        raise EdgepackError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    recipe = parse_preset(top["preset"], top.get("model", DEFAULT_MODEL)) if "preset" in top else Recipe()
    recipe.name = top.get("name", top.get("preset", path.stem))
    recipe.model = top.get("model", recipe.model)
    recipe.order = top.get("order", recipe.order)
    if recipe.order not in ("DWL", "DLW"):
        raise EdgepackError(f"{path}: order must be DWL or DLW")
    for section, cls in _SECTIONS.items():
        if section in data:
            if not isinstance(data[section], dict):
                raise EdgepackError(f"{path}: [{section}] must be a table")
            setattr(recipe, section, _build(cls, data[section], f"{path} [{section}]"))
    if recipe.eora and not recipe.gptq:
        raise EdgepackError(f"{path}: [eora] needs [gptq] (EoRA compensates the quantization error)")
    return recipe


def resolve(spec: str) -> Recipe:
    """A TOML path or a preset string."""
    if spec.endswith(".toml") or Path(spec).is_file():
        return load_recipe(spec)
    return parse_preset(spec)


def preset_table() -> list[tuple[str, str]]:
    rows = [("baseline", parse_preset("baseline").describe())]
    for name in PRUNED_PRESETS + CHANNEL_PRESETS:
        rows.append((name, parse_preset(name).describe()))
    for name in ("W1:8 lora=wikitext quant=eora", "D2 lora=triviaqa quant=eora", "D2+W1:8 lora=wikitext quant=eora"):
        rows.append((name, parse_preset(name).describe()))
    return rows
