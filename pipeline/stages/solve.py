"""Stage 4b, solve: verify, merge, and solve the SEIGH core for the top-k eigenpairs.

Before anything else every part's flags and checksums are verified, in the same single
read of each part that merges it into the split's monolithic arrays (allocated once by
the layout, or on first use), or a row block at a time when the layout fixed a
``row_block`` (the plan's choice when ``D x k`` matrices do not fit the memory budget: then
every ``D``-row matrix is read and written in row blocks,
:mod:`hessov.skerch_ext.rowblocks`); a missing or corrupt measurement stops the solve and
names the indices (``hessov resume`` re-measures them), leaving the arrays untouched.
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
import time
from contextlib import contextmanager

import h5py
import numpy as np
import torch

from hessov import summary
from hessov.config import RunConfig
from hessov.errors import MissingInputError
from hessov.fileio import atomic_write
from hessov.merge import dataset_rows, merged_round, round_rows, tall_dataset
from hessov.rundir import RunDir
from hessov.runlog import get_logger, log_event
from hessov.skerch_ext.aposteriori import (
    apost_error_rows,
    apost_failure_probabilities,
    gaussian_probe_rows,
    scree_bounds,
)
from hessov.skerch_ext.rowblocks import row_pass, tsqr
from hessov.skerch_ext.solve import (
    block_krylov_core_rows,
    core_from_projections,
    eigenpairs_from_core,
    orthonormal_basis,
    ritz_coefficients,
    seigh_two_pass,
    single_pass_core,
)
from hessov.sketchspec import SketchSpec
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


@contextmanager
def scratch_file(path):
    """An HDF5 file for ``D``-row scratch matrices, removed when the context ends, whatever
    ends it (10 GB at D = 10^7, k = 256).
    """
    try:
        with h5py.File(path, "w") as handle:
            yield handle
    finally:
        path.unlink(missing_ok=True)


def _require_basis(run: RunDir, step: int, split: str):
    path = run.two_pass_basis(step, split)
    if not path.is_file():
        raise MissingInputError(
            f"{path} is missing: write the first round's basis with "
            f"`hessov basis {run.root} step={step} split={split}`"
        )
    return path


def two_pass_eigenpairs(run: RunDir, spec: SketchSpec, step: int, split: str, handle, seconds):
    """Rayleigh-Ritz on the basis ``Q`` ``(D, k)`` of the basis stage and the second round's
    ``H Q`` ``(D, k)``, in memory: eigenvalues ``(k,)``; eigenvectors ``(D, k)`` are written
    to ``handle``.
    """
    path = _require_basis(run, step, split)
    t0 = time.perf_counter()
    h_basis, _ = merged_round(run, spec, step, split, "second")
    with h5py.File(path, "r") as basis_file:
        q = torch.from_numpy(basis_file["basis"][:])
        seconds["merge"] = float(basis_file.attrs["merge_seconds"]) + time.perf_counter() - t0
        seconds["qr"] = float(basis_file.attrs["qr_seconds"])
    t0 = time.perf_counter()
    eigenvalues, eigenvectors = seigh_two_pass(q, torch.from_numpy(h_basis), spec.layout.num_outer)
    seconds["core_solve"] = time.perf_counter() - t0
    handle.create_dataset("eigenvectors", data=eigenvectors.numpy(), chunks=(q.shape[0], 1))
    return eigenvalues


def two_pass_eigenpairs_in_row_blocks(
    run: RunDir, spec: SketchSpec, step: int, split: str, handle, seconds
):
    """:func:`two_pass_eigenpairs` out of core: every ``D``-row matrix (``Q``, ``H Q``, the
    extension ``P`` in a scratch file, ``W``) is read and written ``spec.row_block`` rows at
    a time (:func:`hessov.skerch_ext.solve.block_krylov_core_rows`).
    """
    layout = spec.layout
    ranges = spec.row_ranges
    scratch_path = run.solve_scratch(step, split)
    t0 = time.perf_counter()
    with (
        h5py.File(_require_basis(run, step, split), "r") as basis_file,
        round_rows(run, spec, step, split, "second") as h_basis,
        scratch_file(scratch_path) as scratch,
    ):
        seconds["qr"] = float(basis_file.attrs["qr_seconds"])
        basis, _ = dataset_rows(basis_file["basis"])
        shape = (layout.dim, layout.num_outer)
        extension = dataset_rows(tall_dataset(scratch, "extension", shape, layout.dtype))
        core = block_krylov_core_rows(basis, h_basis, extension, ranges)
        eigenvalues, coefficients = ritz_coefficients(core, layout.num_outer)
        top, bottom = coefficients[: layout.num_outer], coefficients[layout.num_outer :]
        dataset = tall_dataset(handle, "eigenvectors", shape, layout.dtype)
        _, write = dataset_rows(dataset)
        for rows in row_pass(ranges, "row blocks: eigenvectors"):
            write(rows, basis(rows) @ top + extension[0](rows) @ bottom)
    seconds["core_solve"] = time.perf_counter() - t0
    return eigenvalues


def single_pass_eigenpairs(run: RunDir, spec: SketchSpec, step: int, split: str, handle, seconds):
    """Single-pass SEIGH from the first round's outer ``(D, k)`` and inner ``(s, s)`` sketches,
    in memory: eigenvalues ``(k,)``; eigenvectors ``(D, k)`` are written to ``handle``.
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
    handle.create_dataset("eigenvectors", data=eigenvectors.numpy(), chunks=(q.shape[0], 1))
    return eigenvalues


def single_pass_eigenpairs_in_row_blocks(
    run: RunDir, spec: SketchSpec, step: int, split: str, handle, seconds
):
    """:func:`single_pass_eigenpairs` out of core: ``Q`` by TSQR into a scratch file, ``Psi Q``
    and ``Omega^T Q`` a block of ``block_size`` columns at a time (the random matrices act
    on whole columns, as in a measure task), ``W = Q U`` by row blocks.
    """
    layout = spec.layout
    shape = (layout.dim, layout.num_outer)
    ranges = spec.row_ranges
    scratch_path = run.solve_scratch(step, split)
    t0 = time.perf_counter()
    with (
        round_rows(run, spec, step, split, "first") as outer,
        scratch_file(scratch_path) as scratch,
    ):
        basis_data = tall_dataset(scratch, "basis", shape, layout.dtype)
        basis, write_basis = dataset_rows(basis_data)
        tsqr(outer, write_basis, basis, ranges)
        seconds["qr"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        inner = torch.from_numpy(spec.store(run, step, split).inner_matrix())
        psi_basis, omega_t_basis = _projections(spec, basis_data)
        core = core_from_projections(psi_basis, omega_t_basis, inner)
        eigenvalues, coefficients = ritz_coefficients(core, layout.num_outer)
        _, write = dataset_rows(tall_dataset(handle, "eigenvectors", shape, layout.dtype))
        for rows in row_pass(ranges, "row blocks: eigenvectors"):
            write(rows, basis(rows) @ coefficients)
    seconds["core_solve"] = time.perf_counter() - t0
    return eigenvalues


def _projections(spec: SketchSpec, basis) -> tuple[torch.Tensor, torch.Tensor]:
    """``Psi Q`` and ``Omega^T Q`` ``(s, k)``, from ``block_size`` columns of ``Q`` at a time."""
    sketch = spec.matrices(getattr(torch, spec.layout.dtype), "cpu")
    psi, omega_t = [], []
    for start in range(0, basis.shape[1], spec.layout.block_size):
        columns = torch.from_numpy(basis[:, start : start + spec.layout.block_size])
        psi.append(sketch.psi_apply(columns))
        omega_t.append(sketch.omega_t_apply(columns))
    return torch.cat(psi, dim=1), torch.cat(omega_t, dim=1)


def a_posteriori(run: RunDir, spec: SketchSpec, step, split, eigenvalues, handle, seconds) -> dict:
    """The a-posteriori error of the written eigenpairs from the ``apost`` round's products
    of ``NUM_A_POSTERIORI`` Gaussian probes, its failure probabilities and the scree bounds
    ``(k,)``.
    """
    t0 = time.perf_counter()
    eigenvectors = dataset_rows(handle["eigenvectors"])[0]
    seed_range = spec.seeds()["apost"]
    with round_rows(run, spec, step, split, "apost") as h_probes:
        estimate = apost_error_rows(
            eigenvalues,
            eigenvectors,
            lambda rows: gaussian_probe_rows(seed_range, rows),
            h_probes,
            spec.row_ranges,
        )
    scree_lo, scree_hi = scree_bounds(eigenvalues, estimate.error, estimate.frobenius)
    p_low, p_high = apost_failure_probabilities(spec.num_apost, 0.5)
    seconds["a_posteriori"] = time.perf_counter() - t0
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
        "apost_rel_err": estimate.relative_error,
        "apost_error": estimate.error,
        "frobenius_estimate": estimate.frobenius,
        "apost_probability_below_half": check["probabilities"][0],
        "apost_probability_above_1_5": check["probabilities"][1],
        "num_a_posteriori": spec.num_apost,
        "hvps": spec.total_hvps,
        "seconds_by_phase": seconds,
    }


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
        "dtype": spec.layout.dtype,
        "problem": cfg.problem,
        "hvps": spec.total_hvps,
        "seconds_by_phase": fields["seconds_by_phase"],
        "apost_rel_err": fields["apost_rel_err"],
        "apost_error": fields["apost_error"],
        "frobenius_estimate": fields["frobenius_estimate"],
    }


def solve(run: RunDir, cfg: RunConfig, spec: SketchSpec, step: int, split: str) -> dict:
    """Solve one step and split (two-pass: after the basis stage and the second round; and
    after the a-posteriori round); writes the eigen file and the summary, and returns the
    summary fields.
    """
    set_cpu_threads(cfg.threads)
    seconds = {"layout": spec.layout_seconds, **measurement_seconds(run, spec, step, split)}
    if spec.recovery == "two_pass":
        recover = two_pass_eigenpairs_in_row_blocks if spec.row_block else two_pass_eigenpairs
    else:
        recover = single_pass_eigenpairs_in_row_blocks if spec.row_block else single_pass_eigenpairs
    with atomic_write(run.eigen(step, split)) as tmp, h5py.File(tmp, "w") as handle:
        eigenvalues = recover(run, spec, step, split, handle, seconds)
        check = a_posteriori(run, spec, step, split, eigenvalues, handle, seconds)
        seconds = {key: round(value, 4) for key, value in seconds.items()}
        fields = summary_fields(spec, eigenvalues, check, seconds)
        handle.create_dataset("eigenvalues", data=eigenvalues.numpy())
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
