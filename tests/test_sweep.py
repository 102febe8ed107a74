"""Study mode: grids, prefix sharing between grid points, the sweep's tables and plots, resuming."""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import pytest

from compressor import pipeline, report, stages, sweep
from compressor.recipe import PRUNED_PRESETS, Calibration, DepthStage, Recipe, WidthStage, parse_preset
from runtime.errors import EdgepackError
from runtime.harness import EvalLimits

TINY_LIMITS = EvalLimits(
    ctx=32, ppl_windows=2, qa_questions=2, qa_max_new_tokens=3, wikitext="tiny-wikitext", triviaqa="tiny-triviaqa"
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUIET = lambda m: None  # noqa: E731


def tiny_grid(tmp_path, model, presets) -> Path:
    runs = "".join(f'[[run]]\npreset = "{p}"\n' for p in presets)
    path = tmp_path / "tiny-grid.toml"
    path.write_text(
        f'name = "tiny"\nmodel = "{model}"\n[calibration]\nsamples = 4\nseqlen = 32\nbatch_size = 2\n' + runs
    )
    return path


def counting_stages(monkeypatch, names=("depth", "width")) -> dict:
    calls = {n: 0 for n in names}
    real = dict(stages.STAGE_FUNCTIONS)
    for name in names:

        def run(ctx, src, out, _name=name):
            calls[_name] += 1
            return real[_name](ctx, src, out)

        monkeypatch.setitem(stages.STAGE_FUNCTIONS, name, run)
    return calls


def test_named_grids_and_grid_files(tmp_path):
    name, pruned = sweep.load_grid("pruned")
    assert name == "pruned" and pruned[0].name == "baseline" and not pruned[0].stage_names()
    assert [r.name for r in pruned[1:]] == PRUNED_PRESETS + ["C75", "C75A2"]
    _, optimized = sweep.load_grid("optimized")
    assert 6 <= len(optimized) - 1 <= 12
    quants = {sweep.labels(r)["quant"] for r in optimized}
    assert quants == {"none", "GPTQ", "GPTQ+EoRA"}
    assert {r.lora.dataset for r in optimized if r.lora} == {"wikitext", "triviaqa"}
    _, order = sweep.load_grid("order")
    pairs = {}
    for r in order[1:]:
        d = r.to_dict()
        pairs.setdefault(
            json.dumps({k: v for k, v in d.items() if k not in ("name", "order")}, sort_keys=True), set()
        ).add(r.order)
    assert pairs and all(v == {"DWL", "DLW"} for v in pairs.values())

    # TOML: top-level defaults, a preset run, a run built from sections, a section that only tunes existing stages
    f = tmp_path / "g.toml"
    f.write_text(
        'model = "m"\n[calibration]\nsamples = 8\n[lora]\nsamples = 16\ndataset = "triviaqa"\n'
        '[width]\nn = 2\nm = 4\nmethod = "wanda"\n'
        '[[run]]\npreset = "D2 lora=triviaqa"\n'
        '[[run]]\nname = "w"\n[run.width]\nn = 1\nm = 8\n[run.calibration]\nseqlen = 64\n'
        '[[run]]\npreset = "W1:8 lora=wikitext"\n'
    )
    name, recipes = sweep.load_grid(str(f), model="other")
    assert name == "g" and [r.name for r in recipes] == ["baseline", "D2 lora=triviaqa", "w", "W1:8 lora=wikitext"]
    d2, w, w18 = recipes[1:]
    # what a preset spells out beats the grid's defaults, even where it equals the dataclass default
    assert (w18.width.n, w18.width.m) == (1, 8) and w18.lora.dataset == "wikitext" and w18.lora.samples == 16
    assert d2.model == "other" and d2.depth.remove == 2 and d2.calibration.samples == 8
    assert d2.lora.dataset == "triviaqa" and d2.lora.samples == 16  # preset's dataset kept, grid's samples applied
    assert (
        w.lora is None and (w.width.n, w.width.m) == (1, 8) and (w.calibration.samples, w.calibration.seqlen) == (8, 64)
    )
    # calib= and lora=distill survive a run's own [gptq] table; without calib= a grid's [gptq] dataset applies
    f.write_text(
        '[gptq]\ndataset = "chat"\n[lora]\nobjective = "lm"\n'
        '[[run]]\nname = "g32"\npreset = "W1:8 lora=distill quant=eora calib=mix"\n[run.gptq]\ngroup_size = 32\n'
        '[[run]]\npreset = "W1:8 lora=wikitext quant=gptq"\n'
        '[[run]]\npreset = "W1:8 lora=wikitext quant=gptq group=32a"\n[run.gptq]\ndamp = 0.05\n'
    )
    _, (_, g32, plain, grouped) = sweep.load_grid(str(f))
    assert (grouped.gptq.group_size, grouped.gptq.sym, grouped.gptq.damp, grouped.gptq.dataset) == (
        32,
        False,
        0.05,
        "chat",
    )
    assert (g32.gptq.dataset, g32.gptq.group_size, g32.eora.dataset) == ("mix", 32, "mix")
    assert (g32.lora.objective, g32.lora.dataset) == ("distill", "mix")
    assert plain.gptq.dataset == "chat" and plain.lora.objective == "lm"
    assert sweep.labels(parse_preset("D2+W2:4 lora=wikitext order=DLW")) == {
        "config": "D2+W2:4",
        "lora": "wikitext",
        "quant": "none",
        "order": "D→L→W",
    }
    assert sweep.labels(parse_preset("W2:4 lora=wikitext"))["order"] == "W→L"

    for text, msg in (
        ('[[run]]\npreset = "D2"\nfoo = 1\n', "unknown key"),
        ("[[run]]\n[run.width]\nn = 1\n", "needs preset"),
        ('[[run]]\nname = "a"\npreset = "D2"\n[[run]]\nname = "a"\npreset = "D4"\n', "two different runs"),
        ('name = "x"\n', "no \\[\\[run\\]\\]"),
        ('orde = "DLW"\n[[run]]\npreset = "D2"\n', "unknown top-level key"),
        ('[[run]]\npreset = "D2"\n[run.width]\nnn = 1\n', "unknown setting"),
    ):
        f.write_text(text)
        with pytest.raises(EdgepackError, match=msg):
            sweep.load_grid(str(f))
    with pytest.raises(EdgepackError, match="named grid"):
        sweep.load_grid("no-such-grid")


def test_pareto_front_and_order_pairs():
    pts = [(10, 50), (8, 40), (8, 45), (5, 45), (12, 49), (3, 10)]
    assert sorted(report.pareto_front(pts)) == [0, 3, 5]  # (8,45) is beaten by (5,45), (12,49) by (10,50)


def test_report_costs_in_deployed_bytes_and_shows_chat_fidelity(tmp_path):
    from runtime.harness import EvalLimits

    def row(name, deployed, size, closed, match):
        return report.SweepRow(
            name=name, config=name, lora="none", quant="none", order="", description="", closed=closed,
            closed_exact=0.0, open=closed, open_exact=0.0, questions=10, ppl=20.0, ppl_windows=2, ppl_tokens=100,
            kld=None, top1=None, params_dense=100, params_nonzero=100, size_bytes=size, example="", prompt="",
            workdir="", fingerprint="", deployed_bytes=deployed, chat_match32=match, chat_kld=0.1, chat_top1=0.9,
        )  # fmt: skip

    rows = [row("big", 4_000_000, 9_000_000, 0.5, 0.75), row("small", 1_000_000, 9_000_000, 0.4, 0.5)]
    rows.append(row("unmeasured", None, 2_000_000, 0.3, None))
    assert [report.cost_bytes(r) for r in rows] == [4_000_000, 1_000_000, 2_000_000]
    md = report.results_markdown(rows, EvalLimits(), "g")
    assert "| deployed | chat match % | chat KL |" in md
    assert "| small | none | none | 40.0 | 40.0 | 20.00 | 0.00 M | 9.00 MB | 1.00 MB | 50.0 | 0.1000 |" in md
    assert "| — | — | 0.1000 |" in md  # not measured: a dash, never a zero
    table = list(csv.DictReader(report.results_csv(rows).splitlines()))
    assert table[0]["deployed_mb"] == "4.0" and table[0]["chat_match32_pct"] == "75.0" and table[2]["deployed_mb"] == ""
    assert report.plot_pareto(rows, EvalLimits(), tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC


def test_share_prefix_links_finished_stages(tiny_checkpoint, tmp_path, monkeypatch):
    cal = Calibration(samples=4, seqlen=32, batch_size=2)
    a = Recipe(
        name="a", model=str(tiny_checkpoint), calibration=cal, depth=DepthStage(remove=1), width=WidthStage(n=1, m=4)
    )
    pipeline.run_pipeline(a, tmp_path / "a", final_eval=False, log=QUIET)

    b = Recipe(
        name="b", model=str(tiny_checkpoint), calibration=cal, depth=DepthStage(remove=1), width=WidthStage(n=2, m=4)
    )
    other_calibration = Recipe(
        name="c",
        model=str(tiny_checkpoint),
        calibration=Calibration(samples=4, seqlen=32, seed=1),
        depth=DepthStage(remove=1),
    )
    assert sweep.share_prefix(other_calibration, tmp_path / "c", [tmp_path / "a"]) == []  # fingerprint differs
    assert sweep.share_prefix(b, tmp_path / "b", [tmp_path / "missing", tmp_path / "a"]) == ["01-depth"]
    src, dst = tmp_path / "a/01-depth/model/model.safetensors", tmp_path / "b/01-depth/model/model.safetensors"
    assert os.stat(src).st_ino == os.stat(dst).st_ino  # hard link, no copy
    rec = json.loads((tmp_path / "b/01-depth/record.json").read_text())
    assert rec["shared_from"] == str(tmp_path / "a/01-depth")
    assert json.loads((tmp_path / "a/01-depth/record.json").read_text()).get("shared_from") is None

    calls = counting_stages(monkeypatch)
    summary = pipeline.run_pipeline(b, tmp_path / "b", final_eval=False, log=QUIET)
    assert calls == {"depth": 0, "width": 1}  # the depth stage was not rerun
    assert summary["stages"][1]["input_dir"] == str(tmp_path / "b/01-depth/model")
    # the same recipe as `a` in a new directory: both stages linked, nothing runs
    a2 = Recipe(**{**a.__dict__, "name": "a2"})
    assert sweep.share_prefix(a2, tmp_path / "a2", [tmp_path / "b", tmp_path / "a"]) == ["01-depth", "02-width"]
    rec = json.loads((tmp_path / "a2/02-width/record.json").read_text())
    assert rec["input_dir"] == str(tmp_path / "a2/01-depth/model")  # paths point into the new directory
    pipeline.run_pipeline(a2, tmp_path / "a2", final_eval=False, log=QUIET)
    assert calls == {"depth": 0, "width": 1}
    assert sweep.share_prefix(a2, tmp_path / "a2", [tmp_path / "a"]) == []  # already complete


def test_sweep_end_to_end_tables_plots_and_resume(tiny_checkpoint, tmp_path, monkeypatch):
    grid = tiny_grid(tmp_path, tiny_checkpoint, ["D1", "W1:4", "D1+W1:4"])
    calls = counting_stages(monkeypatch)
    out = tmp_path / "out"
    result = sweep.run_sweep(str(grid), out, TINY_LIMITS, runs_dir=tmp_path / "runs", log=QUIET)
    assert calls == {"depth": 1, "width": 2}  # D1+W1:4 reused D1's depth stage
    names = ["baseline", "D1", "W1:4", "D1+W1:4"]
    assert [r.name for r in result["rows"]] == names and not result["failed"]
    combo = next(r for r in result["rows"] if r.name == "D1+W1:4")
    assert combo.shared == ["01-depth"]

    # the CSV matches each job's own records
    with open(out / "results.csv", newline="") as f:
        table = {r["name"]: r for r in csv.DictReader(f)}
    assert list(table) == names
    for name in names:
        row = table[name]
        summary = json.loads((Path(row["workdir"]) / "summary.json").read_text())
        ev = summary["eval"]
        assert float(row["ppl"]) == pytest.approx(ev["wikitext"]["ppl"], rel=1e-4)
        assert float(row["closed_pct"]) == pytest.approx(100 * ev["triviaqa_closed"]["contains"], abs=0.01)
        assert float(row["open_pct"]) == pytest.approx(100 * ev["triviaqa_open"]["contains"], abs=0.01)
        assert int(row["questions"]) == 2 and int(row["ppl_windows"]) == 2
        if summary["stages"]:
            assert int(row["params_nonzero"]) == summary["stages"][-1]["params"]["nonzero"]
            assert int(row["params_dense"]) == summary["stages"][-1]["params"]["dense"]
        assert float(row["size_mb"]) > 0
        assert 0 < float(row["deployed_mb"])  # the ONNX decoder a bundle of the point ships
    base = table["baseline"]
    # the source's own count (its padding embedding row is exact zeros, so non-zero is a little lower)
    assert int(base["params_dense"]) - 64 <= int(base["params_nonzero"]) <= int(base["params_dense"])
    assert int(base["params_dense"]) > int(table["D1"]["params_dense"])
    assert int(table["W1:4"]["params_nonzero"]) < int(table["W1:4"]["params_dense"]) == int(base["params_dense"])

    md = (out / "results.md").read_text()
    assert TINY_LIMITS.describe() in md and "N weights pruned in every group of M" in md
    line = next(l for l in md.splitlines() if l.startswith("| D1+W1:4 "))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:3] == ["D1+W1:4", "none", "none"]
    assert cells[5] == f"{float(table['D1+W1:4']['ppl']):.2f}"
    assert cells[6] == report.fmt_params(int(table["D1+W1:4"]["params_nonzero"]))
    examples = (out / "examples.md").read_text()
    assert "Who created the Chipmunks?" in examples and TINY_LIMITS.describe() in examples
    assert sum(l.startswith("| ") for l in examples.splitlines()) == 1 + len(names)
    for png in ("accuracy.png", "perplexity.png", "pareto.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert not (out / "order.png").exists()  # no order pair in this grid
    index = (out / "index.md").read_text()
    for target in ("results.md", "results.csv", "examples.md", "accuracy.png", "perplexity.png", "pareto.png"):
        assert f"({target})" in index

    # resuming reruns nothing: no stage, no evaluation, no generation
    def boom(*a, **k):
        raise AssertionError("resumed sweep recomputed something")

    for name in stages.STAGE_FUNCTIONS:
        monkeypatch.setitem(stages.STAGE_FUNCTIONS, name, boom)
    monkeypatch.setattr(pipeline, "evaluate", boom)
    monkeypatch.setattr(sweep, "generate_example", boom)
    csv_before = (out / "results.csv").read_text()
    again = sweep.run_sweep(str(grid), out, TINY_LIMITS, runs_dir=tmp_path / "runs", log=QUIET)
    assert [r.name for r in again["rows"]] == names
    assert (out / "results.csv").read_text() == csv_before


def test_sweep_command_dry_run_and_ray_error(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    sweep.add_sweep_command(sub)
    args = parser.parse_args(
        [
            "sweep",
            "optimized",
            "--model",
            str(tiny_checkpoint),
            "--runs-dir",
            str(tmp_path),
            "--dry-run",
            "--jobs",
            "2",
            "--windows",
            "3",
        ]
    )
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "13 points in" in err and "windows=3" in err
    assert "family: D2 lora=triviaqa [" in err and "→ D2 lora=triviaqa quant=gptq [" in err
    assert not list(tmp_path.iterdir())  # a dry run writes nothing

    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(EdgepackError, match="pip install ray"):
        sweep.run_sweep("order", tmp_path / "o", TINY_LIMITS, use_ray=True, model=str(tiny_checkpoint))


def test_failed_point_is_reported_and_others_kept(tiny_checkpoint, tmp_path):
    grid = tiny_grid(tmp_path, tiny_checkpoint, ["D9"])  # the tiny model has 4 layers
    with pytest.raises(EdgepackError, match="1 of 2 grid points failed \\(D9\\)"):
        sweep.run_sweep(str(grid), tmp_path / "out", TINY_LIMITS, runs_dir=tmp_path / "runs", log=QUIET)
    index = (tmp_path / "out/index.md").read_text()
    assert "1 configuration evaluated, 1 failed" in index and "depth.remove=9" in index
    assert "| baseline |" in (tmp_path / "out/results.md").read_text()


def test_sweep_in_worker_processes(tiny_checkpoint, tmp_path):
    """--jobs 2: families run in spawned processes and still share their prefixes (checked on disk)."""
    grid = tiny_grid(tmp_path, tiny_checkpoint, ["D1", "D1+W1:4"])
    result = sweep.run_sweep(str(grid), tmp_path / "out", TINY_LIMITS, jobs=2, runs_dir=tmp_path / "runs", log=QUIET)
    rows = {r.name: r for r in result["rows"]}
    assert list(rows) == ["baseline", "D1", "D1+W1:4"]
    d1, combo = Path(rows["D1"].workdir), Path(rows["D1+W1:4"].workdir)
    assert (
        os.stat(d1 / "01-depth/model/model.safetensors").st_ino
        == os.stat(combo / "01-depth/model/model.safetensors").st_ino
    )
    assert rows["D1+W1:4"].shared == ["01-depth"]
    assert (tmp_path / "out/pareto.png").read_bytes()[:8] == PNG_MAGIC


def test_sweep_as_ray_tasks(tiny_checkpoint, tmp_path):
    ray = pytest.importorskip("ray")
    grid = tiny_grid(tmp_path, tiny_checkpoint, ["D1"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # the 2 families in parallel
    try:
        result = sweep.run_sweep(
            str(grid), tmp_path / "out", TINY_LIMITS, use_ray=True, runs_dir=tmp_path / "runs", log=QUIET
        )
    finally:
        ray.shutdown()
    rows = {r.name: r for r in result["rows"]}
    assert list(rows) == ["baseline", "D1"]
    summary = json.loads((Path(rows["D1"].workdir) / "summary.json").read_text())
    assert rows["D1"].ppl == summary["eval"]["wikitext"]["ppl"]
    assert (tmp_path / "out/results.csv").read_text().count("\n") == 3
