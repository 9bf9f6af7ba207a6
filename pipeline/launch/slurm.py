"""The Slurm backend: the stage graph of a run as submitit jobs, and following them safely.

``hessov run backend=slurm`` submits the chain that ``slurm/submit_chain.sh`` submits, through
submitit instead of sbatch scripts: train; layout; per step and split a measurement job array
of ``ceil(measurements / MEAS_PER_JOB)`` tasks per round (two-pass: first round, basis solve,
second round), then the solve; the exhaustive check (``EXHAUSTIVE=true``) and the analysis
after each solve; the replays after training and their comparison after the replays. Jobs
are linked with ``--dependency=afterok`` and ``--kill-on-invalid-dep=yes``, so that a failed
job cancels what depends on it instead of leaving it pending forever. Each job runs
:func:`run_stage`, i.e. ``pipeline.cli.main`` with the subcommand's arguments: a Slurm job
is exactly a ``hessov`` subcommand, as in the sbatch scripts.

``hessov resume RUN backend=slurm`` builds the same graph from what the run's files say is
missing (:func:`pipeline.launch.plan.run_status`): only the array tasks with missing
indices, the basis and solves not yet written, and so on; everything measured is reused.

The job ids of every submission are kept in ``RUN/slurm/jobs.json``::

    {"submissions": [{"command": "run" | "resume", "submitted": "2025-01-31T12:00:00",
                      "logs": "RUN/logs/slurm",
                      "jobs": [{"name": "measure first step=100 split=train task=1",
                                "stage": "measure", "job_id": "1234_1",
                                "after": ["1233"], "argv": ["measure", "RUN", ...]}, ...]},
                     ...]}

``hessov status`` shows the latest submission's job states next to the file state, and a new
submission is refused while jobs of an earlier one are still queued (they would race it).

Waiting never trusts a job to report back: a job killed by a signal writes no result, and
without accounting submitit's ``result()`` would wait forever. ``--wait`` polls squeue and
sacct, gives up after ``slurm.wait_timeout_minutes``, and ends with the failed jobs by name
and the work the files say is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pipeline.config import RunConfig, SlurmConfig, replay_jobs, save_config
from pipeline.errors import ConfigError, HessovError, RunExistsError
from pipeline.launch.chain import plan_chain
from pipeline.launch.plan import missing_work, run_status
from pipeline.rundir import RunDir
from pipeline.sketchspec import SketchSpec, load_spec
from pipeline.summary import atomic_write_json

#: Every squeue/sacct/sinfo call is cut off after this long: a controller that does not
#: answer must never hang `hessov status` or a wait.
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


class SlurmJobsActiveError(HessovError):
    """Jobs of an earlier submission are still queued; submitting again would race them."""


def run_stage(argv: list[str]) -> None:
    """What every submitted job runs: ``hessov ARGV`` in-process, failing the job (so that
    ``afterok`` never fires) when the subcommand exits non-zero."""
    from pipeline.cli import main

    code = main(argv)
    if code:
        raise RuntimeError(f"hessov {' '.join(argv)} exited with status {code}")


# ---------------------------------------------------------------------------------------------
# The job graph


@dataclass
class StageJob:
    """One submission: a single job, or a job array with one element per ``labels`` entry."""

    name: str
    stage: str  # the resource section in slurm.stages
    argvs: list[list[str]]  # the hessov arguments of each job (array element)
    after: list[str] = field(default_factory=list)  # names of jobs that must succeed first
    labels: list[str] | None = None  # array elements' names (e.g. "task=1"); None: one job

    def element_names(self) -> list[str]:
        if self.labels is None:
            return [self.name]
        return [f"{self.name} {label}" for label in self.labels]


def build_jobs(
    run: RunDir,
    spec: SketchSpec,
    status: dict | None,
    cfg: RunConfig,
    compute_args: list[str],
) -> list[StageJob]:
    """The jobs still needed by ``run``, in submission order (dependencies first).

    ``status`` is :func:`run_status` of the run (``None``: nothing exists yet), so a new run
    gets the whole chain and a resumed one only what its files say is missing.
    ``compute_args`` (``device=``, ``threads=``) are passed on to the compute stages.
    """
    root = str(run.root)
    done = status or {"train": False, "layout": False, "sketches": []}
    items = {(item.step, item.split): item for item in done["sketches"]}
    jobs: list[StageJob] = []

    def add(name, stage, argvs, after, labels=None) -> list[str]:
        jobs.append(StageJob(name, stage, argvs, list(after), labels))
        return [name]

    trained: list[str] = []
    if not done["train"]:
        # resume=true: a job requeued after a node failure continues from its last snapshot.
        train_argv = ["train", str(run.config), f"RUN_DIR={root}", "resume=true"]
        trained = add("train", "train", [train_argv + compute_args], [])
    laid_out = trained
    if not done["layout"]:
        laid_out = add("layout", "layout", [["layout", root, *compute_args]], trained)
    for step in spec.steps:
        for split in spec.splits:
            item = items.get((step, split))
            where = [f"step={step}", f"split={split}"]
            label = " ".join(where)
            solved = item is not None and item.solved
            previous = laid_out
            if not solved:
                for round_name in spec.rounds:
                    if round_name == "second" and not (item and item.basis_written):
                        basis = ["solve", root, *where, *compute_args]
                        previous = add(f"basis {label}", "solve", [basis], previous)
                    tasks = (
                        item.rounds[round_name].tasks_missing
                        if item
                        else list(range(spec.num_tasks))
                    )
                    if tasks:
                        measure = ["measure", root, *where, f"round={round_name}"]
                        previous = add(
                            f"measure {round_name} {label}",
                            "measure",
                            [[*measure, f"task={task}", *compute_args] for task in tasks],
                            previous,
                            [f"task={task}" for task in tasks],
                        )
                solve = ["solve", root, *where, *compute_args]
                previous = add(f"solve {label}", "solve", [solve], previous)
            if cfg.EXHAUSTIVE and not (item and item.exhaustive_done):
                exhaustive = ["exhaustive", root, *where, *compute_args]
                add(f"exhaustive {label}", "exhaustive", [exhaustive], previous)
            if not (solved and run.analysis_step(step, split).is_file()):
                add(f"analyze {label}", "analyze", [["analyze", root, *where]], previous)
    replays = []
    for job in replay_jobs(cfg.replays):  # one per seed
        if not run.replay_summary(job.name).is_file():  # written when it finished
            argv = ["replay", root, f"name={job.name}", *compute_args]
            replays += add(f"replay name={job.name}", "replay", [argv], trained)
    if replays:
        add("compare", "compare", [["compare", root]], replays)
    return jobs


# ---------------------------------------------------------------------------------------------
# Resources and checks before anything is submitted


def _stage_section(slurm: SlurmConfig, stage: str) -> str:
    """The config key that sets ``stage``'s resources, for error messages."""
    override = getattr(slurm.stages, stage)
    overridden = any(getattr(override, key) is not None for key in override.__dataclass_fields__)
    return f"slurm.stages.{stage}" if overridden else "slurm"


def stage_resources(slurm: SlurmConfig, stage: str) -> dict:
    """submitit ``SlurmExecutor`` parameters of one stage: the section's values with the
    stage's overrides on top."""
    override = getattr(slurm.stages, stage)

    def pick(key: str):
        value = getattr(override, key)
        return getattr(slurm, key) if value is None else value

    extra = {**slurm.additional_parameters, **(override.additional_parameters or {})}
    # A job whose dependency failed is cancelled instead of pending forever.
    resources: dict = {"additional_parameters": {"kill_on_invalid_dep": "yes", **extra}}
    resources["cpus_per_task"] = pick("cpus_per_task")
    if pick("partition"):
        resources["partition"] = pick("partition")
    if pick("time_minutes"):
        resources["time"] = pick("time_minutes")
    if pick("mem_gb"):
        resources["mem"] = f"{pick('mem_gb')}G"
    if pick("gpus_per_node"):
        resources["gpus_per_node"] = pick("gpus_per_node")
    return resources


def _sbatch_options(resources: dict) -> list[str]:
    """The resources as sbatch command-line options (as submitit writes them as #SBATCH)."""
    options = {key: value for key, value in resources.items() if key != "additional_parameters"}
    options.update(resources["additional_parameters"])
    flags = []
    for key, value in options.items():
        name = "--" + key.replace("_", "-")
        flags.append(name if value is True else f"{name}={value}")
    return flags


def _slurm(*args: str, timeout: float = QUERY_TIMEOUT_S) -> str:
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
    ``sbatch --test-only`` rejects (time limit, memory, GPUs, an unknown option)."""
    try:
        partitions = set(_slurm("sinfo", "-h", "-o", "%R").split())
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
        options = _sbatch_options(resources)
        try:
            _slurm("sbatch", "--test-only", *options, "--wrap=true")
        except SlurmUnreachable as err:
            raise ConfigError(
                f"{_stage_section(slurm, stage)}: Slurm refuses the {stage} job's resources "
                f"({' '.join(options)}): {err}"
            ) from None


# ---------------------------------------------------------------------------------------------
# The job store


def load_store(run: RunDir) -> dict:
    if not run.slurm_jobs.is_file():
        return {"submissions": []}
    return json.loads(run.slurm_jobs.read_text())


def _all_job_ids(store: dict) -> list[str]:
    return [job["job_id"] for sub in store["submissions"] for job in sub["jobs"]]


def refuse_while_queued(run: RunDir) -> None:
    """Refuse a new submission while jobs of an earlier one are still queued or running."""
    store = load_store(run)
    ids = _all_job_ids(store)
    if not ids:
        return
    try:
        states = query_states(ids)
    except SlurmUnreachable as err:
        raise ConfigError(f"backend: the Slurm controller does not answer ({err})") from None
    names = {job["job_id"]: job["name"] for sub in store["submissions"] for job in sub["jobs"]}
    active = [job_id for job_id in ids if states[job_id].active]
    if active:
        listed = ", ".join(f"{names[j]} ({j})" for j in active[:5])
        more = f" and {len(active) - 5} more" if len(active) > 5 else ""
        raise SlurmJobsActiveError(
            f"{run.root}: {len(active)} jobs of an earlier submission are still queued or "
            f"running: {listed}{more}. Wait for them (hessov status {run.root}) or cancel them "
            f"(scancel {' '.join(active)}) before submitting again."
        )


def submit_jobs(run: RunDir, cfg: RunConfig, jobs: list[StageJob], command: str) -> list[dict]:
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
            if job.labels is None:
                handles = [executor.submit(run_stage, job.argvs[0])]
            else:
                handles = executor.map_array(run_stage, job.argvs)
        except (FailedJobError, FailedSubmissionError, OSError) as err:
            submitted = [record["job_id"] for record in records]
            if submitted:
                try:
                    _slurm("scancel", *submitted)
                except SlurmUnreachable as cancel_error:
                    print(f"hessov: could not cancel {submitted}: {cancel_error}", file=sys.stderr)
            atomic_write_json(run.slurm_jobs, store)
            raise HessovError(
                f"sbatch refused the job {job.name!r}: {str(err).strip()}; the "
                f"{len(submitted)} jobs submitted before it were cancelled"
            ) from None
        # An array's master id: afterok on it waits for every element.
        dependency_ids[job.name] = handles[0].job_id.split("_")[0]
        for name, argv, handle in zip(job.element_names(), job.argvs, handles, strict=True):
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
# Job states


@dataclass(frozen=True)
class JobState:
    """A job's state, with Slurm's reason; ``queued``: pending or running."""

    state: str
    reason: str = ""
    queued: bool = False

    @property
    def never_runs(self) -> bool:
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
        return self.never_runs or (
            not self.queued and self.state in TERMINAL_STATES and self.state != "COMPLETED"
        )

    def describe(self) -> str:
        """The state, with Slurm's reason where it has one (e.g. a job pending on its
        dependencies, or cancelled because a dependency failed)."""
        if self.reason not in ("", "None"):
            return f"{self.state} ({self.reason})"
        return self.state


def _expand_array_record(job_id: str) -> list[str]:
    """sacct's record of array elements that never started, e.g. ``12_[0-2,5%4]``, as
    ``["12_0", "12_1", "12_2", "12_5"]``; any other id as itself."""
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
    when accounting is unavailable."""
    masters = sorted({job_id.split("_")[0] for job_id in job_ids}, key=int)
    try:
        out = _slurm("sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(masters))
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
    listing = _slurm("squeue", "--me", "-h", "-r", "-t", "all", "-o", "%i|%T|%r")
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


def describe_jobs(run: RunDir) -> str | None:
    """The latest submission's jobs and their Slurm states, for ``hessov status``; ``None``
    when the run was never submitted to Slurm."""
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
        text += "; running: " + ", ".join(running[:4])
        text += f" and {len(running) - 4} more" if len(running) > 4 else ""
    return text


def follow(run: RunDir, jobs: list[dict], cfg: RunConfig) -> int:
    """Poll the jobs until none can run any more or ``slurm.wait_timeout_minutes`` passed,
    showing progress on stderr; 0 if every job completed and the files say the run is
    complete, else 1 after naming the failed jobs and the missing work."""
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
    missing = missing_work(run_status(run), cfg.EXHAUSTIVE)
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


def _submit_and_report(
    run: RunDir, cfg: RunConfig, jobs: list[StageJob], command: str, wait: bool
) -> int:
    records = submit_jobs(run, cfg, jobs, command)
    for record in records:
        print(f"{record['job_id']} {record['name']}")
    sys.stdout.flush()
    code = follow(run, records, cfg) if wait else 0
    print(run.root)
    return code


def submit_run(cfg: RunConfig, wait: bool) -> int:
    """``hessov run backend=slurm``: submit the whole chain of a new run (or of an unfinished
    one given as ``RUN_DIR`` with ``resume=true``); prints job ids, then the run directory."""
    require_clients()
    plan = plan_chain(cfg)
    run = plan.run
    if cfg.RUN_DIR:
        from pipeline.stages.train import prepare_run_dir

        refuse_while_queued(run)
        try:
            prepare_run_dir(cfg)  # the refusals the train job would meet
        except RunExistsError as err:
            raise RunExistsError(
                f"{err} To finish what it is missing: hessov resume {run.root} backend=slurm"
            ) from None
    cfg.RUN_DIR, cfg.resume = str(run.root), True
    status = run_status(run) if run.config.is_file() else None
    jobs = build_jobs(run, plan.spec, status, cfg, [])
    check_cluster(cfg.slurm, {job.stage for job in jobs})
    if not run.config.is_file():
        # The train job reads this config (the same resolved config it will save), and its
        # presence marks the directory as a run whose training is pending, which training
        # with resume=true continues from scratch.
        run.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config)
    return _submit_and_report(run, cfg, jobs, "run", wait)


def submit_resume(run: RunDir, cfg: RunConfig, compute_args: list[str], wait: bool) -> int:
    """``hessov resume RUN backend=slurm``: submit only what the run's files say is missing."""
    require_clients()
    refuse_while_queued(run)
    cfg.RUN_DIR, cfg.resume = str(run.root), True
    status = run_status(run)
    spec = load_spec(run) if status["layout"] else plan_chain(cfg).spec
    jobs = build_jobs(run, spec, status, cfg, compute_args)
    if not jobs:
        print(f"hessov: nothing to submit: {run.root} is complete", file=sys.stderr)
        print(run.root)
        return 0
    check_cluster(cfg.slurm, {job.stage for job in jobs})
    return _submit_and_report(run, cfg, jobs, "resume", wait)
