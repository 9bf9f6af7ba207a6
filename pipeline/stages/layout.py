"""Stage 2, layout: fix the sketch settings and create the measurement storage.

Resolves the sketch settings (``k`` by :func:`hessov.costs.default_k` and ``s`` = 2k by
default, the block size, which steps and splits to measure), writes them to
``measurements/sketch.json``, creates
one set of part files with ``initialized`` flags and a virtual view per step and split,
and allocates each split's monolithic merge arrays once (reused for every step) unless the
basis and solve work in row blocks (``row_block``, chosen from the memory budget).
Running it again with the same settings only creates what is missing; with other
settings it is refused, since the measured parts belong to the first layout. A resumed run
finishes the layout on disk (:func:`complete_layout`), whatever its config's defaults say.
"""

from __future__ import annotations

import time

from hessov import summary
from hessov.config import RunConfig
from hessov.errors import ConfigError
from hessov.paramblock import recorded_layout
from hessov.paramstore import ColumnStore
from hessov.rundir import RunDir
from hessov.runlog import get_logger, log_event
from hessov.skerch_ext.storage import check_part_count
from hessov.sketchspec import (
    SketchSpec,
    check_same_layout,
    load_spec,
    resolve_block_spec,
    save_spec,
)


def layout(run: RunDir, cfg: RunConfig) -> SketchSpec:
    """Create (or complete) the measurement layout of ``run``; returns the spec."""
    started = time.perf_counter()
    params = ColumnStore(run.require(run.params, "train"))
    spec = resolve_block_spec(cfg, recorded_layout(run), params.steps())
    if run.sketch_spec.is_file():
        spec = check_same_layout(load_spec(run), spec, run.sketch_spec)
    return complete_layout(run, spec, started)


def complete_layout(run: RunDir, spec: SketchSpec, started: float | None = None) -> SketchSpec:
    """Create whatever storage of ``spec`` is missing in ``run`` and record the layout.

    ``hessov resume`` calls this with the spec on disk, so that a layout made by hand with
    other ``k``, ``s``, ``block_size`` or ``recovery`` than the config's is finished as it is.
    """
    log = get_logger()
    started = time.perf_counter() if started is None else started
    try:
        check_part_count(len(spec.layout.blocks))
    except ValueError as err:
        raise ConfigError(f"block_size: {err}") from None
    created = 0
    for step in spec.steps:
        for split in spec.splits:
            for round_name in spec.rounds:
                created += spec.store(run, step, split, round_name).create()
    if not spec.row_block:  # out of core, the stages read the parts in row blocks
        for split in spec.splits:
            for round_name in spec.rounds:
                if round_name != "apost":  # read from its parts (hessov.merge.round_rows)
                    spec.monolithic(run, split, round_name).allocate()
    if not spec.layout_seconds:
        spec.layout_seconds = round(time.perf_counter() - started, 3)
    save_spec(run, spec)
    fields = {
        "D": spec.layout.dim,
        "k": spec.layout.num_outer,
        "s": spec.layout.num_inner,
        "hvps_per_step_and_split": spec.total_hvps,
        "block_size": spec.layout.block_size,
        "parts_per_step_and_split": len(spec.layout.blocks),
        "tasks_per_step_and_split": spec.num_tasks,
        "MEAS_PER_JOB": spec.meas_per_job,
        "row_block": spec.row_block,
        "a_posteriori_probes": spec.num_apost,
        "recovery": spec.recovery,
        "rounds": spec.krylov_rounds if spec.recovery == "two_pass" else 1,
        "target_rel_err": spec.target_rel_err or None,
        "noise": spec.layout.noise,
        "steps": spec.steps,
        "splits": spec.splits,
        "seconds": spec.layout_seconds,
    }
    summary.record(run, "layout", fields)
    log_event(run.log, "layout", "layout", created_parts=created, **fields)
    log.info(
        "layout: D=%d, k=%d, s=%d, block %d, %d parts per step and split, %d steps x %s",
        spec.layout.dim,
        spec.layout.num_outer,
        spec.layout.num_inner,
        spec.layout.block_size,
        len(spec.layout.blocks),
        len(spec.steps),
        spec.splits,
    )
    return spec
