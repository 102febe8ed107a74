"""A sweep's report: tables (CSV + Markdown, shaped like the seed study's), PNG plots and an index.

Input is the list of rows that compressor.sweep returns (one per grid point, the baseline first). Every
table caption states the evaluation limits, because numbers from 40 questions and from 728 are not the
same kind of number. Plots use matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from runtime.fileio import atomic_write_bytes, atomic_write_text
from runtime.harness import EvalLimits

NM_NOTE = "N:M = N weights pruned in every group of M (W1:8 is 12.5 % sparse; NVIDIA's 2:4 counts the kept ones)."
CSV_COLUMNS = [
    "name",
    "config",
    "lora",
    "quant",
    "order",
    "closed_pct",
    "open_pct",
    "closed_exact_pct",
    "open_exact_pct",
    "questions",
    "ppl",
    "ppl_windows",
    "ppl_tokens",
    "kld",
    "top1_pct",
    "params_dense",
    "params_nonzero",
    "size_mb",
    "deployed_mb",
    "chat_match32_pct",
    "chat_kld",
    "chat_top1_pct",
    "seconds",
    "example",
    "workdir",
    "fingerprint",
]


@dataclass
class SweepRow:
    """One evaluated grid point: compressor.sweep fills it (and caches it as JSON), the report reads it."""

    name: str
    config: str  # the seed table's first columns (compressor.sweep.labels): pruning config, LoRA data, ...
    lora: str
    quant: str
    order: str
    description: str
    closed: float  # TriviaQA closed-book accuracy (answer contained), 0-1
    closed_exact: float
    open: float  # open-book
    open_exact: float
    questions: int
    ppl: float
    ppl_windows: int
    ppl_tokens: int
    kld: float | None  # vs the unquantized model of the same run (GPTQ / EoRA points only)
    top1: float | None
    params_dense: int
    params_nonzero: int
    size_bytes: int
    example: str  # the greedy answer to `prompt`
    prompt: str
    workdir: str
    fingerprint: str
    stages: list[str] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)  # stage directories linked from another run
    recipe: dict = field(default_factory=dict)
    limits: dict = field(default_factory=dict)
    seconds: float | None = None
    deployed_bytes: int | None = None  # the ONNX decoder a bundle of this point ships (compressor.sweep)
    chat_match32: float | None = None  # chat fidelity vs the source's greedy replies (runtime.harness.eval_chat)
    chat_kld: float | None = None
    chat_top1: float | None = None


@dataclass
class FailedPoint:
    """A grid point that raised: reported, and the others still are."""

    name: str
    workdir: str
    error: str


def pct(x) -> float | None:
    return None if x is None else round(100 * x, 2)


def size_mb(row: dict) -> float:
    return round(row.size_bytes / 1e6, 3)


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def fmt_size(row: dict) -> str:
    return fmt_mb(row.size_bytes)


def fmt_mb(n: int | None) -> str:
    if n is None:
        return "—"
    mb = n / 1e6
    return f"{mb:.1f} MB" if mb >= 10 else f"{mb:.2f} MB"


def cost_bytes(row: SweepRow) -> int:
    """What a user pays in: the deployed bundle's decoder bytes, or the checkpoint files when not measured."""
    return row.deployed_bytes if row.deployed_bytes is not None else row.size_bytes


def short_label(row: dict) -> str:
    parts = [row.config]
    if row.lora != "none":
        parts.append(f"LoRA {row.lora}")
    if row.quant != "none":
        parts.append(row.quant)
    if row.order:
        parts.append(row.order)
    return " · ".join(parts)


def plot_labels(rows: list[SweepRow]) -> list[str]:
    """Short labels when they tell the points apart, the run names otherwise."""
    short = [short_label(r) for r in rows]
    return short if len(set(short)) == len(short) else [r.name for r in rows]


def caption(limits: EvalLimits, rows: list[SweepRow]) -> str:
    q = rows[0].questions if rows else "?"
    w = f"{rows[0].ppl_windows} windows × {limits.ctx} tokens" if rows else "?"
    return (
        f"Evaluation limits: {limits.describe()} — WikiText-2 test PPL on {w}; TriviaQA closed and open book on "
        f"the same {q} questions, % = answer contains an alias (exact match in results.csv). Non-zero parameters "
        f"count the weights left after pruning (GPTQ keeps the count; EoRA adds its low-rank pairs); size = weight "
        f"files on disk (float32 checkpoints store pruned zeros densely, GPTQ stores int4); deployed = the ONNX "
        f"decoder files a bundle of the point ships (int4 projections, int8 embedding and head), the cost axis of "
        f"the Pareto plots; chat match = share of the source's greedy chat replies whose first 32 tokens the point "
        f"reproduces (teacher-forced, vs the uncompressed source). {NM_NOTE}"
    )


# ------------------------------------------------------------------ tables
def csv_rows(rows: list[SweepRow]) -> list[dict]:
    out = []
    for r in rows:
        out.append(
            {
                "name": r.name,
                "config": r.config,
                "lora": r.lora,
                "quant": r.quant,
                "order": r.order,
                "closed_pct": pct(r.closed),
                "open_pct": pct(r.open),
                "closed_exact_pct": pct(r.closed_exact),
                "open_exact_pct": pct(r.open_exact),
                "questions": r.questions,
                "ppl": round(r.ppl, 4),
                "ppl_windows": r.ppl_windows,
                "ppl_tokens": r.ppl_tokens,
                "kld": None if r.kld is None else round(r.kld, 5),
                "top1_pct": pct(r.top1),
                "params_dense": r.params_dense,
                "params_nonzero": r.params_nonzero,
                "size_mb": size_mb(r),
                "deployed_mb": None if r.deployed_bytes is None else round(r.deployed_bytes / 1e6, 3),
                "chat_match32_pct": pct(r.chat_match32),
                "chat_kld": None if r.chat_kld is None else round(r.chat_kld, 5),
                "chat_top1_pct": pct(r.chat_top1),
                "seconds": r.seconds,
                "example": r.example,
                "workdir": r.workdir,
                "fingerprint": r.fingerprint,
            }
        )
    return out


def results_csv(rows: list[SweepRow]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in csv_rows(rows):
        writer.writerow({k: "" if v is None else v for k, v in r.items()})
    return buf.getvalue()


def md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ⏎ ")


def results_markdown(rows: list[SweepRow], limits: EvalLimits, grid_name: str) -> str:
    with_order = any(r.order for r in rows)
    with_chat = any(r.chat_match32 is not None for r in rows)
    ambiguous = len({short_label(r) for r in rows}) < len(rows)
    head = (
        (["run"] if ambiguous else [])
        + ["config", "LoRA", "quant"]
        + (["order"] if with_order else [])
        + ["closed %", "open %", "PPL", "non-zero params", "size", "deployed"]
        + (["chat match %", "chat KL"] if with_chat else [])
    )
    lines = [
        f"# Sweep `{grid_name}`: results",
        "",
        f"*{caption(limits, rows)}*",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = (
            ([r.name] if ambiguous else [])
            + [r.config, r.lora, r.quant]
            + ([r.order or "—"] if with_order else [])
            + [
                f"{100 * r.closed:.1f}",
                f"{100 * r.open:.1f}",
                f"{r.ppl:.2f}",
                fmt_params(r.params_nonzero),
                fmt_size(r),
                fmt_mb(r.deployed_bytes),
            ]
            + (
                ["—" if r.chat_match32 is None else f"{100 * r.chat_match32:.1f}", _fmt_kld(r.chat_kld)]
                if with_chat
                else []
            )
        )
        lines.append("| " + " | ".join(md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt_kld(x) -> str:
    return "—" if x is None else f"{x:.4f}"


def examples_markdown(
    rows: list[SweepRow], limits: EvalLimits, prompt: str, grid_name: str, max_new_tokens: int = 24
) -> str:
    lines = [
        f"# Sweep `{grid_name}`: generation examples",
        "",
        f"*Prompt {prompt!r} as one chat turn (the model's chat template), greedy decoding, up to {max_new_tokens} new tokens, "
        f"through the final stage of every configuration (torch, float32; GPTQ as its exact dequantized weights). "
        f"Evaluation limits of the other tables: {limits.describe()}.*",
        "",
        "| config | LoRA | quant | output |",
        "|---|---|---|---|",
    ]
    for r in rows:
        cfg = r.config + (f" ({r.order})" if r.order else "")
        lines.append("| " + " | ".join(md_cell(c) for c in (cfg, r.lora, r.quant, r.example or "(empty)")) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ analysis
def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower (or equal) cost AND higher accuracy."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def order_pairs(rows: list[SweepRow]) -> list[tuple[str, SweepRow, SweepRow]]:
    """(label, D→W→L row, D→L→W row) for recipes that differ only in the order of width pruning and LoRA."""
    groups: dict[str, dict] = {}
    for r in rows:
        if not r.order:
            continue
        key = json.dumps({k: v for k, v in r.recipe.items() if k not in ("name", "order")}, sort_keys=True)
        groups.setdefault(key, {})[r.recipe["order"]] = r
    pairs = []
    for g in groups.values():
        if "DWL" in g and "DLW" in g:
            a = g["DWL"]
            pairs.append(
                (f"{a.config} · LoRA {a.lora}" + (f" · {a.quant}" if a.quant != "none" else ""), g["DWL"], g["DLW"])
            )
    return pairs


# ------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _acc_top(values) -> float:
    """Accuracy axes start at 0 and leave headroom; an all-zero tiny run still gets a readable axis."""
    return min(100.0, max(10.0, 1.15 * max(values, default=0)))


def _baseline(rows):
    return next((r for r in rows if r.config == "baseline" and r.lora == "none" and r.quant == "none"), None)


def plot_accuracy(rows: list[SweepRow], limits: EvalLimits, path: Path) -> Path:
    import numpy as np

    plt = _pyplot()
    names = plot_labels(rows)
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows) + 2), 5), layout="constrained")
    ax.bar(x - 0.2, [100 * r.closed for r in rows], 0.4, label="closed book")
    ax.bar(x + 0.2, [100 * r.open for r in rows], 0.4, label="open book")
    base = _baseline(rows)
    if base:
        ax.axhline(100 * base.closed, ls="--", lw=0.8, color="C0")
        ax.axhline(100 * base.open, ls="--", lw=0.8, color="C1")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("TriviaQA accuracy (% contains an alias)")
    ax.set_ylim(0, _acc_top([100 * getattr(r, k) for r in rows for k in ("closed", "open")]))
    ax.set_title(
        f"TriviaQA accuracy per configuration (n={rows[0].questions}; dashed: baseline)\n{limits.describe()}",
        fontsize=9,
    )
    ax.legend()
    return _save(fig, path)


def plot_perplexity(rows: list[SweepRow], limits: EvalLimits, path: Path) -> Path:
    import numpy as np

    plt = _pyplot()
    names = plot_labels(rows)
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows) + 2), 5), layout="constrained")
    ax.bar(x, [r.ppl for r in rows], 0.6, color="C2")
    base = _baseline(rows)
    if base:
        ax.axhline(base.ppl, ls="--", lw=0.8, color="k")
    ax.set_yscale("log")  # pruning can raise perplexity by orders of magnitude
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("WikiText-2 perplexity (log scale, lower is better)")
    ax.set_title(
        f"Perplexity per configuration ({rows[0].ppl_tokens} scored tokens; dashed: baseline)\n{limits.describe()}",
        fontsize=9,
    )
    return _save(fig, path)


def plot_pareto(rows: list[SweepRow], limits: EvalLimits, path: Path) -> Path:
    """Quality against what a user pays in: deployed bytes (the bundle's decoder files; the checkpoint's
    files for points where they were not measured, marked in the axis label)."""
    plt = _pyplot()
    names = plot_labels(rows)
    panels = [("closed", "TriviaQA closed book (% contains)"), ("open", "TriviaQA open book (% contains)")]
    if any(r.chat_match32 is not None for r in rows):
        panels.append(("chat_match32", "chat: replies matching the source's first 32 tokens (%)"))
    estimated = any(r.deployed_bytes is None for r in rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), sharex=True, layout="constrained")
    for ax, (key, title) in zip(axes, panels):
        pts = [(cost_bytes(r) / 1e6, 100 * (getattr(r, key) or 0.0)) for r in rows]
        front = pareto_front(pts)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="0.6", s=18, label="configuration")
        fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
        ax.plot(fx, fy, "-o", color="C3", ms=6, drawstyle="steps-post", label="Pareto front")
        for i in front:
            ax.annotate(names[i], pts[i], fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(
            "deployed MB (bundle decoder files" + ("; checkpoint files where not measured)" if estimated else ")")
        )
        ax.set_ylabel(title)
        ax.set_ylim(0, _acc_top([p[1] for p in pts]))
        ax.set_xlim(left=0)
        ax.set_title(f"{title.split(' (')[0]} vs deployed bytes", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"Pareto front: no other configuration ships fewer bytes with higher quality\n{limits.describe()}",
        fontsize=9,
    )
    return _save(fig, path)


def plot_order(pairs, limits: EvalLimits, path: Path) -> Path:
    import numpy as np

    plt = _pyplot()
    x = np.arange(len(pairs))
    fig, axes = plt.subplots(1, 3, figsize=(max(11, 3 * len(pairs) + 4), 4.5), layout="constrained")
    for ax, key, ylabel in (
        (axes[0], "closed", "closed book %"),
        (axes[1], "open", "open book %"),
        (axes[2], "ppl", "WikiText-2 PPL"),
    ):
        scale = 1 if key == "ppl" else 100
        ax.bar(x - 0.2, [scale * getattr(a, key) for _, a, _ in pairs], 0.4, label="depth → width → LoRA")
        ax.bar(x + 0.2, [scale * getattr(b, key) for _, _, b in pairs], 0.4, label="depth → LoRA → width")
        ax.set_xticks(x, [p[0] for p in pairs], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        if key != "ppl":
            ax.set_ylim(0, _acc_top([scale * getattr(r, key) for _, a, b in pairs for r in (a, b)]))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Stage order: width pruning before or after LoRA\n{limits.describe()}", fontsize=9)
    return _save(fig, path)


# ------------------------------------------------------------------ the folder
def write_report(
    rows: list[SweepRow],
    out_dir: str | Path,
    limits: EvalLimits,
    grid_name: str,
    failed=(),
    prompt: str = "",
    max_new_tokens: int = 24,
) -> dict[str, Path]:
    """Write every table, plot and index.md into `out_dir`; returns {file kind: path}."""
    out = Path(out_dir)
    files: dict[str, Path] = {}
    files["csv"] = atomic_write_text(out / "results.csv", results_csv(rows))
    files["results"] = atomic_write_text(out / "results.md", results_markdown(rows, limits, grid_name))
    files["examples"] = atomic_write_text(
        out / "examples.md", examples_markdown(rows, limits, prompt, grid_name, max_new_tokens)
    )
    pairs = order_pairs(rows)
    if rows:
        files["accuracy"] = plot_accuracy(rows, limits, out / "accuracy.png")
        files["perplexity"] = plot_perplexity(rows, limits, out / "perplexity.png")
        files["pareto"] = plot_pareto(rows, limits, out / "pareto.png")
    if pairs:
        files["order"] = plot_order(pairs, limits, out / "order.png")
    files["index"] = atomic_write_text(out / "index.md", index_markdown(rows, limits, grid_name, files, pairs, failed))
    return files


def index_markdown(rows, limits: EvalLimits, grid_name: str, files: dict, pairs, failed) -> str:
    lines = [
        f"# Sweep `{grid_name}`",
        "",
        f"{len(rows)} configuration{'' if len(rows) == 1 else 's'} evaluated"
        + (f", {len(failed)} failed" if failed else "")
        + ".",
        "",
        f"*{caption(limits, rows)}*",
        "",
        "- [results.md](results.md): the table (config, LoRA, quant, closed %, open %, PPL, non-zero params, size, "
        "deployed bytes, chat match)",
        "- [results.csv](results.csv): every number, including exact match, KL divergence and work directories",
        "- [examples.md](examples.md): one prompt through every configuration",
        "",
    ]
    plots = [
        ("accuracy", "TriviaQA accuracy per configuration"),
        ("perplexity", "Perplexity per configuration"),
        ("pareto", "Quality vs deployed bytes, Pareto front marked"),
        ("order", "Stage order: depth → width → LoRA vs depth → LoRA → width"),
    ]
    for kind, title in plots:
        if kind in files:
            lines += [f"## {title}", "", f"![{title}]({files[kind].name})", ""]
    if not pairs:
        lines += ["*No ordering comparison: the grid has no pair of recipes that differ only in `order`.*", ""]
    if failed:
        lines += ["## Failed points", ""] + [f"- `{r.name}`: {md_cell(r.error)} ({r.workdir})" for r in failed]
        lines.append("")
    lines += ["## Work directories", ""] + [f"- `{r.name}`: `{r.workdir}`" for r in rows]
    return "\n".join(lines) + "\n"
