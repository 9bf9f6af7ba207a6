"""Stage 4b, solve: verify, merge, and solve the SEIGH core for the top-k eigenpairs.

Before anything else every part's flags and checksums are verified, in the same single
read of each part that merges it into the split's monolithic arrays (allocated once by
the layout); a missing or corrupt measurement stops the solve and names the indices
(``hessov resume`` re-measures them), leaving the arrays untouched. Then single-pass
SEIGH (Fernandez et al.; Tropp et al. 2017): ``Q = qr(Y)``, the core
``(Psi Q)^+ Z ((Omega^T Q)^+)^T`` from two least-squares solves with block transforms,
symmetrised, ``eigh``, sorted by ``|lambda|``, ``W = Q U`` (or, two-pass, Rayleigh-Ritz on
the basis stage's ``Q`` and the second round's ``H Q``). Finally the a-posteriori error is
estimated with ``NUM_A_POSTERIORI`` Gaussian probes (their own seed range), with its
probability and scree bounds.

Writes ``eigen/step_T_{split}.h5`` (eigenvalues ``(k,)``, eigenvectors ``(D, k)``, bounds,
provenance) and the ``solve`` summary for that step and split.
"""

from __future__ import annotations

import json
import time

import h5py
import numpy as np
import torch

from hessov import summary
from hessov.config import RunConfig
from hessov.errors import MissingInputError
from hessov.fileio import atomic_write
from hessov.hessian import hessian_at_step
from hessov.merge import merged_round
from hessov.rundir import RunDir
from hessov.runlog import get_logger, log_event
from hessov.skerch_ext.aposteriori import (
    apost_error,
    apost_failure_probabilities,
    gaussian_probes,
    scree_bounds,
)
from hessov.skerch_ext.solve import (
    eigenpairs_from_core,
    orthonormal_basis,
    seigh_two_pass,
    single_pass_core,
)
from hessov.sketchspec import SketchSpec
from hessov.training import set_cpu_threads


def write_eigen_file(path, eigenvalues, eigenvectors, attrs: dict, datasets: dict) -> None:
    """Write the eigenpairs file atomically: eigenvalues ``(k,)``, eigenvectors ``(D, k)``
    (one chunk per column), the extra ``datasets`` and ``attrs`` (non-scalars as JSON).
    """
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("eigenvalues", data=eigenvalues)
        handle.create_dataset("eigenvectors", data=eigenvectors, chunks=(eigenvectors.shape[0], 1))
        for name, value in datasets.items():
            handle.create_dataset(name, data=value)
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


def two_pass_eigenpairs(run: RunDir, spec: SketchSpec, step: int, split: str, like, seconds):
    """Rayleigh-Ritz on the basis ``Q`` ``(D, k)`` of the basis stage and the second round's
    ``H Q`` ``(D, k)``: eigenvalues ``(k,)`` and eigenvectors ``(D, k)``, typed ``like``.
    """
    path = run.two_pass_basis(step, split)
    if not path.is_file():
        raise MissingInputError(
            f"{path} is missing: write the first round's basis with "
            f"`hessov basis {run.root} step={step} split={split}`"
        )
    t0 = time.perf_counter()
    h_basis, _ = merged_round(run, spec, step, split, "second")
    with h5py.File(path, "r") as handle:
        q = torch.from_numpy(handle["basis"][:]).to(like)
        seconds["merge"] = float(handle.attrs["merge_seconds"]) + time.perf_counter() - t0
        seconds["qr"] = float(handle.attrs["qr_seconds"])
    t0 = time.perf_counter()
    pairs = seigh_two_pass(q, torch.from_numpy(h_basis).to(like), spec.layout.num_outer)
    seconds["core_solve"] = time.perf_counter() - t0
    return pairs


def single_pass_eigenpairs(run: RunDir, spec: SketchSpec, step: int, split: str, like, seconds):
    """Single-pass SEIGH from the first round's outer ``(D, k)`` and inner ``(s, s)`` sketches:
    eigenvalues ``(k,)`` and eigenvectors ``(D, k)``, typed ``like``.
    """
    t0 = time.perf_counter()
    outer, inner = merged_round(run, spec, step, split, "first")
    seconds["merge"] = time.perf_counter() - t0
    sketch = spec.matrices(like.dtype, like.device)
    t0 = time.perf_counter()
    q = orthonormal_basis(torch.from_numpy(outer).to(like))
    seconds["qr"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    core = single_pass_core(
        q, torch.from_numpy(inner).to(like), sketch.omega_t_apply, sketch.psi_apply
    )
    pairs = eigenpairs_from_core(q, core)
    seconds["core_solve"] = time.perf_counter() - t0
    return pairs


def a_posteriori(hessian, spec: SketchSpec, eigenvalues, eigenvectors, seconds) -> dict:
    """The a-posteriori error of the eigenpairs from ``NUM_A_POSTERIORI`` Gaussian probes,
    its failure probabilities and the scree bounds ``(k,)``.
    """
    t0 = time.perf_counter()
    probes = gaussian_probes(
        spec.layout.dim, spec.seeds()["apost"], dtype=hessian.dtype, device=hessian.device
    )
    estimate = apost_error(
        hessian.matmat, eigenvalues, eigenvectors, probes, spec.layout.block_size
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
    """Solve one step and split (two-pass: after the basis stage and the second round);
    writes the eigen file and the summary, and returns the summary fields.
    """
    set_cpu_threads(cfg.threads)
    seconds = {"layout": spec.layout_seconds, **measurement_seconds(run, spec, step, split)}
    t0 = time.perf_counter()
    hessian = hessian_at_step(run, cfg, step, split, check_deterministic=False)
    seconds["operator_setup"] = time.perf_counter() - t0
    like = torch.empty(0, dtype=hessian.dtype, device=hessian.device)
    recover = two_pass_eigenpairs if spec.recovery == "two_pass" else single_pass_eigenpairs
    eigenvalues, eigenvectors = recover(run, spec, step, split, like, seconds)
    check = a_posteriori(hessian, spec, eigenvalues, eigenvectors, seconds)
    seconds = {key: round(value, 4) for key, value in seconds.items()}
    fields = summary_fields(spec, eigenvalues, check, seconds)
    scree_lo, scree_hi = check["scree"]
    write_eigen_file(
        run.eigen(step, split),
        eigenvalues.cpu().numpy(),
        eigenvectors.cpu().numpy(),
        provenance(spec, cfg, step, split, fields),
        {"scree_lower": scree_lo.cpu().numpy(), "scree_upper": scree_hi.cpu().numpy()},
    )
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
