"""Stage 4a, basis: the block of the Krylov basis that the next round multiplies.

Two-pass recovery (Halko, Martinsson and Tropp 2011: a range finder, then Rayleigh-Ritz in
:mod:`hessov.stages.solve`) measures ``Y = H Omega`` in a first round, orthonormalises it
here, ``Q = qr(Y)`` of shape ``(D, k)``, and measures ``H Q`` in a second round. Every part's
flags and checksums are verified in the same read that merges it into the split's monolithic
arrays; a missing or corrupt measurement stops the stage and names the indices.

With ``rounds=q`` (block Krylov, :mod:`hessov.skerch_ext.krylov`) the basis of round ``j >= 3``
is the next block ``Q_{j-2}``, an orthonormal basis of ``(I - V V^T) H Q_{j-3}`` for the
blocks ``V`` so far (:mod:`hessov.krylovspace`). The same job bounds the eigenvalues that the
solve after round ``j - 1`` would report and records the check (:mod:`hessov.rounds`); with
``target_rel_err`` met it writes no block, and the later rounds have nothing to do.

Writes ``measurements/step_T_{split}/basis.h5`` (``basis_roundJ.h5`` for round ``J``;
dataset ``basis`` ``(D, k)``, attributes ``merge_seconds`` and ``qr_seconds``), which the
round's measurement tasks read. When the layout fixed a ``row_block`` (the plan's choice
when ``D x k`` does not fit the memory budget) the block comes from TSQR in row-block
phases (:mod:`hessov.rowpass`: local QRs, the tree, the factors applied), one array task per
row block on Slurm, so no ``D x k`` matrix is held in memory; the parts are checksummed
block by block as they are read. The block's rows are copied into the basis file at the end.
"""

from __future__ import annotations

import time

import h5py
import torch

from hessov.config import RunConfig
from hessov.fileio import atomic_write
from hessov.krylovspace import (
    check_after_round,
    remove_unneeded_work,
    space_in_memory,
    space_rows,
)
from hessov.merge import merged_round, round_block, tall_dataset, verify_round
from hessov.rounds import not_needed, round_number, stopped_after
from hessov.rowpass import RowWork, program_phases, run_phases, work_name
from hessov.rowsolve import extended_core_of, extension_phases, round_tsqr_phases
from hessov.rundir import RunDir
from hessov.runlog import get_logger
from hessov.skerch_ext.rowblocks import row_pass
from hessov.skerch_ext.solve import coupled_core, next_block, orthonormal_basis
from hessov.sketchspec import SketchSpec
from hessov.training import set_cpu_threads


def basis(  # noqa: PLR0913 (a job's coordinates)
    run: RunDir,
    cfg: RunConfig,
    spec: SketchSpec,
    step: int,
    split: str,
    phase: str | None = None,
    blocks: list[int] | None = None,
    round_name: str = "second",
) -> dict:
    """Write the basis block ``(D, k)`` that ``round_name`` multiplies, for ``step`` and
    ``split``; returns the summary fields (``basis``: the file). In row blocks, only
    ``phase`` (of its ``blocks``) when given: one job of the program.
    """
    set_cpu_threads(cfg.threads)
    path = run.two_pass_basis(step, split, round_name)
    if not_needed(run, spec, step, split, round_name):
        get_logger().info(
            "basis step %d %s: target_rel_err met after round %d, %s not needed",
            *(step, split, stopped_after(run, step, split), round_name),
        )
        remove_unneeded_work(run, spec, step, split)
        return {"basis": None}
    if spec.row_block:
        return _basis_in_row_blocks(run, spec, (step, split, round_name), phase, blocks)
    if round_name != "second":
        return _next_block_in_memory(run, spec, step, split, round_name)
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


def _next_block_in_memory(run: RunDir, spec: SketchSpec, step: int, split: str, round_name):
    """The basis of round ``j >= 3`` in memory: the space after round ``j - 1``, its check,
    and unless the target is met the next block.
    """
    before = round_number(round_name) - 1
    t0 = time.perf_counter()
    space, products, _ = space_in_memory(run, spec, step, split, before)
    merge_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    block = next_block(space, products[:, -spec.layout.num_outer :])
    core = coupled_core(space.T @ products, block.T @ products)
    check = check_after_round(run, spec, (step, split, before), core, space.shape[1])
    if check.met:
        return {"basis": None}
    path = run.two_pass_basis(step, split, round_name)
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("basis", data=block.numpy(), chunks=(block.shape[0], 1))
        handle.attrs["merge_seconds"] = merge_seconds
        handle.attrs["qr_seconds"] = time.perf_counter() - t0
        handle.attrs["row_block"] = 0
    get_logger().info(
        "basis step %d %s: block %s (%d x %d) of the Krylov basis written",
        *(step, split, round_name, *block.shape),
    )
    return {"basis": str(path)}


def _basis_in_row_blocks(run: RunDir, spec: SketchSpec, where, phase, blocks):
    """TSQR over row blocks of the first round's parts (the second round's basis) or the
    next Krylov block's phases (a later round's), the block written to its basis file at the
    end. ``where`` is ``(step, split, round_name)``. A single phase's job after the file is
    written (a requeued task) has nothing to do.
    """
    step, split, round_name = where
    path = run.two_pass_basis(step, split, round_name)
    if phase is not None and path.is_file():
        get_logger().info("basis step %d %s: written already, phase %s skipped", step, split, phase)
        return {"basis": str(path)}
    work = RowWork(
        run.row_work(step, split, work_name("basis", round_name), spec.row_block),
        program_phases("basis", spec.recovery, round_name),
        spec.row_ranges,
    )
    if round_name == "second":
        outer = round_block(run, spec, step, split, "first")
        phases = round_tsqr_phases(work, outer, verify_round(run, spec, step, split, "first"))
        result_phase = "apply"
    else:
        before = round_number(round_name) - 1
        rows = space_rows(run, spec, step, split, before)
        phases = extension_phases(work, *rows, spec.layout.num_outer)
        phases["check"] = lambda: _row_check(run, spec, (step, split, before), work)
        result_phase = "reorth_apply"
    phases["finish"] = lambda: _write_basis(run, spec, where, work, result_phase)
    run_phases(work, phases, phase, blocks, label=f"basis step {step} {split} {round_name}: ")
    return {"basis": str(path) if path.is_file() else None}


def _row_check(run: RunDir, spec: SketchSpec, where, work: RowWork) -> dict:
    """The ``check`` phase: the bounds after the round before, recorded (``met``: 1 when the
    target is met and no block is written).
    """
    core, num = extended_core_of(work)
    return {"met": torch.tensor([int(check_after_round(run, spec, where, core, num).met)])}


def _write_basis(run: RunDir, spec: SketchSpec, where, work: RowWork, result_phase: str) -> None:
    """The basis file from the block's rows (``result_phase``'s), copied a row block at a
    time into one dataset: the round's tasks read its columns, which one chunked dataset
    serves with a single file's caches (a virtual view over the blocks cost each task a
    gigabyte of caches at D = 10^7, k = 256, bench/RESULTS.md question 8). Nothing is
    written when the ``check`` phase found the target met.
    """
    step, split, round_name = where
    if result_phase != "apply" and int(work.read("check")["met"][0]):
        return
    layout = spec.layout
    seconds = work.seconds()
    path = run.two_pass_basis(step, split, round_name)
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as handle:
        dataset = tall_dataset(handle, "basis", (layout.dim, layout.num_outer), layout.dtype)
        for number, rows in enumerate(row_pass(spec.row_ranges, f"basis file: {round_name}")):
            block = work.read(result_phase, number, ["block"])["block"]
            dataset[rows.start : rows.stop] = block
        handle.attrs["merge_seconds"] = 0.0
        handle.attrs["qr_seconds"] = sum(seconds.values())
        handle.attrs["row_block"] = spec.row_block
    get_logger().info(
        "basis step %d %s: the %s round's block (%d x %d) written in row blocks of %d",
        *(step, split, round_name, layout.dim, layout.num_outer, spec.row_block),
    )
