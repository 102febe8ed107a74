"""Study mode: run a grid of recipes and report it as tables and plots (compressor.report).

A grid is a named list (`pruned`, `optimized`, `order`) or a TOML file of recipes. Every grid point is an
independent job in `runs_dir/<slug>-<recipe hash>/`, so a sweep that stops resumes where it was, and a
finished point is read back from its row cache without loading a model.

Points that start the same way share their common stages instead of recomputing them: before a job runs,
`share_prefix` looks for another work directory whose first k stage records carry the same fingerprints
(the pipeline's own chain: stage settings + calibration + the previous stage's fingerprint) and hard-links
those stage directories into the job's work directory; the pipeline then finds them done and resumes after
them. Jobs that can share (same first stage) form a *family* that runs in order, shortest recipe first;
families run in parallel, as processes (`--jobs N`) or as Ray tasks (`--ray`). Nothing here schedules
anything else by hand.

Grid TOML:

    name = "my-grid"                 # optional; default: the file's stem
    model = "models/SmolLM2-135M-Instruct"
    grid = "optimized"               # optional: start from a named grid
    [calibration]                    # defaults for every run
    samples = 16
    [lora]                           # defaults for every run that HAS a LoRA stage (does not add one)
    samples = 128
    [[run]]
    preset = "D2"                    # N:M = N weights PRUNED in every group of M
    [[run]]
    name = "w18-dense-merge"
    [run.width]
    n = 1
    m = 8
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from compressor.importer import MODELS_DIR
from compressor.recipe import (
    CHANNEL_PRESETS,
    PRUNED_PRESETS,
    SECTIONS,
    Recipe,
    recipe_from_dict,
    settings_hash,
)
from compressor.report import FailedPoint, SweepRow
from compressor.workdir import RECORD, Workdir, read_record, stage_dirname
from runtime.errors import EdgepackError
from runtime.fileio import atomic_write_json
from runtime.harness import EvalLimits, add_limit_args, limits_from_args

DEFAULT_PROMPT = "Who created the Chipmunks?"
EXAMPLE_TOKENS = 24
ROW_VERSION = 2  # bump when the row layout changes, so cached rows are recomputed
ROW_FILE = "sweep-row.json"  # a finished point's table row, in its work directory

# The seed study's grids, as preset strings (N:M = N weights pruned of every M).
OPTIMIZED_GRID = [
    # the seed's three optimised configurations, each without quantization, with GPTQ, and with GPTQ+EoRA
    "W1:8 lora=wikitext",
    "W1:8 lora=wikitext quant=gptq",
    "W1:8 lora=wikitext quant=eora",
    "D2 lora=triviaqa",
    "D2 lora=triviaqa quant=gptq",
    "D2 lora=triviaqa quant=eora",
    "D2+W1:8 lora=wikitext",
    "D2+W1:8 lora=wikitext quant=gptq",
    "D2+W1:8 lora=wikitext quant=eora",
    # the other LoRA dataset on the combined pruning, and quantization alone as the reference for its cost
    "D2+W1:8 lora=triviaqa quant=eora",
    "baseline quant=gptq",
    "baseline quant=eora",
]
ORDER_GRID = [
    "W2:4 lora=wikitext order=DWL",
    "W2:4 lora=wikitext order=DLW",
    "D2+W2:4 lora=wikitext order=DWL",
    "D2+W2:4 lora=wikitext order=DLW",
    "D2+W1:8 lora=wikitext order=DWL",
    "D2+W1:8 lora=wikitext order=DLW",
]
NAMED_GRIDS = {
    "pruned": PRUNED_PRESETS + ["C75", "C75A2"],
    "optimized": OPTIMIZED_GRID,
    "order": ORDER_GRID,
}
assert all(c in CHANNEL_PRESETS for c in NAMED_GRIDS["pruned"][-2:])


# ------------------------------------------------------------------ grids
def load_grid(spec: str, model: str | None = None) -> tuple[str, list[Recipe]]:
    """A named grid or a TOML grid file -> (grid name, recipes); the baseline is always the first row."""
    if spec in NAMED_GRIDS:
        name, defaults, runs = spec, {}, [{"preset": p} for p in NAMED_GRIDS[spec]]
    else:
        path = Path(spec)
        if not path.is_file():
            raise EdgepackError(f"{spec}: neither a named grid ({', '.join(NAMED_GRIDS)}) nor a grid TOML file")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise EdgepackError(f"{path}: invalid TOML ({e})") from None
        runs = data.pop("run", [])
        if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
            raise EdgepackError(f"{path}: runs are written as [[run]] tables")
        base = data.pop("grid", None)
        if base is not None:
            if base not in NAMED_GRIDS:
                raise EdgepackError(f"{path}: grid = {base!r} is not a named grid ({', '.join(NAMED_GRIDS)})")
            runs = [{"preset": p} for p in NAMED_GRIDS[base]] + runs
        name = data.pop("name", path.stem)
        unknown = set(data) - {"model"} - set(SECTIONS)
        if unknown:
            raise EdgepackError(
                f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))} (name, model, grid, "
                f"[[run]], or a default section: {', '.join(SECTIONS)})"
            )
        defaults = data
        if not runs:
            raise EdgepackError(f'{path}: no [[run]] tables and no grid = "..."')
        spec = str(path)
    if model:
        defaults = {**defaults, "model": model}
    recipes = [recipe_from_dict(r, defaults, f"{spec} run {i + 1}") for i, r in enumerate(runs)]
    if not any(not r.stage_names() for r in recipes):
        recipes.insert(0, recipe_from_dict({"preset": "baseline"}, defaults, spec))
    else:  # move the reference row first
        recipes.sort(key=lambda r: bool(r.stage_names()))
    seen: dict[str, str] = {}
    for r in recipes:
        h = recipe_hash(r)
        if r.name in seen and seen[r.name] != h:
            raise EdgepackError(f"{spec}: two different runs are named {r.name!r}")
        seen[r.name] = h
    unique = {recipe_hash(r) + r.name: r for r in recipes}  # the same point listed twice runs once
    return name, list(unique.values())


def recipe_hash(recipe: Recipe) -> str:
    """Identity of a grid point: everything but its name."""
    return settings_hash({k: v for k, v in recipe.to_dict().items() if k != "name"})


def labels(recipe: Recipe) -> dict:
    """The seed table's first columns: pruning config, LoRA data, quantization, stage order."""
    parts = []
    if recipe.depth:
        parts.append(f"D{recipe.depth.remove}")
    if recipe.width:
        parts.append(f"W{recipe.width.n}:{recipe.width.m}")
    if recipe.channels:
        c = recipe.channels
        parts.append(f"C{round(100 * c.ffn_keep)}" + (f"A{c.kv_groups_keep}" if c.kv_groups_keep else ""))
    config = "+".join(parts) or "baseline"
    order = ""
    if recipe.lora and (recipe.width or recipe.channels):
        order = "L→W" if recipe.order == "DLW" else "W→L"
        order = ("D→" if recipe.depth else "") + order
    quant = "GPTQ+EoRA" if recipe.eora else "GPTQ" if recipe.gptq else "none"
    return {"config": config, "lora": recipe.lora.dataset if recipe.lora else "none", "quant": quant, "order": order}


# ------------------------------------------------------------------ jobs and prefix sharing
@dataclasses.dataclass
class Job:
    recipe: Recipe
    workdir: Path
    chain: list[tuple[str, str]]  # (stage directory name, fingerprint) per stage, in order
    source_fp: str

    @property
    def name(self) -> str:
        return self.recipe.name


def stage_chain(recipe: Recipe, source_fp: str | None = None) -> list[tuple[str, str]]:
    """The stage directories and fingerprints the pipeline will use for `recipe`, computed without running."""
    from compressor.pipeline import source_fingerprint, stage_fingerprint

    fp = source_fp or source_fingerprint(Path(recipe.model))
    chain = []
    for index, stage in enumerate(recipe.stage_names(), 1):
        fp = stage_fingerprint(recipe, stage, fp)
        chain.append((stage_dirname(index, stage), fp))
    return chain


def plan_jobs(recipes: list[Recipe], runs_dir: Path) -> list[Job]:
    from compressor.pipeline import slug, source_fingerprint

    jobs, source_fps = [], {}
    for r in recipes:
        if not (Path(r.model) / "config.json").exists():
            raise EdgepackError(f"{r.model}: source model not found (run `edgepack import` first, or pass --model)")
        if r.model not in source_fps:
            source_fps[r.model] = source_fingerprint(Path(r.model))
        jobs.append(
            Job(
                r,
                runs_dir / f"{slug(r.name)}-{recipe_hash(r)}",
                stage_chain(r, source_fps[r.model]),
                source_fps[r.model],
            )
        )
    return jobs


def families(jobs: list[Job]) -> list[list[Job]]:
    """Jobs whose first stage is the same can share a prefix: one family each, shortest recipe first, so a
    longer recipe finds its prefix finished. Jobs with no stages (the baseline) stand alone."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        key = job.chain[0][1] if job.chain else f"solo-{job.workdir.name}"
        groups.setdefault(key, []).append(job)
    return [sorted(g, key=lambda j: len(j.chain)) for g in groups.values()]


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: a plain copy is still correct
        shutil.copy2(src, dst)


def _rewrite_paths(obj, old: str, new: str):
    if isinstance(obj, str):
        return new + obj[len(old) :] if obj == old or obj.startswith(old + os.sep) else obj
    if isinstance(obj, dict):
        return {k: _rewrite_paths(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rewrite_paths(v, old, new) for v in obj]
    return obj


def _finished_prefix(wd: Workdir, chain: list[tuple[str, str]]) -> int:
    """How many leading stages of `chain` are finished in `wd` (the pipeline's own test)."""
    n = 0
    while n < len(chain) and wd.finished(*chain[n]):
        n += 1
    return n


def share_prefix(recipe: Recipe, workdir: Path, other_workdirs, source_fp: str | None = None) -> list[str]:
    """Hard-link (copy where linking fails) the longest run of leading stages of `recipe` that another work
    directory has finished with the same fingerprints into `workdir`; returns the stage directory names
    linked. Records are rewritten to point at `workdir`, so the copy stands alone if the donor is deleted.
    Finished outputs are never modified in place (every write is a rename), so shared inodes stay correct.
    The donor's cached evaluations (keyed by fingerprint and limits) are linked too."""

    workdir = Path(workdir)
    chain = stage_chain(recipe, source_fp)
    have = _finished_prefix(Workdir(workdir), chain)
    donor, best = None, have
    for other in other_workdirs:
        other = Path(other)
        if not other.is_dir() or other.resolve() == workdir.resolve():
            continue
        n = _finished_prefix(Workdir(other), chain)
        if n > best:
            donor, best = other, n
    if donor is None:
        return []
    workdir.mkdir(parents=True, exist_ok=True)
    linked = []
    for dirname, _ in chain[have:best]:
        target = workdir / dirname
        tmp = Path(tempfile.mkdtemp(prefix=f".{dirname}.", dir=workdir))
        try:
            shutil.copytree(donor / dirname, tmp / dirname, copy_function=_link_or_copy, symlinks=True)
            record = read_record(tmp / dirname / RECORD)
            record = _rewrite_paths(record, str(donor), str(workdir))
            record["shared_from"] = str(donor / dirname)
            (tmp / dirname / RECORD).unlink()  # break the link before rewriting: the donor keeps its own
            atomic_write_json(tmp / dirname / RECORD, record)
            if target.exists():
                shutil.rmtree(target)  # a partial or stale attempt at this stage
            os.replace(tmp / dirname, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        linked.append(dirname)
    for cached in sorted(Workdir(donor).evals.glob("*.json")):
        dst = Workdir(workdir).evals / cached.name
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(str(cached), str(dst))
    return linked


# ------------------------------------------------------------------ running one job
def _row_key(job: Job, limits: EvalLimits, prompt: str, max_new_tokens: int) -> str:
    final_fp = job.chain[-1][1] if job.chain else job.source_fp
    return settings_hash(
        {
            "v": ROW_VERSION,
            "recipe": recipe_hash(job.recipe),
            "name": job.name,
            "fp": final_fp,
            "limits": dataclasses.asdict(limits),
            "prompt": prompt,
            "tokens": max_new_tokens,
        }
    )


def cached_row(
    job: Job, limits: EvalLimits, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = EXAMPLE_TOKENS
) -> SweepRow | None:
    cached = read_record(job.workdir / ROW_FILE)
    if cached and cached.get("key") == _row_key(job, limits, prompt, max_new_tokens):
        return SweepRow(**cached["row"])
    return None


def _weight_bytes(*dirs: Path) -> int:
    return sum(f.stat().st_size for d in dirs for f in Path(d).glob("*.safetensors"))


def _adapter_params(adapter_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in Path(adapter_dir).glob("*.safetensors"):
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n = 1
                for s in shape:
                    n *= s
                total += n
    return total


def _final_model(job: Job, summary: dict):
    """(torch model, weight directories) of the job's final result, loaded as the evaluation loads it."""
    from compressor.stages import load_stage_model
    from compressor.torch_backend import load_causal_lm

    if not summary["stages"]:
        return load_causal_lm(job.recipe.model), [Path(job.recipe.model)]
    rec = summary["stages"][-1]
    sdir = job.workdir / job.chain[-1][0]
    dirs = [Path(summary["final_model"])]
    if rec["stage"] == "eora":
        dirs.append(Path(rec["quantized_model"]))
    return load_stage_model(rec["stage"], sdir, rec), dirs


def deployed_bytes(workdir: Path, summary: dict) -> int:
    """Bytes of the ONNX decoder files a bundle of this run ships: built with the exporter's shipping graph
    (exporter.export.build_onnx) into a temporary directory and measured, so pruned zeros, int4 packing, the
    int8 embedding and EoRA's factors count as they deploy."""
    from exporter.export import ExportOptions, build_onnx  # the sweep sits on top of the whole pipeline

    with tempfile.TemporaryDirectory(prefix=".deployed-", dir=workdir) as tmp:
        build_onnx(workdir, summary, Path(tmp), ExportOptions())
        return sum(f.stat().st_size for f in (Path(tmp) / "onnx").iterdir() if f.is_file())


def generate_example(model, tokenizer, prompt: str, max_new_tokens: int = EXAMPLE_TOKENS) -> str:
    """Greedy answer to one chat turn: the same words through every configuration show what pruning costs."""
    from compressor.torch_backend import TorchBackend

    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    stops = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    out = TorchBackend(model, pad_id=tokenizer.pad_id).greedy([ids], max_new_tokens, stops)[0]
    return tokenizer.decode(out).strip()


def run_job(
    job: Job,
    limits: EvalLimits,
    peers: list[Path],
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = EXAMPLE_TOKENS,
    log=print,
) -> SweepRow:
    """Run (or resume) one grid point and return its table row, cached in workdir/sweep-row.json."""
    from compressor.pipeline import run_pipeline

    row = cached_row(job, limits, prompt, max_new_tokens)
    if row is not None:
        return row
    t0 = time.perf_counter()
    linked = share_prefix(job.recipe, job.workdir, peers, job.source_fp)
    if linked:
        log(f"{job.name}: reusing {', '.join(linked)} from a run with the same stage fingerprints")
    summary = run_pipeline(job.recipe, job.workdir, eval_limits=limits, final_eval=True, stage_eval=False, log=log)
    row = _row(job, summary, limits, prompt, max_new_tokens, linked)
    row.seconds = round(time.perf_counter() - t0, 1)
    atomic_write_json(
        job.workdir / ROW_FILE, {"key": _row_key(job, limits, prompt, max_new_tokens), "row": dataclasses.asdict(row)}
    )
    return row


def _row(job: Job, summary: dict, limits: EvalLimits, prompt: str, max_new_tokens: int, linked: list[str]) -> SweepRow:
    """The table row of a finished run: its evaluation, parameter counts, size on disk and example answer."""
    from compressor.torch_backend import load_causal_lm
    from compressor.width import count_parameters
    from runtime.tokenizer import TextTokenizer

    model, weight_dirs = _final_model(job, summary)
    float_params = next((s["params"] for s in reversed(summary["stages"]) if s.get("params")), None)
    if float_params is None:  # baseline, or quantization of the source: the source's count
        float_params = count_parameters(load_causal_lm(job.recipe.model))
    extra = (
        _adapter_params(Path(summary["final_model"]))
        if summary["stages"] and summary["stages"][-1]["stage"] == "eora"
        else 0
    )
    example = generate_example(model, TextTokenizer(job.recipe.model), prompt, max_new_tokens)
    ev = summary["eval"]
    nonzero = float_params["nonzero"] if float_params["nonzero"] is not None else float_params["dense"]
    return SweepRow(
        name=job.name,
        **labels(job.recipe),
        description=summary["description"],
        closed=ev["triviaqa_closed"]["contains"],
        closed_exact=ev["triviaqa_closed"]["exact_match"],
        open=ev["triviaqa_open"]["contains"],
        open_exact=ev["triviaqa_open"]["exact_match"],
        questions=ev["triviaqa_closed"]["n"],
        ppl=ev["wikitext"]["ppl"],
        ppl_windows=ev["wikitext"]["windows"],
        ppl_tokens=ev["wikitext"]["tokens"],
        kld=ev["wikitext"].get("kld"),
        top1=ev["wikitext"].get("top1"),
        chat_match32=ev.get("chat", {}).get("match32"),
        chat_kld=ev.get("chat", {}).get("kld"),
        chat_top1=ev.get("chat", {}).get("top1"),
        deployed_bytes=deployed_bytes(job.workdir, summary),
        params_dense=float_params["dense"] + extra,
        params_nonzero=nonzero + extra,
        size_bytes=_weight_bytes(*weight_dirs),
        example=example,
        prompt=prompt,
        workdir=str(job.workdir),
        fingerprint=summary["fingerprint"],
        stages=[s["stage"] for s in summary["stages"]],
        shared=linked,
        recipe=job.recipe.to_dict(),
        limits=dataclasses.asdict(limits),
    )


def run_family(
    family: list[Job],
    limits: EvalLimits,
    peers: list[Path],
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = EXAMPLE_TOKENS,
    threads: int | None = None,
    log=None,
) -> list[SweepRow | FailedPoint]:
    """Run one family in order (top-level and picklable: the unit of work of a process pool or a Ray task).
    A failing job is reported as a FailedPoint and does not stop the others."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    results = []
    for job in family:
        say = log or (lambda m, _n=job.name: print(f"[{_n}] {m}", file=sys.stderr, flush=True))
        try:
            results.append(run_job(job, limits, peers, prompt, max_new_tokens, log=say))
        except Exception as e:  # noqa: BLE001 - one broken point must not lose the others' results
            import traceback

            say(f"failed: {e}\n{traceback.format_exc()}")
            results.append(FailedPoint(job.name, str(job.workdir), f"{type(e).__name__}: {e}"))
    return results


# ------------------------------------------------------------------ the sweep
def run_sweep(
    grid_name_or_path: str,
    out_dir: str | Path | None,
    limits: EvalLimits,
    jobs: int = 1,
    use_ray: bool = False,
    model: str | None = None,
    log=print,
    runs_dir: str | Path | None = None,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = EXAMPLE_TOKENS,
    dry_run: bool = False,
) -> dict:
    """Run every point of a grid (resuming finished ones from their caches) and write the report.
    Returns {"grid", "out_dir", "rows", "failed", "files"}."""
    from compressor import report

    if use_ray:
        _import_ray()
    grid_name, recipes = load_grid(grid_name_or_path, model)
    runs_dir = Path(runs_dir) if runs_dir else MODELS_DIR / "runs"
    out_dir = Path(out_dir) if out_dir else MODELS_DIR / "sweeps" / grid_name
    all_jobs = plan_jobs(recipes, runs_dir)
    fams = families(all_jobs)
    log(f"sweep {grid_name!r}: {len(all_jobs)} points in {len(fams)} families; evaluation: {limits.describe()}")
    if dry_run:
        for fam in fams:
            log("  family: " + " → ".join(f"{j.name} [{j.workdir.name}]" for j in fam))
        return {
            "grid": grid_name,
            "out_dir": str(out_dir),
            "rows": [],
            "failed": [],
            "files": {},
            "jobs": [(j.name, str(j.workdir)) for j in all_jobs],
        }
    # Every work directory that exists can donate a prefix (other sweeps and `edgepack compress` runs too).
    peers = sorted({*(j.workdir for j in all_jobs), *(p for p in runs_dir.glob("*") if p.is_dir())})
    results: dict[str, SweepRow | FailedPoint] = {}
    todo = []
    for fam in fams:
        rows = [cached_row(j, limits, prompt, max_new_tokens) for j in fam]
        if all(rows):
            results.update({j.name: r for j, r in zip(fam, rows)})
        else:
            todo.append(fam)
    log(f"{len(results)} points cached, {sum(len(f) for f in todo)} to run")

    def collect(rows: list[SweepRow | FailedPoint]) -> None:
        for row in rows:
            results[row.name] = row
            status = (
                f"failed ({row.error})"
                if isinstance(row, FailedPoint)
                else (f"closed {100 * row.closed:.1f} %, open {100 * row.open:.1f} %, PPL {row.ppl:.2f}")
            )
            log(f"[{len(results)}/{len(all_jobs)}] {row.name}: {status}")

    for rows in _run_families(todo, limits, peers, prompt, max_new_tokens, jobs, use_ray, log):
        collect(rows)

    ordered = [results[j.name] for j in all_jobs]
    rows = [r for r in ordered if isinstance(r, SweepRow)]
    failed = [r for r in ordered if isinstance(r, FailedPoint)]
    files = report.write_report(
        rows, out_dir, limits, grid_name, failed=failed, prompt=prompt, max_new_tokens=max_new_tokens
    )
    log(f"report: {out_dir / 'index.md'}")
    if failed:
        raise EdgepackError(
            f"{len(failed)} of {len(ordered)} grid points failed ({', '.join(r.name for r in failed)});"
            f" the others are reported in {out_dir}"
        )
    return {"grid": grid_name, "out_dir": str(out_dir), "rows": rows, "failed": failed, "files": files}


def _run_families(
    todo: list[list[Job]], limits: EvalLimits, peers, prompt: str, max_new_tokens: int, jobs: int, use_ray: bool, log
):
    """Each family's rows as it finishes: as Ray tasks, in `jobs` worker processes, or here in order."""
    if todo and use_ray:
        yield from _run_with_ray(todo, limits, peers, prompt, max_new_tokens)
    elif todo and jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        workers = min(jobs, len(todo))
        threads = max(1, (os.cpu_count() or 1) // workers)
        # spawn, not fork: forking a process that already holds torch's thread pools can deadlock
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_family, fam, limits, peers, prompt, max_new_tokens, threads) for fam in todo]
            for fut in as_completed(futures):
                yield fut.result()
    else:
        for fam in todo:
            yield run_family(fam, limits, peers, prompt, max_new_tokens, log=log)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise EdgepackError("--ray needs Ray: pip install ray (or run without --ray, with --jobs N)") from None
    return ray


def _run_with_ray(todo: list[list[Job]], limits: EvalLimits, peers, prompt, max_new_tokens):
    """The same families as Ray tasks: ray.init() joins the cluster named by RAY_ADDRESS, else starts a local
    one; a caller that already called ray.init() keeps its own. Work directories must be on storage every
    node sees."""
    ray = _import_ray()
    if not ray.is_initialized():
        ray.init()
    task = ray.remote(num_cpus=1)(run_family)
    pending = [task.remote(fam, limits, peers, prompt, max_new_tokens, 1) for fam in todo]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


# ------------------------------------------------------------------ command line
def add_sweep_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep", help="run a grid of recipes (pruned, optimized, order, or a TOML file) and write tables and plots"
    )
    p.add_argument("grid", help=f"named grid ({', '.join(NAMED_GRIDS)}) or a grid TOML file ([[run]] tables)")
    p.add_argument("-o", "--out", help="output folder (default models/sweeps/GRID)")
    p.add_argument("--jobs", type=int, default=1, help="grid points run in parallel as processes (default 1)")
    p.add_argument("--ray", action="store_true", help="run the grid points as Ray tasks (pip install ray)")
    p.add_argument("--model", help="source HF directory for every point (default models/SmolLM2-135M-Instruct)")
    p.add_argument("--runs-dir", help="where the per-point work directories go (default models/runs)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the generation example's prompt")
    p.add_argument("--dry-run", action="store_true", help="list the points and families, run nothing")
    add_limit_args(p)
    p.set_defaults(func=cmd_sweep)
    return p


def cmd_sweep(args) -> int:
    if args.jobs < 1:
        raise EdgepackError(f"--jobs {args.jobs}: needs at least 1")
    limits = limits_from_args(args)
    result = run_sweep(
        args.grid,
        args.out,
        limits,
        jobs=args.jobs,
        use_ray=args.ray,
        model=args.model,
        log=lambda m: print(m, file=sys.stderr),
        runs_dir=args.runs_dir,
        prompt=args.prompt,
        dry_run=args.dry_run,
    )
    if not args.dry_run:
        print(Path(result["out_dir"]) / "index.md")
    return 0
