"""The estimates that reuse a sketch as array tasks of random probes: plans, seeds, files.

The trace, diagonal and density stages (:mod:`hessov.stages.trace`, ...) each split their
random probes into independent array tasks, as the measure stage splits the sketch's
columns: a task multiplies ``H`` onto its probes and writes their samples to its own file,
``RUN/estimates/step_T_SPLIT/NAME/task_*.h5`` (:meth:`hessov.rundir.RunDir.estimate_task`),
atomically; a finish job reads every task's file and writes the estimate. A task whose file
exists is not run again, so a resumed run redoes only the missing tasks.

A probe's seed depends on the estimate, the layout's seed, the step, the split and the
probe's index only (:func:`probe_seeds`): its bits are the same whichever task draws it.
The settings (``trace_probes``, ``diagonal_probes``, ``probes_per_task``, ``density_runs``,
``density_steps``) are recorded in every task file; a finish refuses files written with
other settings rather than mixing them.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass

import h5py
import numpy as np

from hessov.config import RunConfig
from hessov.errors import ConfigError, MissingInputError
from hessov.fileio import atomic_write
from hessov.rundir import RunDir
from hessov.skerch_ext.operator import MatMat
from hessov.sketchspec import SketchSpec

#: Keys an estimate's job may override besides the compute keys: its probe counts.
ESTIMATE_KEYS = (
    "trace_probes",
    "diagonal_probes",
    "probes_per_task",
    "density_runs",
    "density_steps",
)


@dataclass(frozen=True)
class ProbePlan:
    """How an estimate's probes are split into array tasks.

    Attributes:
        name: ``trace``, ``diagonal`` or ``density``.
        total: probes (trace, diagonal) or Lanczos runs (density).
        per_task: probes or runs of one array task.
        steps: density: Lanczos steps (HVPs) of a run; 0 for the others (one HVP a probe).
    """

    name: str
    total: int
    per_task: int
    steps: int = 0

    @property
    def num_tasks(self) -> int:
        """The array tasks, ``ceil(total / per_task)``."""
        return math.ceil(self.total / self.per_task)

    def indices(self, task: int) -> range:
        """The probes (or runs) of array task ``task``."""
        if not 0 <= task < self.num_tasks:
            raise ConfigError(f"task: must be in 0..{self.num_tasks - 1}, got {task}")
        return range(task * self.per_task, min((task + 1) * self.per_task, self.total))

    def hvps(self, tasks) -> int:
        """Hessian-vector products of ``tasks`` (at most: a Lanczos run may end early)."""
        return sum(len(self.indices(task)) for task in tasks) * max(self.steps, 1)


def chunks(indices: range, size: int) -> list[range]:
    """``indices`` in consecutive pieces of at most ``size``: the probes one product takes."""
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def probe_plan(cfg: RunConfig, name: str) -> ProbePlan:
    """The plan of estimate ``name`` from ``cfg``'s probe counts."""
    if name == "density":
        return ProbePlan(name, cfg.density_runs, 1, cfg.density_steps)
    total = cfg.trace_probes if name == "trace" else cfg.diagonal_probes
    return ProbePlan(name, total, cfg.probes_per_task)


def probe_seeds(spec: SketchSpec, plan: ProbePlan, where: tuple[int, str], indices) -> list[int]:
    """The seed of each probe of ``indices`` of ``plan``'s estimate at ``where`` (step,
    split): a CRC of the names and numbers, distinct across estimates, steps and splits.
    """
    step, split = where
    prefix = f"{plan.name}:{spec.layout.seed}:{step}:{split}:"
    return [zlib.crc32(f"{prefix}{index}".encode()) for index in indices]


def write_task(run: RunDir, plan: ProbePlan, where, task: int, arrays: dict, seconds: float):
    """Write array task ``task``'s samples ``arrays`` (name: tensor) with the plan, atomically."""
    with atomic_write(run.estimate_task(*where, plan.name, task)) as tmp:
        with h5py.File(tmp, "w") as handle:
            for key, value in arrays.items():
                handle.create_dataset(key, data=value.numpy())
            handle.attrs.update({"task": task, "seconds": seconds, **asdict(plan)})


def missing_tasks(run: RunDir, plan: ProbePlan, where: tuple[int, str]) -> list[int]:
    """The array tasks of ``plan`` at ``where`` with no file yet."""
    return [
        task
        for task in range(plan.num_tasks)
        if not run.estimate_task(*where, plan.name, task).is_file()
    ]


#: The config keys behind each estimate's plan, named when task files disagree with them.
PLAN_KEYS = {
    "trace": ("trace_probes", "probes_per_task"),
    "diagonal": ("diagonal_probes", "probes_per_task"),
    "density": ("density_runs", "density_steps"),
}


def _check_plan(path, attrs, plan: ProbePlan) -> None:
    recorded = {key: type(value)(attrs[key]) for key, value in asdict(plan).items()}
    if recorded != asdict(plan):
        first, second = PLAN_KEYS[plan.name]
        was = (
            recorded["total"],
            recorded["per_task"] if plan.name != "density" else recorded["steps"],
        )
        now = (plan.total, plan.per_task if plan.name != "density" else plan.steps)
        raise ConfigError(
            f"{first}: {path} was computed with {first}={was[0]} {second}={was[1]}, not "
            f"{first}={now[0]} {second}={now[1]}: pass those, or remove {path.parent} to "
            "compute the estimate again"
        )


def check_recorded(run: RunDir, plan: ProbePlan, where: tuple[int, str]) -> None:
    """Refuse ``plan`` when task files on disk were written with other settings (before any
    job is submitted: their samples would not mix).

    Raises:
        ConfigError: naming the keys and the directory.
    """
    for path in sorted(run.estimate_task(*where, plan.name, 0).parent.glob("task_*.h5")):
        with h5py.File(path, "r") as handle:
            _check_plan(path, handle.attrs, plan)


def read_tasks(run: RunDir, plan: ProbePlan, where: tuple[int, str]) -> list[dict]:
    """Every task's arrays (numpy) with ``seconds``, in task order.

    Raises:
        MissingInputError: naming the tasks not computed yet.
        ConfigError: a task file written with other settings.
    """
    missing = missing_tasks(run, plan, where)
    if missing:
        step, split = where
        raise MissingInputError(
            f"{plan.name} step {step} {split}: array tasks {missing} of {plan.num_tasks} have "
            f"no file in {run.estimate_task(*where, plan.name, 0).parent}; run them with "
            f"`hessov {plan.name} {run.root} step={step} split={split} phase=probes`"
        )
    results = []
    for task in range(plan.num_tasks):
        path = run.estimate_task(*where, plan.name, task)
        with h5py.File(path, "r") as handle:
            _check_plan(path, handle.attrs, plan)
            arrays = {key: np.asarray(handle[key]) for key in handle}
            results.append({**arrays, "seconds": float(handle.attrs["seconds"])})
    return results


def on_cpu(hessian) -> MatMat:
    """``H M`` for a CPU matrix ``M`` whatever the device of ``hessian``
    (:class:`hessov.hessian.HessianAtStep`): the probes are projected on the CPU, where the
    sketch's basis is read.
    """
    return lambda columns: hessian.matmat(columns.to(hessian.device)).cpu()
