"""The eigenvalue density of the Hessian of one step and split, by deflated SLQ.

Each of ``density_runs`` array tasks runs ``density_steps`` Lanczos steps from its own
Rademacher start vector on ``P H P``, ``P`` the complement of the solve's eigenvectors, so
that the runs resolve the bulk; the solve's eigenvalues come back as outliers of weight
``1/D`` each (:mod:`hessov.skerch_ext.slq`, :mod:`hessov.probes`). Writes
``RUN/estimates/step_T_SPLIT/density.h5``: the quadrature's ``nodes`` and ``weights``
(summing to 1; re-broaden them at any width), the Gaussian-broadened ``density`` on ``grid``
and the ``outliers``; a figure on log scale with the outliers marked; the ``density``
summary.
"""

from __future__ import annotations

import time

import h5py
import torch

from hessov import summary
from hessov.analysis.estimate_figures import plot_density
from hessov.analysis.figures import save_figure
from hessov.config import RunConfig
from hessov.deflation import sketch_eigenpairs
from hessov.fileio import atomic_write
from hessov.hessian import hessian_at_step
from hessov.probes import on_cpu, probe_plan, probe_seeds, read_tasks, write_task
from hessov.rundir import RunDir
from hessov.runlog import get_logger, log_event
from hessov.skerch_ext.hutchinson import rademacher
from hessov.skerch_ext.slq import broadened, deflated_measure, lanczos_quadrature
from hessov.sketchspec import SketchSpec

NAME = "density"
#: The broadening: this fraction of the nodes' range (Ghorbani et al. 2019 use sigma^2 =
#: 1e-5 on a spectrum scaled to [-1, 1], about 0.16%).
SIGMA_FRACTION = 1e-3
GRID_POINTS = 4001


def task(run: RunDir, cfg: RunConfig, spec: SketchSpec, where: tuple[int, str], number: int):
    """Array task ``number``: one Lanczos run's nodes and weights."""
    t0 = time.perf_counter()
    plan = probe_plan(cfg, NAME)
    hessian = hessian_at_step(run, cfg, *where, check_deterministic=False)
    _, deflation = sketch_eigenpairs(run, spec, *where)
    (index,) = plan.indices(number)
    start = rademacher(deflation.dim, probe_seeds(spec, plan, where, [index]), hessian.dtype)
    nodes, weights = lanczos_quadrature(on_cpu(hessian), deflation.project, start[:, 0], plan.steps)
    write_task(
        run, plan, where, number, {"nodes": nodes, "weights": weights}, time.perf_counter() - t0
    )


def finish(run: RunDir, cfg: RunConfig, spec: SketchSpec, where: tuple[int, str]) -> dict:
    """Put the runs and the outliers together; write the density, its figure and summary."""
    plan = probe_plan(cfg, NAME)
    tasks = read_tasks(run, plan, where)
    outliers, deflation = sketch_eigenpairs(run, spec, *where)
    runs = [(torch.from_numpy(t["nodes"]), torch.from_numpy(t["weights"])) for t in tasks]
    nodes, weights = deflated_measure(outliers, runs, deflation.dim)
    span = float(nodes.max() - nodes.min()) or 1.0
    sigma = SIGMA_FRACTION * span
    grid = torch.linspace(
        float(nodes.min()) - 5 * sigma,
        float(nodes.max()) + 5 * sigma,
        GRID_POINTS,
        dtype=torch.float64,
    )
    density = broadened(nodes, weights, grid, sigma)
    path, figure = run.estimate(*where, NAME), run.estimate_figure(*where, NAME)
    arrays = {
        "nodes": nodes,
        "weights": weights,
        "grid": grid,
        "density": density,
        "outliers": outliers,
    }
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as handle:
        for key, value in arrays.items():
            handle.create_dataset(key, data=value.numpy())
        handle.attrs.update({"sigma": sigma, "runs": plan.total, "lanczos_steps": plan.steps})
    save_figure(plot_density(grid.numpy(), density.numpy(), outliers.numpy(), where, sigma), figure)
    fields = {
        "file": str(path),
        "figure": str(figure),
        "runs": plan.total,
        "lanczos_steps": plan.steps,
        "hvps": sum(len(t["nodes"]) for t in tasks),
        "outliers": len(outliers),
        "sigma": sigma,
        "bulk_range": [float(min(r[0].min() for r in runs)), float(max(r[0].max() for r in runs))],
        "seconds": round(sum(t["seconds"] for t in tasks), 3),
    }
    summary.record(run, NAME, fields, *where)
    log_event(run.log, NAME, NAME, step=where[0], split=where[1], runs=plan.total)
    get_logger().info(
        "density step %d %s: %d Lanczos runs of %d steps, bulk in [%.3g, %.3g], %d outliers",
        *where,
        plan.total,
        plan.steps,
        *fields["bulk_range"],
        len(outliers),
    )
    return fields
