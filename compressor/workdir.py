"""A pipeline work directory: the one owner of its layout (stage directory names, stage records, summary).

    workdir/
      recipe.json                 the recipe as resolved
      01-depth/model/             HF checkpoint after this stage      01-depth/record.json
      02-width/model/ masks.safetensors                               02-width/record.json
      ...
      evals/                      cached evaluations and reference log-probabilities
      summary.json                every stage's record + the final evaluation

The pipeline writes it, the sweep plans and shares stage directories in it, the exporter reads it; all of
them name things through `Workdir`, so the `NN-stage` pattern and the record files live here only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import EdgepackError
from runtime.fileio import read_json

RECORD = "record.json"  # written last: a stage with a record is finished
STARTED = "started.json"  # the fingerprint a stage directory's partial work belongs to
SUMMARY = "summary.json"
RECIPE = "recipe.json"
EVALS = "evals"


def stage_dirname(index: int, stage: str) -> str:
    """`01-depth`: stages are numbered from 1 in the order they run."""
    return f"{index:02d}-{stage}"


def read_record(path: Path) -> dict | None:
    """A JSON record, or None when it is missing or half-written (records are replaced atomically, so a
    broken one is a crash from before that rule, treated as absent)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@dataclass(frozen=True)
class Workdir:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def stage_dir(self, index: int, stage: str) -> Path:
        return self.path / stage_dirname(index, stage)

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def recipe_path(self) -> Path:
        return self.path / RECIPE

    @property
    def evals(self) -> Path:
        return self.path / EVALS

    def finished(self, dirname: str, fingerprint: str) -> dict | None:
        """The record of stage directory `dirname` if it finished with `fingerprint` and its output is there."""
        record = read_record(self.path / dirname / RECORD)
        if (
            record
            and record.get("fingerprint") == fingerprint
            and (self.path / dirname / record.get("output", "model")).exists()
        ):
            return record
        return None

    def started_fingerprint(self, dirname: str) -> str | None:
        started = read_record(self.path / dirname / STARTED)
        return started.get("fingerprint") if started else None

    def summary(self) -> dict:
        if not self.summary_path.exists():
            raise EdgepackError(f"{self.path}: no {SUMMARY} (run `edgepack compress` to the end first)")
        return read_json(self.summary_path)

    def stage_dirs(self, summary: dict) -> dict[str, Path]:
        """Stage name -> its directory, for the stages a finished run's summary lists."""
        return {rec["stage"]: self.stage_dir(i, rec["stage"]) for i, rec in enumerate(summary["stages"], 1)}
