"""Quality claims: measured once by the exporter, re-measured by `edgepack verify` on the user's machine.

Both sides call runtime.harness.evaluate on the bundle's ONNX model with the bundle's reference and the
claim's own limits, so a claim and its check differ only by what differs between machines (CPU kernels,
thread counts), never by protocol. Each claim stores its limits, its sample size and its tolerance
(see runtime.manifest for the schema):

    ppl                 relative 2 %: |measured - claimed| <= 0.02 * claimed
    kld, chat_kld       absolute max(0.01, 0.05 * claimed) nats
    top1, triviaqa_*,   absolute binomial-noise margin for the sample size n (reply tokens for chat_top1,
    chat_top1,          replies for chat_match32):
    chat_match32
                        max(2 * sqrt(p * (1 - p) / n), 2 / n), i.e. two standard errors, never below two items

The data is always the project's own: runtime.manifest only accepts claims whose limits name the built-in
evaluation sets (never a path), and runtime.datasets checks each shipped set against its digest before
reading it; a user's own files are used only where the user names them (a recipe's calibration dataset, the
Python API), never because a bundle says so.

On the machine that exported the bundle the re-measurement is exact; the margins are there for other CPUs
(int8 activation kernels differ between AVX2, AVX-512 VNNI and ARM dot-product paths) and are small enough
that a perturbed weight file fails them (tests/test_verify.py).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, fields

from runtime.errors import EdgepackError
from runtime.harness import EvalLimits, evaluate
from runtime.manifest import METRICS

PPL_METRICS = ("ppl", "kld", "top1")
CHAT_METRICS = ("chat_kld", "chat_top1", "chat_match32")
REFERENCE_METRICS = ("kld", "top1", *CHAT_METRICS)


@dataclass
class MetricCheck:
    name: str  # metric key, e.g. "ppl" or "triviaqa_closed_contains"
    claimed: float
    measured: float | None  # None when it could not be measured (detail says why)
    tolerance: float  # the allowed |measured - claimed|, in the metric's units
    passed: bool
    detail: str  # the rule and the sample, e.g. "relative 2 %; 8 windows × 512 = 4088 tokens"

    @property
    def label(self) -> str:
        return METRICS.get(self.name, self.name)


# ---------------------------------------------------------------------------------------------------------
# Claims (exporter side)


def tolerance_for(metric: str, value: float, n: int) -> dict:
    """The tolerance a claim of `value` on a sample of `n` gets (the rule in this module's docstring)."""
    if metric == "ppl":
        return {"kind": "relative", "value": 0.02, "rule": "relative 2 %"}
    if metric in ("kld", "chat_kld"):
        return {
            "kind": "absolute",
            "value": round(max(0.01, 0.05 * value), 6),
            "rule": "absolute max(0.01, 5 % of claimed) nats",
        }
    p = min(max(float(value), 0.0), 1.0)
    margin = max(2.0 * math.sqrt(p * (1.0 - p) / n), 2.0 / n)
    return {
        "kind": "absolute",
        "value": round(margin, 6),
        "rule": f"absolute, binomial margin max(2·sqrt(p(1-p)/n), 2/n) for n={n}",
    }


def claims_from_result(result: dict, limits: EvalLimits) -> dict:
    """{metric: claim} from one runtime.harness.evaluate result."""
    lim = asdict(limits)
    claims = {}

    def add(metric, value, n):
        claims[metric] = {
            "value": float(value),
            "limits": lim,
            "n": int(n),
            "tolerance": tolerance_for(metric, value, n),
        }

    if "wikitext" in result:
        w = result["wikitext"]
        add("ppl", w["ppl"], w["tokens"])
        if "kld" in w:
            add("kld", w["kld"], w["tokens"])
            add("top1", w["top1"], w["tokens"])
    for mode in ("closed", "open"):
        r = result.get(f"triviaqa_{mode}")
        if r:
            add(f"triviaqa_{mode}_contains", r["contains"], r["n"])
            add(f"triviaqa_{mode}_exact", r["exact_match"], r["n"])
    if "chat" in result:
        c = result["chat"]
        add("chat_kld", c["kld"], c["tokens"])
        add("chat_top1", c["top1"], c["tokens"])
        add("chat_match32", c["match32"], c["replies"])
    return claims


def measure_quality(
    backend, tokenizer, reference, levels: dict[str, EvalLimits], tasks=("ppl", "closed", "open"), progress: bool = True
) -> dict:
    """The manifest's quality block: for each level ("full", optionally "quick"), evaluate the bundle's
    model (an OnnxDecoder on the exported ONNX file) with the runtime's harness and turn the numbers into
    claims. `reference` (runtime.reference.Reference or None) adds kld and top1, and perplexity is then
    measured on the reference's windows (its ctx must equal the limits' ctx); a reference with a chat part
    adds the chat claims (chat_kld, chat_top1, chat_match32)."""
    quality = {}
    has_chat = getattr(reference, "chat", None) is not None
    for level, limits in levels.items():
        _check_reference_fits(reference, limits, f"quality level {level!r}")
        same = next((quality[earlier] for earlier, lim in levels.items() if earlier in quality and lim == limits), None)
        if same is not None:  # e.g. an export on the quick limits: "full" and "quick" are one measurement
            quality[level] = copy.deepcopy(same)
            continue
        chat = ("chat",) if has_chat and "chat" not in tasks and getattr(limits, "chat_prompts", 0) != 0 else ()
        result = evaluate(backend, tokenizer, limits, tasks=(*tasks, *chat), progress=progress, reference=reference)
        quality[level] = claims_from_result(result, limits)
    return quality


def _check_reference_fits(reference, limits: EvalLimits, what: str) -> None:
    if reference is None:
        return
    n, ctx = reference.window_ids.shape
    if ctx != limits.ctx:
        raise EdgepackError(f"{what}: the reference's windows are {ctx} tokens, the limits say ctx={limits.ctx}")
    if limits.ppl_windows is not None and limits.ppl_windows > n:
        raise EdgepackError(f"{what}: {limits.ppl_windows} perplexity windows asked, the reference has {n}")


# ---------------------------------------------------------------------------------------------------------
# Verification (user side)


def _limits_from(d: dict, where: str) -> EvalLimits:
    known = {f.name for f in fields(EvalLimits)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise EdgepackError(f"{where}: unknown evaluation limit {unknown[0]!r} (written by a newer edgepack?)")
    return EvalLimits(**d)


def verify_bundle(
    bundle, quick: bool = False, progress: bool = True, on_progress=None, threads: int | None = None
) -> list[MetricCheck]:
    """Re-measure the manifest's claims ("full", or "quick" with quick=True) with the same limits, and
    compare each with its tolerance. on_progress(done, total, message) is called before each group of
    metrics that share limits is measured, and once at the end (done == total)."""
    level = "quick" if quick else "full"
    claims = bundle.manifest["quality"].get(level) or {}
    if not claims:
        raise EdgepackError(f"{bundle.path}: the manifest makes no {level!r} quality claims to verify")
    groups: dict[str, list[str]] = {}
    for metric, claim in claims.items():
        groups.setdefault(json.dumps(claim["limits"], sort_keys=True), []).append(metric)

    reference = bundle.reference()
    decoder = None
    checks: list[MetricCheck] = []
    for i, (key, metrics) in enumerate(groups.items()):
        limits = _limits_from(json.loads(key), f"{bundle.path}: quality.{level}.{metrics[0]}.limits")
        if on_progress:
            on_progress(i, len(groups), f"measuring {', '.join(metrics)} ({limits.describe()})")
        needs_ref = any(m in REFERENCE_METRICS for m in metrics)
        if needs_ref and reference is None:
            checks += [
                _unmeasured(m, claims[m], "the bundle ships no reference") for m in metrics if m in REFERENCE_METRICS
            ]
            metrics = [m for m in metrics if m not in REFERENCE_METRICS]
        if any(m in CHAT_METRICS for m in metrics) and reference is not None and reference.chat is None:
            checks += [
                _unmeasured(m, claims[m], "the bundle's reference holds no chat replies")
                for m in metrics
                if m in CHAT_METRICS
            ]
            metrics = [m for m in metrics if m not in CHAT_METRICS]
        tasks = []
        if any(m in PPL_METRICS for m in metrics):
            tasks.append("ppl")
        tasks += [mode for mode in ("closed", "open") if any(m.startswith(f"triviaqa_{mode}_") for m in metrics)]
        if any(m in CHAT_METRICS for m in metrics):
            tasks.append("chat")
        if not tasks:
            continue
        if "ppl" in tasks:
            _check_reference_fits(reference, limits, f"{bundle.reference_path}")
        if decoder is None:
            decoder = bundle.decoder(threads)
        result = evaluate(
            decoder,
            bundle.tokenizer,
            limits,
            tasks=tuple(tasks),
            progress=progress,
            reference=reference if ("ppl" in tasks or "chat" in tasks) else None,
        )
        measured = claims_from_result(result, limits)
        for m in metrics:
            checks.append(compare(m, claims[m], measured.get(m)))
    if on_progress:
        on_progress(len(groups), len(groups), "done")
    order = list(METRICS)
    return sorted(checks, key=lambda c: order.index(c.name) if c.name in order else len(order))


def compare(metric: str, claim: dict, measured: dict | None) -> MetricCheck:
    """One claim against its re-measurement."""
    if measured is None:
        return _unmeasured(metric, claim, "not produced by the evaluation")
    tol = claim["tolerance"]
    allowed = tol["value"] * abs(claim["value"]) if tol["kind"] == "relative" else tol["value"]
    diff = abs(measured["value"] - claim["value"])
    sample = _sample_text(metric, claim)
    rule = tol.get("rule") or f"{tol['kind']} {tol['value']}"
    if measured["n"] != claim["n"]:
        return MetricCheck(
            metric,
            claim["value"],
            measured["value"],
            allowed,
            False,
            f"sample size differs: measured on {measured['n']}, claimed on {claim['n']} ({sample})",
        )
    passed = diff <= allowed + 1e-12
    return MetricCheck(metric, claim["value"], measured["value"], allowed, passed, f"{rule}; {sample}")


def _unmeasured(metric: str, claim: dict, why: str) -> MetricCheck:
    return MetricCheck(metric, claim["value"], None, claim["tolerance"]["value"], False, f"not measured: {why}")


def _sample_text(metric: str, claim: dict) -> str:
    lim = claim["limits"]
    if metric in PPL_METRICS:
        return f"{claim['n']} tokens, ctx={lim['ctx']}"
    if metric == "chat_match32":
        return f"n={claim['n']} source replies"
    if metric in CHAT_METRICS:
        return f"{claim['n']} reply tokens of {lim.get('chat_prompts') or 'all'} source replies"
    return f"n={claim['n']} questions, {lim['qa_max_new_tokens']} new tokens max"


def format_checks(checks: list[MetricCheck]) -> str:
    """The verify table: metric, claimed, measured, tolerance, PASS/FAIL, detail."""
    from runtime.bundle import format_metric

    rows = [("metric", "claimed", "measured", "tolerance", "result", "detail")]
    for c in checks:
        measured = "-" if c.measured is None else format_metric(c.name, c.measured)
        tol = f"±{c.tolerance:.4f}" if c.name in ("ppl", "kld", "chat_kld") else f"±{100 * c.tolerance:.1f} pt"
        rows.append(
            (c.label, format_metric(c.name, c.claimed), measured, tol, "PASS" if c.passed else "FAIL", c.detail)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5] for r in rows]
    failed = sum(not c.passed for c in checks)
    lines.append(f"{len(checks) - failed}/{len(checks)} checks passed" + (f", {failed} FAILED" if failed else ""))
    return "\n".join(lines)


def checks_to_json(checks: list[MetricCheck]) -> dict:
    return {"passed": all(c.passed for c in checks), "checks": [asdict(c) | {"label": c.label} for c in checks]}
