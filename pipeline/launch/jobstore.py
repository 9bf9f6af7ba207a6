"""The job store of a run: the Slurm job ids of every submission, in ``RUN/slurm/jobs.json``.

::

    {"submissions": [{"command": "run" | "resume", "submitted": "2025-01-31T12:00:00",
                      "logs": "RUN/logs/slurm",
                      "jobs": [{"name": "measure first step=100 split=train task=1",
                                "stage": "measure", "job_id": "1234_1",
                                "after": ["1233"], "argv": ["measure", "RUN", ...]}, ...]},
                     ...]}

``hessov status`` shows the latest submission's job states next to the file state, and a new
submission is refused while jobs of an earlier one are still queued (they would race it).
"""

from __future__ import annotations

import json

from hessov.errors import ConfigError, HessovError
from hessov.launch.slurm_client import SlurmUnreachable, query_states
from hessov.rundir import RunDir
from hessov.runlog import get_logger

#: How many of the active jobs the refusal names.
LISTED_ACTIVE_JOBS = 5


class SlurmJobsActiveError(HessovError):
    """Jobs of an earlier submission are still queued; submitting again would race them."""


def load_store(run: RunDir) -> dict:
    """The run's job store (see the module docstring); no submissions if there is none."""
    if not run.slurm_jobs.is_file():
        return {"submissions": []}
    return json.loads(run.slurm_jobs.read_text())


def _all_job_ids(store: dict) -> list[str]:
    return [job["job_id"] for sub in store["submissions"] for job in sub["jobs"]]


def refuse_while_queued(run: RunDir, unreachable_ok: bool = False) -> None:
    """Refuse a new submission (or a local run) while jobs of an earlier submission are still
    queued or running. With ``unreachable_ok`` (a local run, perhaps of a copied run
    directory) a Slurm that does not answer only gets a warning.
    """
    store = load_store(run)
    ids = _all_job_ids(store)
    if not ids:
        return
    try:
        states = query_states(ids)
    except SlurmUnreachable as err:
        if unreachable_ok:
            get_logger().warning("cannot ask Slurm whether %s's jobs still run (%s)", run.root, err)
            return
        raise ConfigError(f"backend: the Slurm controller does not answer ({err})") from None
    names = {job["job_id"]: job["name"] for sub in store["submissions"] for job in sub["jobs"]}
    active = [job_id for job_id in ids if states[job_id].active]
    if active:
        listed = ", ".join(f"{names[j]} ({j})" for j in active[:LISTED_ACTIVE_JOBS])
        more = (
            f" and {len(active) - LISTED_ACTIVE_JOBS} more"
            if len(active) > LISTED_ACTIVE_JOBS
            else ""
        )
        raise SlurmJobsActiveError(
            f"{run.root}: {len(active)} jobs of an earlier submission are still queued or "
            f"running: {listed}{more}. Wait for them (hessov status {run.root}) or cancel them "
            f"(scancel {' '.join(active)}) before submitting again."
        )


def describe_jobs(run: RunDir) -> str | None:
    """The latest submission's jobs and their Slurm states, for ``hessov status``; ``None``
    when the run was never submitted to Slurm.
    """
    store = load_store(run)
    if not store["submissions"]:
        return None
    latest = store["submissions"][-1]
    jobs = latest["jobs"]
    head = (
        f"slurm: {len(jobs)} jobs submitted by `hessov {latest['command']}` at "
        f"{latest['submitted']} (logs {latest['logs']})"
    )
    if len(store["submissions"]) > 1:
        head += f"; latest of {len(store['submissions'])} submissions in {run.slurm_jobs}"
    try:
        states = query_states([job["job_id"] for job in jobs])
    except SlurmUnreachable as err:
        return f"{head}\n  Slurm not reachable ({err}): job states unknown; files above are current"
    width = max((len(job["name"]) for job in jobs), default=0)
    lines = [head]
    for job in jobs:
        state = states[job["job_id"]].describe()
        lines.append(f"  {job['name']:<{width}}  {job['job_id']:<12} {state}")
    return "\n".join(lines)
