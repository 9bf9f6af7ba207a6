"""Operator checks before sketching (the paper's script 20a): is this Hessian safe to sketch?

Builds the Hessian of a recorded step and split exactly as the measurement stage will,
and reports a determinism probe (two independent passes over the data must agree: random
augmentation or train-mode dropout would fail it), a symmetry probe ``v^T H w`` vs
``w^T H v``, a NaN/inf probe, and the time of one Hessian-vector product. Side-effect
free apart from its log line and summary entry.
"""

from __future__ import annotations

from hessov import batching, summary
from hessov.config import RunConfig
from hessov.errors import ConfigError
from hessov.hessian import hessian_at_step
from hessov.rundir import RunDir
from hessov.runlog import get_logger, log_event
from hessov.skerch_ext.operator import operator_checks

#: Relative asymmetry above which the operator is reported as not symmetric.
SYMMETRY_TOLERANCE = {"float32": 1e-3, "float64": 1e-8}


def check_operator(run: RunDir, cfg: RunConfig, step: int, split: str) -> dict:
    """Run the checks; raises :class:`ConfigError` if the operator is unusable (not
    deterministic, with the likely cause; or not finite).
    """
    hessian = hessian_at_step(run, cfg, step, split, check_deterministic=True)
    report = operator_checks(
        hessian.matmat,
        hessian.dim,
        dtype=hessian.dtype,
        device=hessian.device,
        seed=cfg.RANDOM_SEED,
    )
    fields = report.as_dict()
    fields["symmetric"] = report.symmetry_rel_diff <= SYMMETRY_TOLERANCE[cfg.dtype]
    fields["num_data"] = batching.num_examples(hessian.inputs)
    fields["device"] = str(hessian.device)
    summary.record(run, "check_operator", fields, step, split)
    log_event(run.log, "check-operator", "operator_checks", step=step, split=split, **fields)
    log = get_logger()
    log.info(
        "operator at step %d (%s): D=%d, deterministic, symmetric=%s (rel. diff %.2e), "
        "finite=%s, one HVP %.4f s",
        step,
        split,
        report.dim,
        fields["symmetric"],
        report.symmetry_rel_diff,
        report.finite,
        report.seconds_per_hvp,
    )
    if not report.finite:
        raise ConfigError(f"step: the Hessian at step {step} ({split}) produces NaN or inf")
    return fields
