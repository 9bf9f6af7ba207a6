"""Stage 4, solve: verify, merge, and solve the SEIGH core for the top-k eigenpairs.

Before anything else every part's flags and checksums are verified; a missing or
corrupt measurement stops the solve and names the indices (``hessov resume`` re-measures
them). The parts are merged into the split's monolithic arrays (allocated once by the
layout), then single-pass SEIGH (Fernandez et al.; Tropp et al. 2017): ``Q = qr(Y)``,
the core ``(Psi Q)^+ Z ((Omega^T Q)^+)^T`` from two least-squares solves with block
transforms, symmetrised, ``eigh``, sorted by ``|lambda|``, ``W = Q U``. Finally the
a-posteriori error is estimated with ``NUM_A_POSTERIORI`` Gaussian probes (their own
seed range), with its probability and scree bounds.

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
from skerch_ext.errors import (
    apost_error,
    apost_failure_probabilities,
    gaussian_probes,
    scree_bounds,
)
from skerch_ext.solve import eigenpairs_from_core, orthonormal_basis, single_pass_core
from skerch_ext.storage import MonolithicArrays, describe_indices


def verify_measurements(run: RunDir, spec: SketchSpec, step: int, split: str) -> None:
    """Raise :class:`MissingInputError` naming every missing or corrupt measurement."""
    problems = spec.store(run, step, split).verify()
    if problems["missing"] or problems["corrupt"]:
        raise MissingInputError(
            f"step {step} {split}: measurements missing: {describe_indices(problems['missing'])}; "
            f"corrupt: {describe_indices(problems['corrupt'])}. Re-measure them with "
            f"`hessov resume {run.root}` (or `hessov measure ... indices=a:b`)."
        )


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


def solve(run: RunDir, cfg: RunConfig, spec: SketchSpec, step: int, split: str) -> dict:
    """Solve one step and split; returns the summary fields."""
    log = get_logger()
    seconds = {"layout": spec.layout_seconds}
    verify_measurements(run, spec, step, split)
    store = spec.store(run, step, split)
    seconds["measurements"] = round(sum(float(a.get("seconds", 0)) for a in store.part_attrs()), 3)

    t0 = time.perf_counter()
    arrays = MonolithicArrays(run.monolithic(split), spec.layout)
    label = f"step_{step}_{split}"
    with arrays.locked():
        arrays.merge(store, label)
        outer, inner = arrays.read(label)
    seconds["merge"] = time.perf_counter() - t0

    hessian = hessian_at_step(run, cfg, step, split, check_deterministic=False)
    dtype, device = hessian.dtype, hessian.device
    sketch = spec.matrices(dtype, device)
    outer_t = torch.from_numpy(outer).to(device, dtype)
    inner_t = torch.from_numpy(inner).to(device, dtype)
    t0 = time.perf_counter()
    basis = orthonormal_basis(outer_t)
    seconds["qr"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    core = single_pass_core(basis, inner_t, sketch.omega_t_apply, sketch.psi_apply)
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
        "hvps": spec.layout.num_inner + spec.num_apost,
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
        "seconds_by_phase": seconds,
        "apost_rel_err": estimate.relative_error,
    }
    write_eigen_file(
        run.eigen(step, split),
        eigenvalues.cpu().numpy(),
        eigenvectors.cpu().numpy(),
        provenance,
        {
            "scree_lower": scree_lo.cpu().numpy(),
            "scree_upper": scree_hi.cpu().numpy(),
            "measurement_seconds": np.array([seconds["measurements"]]),
        },
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
