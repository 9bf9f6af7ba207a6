"""Stage 4, solve: verify, merge, and solve the SEIGH core for the top-k eigenpairs.

Before anything else every part's flags and checksums are verified, in the same single
read of each part that merges it into the split's monolithic arrays (allocated once by
the layout); a missing or corrupt measurement stops the solve and names the indices
(``hessov resume`` re-measures them), leaving the arrays untouched. Then single-pass
SEIGH (Fernandez et al.; Tropp et al. 2017): ``Q = qr(Y)``, the core
``(Psi Q)^+ Z ((Omega^T Q)^+)^T`` from two least-squares solves with block transforms,
symmetrised, ``eigh``, sorted by ``|lambda|``, ``W = Q U`` (or, two-pass, Rayleigh-Ritz on
the first round's basis and the second round's ``H Q``). Finally the a-posteriori error is
estimated with ``NUM_A_POSTERIORI`` Gaussian probes (their own seed range), with its
probability and scree bounds.

Writes ``eigen/step_T_{split}.h5`` (eigenvalues ``(k,)``, eigenvectors ``(D, k)``, bounds,
provenance) and the ``solve`` summary for that step and split.
"""

from __future__ import annotations

import json
import os
import time

import h5py
import numpy as np
import torch

from pipeline import summary
from pipeline.config import RunConfig
from pipeline.errors import MissingInputError
from pipeline.hessian import hessian_at_step
from pipeline.rundir import RunDir
from pipeline.runlog import EventLog, get_logger
from pipeline.sketchspec import SketchSpec
from pipeline.training import set_cpu_threads
from skerch_ext.errors import (
    apost_error,
    apost_failure_probabilities,
    gaussian_probes,
    scree_bounds,
)
from skerch_ext.solve import (
    eigenpairs_from_core,
    orthonormal_basis,
    seigh_two_pass,
    single_pass_core,
)
from skerch_ext.storage import IncompleteMeasurements


def write_eigen_file(path, eigenvalues, eigenvectors, attrs: dict, datasets: dict) -> None:
    """Write the eigenpairs file atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with h5py.File(tmp, "w") as handle:
        handle.create_dataset("eigenvalues", data=eigenvalues)
        handle.create_dataset("eigenvectors", data=eigenvectors, chunks=(eigenvectors.shape[0], 1))
        for name, value in datasets.items():
            handle.create_dataset(name, data=value)
        for key, value in attrs.items():
            handle.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
    os.replace(tmp, path)


def merged_round(run: RunDir, spec: SketchSpec, step: int, split: str, round_name: str):
    """Verify one round's measurements and merge them into the split's monolithic arrays:
    ``outer`` (D, k) and ``inner`` (s, s) or None. Raises :class:`MissingInputError` naming
    every missing or corrupt measurement."""
    arrays = spec.monolithic(run, split, round_name)
    with arrays.locked():
        try:
            return arrays.merge(
                spec.store(run, step, split, round_name), f"step_{step}_{split}_{round_name}"
            )
        except IncompleteMeasurements as err:
            raise MissingInputError(
                f"step {step} {split} ({round_name} round): {err}. Re-measure them with "
                f"`hessov resume {run.root}` (or `hessov measure ... indices=a:b`)."
            ) from None


def measurement_seconds(run: RunDir, spec: SketchSpec, step: int, split: str) -> dict:
    """Seconds of every round's blocks as the measurement workers recorded them:
    ``"measurements"`` whole blocks (test matrices or basis reads included) and
    ``"products"`` the batched Hessian-vector products alone."""
    parts = [
        attrs
        for round_name in spec.rounds
        for attrs in spec.store(run, step, split, round_name).part_attrs()
    ]
    return {
        key: round(sum(float(attrs.get(field, 0)) for attrs in parts), 3)
        for key, field in (("measurements", "seconds"), ("products", "products_seconds"))
    }


def write_two_pass_basis(run: RunDir, spec: SketchSpec, step: int, split: str) -> dict:
    """First half of two-pass recovery: ``Q = qr(H Omega[:, :k])``, written for the
    second round of measurements."""
    t0 = time.perf_counter()
    outer, _ = merged_round(run, spec, step, split, "first")
    merge_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    basis = orthonormal_basis(torch.from_numpy(outer))
    qr_seconds = time.perf_counter() - t0
    path = run.two_pass_basis(step, split)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with h5py.File(tmp, "w") as handle:
        handle.create_dataset("basis", data=basis.numpy(), chunks=(basis.shape[0], 1))
        handle.attrs["merge_seconds"] = merge_seconds
        handle.attrs["qr_seconds"] = qr_seconds
    os.replace(tmp, path)
    get_logger().info(
        "solve step %d %s: basis Q (%d x %d) of the first round written", step, split, *basis.shape
    )
    return {"state": "awaiting_second_round", "basis": str(path)}


def solve(run: RunDir, cfg: RunConfig, spec: SketchSpec, step: int, split: str) -> dict:
    """Solve one step and split; returns the summary fields.

    With two-pass recovery the first call (after the first round) writes the basis ``Q``
    and returns ``{"state": "awaiting_second_round"}``; the call after the second round
    solves.
    """
    log = get_logger()
    set_cpu_threads(cfg.threads)  # before the basis QR, which runs outside hessian_at_step
    if spec.recovery == "two_pass" and not run.two_pass_basis(step, split).is_file():
        return write_two_pass_basis(run, spec, step, split)
    seconds = {"layout": spec.layout_seconds, **measurement_seconds(run, spec, step, split)}
    t0 = time.perf_counter()
    hessian = hessian_at_step(run, cfg, step, split, check_deterministic=False)
    seconds["operator_setup"] = time.perf_counter() - t0
    dtype, device = hessian.dtype, hessian.device
    if spec.recovery == "two_pass":
        t0 = time.perf_counter()
        h_basis, _ = merged_round(run, spec, step, split, "second")
        with h5py.File(run.two_pass_basis(step, split), "r") as handle:
            basis = torch.from_numpy(handle["basis"][:]).to(device, dtype)
            seconds["merge"] = float(handle.attrs["merge_seconds"]) + time.perf_counter() - t0
            seconds["qr"] = float(handle.attrs["qr_seconds"])
        t0 = time.perf_counter()
        eigenvalues, eigenvectors = seigh_two_pass(
            basis, torch.from_numpy(h_basis).to(device, dtype), spec.layout.num_outer
        )
        seconds["core_solve"] = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        outer, inner = merged_round(run, spec, step, split, "first")
        seconds["merge"] = time.perf_counter() - t0
        sketch = spec.matrices(dtype, device)
        t0 = time.perf_counter()
        basis = orthonormal_basis(torch.from_numpy(outer).to(device, dtype))
        seconds["qr"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        core = single_pass_core(
            basis, torch.from_numpy(inner).to(device, dtype), sketch.omega_t_apply, sketch.psi_apply
        )
        eigenvalues, eigenvectors = eigenpairs_from_core(basis, core)
        seconds["core_solve"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    probes = gaussian_probes(spec.layout.dim, spec.seeds()["apost"], dtype=dtype, device=device)
    estimate = apost_error(
        hessian.matmat, eigenvalues, eigenvectors, probes, spec.layout.block_size
    )
    scree_lo, scree_hi = scree_bounds(eigenvalues, estimate.error, estimate.frobenius)
    p_low, p_high = apost_failure_probabilities(spec.num_apost, 0.5)
    seconds["a_posteriori"] = time.perf_counter() - t0
    seconds = {key: round(value, 4) for key, value in seconds.items()}

    fields = {
        "eigenvalues": eigenvalues.tolist(),
        "k": spec.layout.num_outer,
        "s": spec.layout.num_inner,
        "recovery": spec.recovery,
        "apost_rel_err": estimate.relative_error,
        "apost_error": estimate.error,
        "frobenius_estimate": estimate.frobenius,
        "apost_probability_below_half": p_low,
        "apost_probability_above_1_5": p_high,
        "num_a_posteriori": spec.num_apost,
        "hvps": spec.total_hvps,
        "seconds_by_phase": seconds,
    }
    provenance = {
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
        "seconds_by_phase": seconds,
        "apost_rel_err": estimate.relative_error,
        "apost_error": estimate.error,
        "frobenius_estimate": estimate.frobenius,
    }
    write_eigen_file(
        run.eigen(step, split),
        eigenvalues.cpu().numpy(),
        eigenvectors.cpu().numpy(),
        provenance,
        {"scree_lower": scree_lo.cpu().numpy(), "scree_upper": scree_hi.cpu().numpy()},
    )
    summary.record(run, "solve", fields, step, split)
    EventLog(run.log, "solve").write(
        "solved",
        step=step,
        split=split,
        top_eigenvalues=fields["eigenvalues"][:10],
        apost_rel_err=estimate.relative_error,
        seconds_by_phase=seconds,
    )
    log.info(
        "solve step %d %s: top eigenvalues %s, a-posteriori relative error %.3g",
        step,
        split,
        np.round(eigenvalues[:5].cpu().numpy(), 4).tolist(),
        estimate.relative_error,
    )
    return fields
