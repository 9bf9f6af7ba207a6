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
memory budget) the parts are verified and read in row blocks and ``Q`` comes from TSQR
(:func:`hessov.skerch_ext.rowblocks.tsqr`), so no ``D x k`` matrix is held in memory.
"""

from __future__ import annotations

import time

import h5py
import torch

from hessov.config import RunConfig
from hessov.fileio import atomic_write
from hessov.merge import dataset_rows, merged_round, round_rows, tall_dataset
from hessov.rundir import RunDir
from hessov.runlog import get_logger
from hessov.skerch_ext.rowblocks import tsqr
from hessov.skerch_ext.solve import orthonormal_basis
from hessov.sketchspec import SketchSpec
from hessov.training import set_cpu_threads


def basis(run: RunDir, cfg: RunConfig, spec: SketchSpec, step: int, split: str) -> dict:
    """Write the first round's basis ``Q`` ``(D, k)`` of ``step`` and ``split``; returns the
    summary fields (``basis``: the file, ``seconds``: merge and QR).
    """
    set_cpu_threads(cfg.threads)
    path = run.two_pass_basis(step, split)
    write = _basis_in_row_blocks if spec.row_block else _basis_in_memory
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as handle:
        seconds = write(run, spec, step, split, handle)
        handle.attrs["merge_seconds"] = seconds["merge"]
        handle.attrs["qr_seconds"] = seconds["qr"]
        handle.attrs["row_block"] = spec.row_block
    get_logger().info(
        "basis step %d %s: Q (%d x %d) of the first round written%s",
        step,
        split,
        spec.layout.dim,
        spec.layout.num_outer,
        f" in row blocks of {spec.row_block}" if spec.row_block else "",
    )
    return {"basis": str(path), "seconds": seconds}


def _basis_in_memory(run: RunDir, spec: SketchSpec, step: int, split: str, handle) -> dict:
    """Merge the round into memory and take one QR: the fast path when ``D x k`` fits."""
    t0 = time.perf_counter()
    outer, _ = merged_round(run, spec, step, split, "first")
    merge_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    q = orthonormal_basis(torch.from_numpy(outer))
    qr_seconds = time.perf_counter() - t0
    handle.create_dataset("basis", data=q.numpy(), chunks=(q.shape[0], 1))
    return {"merge": merge_seconds, "qr": qr_seconds}


def _basis_in_row_blocks(run: RunDir, spec: SketchSpec, step: int, split: str, handle) -> dict:
    """TSQR over row blocks of the round's parts, written to ``handle`` in row blocks."""
    layout = spec.layout
    ranges = spec.row_ranges
    t0 = time.perf_counter()
    with round_rows(run, spec, step, split, "first") as outer:
        dataset = tall_dataset(handle, "basis", (layout.dim, layout.num_outer), layout.dtype)
        read, write = dataset_rows(dataset)
        tsqr(outer, write, read, ranges)
    return {"merge": 0.0, "qr": time.perf_counter() - t0}
