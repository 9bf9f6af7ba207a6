"""What each stage records, and the merge behind ``hessov summary RUN_DIR``.

A stage with one result per run writes ``summary/<stage>.json``. Stages with one result
per step and split (solve, exhaustive, analyze) or per name (replay) write one file per
result, ``summary/<stage>/<step>/<split>.json``, so that parallel Slurm jobs never write
the same file and no read-modify-write can lose another job's entry. Every file is
written to a temporary name and renamed (:func:`hessov.fileio.atomic_write_json`), so a
reader never sees half a file.
``hessov summary`` prints one JSON object with one key per finished stage, nesting the
per-result files as ``{stage: {step: {split: {...}}}}``.
"""

from __future__ import annotations

import json
from pathlib import Path

from hessov.fileio import atomic_write_json
from hessov.rundir import RunDir


def record(run: RunDir, stage: str, fields: dict, *keys: str | int) -> Path:
    """Record a stage's summary, nested under ``keys`` (e.g. step, split) if given."""
    if keys:
        path = run.summaries.joinpath(stage, *map(str, keys[:-1])) / f"{keys[-1]}.json"
    else:
        path = run.summary(stage)
    atomic_write_json(path, fields)
    return path


def _load_tree(directory: Path) -> dict:
    tree = {}
    for entry in sorted(directory.iterdir()):
        if entry.is_dir():
            tree[entry.name] = _load_tree(entry)
        elif entry.suffix == ".json" and not entry.name.startswith("."):
            tree[entry.stem] = json.loads(entry.read_text())
    return tree


def load(run: RunDir) -> dict:
    """One object with one key per finished stage of ``run``, and under ``variants`` each
    variant's (:mod:`hessov.variants`) by its name.
    """
    result = _load_tree(run.summaries) if run.summaries.is_dir() else {}
    variants = {name: load(run.variant(name)) for name in run.variant_names()}
    return result | ({"variants": variants} if variants else {})
