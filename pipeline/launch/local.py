"""The local launcher: the stage graph's jobs one after another, in this process.

The same jobs Slurm runs (:func:`hessov.launch.graph.build_graph`), each array task in
turn, called through the same entry point (:func:`hessov.jobs.run_job`) with the same
files, and therefore the same numbers. Every stage skips what its files say is done (a
finished training, measured blocks, a solved step), and the graph of an existing run holds
only what its files say is missing: running it on an interrupted run finishes it, which is
``hessov resume`` for the local backend.
"""

from __future__ import annotations

import time

from hessov.config import RunConfig
from hessov.jobs import run_job
from hessov.launch.graph import Job, RunPlan, plan_resume, plan_run, prepare_run
from hessov.launch.jobstore import refuse_while_queued
from hessov.rundir import RunDir
from hessov.runlog import get_logger


def run_jobs(jobs: list[Job]) -> None:
    """Run every element of ``jobs`` in order (the graph's order respects dependencies)."""
    log = get_logger()
    elements = [element for job in jobs for element in job.elements()]
    for number, (name, argv) in enumerate(elements, start=1):
        log.info("[job %d/%d] %s", number, len(elements), name)
        run_job(argv)


def _run_plan(plan: RunPlan) -> RunDir:
    started = time.perf_counter()
    run_jobs(plan.jobs)
    get_logger().info(
        "pipeline finished in %.1f s: %s", time.perf_counter() - started, plan.run.root
    )
    return plan.run


def run_local(cfg: RunConfig) -> RunDir:
    """Run the whole pipeline of ``cfg`` on this machine (a new run, or an unfinished one
    given as ``RUN_DIR`` with ``resume=true``); returns the run.
    """
    plan = plan_run(cfg)
    refuse_while_queued(plan.run, unreachable_ok=True)  # a Slurm submission's jobs would race
    prepare_run(cfg, plan)
    return _run_plan(plan)


def resume_local(run: RunDir, cfg: RunConfig, compute_args=(), row_overrides=()) -> RunDir:
    """Finish whatever ``run`` is missing, reusing everything already measured: the sketch
    of the layout on disk. ``compute_args`` (``device=``, ``threads=``) reach every job that
    computes with the model; ``row_overrides`` choose the basis and solve's row block again.
    """
    refuse_while_queued(run, unreachable_ok=True)
    return _run_plan(plan_resume(run, cfg, compute_args, row_overrides, save=True))
