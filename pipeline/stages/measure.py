"""Stage 3, measure: one worker's share of the sketch's Hessian-vector products.

For every inner index ``m`` of its range, one HVP ``b = H Omega[:, m]`` gives inner
column ``Psi b`` and, for ``m < k``, outer column ``b``. Indices are measured a block
at a time (one batched ``H @ Omega[:, block]``), and every finished block is written
atomically to its own part file, flagged ``measured``. Blocks already measured are
skipped, and so are blocks another live worker holds (an ``flock`` claim released by
the kernel even on SIGKILL): re-running after a crash redoes only what is missing, and
submitting the same work twice measures nothing twice.

A worker's range comes from ``indices=a:b``, from ``task=i``, or from Slurm's
``SLURM_ARRAY_TASK_ID`` with the layout's ``MEAS_PER_JOB`` (task ``i`` handles
``[i * MEAS_PER_JOB, min(s, (i + 1) * MEAS_PER_JOB))``).

With two-pass recovery there is a second round (``round=second``): after the basis stage
(``hessov basis``) has written the orthonormal basis ``Q`` (D x k) of ``H Omega[:, :k]``,
each worker multiplies ``H`` onto its columns of ``Q`` and stores ``H Q[:, block]`` the same
way. With ``rounds=q`` the rounds ``round3`` ... ``roundq`` do the same on the next blocks of
the block Krylov basis (:mod:`hessov.rounds`); a round after the one that met
``target_rel_err`` has nothing to measure. The a-posteriori round (``round=apost``)
multiplies ``H`` onto the error estimate's Gaussian probes ``G`` (D x NUM_A_POSTERIORI, their
own seed range), which need nothing but the layout, so that the solve that checks its
eigenpairs against them needs no model.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import time
from collections.abc import Callable

import h5py
import numpy as np
import torch
from tqdm import tqdm

from hessov.config import RunConfig
from hessov.errors import ConfigError, MissingInputError
from hessov.hessian import hessian_at_step
from hessov.merge import read_columns
from hessov.rounds import not_needed, stopped_after
from hessov.rundir import RunDir
from hessov.runlog import EventLog, get_logger
from hessov.skerch_ext.aposteriori import gaussian_probe_rows
from hessov.skerch_ext.measure import measure_block, synchronized
from hessov.skerch_ext.storage import MeasurementStore, SketchLayout
from hessov.sketchspec import SketchSpec
from hessov.spectralshift import shift_of, shifted


def blocks_in_range(layout: SketchLayout, indices: range) -> list[int]:
    """Part ids covering ``indices`` exactly; refuses ranges that cut a block."""
    total = layout.num_measurements
    if indices.start < 0 or indices.stop > total or indices.step != 1:
        raise ConfigError(f"indices: {indices.start}:{indices.stop} is outside 0:{total}")
    chosen = []
    for block_id, block in enumerate(layout.blocks):
        inside = indices.start <= block.start and block.stop <= indices.stop
        overlaps = block.start < indices.stop and indices.start < block.stop
        if overlaps and not inside:
            raise ConfigError(
                f"indices: {indices.start}:{indices.stop} cuts block {block.start}:{block.stop}; "
                f"ranges must follow block_size={layout.block_size} boundaries"
            )
        if inside:
            chosen.append(block_id)
    return chosen


def read_basis_columns(
    run: RunDir, step: int, split: str, block: range, round_name: str = "second"
) -> np.ndarray:
    """Columns ``block`` ``(D, len(block))`` of the Krylov block that ``round_name``
    multiplies, which the basis stage wrote.
    """
    path = run.two_pass_basis(step, split, round_name)
    if not path.is_file():
        raise MissingInputError(
            f"{path} is missing: the {round_name} round multiplies H onto the block that "
            f"`hessov basis {run.root} step={step} split={split} round={round_name}` writes "
            "after the round before"
        )
    with h5py.File(path, "r") as handle:
        return read_columns(handle["basis"], block)


def measure(
    run: RunDir,
    cfg: RunConfig,
    spec: SketchSpec,
    step: int,
    split: str,
    indices: range,
    task_name: str,
    round_name: str = "first",
) -> dict:
    """Measure the missing blocks of ``indices`` for ``step``, ``split`` and round; returns
    statistics (blocks measured, skipped, HVPs, seconds).
    """
    log = get_logger()
    store = _laid_out_store(run, spec, step, split, round_name)
    block_ids = blocks_in_range(store.layout, indices)
    todo = [b for b in block_ids if not store.block_measured(b)]
    stats = {
        "task": task_name,
        "blocks": len(block_ids),
        "already_measured": len(block_ids) - len(todo),
        "measured": 0,
        "skipped_claimed": 0,
        "hvps": 0,
        "seconds": 0.0,
    }
    if not_needed(run, spec, step, split, round_name):
        log.info(
            "measure %s step %d %s: the %s round is not needed, the bounds met "
            "target_rel_err=%g after round %d",
            task_name,
            step,
            split,
            round_name,
            spec.target_rel_err,
            stopped_after(run, step, split),
        )
        return stats | {"not_needed": True}
    if not todo:
        log.info(
            "measure %s step %d %s: all %d blocks already measured",
            task_name,
            step,
            split,
            len(block_ids),
        )
        return stats
    started = time.perf_counter()
    hessian = hessian_at_step(run, cfg, step, split)
    # which=smallest: every round multiplies with sigma I - H (hessov.spectralshift).
    sigma = shift_of(run, spec, step, split)
    hessian = dataclasses.replace(hessian, matmat=shifted(hessian.matmat, sigma))
    sketch = spec.matrices(hessian.dtype, hessian.device)
    setup_seconds = time.perf_counter() - started
    if round_name == "first":
        measure_one = functools.partial(_first_round_block, hessian, sketch, layout=spec.layout)
    elif round_name == "apost":
        measure_one = functools.partial(_apost_round_block, spec, hessian)
    else:
        where = (run, step, split, round_name)
        measure_one = functools.partial(_basis_round_block, where, hessian)
    run.task_logs.mkdir(parents=True, exist_ok=True)
    log_name = f"measure_step_{step}_{split}_{round_name}_{task_name}.jsonl"
    with EventLog(run.task_logs / log_name, "measure") as events:
        events.write(
            "start",
            step=step,
            split=split,
            indices=[indices.start, indices.stop],
            blocks=todo,
            host=socket.gethostname(),
            pid=os.getpid(),
            setup_seconds=round(setup_seconds, 3),
        )
        worker = {"task": task_name, "host": socket.gethostname(), "device": str(hessian.device)}
        desc = f"measure {split}@{step} {round_name} [{indices.start}:{indices.stop}]"
        _measure_blocks(store, store.layout, todo, measure_one, worker, events, stats, desc)
        events.write("finished", **stats)
    log.info(
        "measure %s step %d %s: %d blocks (%d HVPs) in %.1f s, %.1f HVPs/s",
        task_name,
        step,
        split,
        stats["measured"],
        stats["hvps"],
        stats["seconds"],
        stats["hvps"] / max(stats["seconds"], 1e-9),
    )
    return stats


def _laid_out_store(
    run: RunDir, spec: SketchSpec, step: int, split: str, round_name: str
) -> MeasurementStore:
    """The part files of ``step``, ``split`` and round; refuses what the layout does not
    measure or has not laid out.
    """
    if step not in spec.steps or split not in spec.splits:
        raise ConfigError(
            f"step/split: the layout measures steps {spec.steps} of splits {spec.splits}, "
            f"not step {step} of {split!r}"
        )
    if round_name not in spec.rounds:
        raise ConfigError(f"round: {spec.recovery} recovery has rounds {spec.rounds}")
    store = spec.store(run, step, split, round_name)
    if not store.directory.is_dir():
        raise ConfigError(f"layout: {store.directory} does not exist; run `hessov layout`")
    return store


#: One block's measurements: inner ``(s, P)`` or None, outer ``(D, P_outer)`` or None, and
#: the seconds of its Hessian-vector products alone.
_Products = tuple[np.ndarray | None, np.ndarray | None, float]


def _first_round_block(hessian, sketch, block: range, layout: SketchLayout) -> _Products:
    """First round: ``H Omega[:, block]``, giving inner columns and, below k, outer ones."""
    result = measure_block(
        hessian.matmat, sketch, block, layout.num_outer, with_inner=layout.num_inner > 0
    )
    inner = result.inner.cpu().numpy() if layout.num_inner else None
    outer = result.outer.cpu().numpy() if result.outer.shape[1] else None
    return inner, outer, result.seconds["hvps"]


def _basis_round_block(where: tuple, hessian, block: range) -> _Products:
    """A round after the first of two-pass recovery: ``H Q[:, block]`` on the round's block
    ``Q`` of the Krylov basis; ``where`` is ``(run, step, split, round_name)``.
    """
    columns = torch.from_numpy(read_basis_columns(*where[:3], block, where[3]))
    columns = synchronized(columns.to(hessian.device, hessian.dtype))
    started = time.perf_counter()
    outer = synchronized(hessian.matmat(columns))
    products_seconds = time.perf_counter() - started
    return None, outer.cpu().numpy(), products_seconds


def _apost_round_block(spec: SketchSpec, hessian, block: range) -> _Products:
    """The a-posteriori round: ``H G[:, block]`` on the error estimate's Gaussian probes."""
    rows = range(spec.layout.dim)
    probes = gaussian_probe_rows(spec.seeds()["apost"], rows, block)
    probes = synchronized(probes.to(hessian.device, hessian.dtype))
    started = time.perf_counter()
    outer = synchronized(hessian.matmat(probes))
    products_seconds = time.perf_counter() - started
    return None, outer.cpu().numpy(), products_seconds


def _measure_blocks(
    store: MeasurementStore,
    layout: SketchLayout,
    todo: list[int],
    measure_one: Callable[[range], _Products],
    worker: dict,
    events: EventLog,
    stats: dict,
    desc: str,
) -> None:
    """Measure and write each block of ``todo`` that no other live worker has claimed and
    none has measured meanwhile, updating ``stats``; ``worker`` (task, host, device) goes
    into every part's attributes.
    """
    progress = tqdm(todo, desc=desc, unit="block", mininterval=1.0)
    for block_id in progress:
        block = layout.blocks[block_id]
        with store.claim(block_id) as mine:
            if not mine or store.block_measured(block_id):
                stats["skipped_claimed"] += int(not mine)
                continue
            started = time.perf_counter()
            inner, outer, products_seconds = measure_one(block)
            block_seconds = time.perf_counter() - started
            attrs = {
                "seconds": block_seconds,
                "products_seconds": products_seconds,
                "hvps": len(block),
                **worker,
            }
            store.write_block(block_id, inner, outer, attrs=attrs)
        stats["measured"] += 1
        stats["hvps"] += len(block)
        stats["seconds"] += block_seconds
        rate = len(block) / block_seconds
        events.write(
            "block",
            block=block_id,
            indices=[block.start, block.stop],
            seconds=round(block_seconds, 4),
            products_seconds=round(products_seconds, 4),
            hvps_per_second=round(rate, 2),
        )
        progress.set_postfix(hvps_per_s=f"{rate:.1f}")
    progress.close()
