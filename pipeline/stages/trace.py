"""The trace of the Hessian of one step and split, reusing the two-pass sketch (Hutch++).

``tr(H) = tr(V^T H V) + tr(P H P)``: the first term exact from the sketch's basis ``V`` and
its measured products ``H V`` (no new HVP), the second by Hutchinson's Rademacher probes on
the deflated remainder, ``trace_probes`` of them in array tasks of ``probes_per_task``
(:mod:`hessov.skerch_ext.hutchinson` for the mathematics, :mod:`hessov.probes` for the
tasks). The 95% confidence interval comes from the probes' spread. Writes
``RUN/estimates/step_T_SPLIT/trace.h5`` and the ``trace`` summary of the step and split.
"""

from __future__ import annotations

import time

import h5py
import torch

from hessov import summary
from hessov.config import RunConfig
from hessov.deflation import sketch_space
from hessov.fileio import atomic_write
from hessov.hessian import hessian_at_step
from hessov.probes import chunks, on_cpu, probe_plan, probe_seeds, read_tasks, write_task
from hessov.rundir import RunDir
from hessov.runlog import get_logger, log_event
from hessov.skerch_ext.hutchinson import deflated_trace_samples, mean_and_ci95, rademacher
from hessov.skerch_ext.rowblocks import row_pass
from hessov.sketchspec import SketchSpec

NAME = "trace"


def task(run: RunDir, cfg: RunConfig, spec: SketchSpec, where: tuple[int, str], number: int):
    """Array task ``number``: ``g^T P H P g`` of each of its probes."""
    t0 = time.perf_counter()
    plan = probe_plan(cfg, NAME)
    hessian = hessian_at_step(run, cfg, *where, check_deterministic=False)
    indices = plan.indices(number)
    samples = []
    with sketch_space(run, spec, *where) as space:
        for chunk in row_pass(chunks(indices, spec.layout.block_size), f"trace task {number}"):
            probes = rademacher(space.dim, probe_seeds(spec, plan, where, chunk), hessian.dtype)
            samples.append(deflated_trace_samples(on_cpu(hessian), space.project, probes))
    write_task(run, plan, where, number, {"samples": torch.cat(samples)}, time.perf_counter() - t0)


def finish(run: RunDir, cfg: RunConfig, spec: SketchSpec, where: tuple[int, str]) -> dict:
    """Add the sketched trace to the probes' mean; write the estimate and its summary."""
    plan = probe_plan(cfg, NAME)
    tasks = read_tasks(run, plan, where)
    samples = torch.cat([torch.from_numpy(t["samples"]) for t in tasks])
    with sketch_space(run, spec, *where) as space:
        sketched, width = float(space.core().trace()), space.width
    remainder, ci95 = mean_and_ci95(len(samples), samples.sum(), (samples**2).sum())
    fields = {
        "value": sketched + float(remainder),
        "ci95": float(ci95),
        "hvps": plan.total,
        "probes": plan.total,
        "sketched_trace": sketched,
        "remainder": float(remainder),
        "basis_width": width,
        "file": str(run.estimate(*where, NAME)),
        "seconds": round(sum(t["seconds"] for t in tasks), 3),
    }
    with atomic_write(run.estimate(*where, NAME)) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("samples", data=samples.numpy())
        handle.attrs.update({key: value for key, value in fields.items() if key != "file"})
    summary.record(run, NAME, fields, *where)
    log_event(run.log, NAME, NAME, step=where[0], split=where[1], **fields)
    get_logger().info(
        "trace step %d %s: %.6g +- %.2g (95%%; sketched %.6g + remainder %.4g from %d probes)",
        *where,
        fields["value"],
        fields["ci95"],
        sketched,
        fields["remainder"],
        plan.total,
    )
    return fields
