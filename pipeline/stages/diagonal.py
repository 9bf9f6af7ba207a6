"""The Hessian diagonal of one step and split, reusing the two-pass sketch.

``diag(H) = 2 rowsum(V * H V) - rowsum(V * V C) + diag(P H P)``: exact on what the sketch's
basis ``V`` carries, from its measured products (no new HVP), and ``diag(P H P) =
E[(P g) * (H P g)]`` by Rademacher probes on the deflated remainder, ``diagonal_probes`` of
them in array tasks of ``probes_per_task`` (:mod:`hessov.skerch_ext.hutchinson`,
:mod:`hessov.probes`). Each entry gets a 95% confidence half-width from the probes' spread.
Writes ``RUN/estimates/step_T_SPLIT/diagonal.h5`` (``diagonal``, ``ci95`` and ``sketched``,
``(D,)`` each), a figure of the diagonal per layer (the parameter tensors of
``params.h5``'s ``parameter_layout``) and the ``diagonal`` summary.
"""

from __future__ import annotations

import json
import time

import h5py
import torch

from hessov import summary
from hessov.analysis.estimate_figures import plot_layer_diagonal
from hessov.analysis.figures import save_figure
from hessov.config import RunConfig
from hessov.deflation import sketch_space
from hessov.fileio import atomic_write
from hessov.hessian import hessian_at_step
from hessov.paramblock import block_layers, recorded_layout
from hessov.probes import chunks, on_cpu, probe_plan, probe_seeds, read_tasks, write_task
from hessov.rundir import RunDir
from hessov.runlog import get_logger, log_event
from hessov.skerch_ext.hutchinson import deflated_diagonal_samples, mean_and_ci95, rademacher
from hessov.skerch_ext.rowblocks import row_pass
from hessov.sketchspec import SketchSpec

NAME = "diagonal"


def task(run: RunDir, cfg: RunConfig, spec: SketchSpec, where: tuple[int, str], number: int):
    """Array task ``number``: the sum and sum of squares ``(D,)`` of its probes' samples."""
    t0 = time.perf_counter()
    plan = probe_plan(cfg, NAME)
    hessian = hessian_at_step(run, cfg, *where, check_deterministic=False)
    total = squares = torch.zeros(spec.layout.dim, dtype=torch.float64)
    with sketch_space(run, spec, *where) as space:
        for chunk in row_pass(chunks(plan.indices(number), spec.layout.block_size), NAME):
            probes = rademacher(space.dim, probe_seeds(spec, plan, where, chunk), hessian.dtype)
            samples = deflated_diagonal_samples(on_cpu(hessian), space.project, probes)
            total, squares = total + samples.sum(dim=1), squares + (samples**2).sum(dim=1)
    arrays = {"sum": total, "sum_squares": squares}
    write_task(run, plan, where, number, arrays, time.perf_counter() - t0)


def layer_rows(run: RunDir, spec: SketchSpec) -> dict[str, range]:
    """The rows of each parameter tensor of the sketched block in its ``D``, from
    ``params.h5``'s layout (:mod:`hessov.paramblock`).
    """
    return block_layers(recorded_layout(run), spec.params)


def layer_fields(diagonal: torch.Tensor, ci95: torch.Tensor, layers: dict[str, range]) -> dict:
    """Per layer: its size, the mean of its diagonal entries with its 95% half-width
    (``||ci95|| / size``: the entries' errors taken as independent) and the relative 95%
    half-width of the whole layer, ``||ci95|| / ||diagonal||``.
    """
    fields = {}
    for name, rows in layers.items():
        part, spread = diagonal[rows.start : rows.stop], ci95[rows.start : rows.stop]
        fields[name] = {
            "size": len(rows),
            "mean": float(part.mean()),
            "mean_ci95": float(spread.norm() / len(rows)),
            "relative_ci95": float(spread.norm() / part.norm().clamp_min(1e-300)),
        }
    return fields


def finish(run: RunDir, cfg: RunConfig, spec: SketchSpec, where: tuple[int, str]) -> dict:
    """Add the sketched part to the probes' mean; write the estimate, figure and summary."""
    plan = probe_plan(cfg, NAME)
    tasks = read_tasks(run, plan, where)
    total = sum(torch.from_numpy(t["sum"]) for t in tasks)
    squares = sum(torch.from_numpy(t["sum_squares"]) for t in tasks)
    remainder, ci95 = mean_and_ci95(plan.total, total, squares)
    with sketch_space(run, spec, *where) as space:
        sketched = space.sketched_diagonal(space.core())
    diagonal = sketched + remainder
    layers = layer_fields(diagonal, ci95, layer_rows(run, spec))
    path, figure = run.estimate(*where, NAME), run.estimate_figure(*where, NAME)
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as handle:
        for key, value in {"diagonal": diagonal, "ci95": ci95, "sketched": sketched}.items():
            handle.create_dataset(key, data=value.numpy())
        handle.attrs.update({"probes": plan.total, "layers": json.dumps(layers)})
    save_figure(plot_layer_diagonal(layers, *where), figure)
    fields = {
        "file": str(path),
        "figure": str(figure),
        "probes": plan.total,
        "hvps": plan.total,
        "relative_ci95": float(ci95.norm() / diagonal.norm()),
        "trace": float(diagonal.sum()),
        "layers": layers,
        "seconds": round(sum(t["seconds"] for t in tasks), 3),
    }
    summary.record(run, NAME, fields, *where)
    log_event(run.log, NAME, NAME, step=where[0], split=where[1], probes=plan.total)
    get_logger().info(
        "diagonal step %d %s: %d layers, relative 95%% half-width %.2g (%d probes)",
        *where,
        len(layers),
        fields["relative_ci95"],
        plan.total,
    )
    return fields
