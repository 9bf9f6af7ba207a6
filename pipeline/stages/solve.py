"""Stage 4b, solve: verify, merge, and solve the SEIGH core for the top-k eigenpairs.

Before anything else every part's flags and checksums are verified, in the same single
read of each part that merges it into the split's monolithic arrays (allocated once by
the layout, or on first use); a missing or corrupt measurement stops the solve and names
the indices (``hessov resume`` re-measures them), leaving the arrays untouched. When the
layout fixed a ``row_block`` (the plan's choice when ``D x k`` matrices do not fit the
memory budget) the solve is instead a chain of row-block phases (:mod:`hessov.rowpass`,
:mod:`hessov.rowsolve`), job arrays on Slurm, whose tasks checksum the rows they read and
whose next combined job checks the chained checksums before anything is built on them.
Then single-pass SEIGH (Fernandez et al.; Tropp et al. 2017): ``Q = qr(Y)``, the core
``(Psi Q)^+ Z ((Omega^T Q)^+)^T`` from two least-squares solves with block transforms,
symmetrised, ``eigh``, sorted by ``|lambda|``, ``W = Q U`` (or, two-pass, Rayleigh-Ritz on
the basis stage's ``Q`` and the second round's ``H Q``). Finally the a-posteriori error is
estimated from the ``apost`` round's products of ``NUM_A_POSTERIORI`` Gaussian probes
(their own seed range), with its probability and scree bounds: the solve needs no model.

Writes ``eigen/step_T_{split}.h5`` (eigenvalues ``(k,)``, eigenvectors ``(D, k)``, bounds,
provenance) and the ``solve`` summary for that step and split.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict

import h5py
import numpy as np
import torch

from hessov import summary
from hessov.config import RunConfig
from hessov.fileio import atomic_write
from hessov.krylovspace import remove_unneeded_work, space_in_memory, space_rows
from hessov.merge import merged_round, round_block, round_rows, tall_dataset, verify_round
from hessov.rounds import product_rounds, read_checks, relative_check, rounds_taken
from hessov.rowpass import RowWork, program_phases, run_phases
from hessov.rowsolve import Rows, apost_phases, single_pass_phases, two_pass_phases
from hessov.rundir import RunDir
from hessov.runlog import get_logger, log_event
from hessov.skerch_ext.aposteriori import (
    ApostEstimate,
    apost_error_rows,
    apost_failure_probabilities,
    gaussian_probe_rows,
    scree_bounds,
)
from hessov.skerch_ext.krylov import EigenvalueBounds, core_bounds
from hessov.skerch_ext.rowblocks import row_pass
from hessov.skerch_ext.solve import (
    eigenpairs_from_core,
    extended_core,
    next_block,
    orthonormal_basis,
    single_pass_core,
)
from hessov.sketchspec import SketchSpec
from hessov.spectralshift import hessian_eigenvalues, shift_of
from hessov.training import set_cpu_threads


def write_attrs(handle: h5py.File, attrs: dict) -> None:
    """The eigen file's attributes (non-scalars as JSON)."""
    for key, value in attrs.items():
        handle.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)


def measurement_seconds(run: RunDir, spec: SketchSpec, step: int, split: str) -> dict:
    """Seconds of every round's blocks as the measurement workers recorded them:
    ``"measurements"`` whole blocks (test matrices or basis reads included) and
    ``"products"`` the batched Hessian-vector products alone.
    """
    parts = [
        attrs
        for round_name in spec.rounds
        for attrs in spec.store(run, step, split, round_name).part_attrs()
    ]
    return {
        key: round(sum(float(attrs.get(field, 0)) for attrs in parts), 3)
        for key, field in (("measurements", "seconds"), ("products", "products_seconds"))
    }


def bounds_source(rounds: int) -> str:
    """Where two-pass bounds come from (:mod:`hessov.skerch_ext.krylov`), in words."""
    space = "span(Q)" if rounds == 2 else f"span(Q_0..Q_{rounds - 2})"  # noqa: PLR2004
    return f"the products of rounds 2..{rounds} (the Ritz pairs of {space}), no extra HVP"


def two_pass_eigenpairs(run: RunDir, spec: SketchSpec, step: int, split: str, seconds):
    """Rayleigh-Ritz on the block Krylov space of the rounds taken (:mod:`hessov.krylovspace`;
    after two rounds the basis ``Q`` ``(D, k)`` and ``H Q``), in memory: eigenvalues
    ``(k,)``, eigenvectors ``(D, k)`` and their
    :class:`~hessov.skerch_ext.krylov.EigenvalueBounds`.
    """
    rounds = rounds_taken(run, spec, step, split)
    t0 = time.perf_counter()
    space, products, basis_seconds = space_in_memory(run, spec, step, split, rounds)
    seconds["merge"] = time.perf_counter() - t0 + basis_seconds["merge"]
    seconds["qr"] = basis_seconds["qr"]
    t0 = time.perf_counter()
    k = spec.layout.num_outer
    basis, core = extended_core(space, products, next_block(space, products[:, -k:]))
    eigenvalues, eigenvectors = eigenpairs_from_core(basis, core, k)
    precision = (space.dtype, space.shape[0])
    bounds = core_bounds(core, space.shape[1], eigenvalues, precision, k)
    seconds["core_solve"] = time.perf_counter() - t0
    return eigenvalues, eigenvectors, EigenvalueBounds(*bounds, bounds_source(rounds))


def single_pass_eigenpairs(run: RunDir, spec: SketchSpec, step: int, split: str, seconds):
    """Single-pass SEIGH from the first round's outer ``(D, k)`` and inner ``(s, s)`` sketches,
    in memory: eigenvalues ``(k,)``, eigenvectors ``(D, k)`` and no bounds (no product of
    ``H`` on the basis was measured).
    """
    t0 = time.perf_counter()
    outer, inner = merged_round(run, spec, step, split, "first")
    seconds["merge"] = time.perf_counter() - t0
    outer = torch.from_numpy(outer)
    sketch = spec.matrices(outer.dtype, outer.device)
    t0 = time.perf_counter()
    q = orthonormal_basis(outer)
    seconds["qr"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    core = single_pass_core(q, torch.from_numpy(inner), sketch.omega_t_apply, sketch.psi_apply)
    eigenvalues, eigenvectors = eigenpairs_from_core(q, core)
    seconds["core_solve"] = time.perf_counter() - t0
    return eigenvalues, eigenvectors, None


def a_posteriori(
    run: RunDir, spec: SketchSpec, step: int, split: str, eigenvalues, eigenvectors: Rows
) -> ApostEstimate:
    """The a-posteriori error of the eigenpairs (``eigenvectors`` reads ``W``'s rows) from
    the ``apost`` round's products of ``NUM_A_POSTERIORI`` Gaussian probes.
    """
    seed_range = spec.seeds()["apost"]
    with round_rows(run, spec, step, split, "apost") as h_probes:
        return apost_error_rows(
            eigenvalues,
            eigenvectors,
            lambda rows: gaussian_probe_rows(seed_range, rows),
            h_probes,
            spec.row_ranges,
        )


def apost_check(spec: SketchSpec, eigenvalues, estimate: ApostEstimate) -> dict:
    """The estimate with its failure probabilities and the scree bounds ``(k,)``."""
    scree_lo, scree_hi = scree_bounds(eigenvalues, estimate.error, estimate.frobenius)
    p_low, p_high = apost_failure_probabilities(spec.num_apost, 0.5)
    return {
        "estimate": estimate,
        "scree": (scree_lo, scree_hi),
        "probabilities": (p_low, p_high),
    }


def summary_fields(spec: SketchSpec, eigenvalues, check: dict, seconds: dict) -> dict:
    """What the ``solve`` summary records for one step and split."""
    estimate = check["estimate"]
    return {
        "eigenvalues": eigenvalues.tolist(),
        "k": spec.layout.num_outer,
        "s": spec.layout.num_inner,
        "recovery": spec.recovery,
        "curvature": spec.curvature,
        "apost_rel_err": estimate.relative_error,
        "apost_error": estimate.error,
        "frobenius_estimate": estimate.frobenius,
        "apost_probability_below_half": check["probabilities"][0],
        "apost_probability_above_1_5": check["probabilities"][1],
        "num_a_posteriori": spec.num_apost,
        "hvps": spec.total_hvps,
        "seconds_by_phase": seconds,
    }


def bound_fields(bounds: EigenvalueBounds | None, recovery: str) -> dict:
    """The summary's per-eigenvalue bound fields (:meth:`EigenvalueBounds.summary`), or the
    same keys saying why there are none.
    """
    if bounds is not None:
        return bounds.summary()
    reason = (
        "none: single pass measures no product of H on its basis"
        if recovery == "single_pass"
        else "none: the row-block ritz phase ran before hessov computed bounds; rerun the solve"
    )
    return {
        "eigenvalue_error_bounds": None,
        "residual_norms": None,
        "error_bounds_resolved": 0,
        "error_bound_theorem": None,
        "error_bounds_from": reason,
    }


def round_fields(run: RunDir, spec: SketchSpec, where, eigenvalues, bounds) -> dict:
    """The summary's round fields: the rounds taken of those planned, what stopped them
    (``rounds``: a fixed number; ``target_rel_err``: a met target left rounds untaken;
    ``max_rounds``: all were taken, ``target_met`` saying whether the last met it), the
    largest relative bound over the checked pairs, the HVPs taken and each round's check.
    """
    if spec.recovery != "two_pass":
        return {"rounds": 1, "rounds_planned": 1, "rounds_stopped_by": "single_pass"}
    step, split = where
    taken = rounds_taken(run, spec, step, split)
    count = spec.checked_eigenpairs
    errors = torch.full(eigenvalues.shape, math.inf) if bounds is None else bounds.error_bounds
    final = relative_check(taken, eigenvalues, errors, count, spec.target_rel_err)
    if not spec.target_rel_err:
        reason = "rounds"
    else:
        reason = "target_rel_err" if taken < spec.krylov_rounds else "max_rounds"
    worst = final.max_relative_bound
    return {
        "rounds": taken,
        "rounds_planned": spec.krylov_rounds,
        "rounds_stopped_by": reason,
        "target_rel_err": spec.target_rel_err or None,
        "target_eigenpairs": count,
        "target_met": final.met if spec.target_rel_err else None,
        "max_relative_error_bound": _finite(worst),
        "hvps": spec.layout.num_measurements * taken,
        "round_checks": [
            asdict(check) | {"max_relative_bound": _finite(check.max_relative_bound)}
            for check in read_checks(run, step, split)
        ],
    }


def _finite(value: float) -> float | None:
    """``value``, or ``None`` (JSON's null) for an unresolved bound's ``inf``."""
    return value if math.isfinite(value) else None


def provenance(spec: SketchSpec, cfg: RunConfig, step: int, split: str, fields: dict) -> dict:
    """The eigen file's attributes: where the eigenpairs come from and how good they are."""
    return {
        "step": step,
        "split": split,
        "k": spec.layout.num_outer,
        "s": spec.layout.num_inner,
        "seeds": repr(spec.seeds()),
        "noise": spec.layout.noise,
        "block_size": spec.layout.block_size,
        "recovery": spec.recovery,
        "curvature": spec.curvature,
        "which": spec.which,
        "dtype": spec.layout.dtype,
        "problem": cfg.problem,
        "hvps": fields["hvps"],
        "rounds": fields["rounds"],
        "seconds_by_phase": fields["seconds_by_phase"],
        "apost_rel_err": fields["apost_rel_err"],
        "apost_error": fields["apost_error"],
        "frobenius_estimate": fields["frobenius_estimate"],
        **({"shift": fields["shift"]} if "shift" in fields else {}),
    }


def solve(
    run: RunDir,
    cfg: RunConfig,
    spec: SketchSpec,
    step: int,
    split: str,
    phase: str | None = None,
    blocks: list[int] | None = None,
) -> dict | None:
    """Solve one step and split (two-pass: after the basis stage and the second round; and
    after the a-posteriori round); writes the eigen file and the summary, and returns the
    summary fields. In row blocks, only ``phase`` (of its ``blocks``) when given: one job of
    the program, which returns the fields only when it was the last.
    """
    set_cpu_threads(cfg.threads)
    if spec.recovery == "two_pass":
        remove_unneeded_work(run, spec, step, split)
    if spec.row_block:
        return solve_in_row_blocks(run, cfg, spec, step, split, phase, blocks)
    seconds = {"layout": spec.layout_seconds, **measurement_seconds(run, spec, step, split)}
    recover = two_pass_eigenpairs if spec.recovery == "two_pass" else single_pass_eigenpairs
    eigenvalues, eigenvectors, bounds = recover(run, spec, step, split, seconds)
    t0 = time.perf_counter()
    estimate = a_posteriori(run, spec, step, split, eigenvalues, _tensor_rows(eigenvectors))
    seconds["a_posteriori"] = time.perf_counter() - t0

    def write(handle: h5py.File) -> None:
        data = eigenvectors.numpy()
        handle.create_dataset("eigenvectors", data=data, chunks=(data.shape[0], 1))

    where = (step, split)
    return write_eigen_file(
        run, cfg, spec, where, eigenvalues, write, estimate, seconds, bounds=bounds
    )


def _tensor_rows(matrix: torch.Tensor) -> Rows:
    return lambda rows: matrix[rows.start : rows.stop]


def solve_in_row_blocks(run, cfg, spec: SketchSpec, step: int, split: str, phase, blocks):
    """The row-block program of the solve (:mod:`hessov.rowpass`, :mod:`hessov.rowsolve`):
    its ``phase`` (all of them by default), the last writing the eigen file from ``W``'s
    row blocks. A single phase's job after the eigen file is written (a requeued task) has
    nothing to do.
    """
    if phase is not None and run.eigen(step, split).is_file():
        get_logger().info("solve step %d %s: solved already, phase %s skipped", step, split, phase)
        return None
    work = RowWork(
        run.row_work(step, split, "solve", spec.row_block),
        program_phases("solve", spec.recovery),
        spec.row_ranges,
    )
    num = spec.layout.num_outer
    if spec.recovery == "two_pass":
        rows = space_rows(run, spec, step, split, rounds_taken(run, spec, step, split))
        phases, eigenvector_rows = two_pass_phases(work, *rows, num)
    else:
        phases, eigenvector_rows = single_pass_phases(
            work,
            round_block(run, spec, step, split, "first"),
            verify_round(run, spec, step, split, "first"),
            lambda columns: _projections(spec, columns),
            lambda: torch.from_numpy(spec.store(run, step, split).inner_matrix()),
            num,
        )
    result = {}

    def finish(estimate: ApostEstimate) -> None:
        result.update(_finish(run, cfg, spec, (step, split), work, estimate))

    seed_range = spec.seeds()["apost"]
    phases |= apost_phases(
        work,
        eigenvector_rows,
        lambda rows: gaussian_probe_rows(seed_range, rows),
        round_block(run, spec, step, split, "apost"),
        verify_round(run, spec, step, split, "apost"),
        finish,
    )
    run_phases(work, phases, phase, blocks, label=f"solve step {step} {split}: ")
    return result or None


def _projections(spec: SketchSpec, columns) -> tuple[torch.Tensor, torch.Tensor]:
    """``Psi Q`` and ``Omega^T Q`` ``(s, k)`` from ``columns(a, b) = Q[:, a:b]``, read
    ``block_size`` columns at a time (the random matrices act on whole columns).
    """
    sketch = spec.matrices(getattr(torch, spec.layout.dtype), "cpu")
    psi, omega_t = [], []
    for start in range(0, spec.layout.num_outer, spec.layout.block_size):
        block = columns(start, min(start + spec.layout.block_size, spec.layout.num_outer))
        psi.append(sketch.psi_apply(block))
        omega_t.append(sketch.omega_t_apply(block))
    return torch.cat(psi, dim=1), torch.cat(omega_t, dim=1)


def _finish(run, cfg, spec: SketchSpec, where, work: RowWork, estimate) -> dict:
    """The eigen file from the row-block program's results: ``W`` copied from its blocks."""
    step, split = where
    qr_seconds = 0.0  # single pass: its TSQR is among the solve's phases
    rounds = rounds_taken(run, spec, step, split) if spec.recovery == "two_pass" else 1
    for name in product_rounds(rounds):
        with h5py.File(run.two_pass_basis(step, split, name), "r") as basis_file:
            qr_seconds += float(basis_file.attrs["qr_seconds"])
    phase_seconds = work.seconds()
    apost = ("apost_sum", "apost_residuals")
    seconds = {
        "layout": spec.layout_seconds,
        **measurement_seconds(run, spec, step, split),
        "merge": 0.0,
        "qr": qr_seconds,
        "core_solve": sum(t for name, t in phase_seconds.items() if name not in apost),
        "a_posteriori": sum(phase_seconds.get(name, 0.0) for name in apost),
    }
    layout = spec.layout

    def write(handle: h5py.File) -> None:
        shape = (layout.dim, layout.num_outer)
        dataset = tall_dataset(handle, "eigenvectors", shape, layout.dtype)
        for number, rows in enumerate(row_pass(spec.row_ranges, "eigen file: W")):
            dataset[rows.start : rows.stop] = work.read("eigenvectors", number, ["block"])["block"]

    ritz = work.read("ritz")
    bounds = None
    if "error_bounds" in ritz:
        source = bounds_source(rounds)
        bounds = EigenvalueBounds(ritz["error_bounds"], ritz["residual_norms"], source)
    eigenvalues = ritz["eigenvalues"]
    return write_eigen_file(
        run, cfg, spec, where, eigenvalues, write, estimate, seconds, bounds=bounds
    )


def write_eigen_file(  # noqa: PLR0913 (the parts of an eigen file)
    run, cfg, spec, where, eigenvalues, write_eigenvectors, estimate, seconds, *, bounds=None
):
    """Write the eigen file of ``where`` (step, split) and its ``solve`` summary: the
    eigenvalues ``(k,)``, what ``write_eigenvectors(handle)`` writes, the a-posteriori
    ``estimate``'s bounds, the per-eigenvalue ``bounds`` (an
    :class:`~hessov.skerch_ext.krylov.EigenvalueBounds`; None for single pass) and the
    provenance; returns the summary fields.
    """
    step, split = where
    check = apost_check(spec, eigenvalues, estimate)  # of the operator sketched
    sigma = shift_of(run, spec, step, split)
    eigenvalues = hessian_eigenvalues(eigenvalues, sigma)  # which=smallest: sigma - mu
    seconds = {key: round(value, 4) for key, value in seconds.items()}
    fields = summary_fields(spec, eigenvalues, check, seconds) | {"which": spec.which}
    fields |= {"shift": sigma} if sigma is not None else {}
    fields |= bound_fields(bounds, spec.recovery)
    fields |= round_fields(run, spec, where, eigenvalues, bounds)
    with atomic_write(run.eigen(step, split)) as tmp, h5py.File(tmp, "w") as handle:
        write_eigenvectors(handle)
        handle.create_dataset("eigenvalues", data=eigenvalues.numpy())
        if bounds is not None:
            handle.create_dataset("error_bounds", data=bounds.error_bounds.numpy())
            handle.create_dataset("residual_norms", data=bounds.residual_norms.numpy())
        for name, bound in zip(("scree_lower", "scree_upper"), check["scree"], strict=True):
            handle.create_dataset(name, data=bound.numpy())
        write_attrs(handle, provenance(spec, cfg, step, split, fields))
    summary.record(run, "solve", fields, step, split)
    log_event(
        run.log,
        "solve",
        "solved",
        step=step,
        split=split,
        top_eigenvalues=fields["eigenvalues"][:10],
        apost_rel_err=fields["apost_rel_err"],
        seconds_by_phase=seconds,
    )
    get_logger().info(
        "solve step %d %s: top eigenvalues %s, a-posteriori relative error %.3g",
        step,
        split,
        np.round(eigenvalues[:5].cpu().numpy(), 4).tolist(),
        fields["apost_rel_err"],
    )
    return fields
