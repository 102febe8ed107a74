"""Config validation: every bad recipe (or graph) value gets one error line, and the same line whichever way
the recipe arrives (dataclass, preset string, TOML recipe file, sweep grid), because the check lives in one
place (runtime.settings.Settings.__post_init__, via the Literal choices and each class's check())."""

from __future__ import annotations

import re

import pytest

from compressor import sweep
from compressor.recipe import (
    SECTIONS,
    ChannelStage,
    DepthStage,
    EoraStage,
    GptqStage,
    LoraStage,
    Recipe,
    WidthStage,
    load_recipe,
    parse_preset,
    recipe_from_dict,
)
from exporter.onnx_graph import GraphOptions
from runtime.errors import EdgepackError

# (section, setting, bad value as TOML, the bad value in Python, what the one error line says)
BAD_VALUES = [
    ("depth", "method", '"greedy"', "greedy", "depth.method='greedy': expected 'oneshot' or 'iterative'"),
    ("depth", "remove", "0", 0, "depth.remove=0: must be at least 1"),
    ("width", "n", "8", 8, "width.n=8: N:M needs 0 < N < M"),
    ("width", "targets", '["qkv"]', ["qkv"], "width.targets=['qkv']: expected some of q_proj"),
    ("channels", "ffn_keep", "1.5", 1.5, "channels.ffn_keep=1.5: keeps a fraction in (0, 1]"),
    (
        "lora",
        "dataset",
        '"books"',
        "books",
        "lora.dataset='books': expected 'wikitext' or 'triviaqa' or 'chat' or 'mix'",
    ),
    ("lora", "objective", '"sft"', "sft", "lora.objective='sft': expected 'lm' or 'distill'"),
    ("lora", "triviaqa_mode", '"half"', "half", "lora.triviaqa_mode='half': expected 'closed' or 'open'"),
    ("lora", "rank", '"8"', "8", "lora.rank='8': expected a whole number"),
    ("lora", "keep_dense", "1", 1, "lora.keep_dense=1: expected true or false"),
    ("gptq", "bits", "5", 5, "gptq.bits=5: expected 2 or 3 or 4 or 8"),
    ("gptq", "damp", "0.0", 0.0, "gptq.damp=0.0: must be in (0, 1)"),
    ("gptq", "mse", "-1.0", -1.0, "gptq.mse=-1.0: must be 0 (off) or a positive norm"),
    ("gptq", "dataset", '"c4"', "c4", "gptq.dataset='c4': expected 'wikitext' or 'triviaqa'"),
    ("eora", "rank", "0", 0, "eora.rank=0: must be at least 1"),
    ("calibration", "samples", "0", 0, "calibration.samples=0: must be at least 1"),
]


def _toml_value_section(section: str, key: str, toml_value: str, table: str = "") -> str:
    extra = f"[{table}gptq]\n" if section == "eora" else ""  # EoRA needs GPTQ: keep that out of the way
    return f"{extra}[{table}{section}]\n{key} = {toml_value}\n"


@pytest.mark.parametrize("section,key,toml_value,value,message", BAD_VALUES, ids=[f"{b[0]}.{b[1]}" for b in BAD_VALUES])
def test_each_bad_value_gets_its_one_line_from_one_place(tmp_path, section, key, toml_value, value, message):
    cls = SECTIONS[section]
    with pytest.raises(EdgepackError) as direct:
        cls(**{key: value})
    assert str(direct.value).startswith(message) and "\n" not in str(direct.value)

    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(_toml_value_section(section, key, toml_value))
    with pytest.raises(EdgepackError) as from_toml:
        load_recipe(recipe_file)
    assert str(from_toml.value) == f"{recipe_file}: {direct.value}"  # the same line, with where it came from

    grid = tmp_path / "g.toml"
    grid.write_text('[[run]]\nname = "x"\n' + _toml_value_section(section, key, toml_value, table="run."))
    with pytest.raises(EdgepackError) as from_grid:
        sweep.load_grid(str(grid))
    assert str(from_grid.value) == f"{grid} run 1: {direct.value}"


def test_recipe_level_rules_are_checked_once_whichever_way_the_recipe_arrives(tmp_path):
    message = re.escape("order='XYZ': expected 'DWL' or 'DLW'")
    with pytest.raises(EdgepackError, match=f"^{message}$"):
        Recipe(order="XYZ")
    with pytest.raises(EdgepackError, match=f"^{message}$"):
        parse_preset("D2 order=XYZ")
    with pytest.raises(EdgepackError, match=f"^grid: {message}$"):
        recipe_from_dict({"preset": "D2", "order": "XYZ"}, where="grid")

    eora_alone = re.escape("[eora] needs [gptq] (EoRA compensates the quantization error)")
    with pytest.raises(EdgepackError, match=f"^{eora_alone}"):
        Recipe(eora=EoraStage())
    f = tmp_path / "r.toml"
    f.write_text("[eora]\nrank = 8\n")
    with pytest.raises(EdgepackError, match=f"^{re.escape(str(f))}: {eora_alone}"):
        load_recipe(f)
    assert load_recipe(f.parent / _write(f, "[gptq]\n[eora]\nrank = 8\n")).eora.rank == 8


def _write(path, text):
    path.write_text(text)
    return path.name


def test_preset_errors_name_the_part_and_the_setting():
    with pytest.raises(EdgepackError, match=r"^W8:8: width.n=8: N:M needs 0 < N < M"):
        parse_preset("W8:8")
    with pytest.raises(EdgepackError, match=r"^C75A0: channels\.kv_groups_keep=0: must be at least 1$"):
        parse_preset("C75A0")
    with pytest.raises(EdgepackError, match=r"^lora.dataset='books'"):
        parse_preset("D2 lora=books")


def test_toml_with_a_preset_keeps_what_the_preset_spells_out(tmp_path):
    """A TOML recipe and a grid run read through the same function: a section tunes the preset's stage
    (here the depth method) without resetting what the preset string said (remove = 4)."""
    f = tmp_path / "r.toml"
    f.write_text('preset = "D4 lora=triviaqa"\n[depth]\nmethod = "iterative"\n[lora]\nrank = 4\n')
    r = load_recipe(f)
    assert (r.depth.remove, r.depth.method) == (4, "iterative")
    assert (r.lora.dataset, r.lora.rank) == ("triviaqa", 4)
    assert r.name == "D4 lora=triviaqa"


def test_valid_values_pass_and_keep_their_fingerprints():
    """Validation adds no field: the stage settings (and so the pipeline's fingerprints) are unchanged."""
    from dataclasses import asdict

    assert asdict(GptqStage()) == {
        "bits": 4,
        "group_size": 128,
        "sym": True,
        "desc_act": False,
        "damp": 0.01,
        "samples": 32,
        "seqlen": 512,
        "dataset": "wikitext",
        "keep_grid": True,  # added later: left out of the fingerprint at this default (GptqStage.added_later)
        "mse": 0.0,  # added later too
    }
    assert GptqStage.added_later == {"keep_grid": True, "mse": 0.0}
    assert set(asdict(LoraStage())) == {
        "dataset",
        "triviaqa_mode",
        "rank",
        "alpha",
        "dropout",
        "targets",
        "samples",
        "batch_size",
        "grad_accum",
        "lr",
        "seqlen",
        "keep_dense",
        "objective",
    }
    # objective came later: at its default ("lm") it is left out of the fingerprint, so older work dirs resume
    from compressor.pipeline import stage_fingerprint
    from compressor.recipe import parse_preset, settings_hash

    recipe = parse_preset("W1:8 lora=wikitext")
    old = {k: v for k, v in asdict(recipe.lora).items() if k != "objective"}
    assert stage_fingerprint(recipe, "lora", "x") == settings_hash(
        {"stage": "lora", "settings": old, "calibration": None, "input": "x"}
    )
    assert stage_fingerprint(parse_preset("W1:8 lora=distill"), "lora", "x") != stage_fingerprint(recipe, "lora", "x")
    assert ChannelStage(ffn_keep=1, kv_groups_keep=None).ffn_keep == 1
    assert DepthStage(method="iterative").method == "iterative" and WidthStage(n=12, m=16).sparsity == 0.75


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"embedding": "int2"}, "GraphOptions.embedding='int2': expected 'fp32' or 'int8' or 'int4'"),
        ({"lm_head": "bf16"}, "GraphOptions.lm_head='bf16': expected 'fp32' or 'int8' or 'int4'"),
        ({"projections": "fp16"}, "GraphOptions.projections='fp16': expected 'keep' or 'int4'"),
        ({"eora_bits": 2}, "GraphOptions.eora_bits=2: expected 8 or 4 or None"),
        ({"accuracy_level": 7}, "GraphOptions.accuracy_level=7: expected 0 or 1 or 2 or 3 or 4"),
    ],
)
def test_graph_options_are_checked_on_construction(kwargs, message):
    with pytest.raises(EdgepackError, match=f"^{re.escape(message)}$"):
        GraphOptions(**kwargs)
    assert GraphOptions(eora_bits=None).eora_bits is None and GraphOptions(eora_bits=8).eora_bits == 8
