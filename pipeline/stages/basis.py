"""Stage 4a, basis: the orthonormal basis of a two-pass sketch's first round.

Two-pass recovery (Halko, Martinsson and Tropp 2011: a range finder, then Rayleigh-Ritz in
:mod:`hessov.stages.solve`) measures ``Y = H Omega`` in a
first round, orthonormalises it here, ``Q = qr(Y)`` of shape ``(D, k)``, and measures ``H Q``
in a second round. Every part's flags and checksums are verified in the same read that merges
it into the split's monolithic arrays; a missing or corrupt measurement stops the stage and
names the indices.

Writes ``measurements/step_T_{split}/basis.h5`` (dataset ``basis`` ``(D, k)``, attributes
``merge_seconds`` and ``qr_seconds``), which the second round's measurement tasks read.
"""

from __future__ import annotations

import time

import h5py
import torch

from hessov.config import RunConfig
from hessov.fileio import atomic_write
from hessov.merge import merged_round
from hessov.rundir import RunDir
from hessov.runlog import get_logger
from hessov.skerch_ext.solve import orthonormal_basis
from hessov.sketchspec import SketchSpec
from hessov.training import set_cpu_threads


def basis(run: RunDir, cfg: RunConfig, spec: SketchSpec, step: int, split: str) -> dict:
    """Write the first round's basis ``Q`` ``(D, k)`` of ``step`` and ``split``; returns the
    summary fields (``basis``: the file, ``seconds``: merge and QR).
    """
    set_cpu_threads(cfg.threads)
    t0 = time.perf_counter()
    outer, _ = merged_round(run, spec, step, split, "first")
    merge_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    q = orthonormal_basis(torch.from_numpy(outer))
    qr_seconds = time.perf_counter() - t0
    path = run.two_pass_basis(step, split)
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("basis", data=q.numpy(), chunks=(q.shape[0], 1))
        handle.attrs["merge_seconds"] = merge_seconds
        handle.attrs["qr_seconds"] = qr_seconds
    get_logger().info(
        "basis step %d %s: Q (%d x %d) of the first round written", step, split, *q.shape
    )
    return {"basis": str(path), "seconds": {"merge": merge_seconds, "qr": qr_seconds}}
