"""The job chain of a run before it exists: what a scheduler must submit.

A Slurm chain is submitted before training has produced anything, yet the size of each
measurement job array depends on D (k defaults to 5% of D) and on the sketch settings.
:func:`plan_chain` builds the problem's network to count D, resolves the sketch settings
exactly as the layout stage will, and chooses the run directory, so that ``hessov plan``,
the sbatch chain script and the submitit backend all submit the same jobs. The replays of
``cfg.replays`` are named too: each of their jobs (one per seed) is one job after training.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import RunConfig, replay_jobs
from pipeline.problems import build_problem
from pipeline.rundir import RunDir
from pipeline.sketchspec import SketchSpec, resolve_spec
from pipeline.stages.train import new_run_dir


@dataclass
class ChainPlan:
    """Run directory, sketch spec, the (step, split) pairs to sketch, and the replays."""

    run: RunDir
    spec: SketchSpec
    replays: list[str]

    @property
    def sketches(self) -> list[tuple[int, str]]:
        return [(step, split) for step in self.spec.steps for split in self.spec.splits]

    def as_lines(self) -> str:
        """A shell-friendly description: one ``key value...`` per line."""
        lines = [
            f"run_dir {self.run.root}",
            f"dim {self.spec.layout.dim}",
            f"rounds {' '.join(self.spec.rounds)}",
            f"tasks {self.spec.num_tasks}",
        ]
        lines += [f"sketch {step} {split}" for step, split in self.sketches]
        lines += [f"replay {name}" for name in self.replays]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "run_dir": str(self.run.root),
            "dim": self.spec.layout.dim,
            "rounds": list(self.spec.rounds),
            "tasks": self.spec.num_tasks,
            "sketches": [[step, split] for step, split in self.sketches],
            "replays": self.replays,
        }


def plan_chain(cfg: RunConfig) -> ChainPlan:
    """Plan the jobs of ``cfg``'s run (choosing a new run directory unless ``RUN_DIR``)."""
    dim = build_problem(cfg).num_params
    run = RunDir(cfg.RUN_DIR) if cfg.RUN_DIR else new_run_dir(cfg)
    spec = resolve_spec(cfg, dim, list(cfg.RECORD_STEPS))
    return ChainPlan(run, spec, [job.name for job in replay_jobs(cfg.replays)])
