"""Recipes: which source model, which calibration data, and the settings of each stage. A stage that is
absent (None) is skipped.

A recipe is a small TOML file (read with the stdlib's tomllib) or a named preset. Preset names follow the
seed study: `D2` removes 2 decoder layers; `W1:8` is N:M width pruning where **N:M means N weights PRUNED in
every group of M consecutive input weights** (W1:2 and W2:4 are both 50 % sparse, W1:8 is 12.5 %, W12:16 is
75 %; NVIDIA's "2:4" counts the weights kept, this notation counts the ones removed). `C75` keeps 75 % of
the FFN channels of every layer (structured pruning that really shrinks the matrices), `C75A2` also keeps
only 2 KV-head groups per layer. Options follow the name: `D2+W1:8 lora=wikitext quant=eora order=DLW`;
`calib=mix` calibrates GPTQ and EoRA on chat + WikiText rows, `group=32a` quantizes in groups of 32 with a
zero point each (asymmetric; the seed's GPTQ setting is `group=128`, symmetric, the dataclass default).

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
from typing import ClassVar, Literal

from runtime.errors import EdgepackError
from runtime.settings import Settings

DEFAULT_MODEL = "models/SmolLM2-135M-Instruct"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# calibration rows for GPTQ / EoRA (compressor.training_data.quant_calibration_rows): "chat" = the self-instruct
# seed tasks through the chat template with the source's own greedy replies, "mix" = half chat, half WikiText
QuantData = Literal["wikitext", "triviaqa", "chat", "mix"]


def _known_projections(settings: Settings, name: str) -> None:
    value = getattr(settings, name)
    if not value or any(t not in PROJECTIONS for t in value):
        raise settings.error(name, value, f"expected some of {', '.join(PROJECTIONS)}")


@dataclass
class Calibration(Settings):
    """Calibration windows for depth scoring and WANDA / channel norms. 8 x 512 tokens keeps depth scoring
    (one forward pass per layer) to minutes on a 2-core CPU; WANDA's paper used 128 x 2048: one option away."""

    section: ClassVar[str] = "calibration"
    dataset: str = "wikitext2-valid"  # a shipped name or a text file path
    samples: int = 8
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 4

    def check(self) -> None:
        self.at_least(1, "samples", "seqlen", "batch_size")


@dataclass
class DepthStage(Settings):
    section: ClassVar[str] = "depth"
    remove: int = 2  # number of decoder layers to drop
    method: Literal["oneshot", "iterative"] = "oneshot"  # one-shot ranking, or greedy re-scoring

    def check(self) -> None:
        self.at_least(1, "remove")


@dataclass
class WidthStage(Settings):
    section: ClassVar[str] = "width"
    n: int = 1  # weights PRUNED ...
    m: int = 8  # ... in every group of m consecutive input weights
    targets: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    method: Literal["wanda"] = "wanda"

    def check(self) -> None:
        if not 0 < self.n < self.m:
            raise self.error("n", self.n, f"N:M needs 0 < N < M (N pruned of every M), got {self.n}:{self.m}")
        _known_projections(self, "targets")

    @property
    def sparsity(self) -> float:
        return self.n / self.m


@dataclass
class ChannelStage(Settings):
    section: ClassVar[str] = "channels"
    ffn_keep: float = 0.75  # fraction of FFN channels kept per layer
    kv_groups_keep: int | None = None  # KV-head groups kept per layer (None = attention untouched)

    def check(self) -> None:
        if not 0 < self.ffn_keep <= 1:
            raise self.error("ffn_keep", self.ffn_keep, "keeps a fraction in (0, 1] of the FFN channels")
        self.at_least(1, "kv_groups_keep")


@dataclass
class LoraStage(Settings):
    section: ClassVar[str] = "lora"
    # settings added after work directories existed: left out of the stage fingerprint at these defaults
    added_later: ClassVar[dict] = {"objective": "lm"}
    # wikitext: packed text; triviaqa: answer-only loss; chat: the self-instruct seed tasks through the chat
    # template with the source's own greedy replies (loss on the replies); mix: half chat, half wikitext
    dataset: Literal["wikitext", "triviaqa", "chat", "mix"] = "wikitext"
    # lm: next-token NLL of the data's tokens; distill: KL(source || student) on the source's logits at the
    # same positions (the teacher is the recipe's pre-compression source model, resident beside the student)
    objective: Literal["lm", "distill"] = "lm"
    triviaqa_mode: Literal["closed", "open"] = "closed"  # prompts for TriviaQA training
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    samples: int = 256  # the seed used 8192 (hours on a 2-core CPU): one option away
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    seqlen: int = 256
    keep_dense: bool = False  # False: re-apply the N:M mask after merging

    def check(self) -> None:
        self.at_least(1, "rank", "samples", "batch_size", "grad_accum", "seqlen")
        if not 0 <= self.dropout < 1:
            raise self.error("dropout", self.dropout, "must be in [0, 1)")
        _known_projections(self, "targets")


@dataclass
class GptqStage(Settings):
    section: ClassVar[str] = "gptq"
    added_later: ClassVar[dict] = {"keep_grid": True, "mse": 0.0}  # left out of the fingerprint at these defaults
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False  # act-order
    damp: float = 0.01
    # clipping: each group's range is shrunk step by step and the scale with the least sum |error|^mse kept
    # (gptqmodel's grid search; 0 = off, the GPTQ paper's code uses 2.4)
    mse: float = 0.0
    samples: int = 32
    seqlen: int = 512
    dataset: QuantData = "wikitext"
    # projections already on a 4-bit block grid (an imported Q4_0/Q4_1/Q4_K GGUF no stage moved) are kept
    # exact (exported block 32, exporter.int4.find_block_grid) and GPTQ / EoRA only act on the others
    keep_grid: bool = True

    def check(self) -> None:
        self.at_least(1, "group_size", "samples", "seqlen")
        if not 0 < self.damp < 1:
            raise self.error("damp", self.damp, "must be in (0, 1)")
        if self.mse < 0:
            raise self.error("mse", self.mse, "must be 0 (off) or a positive norm such as 2.4")


@dataclass
class EoraStage(Settings):
    section: ClassVar[str] = "eora"
    added_later: ClassVar[dict] = {"tune_steps": 0, "tune_samples": 64, "tune_lr": 2e-4, "tune_batch_size": 4}
    rank: int = 32
    dataset: QuantData = "wikitext"
    samples: int = 32
    seqlen: int = 512
    # after the closed-form fit: optimizer steps distilling all EoRA factors together from the float model that
    # was quantized (KL on its logits over `tune_samples` rows of `dataset`; compressor.eora_tune); 0 = off
    tune_steps: int = 0
    tune_samples: int = 64
    tune_lr: float = 2e-4
    tune_batch_size: int = 4

    def check(self) -> None:
        self.at_least(1, "rank", "samples", "seqlen", "tune_samples", "tune_batch_size")
        self.at_least(0, "tune_steps")
        if not self.tune_lr > 0:
            raise self.error("tune_lr", self.tune_lr, "must be > 0")


@dataclass
class Recipe(Settings):
    name: str = "baseline"
    model: str = DEFAULT_MODEL
    order: Literal["DWL", "DLW"] = "DWL"  # depth→width→LoRA or depth→LoRA→width
    calibration: Calibration = field(default_factory=Calibration)
    depth: DepthStage | None = None
    width: WidthStage | None = None
    channels: ChannelStage | None = None
    lora: LoraStage | None = None
    gptq: GptqStage | None = None
    eora: EoraStage | None = None

    def check(self) -> None:
        if self.eora and not self.gptq:
            raise EdgepackError("[eora] needs [gptq] (EoRA compensates the quantization error)")

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
            how = " distilled from the source" if self.lora.objective == "distill" else ""
            parts.append(f"LoRA r{self.lora.rank} on {self.lora.dataset}{how} ({self.lora.samples} samples)")
        if self.gptq:
            g = self.gptq
            parts.append(
                f"GPTQ {g.bits}-bit g{g.group_size}{'' if g.sym else ' asymmetric'}"
                + ("" if g.dataset == "wikitext" else f" calibrated on {g.dataset}")
            )
        if self.eora:
            parts.append(
                f"EoRA r{self.eora.rank}"
                + ("" if self.eora.dataset == "wikitext" else f" on {self.eora.dataset}")
                + (f", distilled {self.eora.tune_steps} steps" if self.eora.tune_steps else "")
            )
        if self.lora and (self.width or self.channels):
            parts.append(f"order {'depth→LoRA→width' if self.order == 'DLW' else 'depth→width→LoRA'}")
        return "; ".join(parts) or "no compression (baseline)"


def settings_hash(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# ------------------------------------------------------------------ presets
PRUNED_DEPTH = ["D2", "D4", "D6", "D8"]
PRUNED_WIDTH = ["W1:2", "W2:4", "W1:8", "W4:8", "W1:16", "W8:16", "W12:16", "W3:4", "W6:8"]
PRUNED_COMBOS = [
    "D2+W1:2",
    "D2+W2:4",
    "D2+W1:8",
    "D2+W4:8",
    "D2+W1:16",
    "D2+W8:16",
    "D4+W1:8",
    "D4+W4:8",
    "D4+W1:16",
    "D4+W8:16",
    "D6+W1:8",
    "D6+W4:8",
    "D6+W1:16",
    "D6+W6:8",
    "D8+W1:8",
    "D8+W4:8",
    "D8+W3:4",
]
CHANNEL_PRESETS = ["C90", "C75", "C50", "C75A2"]
PRUNED_PRESETS = PRUNED_DEPTH + PRUNED_WIDTH + PRUNED_COMBOS


_PART = re.compile(r"^(?:D(?P<d>\d+)|W(?P<n>\d+):(?P<m>\d+)|C(?P<c>\d+)(?:A(?P<a>\d+))?)$")
# The settings a preset string spells out (`D2`, `W1:8`, `C75A2`, `lora=...`, `calib=...`); the rest are defaults.
PRESET_FIELDS = {
    "depth": ("remove",),
    "width": ("n", "m"),
    "channels": ("ffn_keep", "kv_groups_keep"),
    "lora": ("dataset", "objective"),
}


def preset_fields(text: str) -> dict[str, tuple[str, ...]]:
    """The settings `text` names itself: they win over a grid's default sections. `calib=` names the GPTQ and
    EoRA datasets and `group=` GPTQ's group size and symmetry only when written (without them a grid default
    such as `[gptq] dataset` still applies)."""
    named = dict(PRESET_FIELDS)
    options = {opt.partition("=")[0] for opt in text.split()[1:]}
    if "calib" in options:
        named["gptq"] = named["eora"] = ("dataset",)
    if "group" in options:
        named["gptq"] = (*named.get("gptq", ()), "group_size", "sym")
    return named


SECTIONS = {
    "calibration": Calibration,
    "depth": DepthStage,
    "width": WidthStage,
    "channels": ChannelStage,
    "lora": LoraStage,
    "gptq": GptqStage,
    "eora": EoraStage,
}
TOP_LEVEL = ("name", "model", "order", "preset")


def _preset_part(part: str, text: str) -> tuple[str, Settings]:
    mt = _PART.match(part)
    if not mt:
        raise EdgepackError(f"unknown preset part {part!r} in {text!r} (see `edgepack recipes`)")
    try:
        if mt["d"]:
            return "depth", DepthStage(remove=int(mt["d"]))
        if mt["n"]:
            return "width", WidthStage(n=int(mt["n"]), m=int(mt["m"]))
        keep = int(mt["c"])
        if not 0 < keep <= 100:
            raise EdgepackError("C<percent> keeps 1-100 % of FFN channels")
        return "channels", ChannelStage(ffn_keep=keep / 100, kv_groups_keep=int(mt["a"]) if mt["a"] else None)
    except EdgepackError as e:
        raise EdgepackError(f"{part}: {e}") from None


def parse_preset(text: str, model: str = DEFAULT_MODEL) -> Recipe:
    """`D2+W1:8 lora=wikitext quant=eora order=DLW` -> Recipe. `baseline` is the empty recipe."""
    tokens = text.split()
    if not tokens:
        raise EdgepackError("empty preset name")
    fields_: dict = {"name": text.strip(), "model": model}
    if tokens[0] != "baseline":
        fields_.update(_preset_part(part, text) for part in tokens[0].split("+"))
    calib = group = None
    for opt in tokens[1:]:
        key, _, value = opt.partition("=")
        if key == "lora":  # lora=<dataset>, or lora=distill (KL from the source on the chat + wikitext mix)
            fields_["lora"] = (
                LoraStage(dataset="mix", objective="distill") if value == "distill" else LoraStage(dataset=value)
            )
        elif key == "quant":
            if value not in ("gptq", "eora", "none"):
                raise EdgepackError(f"quant={value}: expected gptq, eora or none")
            fields_["gptq"] = GptqStage() if value in ("gptq", "eora") else None
            fields_["eora"] = EoraStage() if value == "eora" else None
        elif key == "calib":  # GPTQ / EoRA calibration rows (the seed's setting: wikitext)
            if value not in QuantData.__args__:
                raise EdgepackError(f"calib={value}: expected one of {', '.join(QuantData.__args__)}")
            calib = value
        elif key == "group":  # GPTQ group size, `a` = asymmetric (a zero point per group): group=32a, group=128
            mt = re.fullmatch(r"([1-9][0-9]*)(a?)", value)
            if not mt:
                raise EdgepackError(f"group={value}: expected a group size, `a` for asymmetric (group=32a, group=128)")
            group = (int(mt[1]), not mt[2])
        elif key == "order":
            fields_["order"] = value
        else:
            raise EdgepackError(f"unknown preset option {opt!r} (lora=, quant=, calib=, group=, order=)")
    for stage in ("gptq", "eora"):
        if calib and fields_.get(stage) is not None:
            fields_[stage] = dataclasses.replace(fields_[stage], dataset=calib)
    if group:
        if fields_.get("gptq") is None:
            raise EdgepackError("group= sets GPTQ's groups: it needs quant=gptq or quant=eora")
        fields_["gptq"] = dataclasses.replace(fields_["gptq"], group_size=group[0], sym=group[1])
    return Recipe(**fields_)


def build_section(cls: type[Settings], data: dict, where: str) -> Settings:
    """One TOML table -> its settings dataclass (unknown keys refused here, values checked by the class)."""
    if not isinstance(data, dict):
        raise EdgepackError(f"{where}: must be a table")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise EdgepackError(
            f"{where}: unknown setting(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(names))})"
        )
    return cls(**data)


def recipe_from_dict(data: dict, defaults: dict | None = None, where: str = "recipe") -> Recipe:
    """A recipe table (a TOML recipe file, or one `[[run]]` of a sweep grid) -> Recipe. Precedence, lowest
    first: the dataclass defaults, `defaults`' sections (a grid's top-level ones), what the preset string
    sets, the table's own sections. A default section only tunes recipes that have that stage; it never
    adds the stage. Every error is one line that starts with `where`."""
    try:
        return _recipe_from_dict(data, defaults or {})
    except EdgepackError as e:
        raise EdgepackError(f"{where}: {e}") from None


def _recipe_from_dict(data: dict, defaults: dict) -> Recipe:
    unknown = set(data) - set(TOP_LEVEL) - set(SECTIONS)
    if unknown:
        raise EdgepackError(
            f"unknown key(s) {', '.join(sorted(unknown))} ({', '.join(TOP_LEVEL)}, or a section: {', '.join(SECTIONS)})"
        )
    if "preset" not in data and "name" not in data:
        raise EdgepackError('a run needs preset = "..." or name = "..."')
    model = data.get("model", defaults.get("model", DEFAULT_MODEL))
    preset = parse_preset(data["preset"], model) if "preset" in data else Recipe(model=model)
    fields_ = {"name": data.get("name", data.get("preset")), "model": model, "order": data.get("order", preset.order)}
    for section, cls in SECTIONS.items():
        current = getattr(preset, section)
        if section != "calibration" and current is None and section not in data:
            fields_[section] = None  # absent stage stays absent
            continue
        explicit = {}
        if "preset" in data and current is not None:  # what the preset string itself says wins over defaults
            explicit = {k: getattr(current, k) for k in preset_fields(data["preset"]).get(section, ())}
        for src in (defaults, data):
            if section in src and not isinstance(src[section], dict):
                raise EdgepackError(f"[{section}] must be a table")
        merged = {**dataclasses.asdict(cls()), **defaults.get(section, {}), **explicit, **data.get(section, {})}
        fields_[section] = build_section(cls, merged, f"[{section}]")
    return Recipe(**fields_)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgepackError(f"{path}: recipe file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise EdgepackError(f"{path}: invalid TOML ({e})") from None
    data.setdefault("name", data.get("preset", path.stem))
    return recipe_from_dict(data, where=str(path))


def resolve(spec: str) -> Recipe:
    """A TOML path or a preset string."""
    if spec.endswith(".toml") or Path(spec).is_file():
        return load_recipe(spec)
    return parse_preset(spec)


def preset_table() -> list[tuple[str, str]]:
    rows = [("baseline", parse_preset("baseline").describe())]
    for name in PRUNED_PRESETS + CHANNEL_PRESETS:
        rows.append((name, parse_preset(name).describe()))
    for name in (
        "W1:8 lora=distill quant=eora calib=mix group=32a",  # the main job's (recipes/main_job.toml: 64 LoRA samples)
        "W1:8 lora=wikitext quant=eora calib=mix group=32a",  # the main job's before 2026-12-07
        "W1:8 lora=wikitext quant=eora",  # the seed's three optimised configurations
        "D2 lora=triviaqa quant=eora",
        "D2+W1:8 lora=wikitext quant=eora",
    ):
        rows.append((name, parse_preset(name).describe()))
    return rows
