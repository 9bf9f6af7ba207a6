"""The spectral shift of one step and split for ``which=smallest`` (:mod:`hessov.spectralshift`).

Lanczos (ARPACK, :func:`hessov.skerch_ext.lanczos.top_eigenpairs`) finds the Hessian's
largest-magnitude eigenpair ``(theta, u)`` to a relative residual of ``SHIFT_TOLERANCE``; one
more product gives the residual ``r = H u - theta u``, and ``sigma = |theta| + ||r||``.
Writes ``measurements/step_T_SPLIT/shift.json`` (``shift``, ``theta``, ``residual``,
``hvps``) and the ``shift`` summary of the step and split, once: a shift on disk is never
replaced, since every round of the sketch must multiply with the same ``sigma I - H``.
"""

from __future__ import annotations

import json
import time

from hessov import summary
from hessov.config import RunConfig
from hessov.fileio import atomic_write_json
from hessov.hessian import hessian_at_step
from hessov.rundir import RunDir
from hessov.runlog import get_logger, log_event
from hessov.skerch_ext.lanczos import top_eigenpairs
from hessov.sketchspec import SketchSpec

#: ARPACK's relative residual for the top eigenpair: the residual is added to the shift, so
#: a loose tolerance only makes the shift a little larger.
SHIFT_TOLERANCE = 1e-3


def shift(run: RunDir, cfg: RunConfig, spec: SketchSpec, step: int, split: str) -> dict:
    """Compute and record the shift of ``step`` and ``split``; returns its fields. A shift on
    disk is kept: the rounds measured with it must all use the same one.
    """
    if run.shift(step, split).is_file():
        get_logger().info("shift step %d %s: kept, %s", step, split, run.shift(step, split))
        return json.loads(run.shift(step, split).read_text())
    started = time.perf_counter()
    hessian = hessian_at_step(run, cfg, step, split)
    top = top_eigenpairs(
        hessian.matmat,
        hessian.dim,
        1,
        dtype=hessian.dtype,
        device=hessian.device,
        tol=SHIFT_TOLERANCE,
        seed=spec.layout.seed,
    )
    vector = top.eigenvectors[:, :1]
    theta = float(top.eigenvalues[0])
    residual = float((hessian.matmat(vector) - theta * vector).norm() / vector.norm())
    fields = {
        "shift": abs(theta) + residual,
        "theta": theta,
        "residual": residual,
        "hvps": top.hvps + 1,
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_json(run.shift(step, split), fields)
    summary.record(run, "shift", fields, step, split)
    log_event(run.log, "shift", "shift", step=step, split=split, **fields)
    get_logger().info(
        "shift step %d %s: sigma = |%.6g| + %.2g (%d HVPs)",
        step,
        split,
        theta,
        residual,
        fields["hvps"],
    )
    return fields
