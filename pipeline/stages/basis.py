"""Stage 4a, basis: the orthonormal basis of a two-pass sketch's first round.

Two-pass recovery (Halko, Martinsson and Tropp 2011: a range finder, then Rayleigh-Ritz in
:mod:`hessov.stages.solve`) measures ``Y = H Omega`` in a
first round, orthonormalises it here, ``Q = qr(Y)`` of shape ``(D, k)``, and measures ``H Q``
in a second round. Every part's flags and checksums are verified in the same read that merges
it into the split's monolithic arrays; a missing or corrupt measurement stops the stage and
names the indices.

Writes ``measurements/step_T_{split}/basis.h5`` (dataset ``basis`` ``(D, k)``, attributes
``merge_seconds`` and ``qr_seconds``), which the second round's measurement tasks read.
When the layout fixed a ``row_block`` (the plan's choice when ``D x k`` does not fit the
memory budget) ``Q`` comes from TSQR in row-block phases (:mod:`hessov.rowpass`: local QRs,
the tree, the factors applied), one array task per row block on Slurm, so no ``D x k``
matrix is held in memory; the parts are checksummed block by block as they are read.
``Q``'s row blocks are copied into ``basis.h5`` at the end.
"""

from __future__ import annotations

import time

import h5py
import torch

from hessov.config import RunConfig
from hessov.fileio import atomic_write
from hessov.merge import merged_round, round_block, tall_dataset, verify_round
from hessov.rowpass import RowWork, program_phases, run_phases
from hessov.rowsolve import round_tsqr_phases
from hessov.rundir import RunDir
from hessov.runlog import get_logger
from hessov.skerch_ext.rowblocks import row_pass
from hessov.skerch_ext.solve import orthonormal_basis
from hessov.sketchspec import SketchSpec
from hessov.training import set_cpu_threads


def basis(
    run: RunDir,
    cfg: RunConfig,
    spec: SketchSpec,
    step: int,
    split: str,
    phase: str | None = None,
    blocks: list[int] | None = None,
) -> dict:
    """Write the first round's basis ``Q`` ``(D, k)`` of ``step`` and ``split``; returns the
    summary fields (``basis``: the file, ``seconds``: merge and QR). In row blocks, only
    ``phase`` (of its ``blocks``) when given: one job of the program.
    """
    set_cpu_threads(cfg.threads)
    if spec.row_block:
        return _basis_in_row_blocks(run, spec, step, split, phase, blocks)
    path = run.two_pass_basis(step, split)
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as handle:
        t0 = time.perf_counter()
        outer, _ = merged_round(run, spec, step, split, "first")
        handle.attrs["merge_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        q = orthonormal_basis(torch.from_numpy(outer))
        handle.attrs["qr_seconds"] = time.perf_counter() - t0
        handle.attrs["row_block"] = 0
        handle.create_dataset("basis", data=q.numpy(), chunks=(q.shape[0], 1))
    get_logger().info(
        "basis step %d %s: Q (%d x %d) of the first round written",
        step,
        split,
        spec.layout.dim,
        spec.layout.num_outer,
    )
    return {"basis": str(path)}


def _basis_in_row_blocks(run: RunDir, spec: SketchSpec, step: int, split: str, phase, blocks):
    """TSQR over row blocks of the round's parts, ``Q`` written to ``basis.h5`` at the end. A
    single phase's job after ``basis.h5`` is written (a requeued task) has nothing to do.
    """
    if phase is not None and run.two_pass_basis(step, split).is_file():
        get_logger().info("basis step %d %s: written already, phase %s skipped", step, split, phase)
        return {"basis": str(run.two_pass_basis(step, split))}
    work = RowWork(
        run.row_work(step, split, "basis", spec.row_block),
        program_phases("basis", spec.recovery),
        spec.row_ranges,
    )
    outer = round_block(run, spec, step, split, "first")
    phases = round_tsqr_phases(work, outer, verify_round(run, spec, step, split, "first"))
    phases["finish"] = lambda: _write_basis(run, spec, step, split, work)
    run_phases(work, phases, phase, blocks, label=f"basis step {step} {split}: ")
    return {"basis": str(run.two_pass_basis(step, split))}


def _write_basis(run: RunDir, spec: SketchSpec, step: int, split: str, work: RowWork) -> None:
    """``basis.h5`` from ``Q``'s row blocks, copied a block at a time into one dataset: the
    second round's tasks read its columns, which one chunked dataset serves with a single
    file's caches (a virtual view over the blocks cost each task a gigabyte of caches at
    D = 10^7, k = 256, bench/RESULTS.md question 8).
    """
    layout = spec.layout
    seconds = work.seconds()
    with atomic_write(run.two_pass_basis(step, split)) as tmp, h5py.File(tmp, "w") as handle:
        dataset = tall_dataset(handle, "basis", (layout.dim, layout.num_outer), layout.dtype)
        for number, rows in enumerate(row_pass(spec.row_ranges, "basis file: Q")):
            dataset[rows.start : rows.stop] = work.read("apply", number, ["block"])["block"]
        handle.attrs["merge_seconds"] = 0.0
        handle.attrs["qr_seconds"] = sum(seconds.values())
        handle.attrs["row_block"] = spec.row_block
    get_logger().info(
        "basis step %d %s: Q (%d x %d) of the first round written in row blocks of %d",
        step,
        split,
        layout.dim,
        layout.num_outer,
        spec.row_block,
    )
