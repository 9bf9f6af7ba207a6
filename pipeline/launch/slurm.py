"""Submit a run's stage graph to Slurm through submitit, and follow the jobs safely.

``hessov run backend=slurm`` submits the jobs of :func:`hessov.launch.graph.build_graph`,
the same list ``slurm/submit_chain.sh`` submits as plain sbatch: each job (or job array)
with ``--dependency=afterok`` on the jobs it waits for and ``--kill-on-invalid-dep=yes``, so
that a failed job cancels what depends on it instead of leaving it pending forever. Each job
runs :func:`run_stage`, the stage's entry point :func:`hessov.jobs.run_job` with the job's
arguments: a Slurm job computes exactly what ``hessov STAGE ...`` computes.

``hessov resume RUN backend=slurm`` submits the graph of what the run's files say is missing
(only the array tasks with missing indices, the basis and solves not yet written, and so on);
everything measured is reused. The job ids go to the job store
(:mod:`hessov.launch.jobstore`).

Waiting never trusts a job to report back: a job killed by a signal writes no result, and
without accounting submitit's ``result()`` would wait forever. ``--wait`` polls squeue and
sacct, gives up after ``slurm.wait_timeout_minutes``, and ends with the failed jobs by name
and the work the files say is missing.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

from hessov.config import RunConfig
from hessov.errors import HessovError
from hessov.fileio import atomic_write_json
from hessov.jobs import run_job
from hessov.launch.graph import Job, RunPlan, plan_resume, plan_run, prepare_run
from hessov.launch.jobstore import load_store, refuse_while_queued
from hessov.launch.resources import stage_resources
from hessov.launch.slurm_client import (
    JobState,
    SlurmUnreachable,
    check_cluster,
    query_states,
    require_clients,
    slurm_client,
)
from hessov.launch.status import missing_work, run_status
from hessov.rundir import RunDir
from hessov.runlog import setup_terminal_logging

#: After the last job left the queue, how long to let accounting catch up with final states.
SETTLE_S = 30
#: How many of the running jobs a progress line names.
LISTED_RUNNING_JOBS = 4


def run_stage(argv: list[str]) -> None:
    """What every submitted job runs: the stage's entry point with the job's arguments.
    An error fails the job, so that ``afterok`` never fires.
    """
    setup_terminal_logging("INFO")
    output = run_job(argv)
    if output:
        print(output)


def _submit_one(executor, job: Job):
    """Submit one job or job array; the submitit handles of its elements."""
    argvs = [argv for _, argv in job.elements()]
    if job.tasks is None:
        return [executor.submit(run_stage, argvs[0])]
    return executor.map_array(run_stage, argvs)


def _cancel(job_ids: list[str]) -> None:
    """Cancel jobs submitted before one sbatch refused (they would run without the rest)."""
    if job_ids:
        try:
            slurm_client("scancel", *job_ids)
        except SlurmUnreachable as error:
            print(f"hessov: could not cancel {job_ids}: {error}", file=sys.stderr)


def submit_jobs(run: RunDir, cfg: RunConfig, jobs: list[Job], command: str) -> list[dict]:
    """Submit ``jobs`` through submitit, recording each in the job store as it goes.

    If sbatch refuses one, the jobs already submitted by this call are cancelled (they would
    only run without what comes after them) and the error names the refused job.
    """
    import submitit
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    folder = Path(cfg.slurm.logs).resolve() if cfg.slurm.logs else run.slurm_logs
    folder.mkdir(parents=True, exist_ok=True)
    store = load_store(run)
    records: list[dict] = []
    store["submissions"].append(
        {
            "command": command,
            "submitted": datetime.now().isoformat(timespec="seconds"),
            "logs": str(folder),
            "jobs": records,
        }
    )
    dependency_ids: dict[str, str] = {}
    for job in jobs:
        after = [dependency_ids[name] for name in job.after]
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
        executor.update_parameters(
            job_name=f"hessov-{job.stage}",
            dependency=f"afterok:{':'.join(after)}" if after else None,
            **stage_resources(cfg.slurm, job.stage),
        )
        try:
            handles = _submit_one(executor, job)
        except (FailedJobError, FailedSubmissionError, OSError) as err:
            submitted = [record["job_id"] for record in records]
            _cancel(submitted)
            atomic_write_json(run.slurm_jobs, store)
            raise HessovError(
                f"sbatch refused the job {job.name!r}: {str(err).strip()}; the "
                f"{len(submitted)} jobs submitted before it were cancelled"
            ) from None
        # An array's master id: afterok on it waits for every element.
        dependency_ids[job.name] = handles[0].job_id.split("_")[0]
        for (name, argv), handle in zip(job.elements(), handles, strict=True):
            records.append(
                {
                    "name": name,
                    "stage": job.stage,
                    "job_id": handle.job_id,
                    "after": after,
                    "argv": argv,
                }
            )
        atomic_write_json(run.slurm_jobs, store)
    return records


# ---------------------------------------------------------------------------------------------
# Following jobs


def _progress(jobs: list[dict], states: dict[str, JobState]) -> str:
    counts: dict[str, int] = {}
    for job in jobs:
        key = states[job["job_id"]].describe().split()[0].lower()
        counts[key] = counts.get(key, 0) + 1
    text = ", ".join(f"{count} {state}" for state, count in sorted(counts.items()))
    running = [job["name"] for job in jobs if states[job["job_id"]].state == "RUNNING"]
    if running:
        text += "; running: " + ", ".join(running[:LISTED_RUNNING_JOBS])
        if len(running) > LISTED_RUNNING_JOBS:
            text += f" and {len(running) - LISTED_RUNNING_JOBS} more"
    return text


def follow(run: RunDir, jobs: list[dict], cfg: RunConfig) -> int:
    """Poll the jobs until none can run any more or ``slurm.wait_timeout_minutes`` passed,
    showing progress on stderr; 0 if every job completed and the files say the run is
    complete, else 1 after naming the failed jobs and the missing work.
    """
    ids = [job["job_id"] for job in jobs]
    started = time.monotonic()
    deadline = started + cfg.slurm.wait_timeout_minutes * 60
    states: dict[str, JobState] = {}
    shown, timed_out = None, False
    while True:
        try:
            states = query_states(ids)
            line = _progress(jobs, states)
            finished = not any(state.active for state in states.values())
        except SlurmUnreachable as err:
            line, finished = f"Slurm not reachable ({err}); retrying", False
        if line != shown:
            elapsed = time.monotonic() - started
            print(f"hessov [{elapsed:6.0f} s] jobs: {line}", file=sys.stderr, flush=True)
            shown = line
        if finished:
            break
        if time.monotonic() >= deadline:
            timed_out = True
            break
        time.sleep(max(0.0, min(cfg.slurm.poll_seconds, deadline - time.monotonic())))
    settle_until = time.monotonic() + SETTLE_S
    while states and not timed_out and not all(s.settled for s in states.values()):
        if time.monotonic() >= settle_until:
            break
        time.sleep(1)
        try:
            states = query_states(ids)
        except SlurmUnreachable:
            break
    return _report(run, jobs, states, cfg, timed_out)


def _report(
    run: RunDir, jobs: list[dict], states: dict[str, JobState], cfg: RunConfig, timed_out: bool
) -> int:
    def say(text: str) -> None:
        print(f"hessov: {text}", file=sys.stderr)

    if timed_out:
        active = [
            job for job in jobs if job["job_id"] not in states or states[job["job_id"]].active
        ]
        say(
            f"stopped waiting after slurm.wait_timeout_minutes={cfg.slurm.wait_timeout_minutes}; "
            f"{len(active)} jobs are still queued or running and carry on: "
            + ", ".join(f"{job['name']} ({job['job_id']})" for job in active)
        )
    failed = [job for job in jobs if job["job_id"] in states and states[job["job_id"]].failed]
    if failed:
        say("failed jobs:")
        for job in failed:
            say(f"  {job['name']} ({job['job_id']}): {states[job['job_id']].describe()}")
    missing = missing_work(run_status(run), cfg.EXHAUSTIVE, cfg.estimates)
    if missing:
        say(f"missing work, from the files of {run.root}:")
        for line in missing:
            say(f"  {line}")
        if not timed_out:
            say(f"finish it with: hessov resume {run.root} backend=slurm --wait")
    if timed_out or failed or missing:
        return 1
    say(f"all {len(jobs)} jobs completed")
    return 0


# ---------------------------------------------------------------------------------------------
# The two entry points


def _submit_and_report(run: RunDir, cfg: RunConfig, plan: RunPlan, command: str, wait: bool):
    records = submit_jobs(run, cfg, plan.jobs, command)
    for record in records:
        print(f"{record['job_id']} {record['name']}")
    sys.stdout.flush()
    code = follow(run, records, cfg) if wait else 0
    print(run.root)
    return code


def submit_run(cfg: RunConfig, wait: bool) -> int:
    """``hessov run backend=slurm``: submit the whole graph of a new run (or of an unfinished
    one given as ``RUN_DIR`` with ``resume=true``); prints job ids, then the run directory.
    """
    require_clients()
    plan = plan_run(cfg)
    if cfg.RUN_DIR:
        refuse_while_queued(plan.run)
    check_cluster(cfg.slurm, {job.stage for job in plan.jobs})
    prepare_run(cfg, plan)
    return _submit_and_report(plan.run, cfg, plan, "run", wait)


def submit_resume(
    run: RunDir, cfg: RunConfig, compute_args: list[str], wait: bool, row_overrides=()
) -> int:
    """``hessov resume RUN backend=slurm``: submit only what the run's files say is missing
    (``row_overrides``: ``row_block=`` or ``memory_gb=`` choose the row block again).
    """
    require_clients()
    refuse_while_queued(run)
    plan = plan_resume(run, cfg, compute_args, row_overrides, save=True)
    if not plan.jobs:
        print(f"hessov: nothing to submit: {run.root} is complete", file=sys.stderr)
        print(run.root)
        return 0
    check_cluster(cfg.slurm, {job.stage for job in plan.jobs})
    return _submit_and_report(run, cfg, plan, "resume", wait)
