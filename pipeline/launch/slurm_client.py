"""The Slurm client: sbatch, squeue, sacct and sinfo as subprocesses, and job states.

Every call is cut off after :data:`QUERY_TIMEOUT_S`: a controller that does not answer must
never hang ``hessov status`` or a wait. A job's state comes from the controller while it
holds the job, else from accounting (:func:`query_states`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from hessov.config import SlurmConfig
from hessov.errors import ConfigError
from hessov.launch.resources import sbatch_options, stage_resources, stage_section

QUERY_TIMEOUT_S = 10

#: sacct states after which a job never changes again.
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "TIMEOUT",
    }
)
#: A job out of the queue that accounting does not know (accounting disabled, or not yet
#: recorded): whether it succeeded is for the run's files to say.
UNKNOWN = "UNKNOWN"
#: squeue reasons of a pending job that will never start.
NEVER_RUNS = frozenset({"DependencyNeverSatisfied"})
#: After the last job left the queue, how long to let accounting catch up with final states.
SETTLE_S = 30


class SlurmUnreachable(Exception):
    """A Slurm client is missing, failed or did not answer in time."""


def slurm_client(*args: str, timeout: float = QUERY_TIMEOUT_S) -> str:
    """Run a Slurm client; its stdout, or :class:`SlurmUnreachable` saying why not."""
    try:
        result = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise SlurmUnreachable(f"{args[0]} is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise SlurmUnreachable(f"{args[0]} did not answer within {timeout} s") from None
    if result.returncode:
        detail = result.stderr.strip().replace("\n", "; ") or f"exit status {result.returncode}"
        raise SlurmUnreachable(f"{args[0]}: {detail}")
    return result.stdout


def require_clients() -> None:
    """Refuse backend=slurm where the Slurm clients are not installed."""
    missing = [tool for tool in ("sbatch", "squeue", "sinfo") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(
            f"backend: backend=slurm needs the Slurm clients, and {', '.join(missing)} "
            "is not on PATH; run on a Slurm login node, or use backend=local"
        )


def check_cluster(slurm: SlurmConfig, stages: set[str]) -> None:
    """Refuse, before anything is submitted, when Slurm cannot take the jobs of ``stages``:
    a controller that does not answer, an unknown partition, or resources that
    ``sbatch --test-only`` rejects (time limit, memory, GPUs, an unknown option).
    """
    try:
        partitions = set(slurm_client("sinfo", "-h", "-o", "%R").split())
    except SlurmUnreachable as err:
        raise ConfigError(f"backend: the Slurm controller does not answer ({err})") from None
    for stage in sorted(stages):
        resources = stage_resources(slurm, stage)
        partition = resources.get("partition")
        if partition and partition not in partitions:
            key = "slurm.partition"
            if getattr(slurm.stages, stage).partition is not None:
                key = f"slurm.stages.{stage}.partition"
            raise ConfigError(
                f"{key}: unknown partition {partition!r}; this cluster has "
                + ", ".join(sorted(partitions))
            )
        options = sbatch_options(resources)
        try:
            slurm_client("sbatch", "--test-only", *options, "--wrap=true")
        except SlurmUnreachable as err:
            raise ConfigError(
                f"{stage_section(slurm, stage)}: Slurm refuses the {stage} job's resources "
                f"({' '.join(options)}): {err}"
            ) from None


@dataclass(frozen=True)
class JobState:
    """A job's state, with Slurm's reason; ``queued``: pending or running."""

    state: str
    reason: str = ""
    queued: bool = False

    @property
    def never_runs(self) -> bool:
        """Pending for a reason Slurm never clears (``NEVER_RUNS``, e.g. a failed dependency)."""
        return self.queued and self.reason in NEVER_RUNS

    @property
    def active(self) -> bool:
        """Still pending or running, and able to run."""
        return self.queued and not self.never_runs

    @property
    def settled(self) -> bool:
        """Its state will not change any more."""
        return self.never_runs or (
            not self.queued and (self.state in TERMINAL_STATES or self.state == UNKNOWN)
        )

    @property
    def failed(self) -> bool:
        """It will never complete: it ended otherwise than COMPLETED, or never runs."""
        return self.never_runs or (
            not self.queued and self.state in TERMINAL_STATES and self.state != "COMPLETED"
        )

    def describe(self) -> str:
        """The state, with Slurm's reason where it has one (e.g. a job pending on its
        dependencies, or cancelled because a dependency failed).
        """
        if self.reason not in ("", "None"):
            return f"{self.state} ({self.reason})"
        return self.state


def _expand_array_record(job_id: str) -> list[str]:
    """Expand sacct's record of array elements that never started, e.g. ``12_[0-2,5%4]``, to
    ``["12_0", "12_1", "12_2", "12_5"]``; any other id to itself.
    """
    match = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not match:
        return [job_id]
    master, ranges = match.group(1), match.group(2).split("%")[0]
    elements = []
    for part in ranges.split(","):
        start, _, stop = part.partition("-")
        elements += [f"{master}_{i}" for i in range(int(start), int(stop or start) + 1)]
    return elements


def _accounted_states(job_ids: list[str]) -> dict[str, str] | None:
    """``{job id: sacct state}`` of ``job_ids`` and of their arrays' other elements; ``None``
    when accounting is unavailable.
    """
    masters = sorted({job_id.split("_")[0] for job_id in job_ids}, key=int)
    try:
        out = slurm_client("sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(masters))
    except SlurmUnreachable:
        return None
    states = {}
    for line in out.splitlines():
        record, _, state = line.partition("|")
        for job_id in _expand_array_record(record.strip()):
            # "CANCELLED by 0" -> "CANCELLED"
            states[job_id] = state.split()[0] if state.strip() else UNKNOWN
    return states


def query_states(job_ids: list[str]) -> dict[str, JobState]:
    """The state of every job in ``job_ids``: from the controller while it still holds the
    job (queued, or ended less than MinJobAge ago), else from accounting.

    An array element cancelled while pending is the one job Slurm keeps no record of at all:
    the controller drops it from the array and sacct never lists it. When accounting answers
    and knows other elements of its array, such an element is reported as cancelled.

    Raises :class:`SlurmUnreachable` when squeue does not answer.
    """
    held = {}
    listing = slurm_client("squeue", "--me", "-h", "-r", "-t", "all", "-o", "%i|%T|%r")
    for line in listing.splitlines():
        job_id, state, reason = line.strip().split("|", 2)
        held[job_id] = JobState(state, reason, queued=state not in TERMINAL_STATES)
    ended = [job_id for job_id in job_ids if job_id not in held]
    accounted = _accounted_states(ended) if ended else {}
    known = set(held) | set(accounted or {})
    states = {}
    for job_id in job_ids:
        master = job_id.split("_")[0]
        if job_id in held:
            states[job_id] = held[job_id]
        elif accounted and job_id in accounted:
            states[job_id] = JobState(accounted[job_id])
        elif (
            accounted is not None
            and "_" in job_id
            and any(other.split("_")[0] == master for other in known)
        ):
            states[job_id] = JobState("CANCELLED", "before it started; Slurm keeps no record")
        else:
            states[job_id] = JobState(UNKNOWN)
    return states
