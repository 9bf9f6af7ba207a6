"""Question 4: parallel scaling of the measurement stage, and the Slurm chain's overhead.

What it runs, on the mnist_mini benchmark run (step 1000, train split, float32, one thread
per worker, blocks of 64):

* one measurement round of ``MEASUREMENTS`` HVPs (a two-pass layout with that k, first
  round only), split into 1, 2, ... equal array tasks (``MEAS_PER_JOB``), each task a
  ``hessov measure`` process: on the real local Slurm cluster (``slurm/job.sbatch measure`` as a
  job array, wall time from ``sbatch`` until the last task has left the queue), and as plain
  processes started at once on this machine (``--workers`` sets the counts; 1..16 on a
  machine with that many cores). Speedup = T(1) / T(n), efficiency = speedup / n.
* the whole pipeline of ``problem=mnist_mini preset=tiny`` as the sbatch chain on the local
  cluster (``slurm/submit_chain.sh``, every job of the stage graph, linked by ``afterok``),
  from submission until the last job has left the queue, against the same jobs run
  one after another without Slurm (``slurm/run_sequential.sh``): the difference is what
  scheduling costs, less what running array tasks side by side saves.

The cluster is started with ``slurm/local-cluster.sh start`` when it does not answer and
this process may (root); it is never stopped here. Without it the Slurm rows say why.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from bench.common import (
    HESSOV,
    ROOT,
    STEP,
    WORK,
    Settings,
    fmt_spread,
    log,
    markdown_table,
    run_child,
    run_cli,
    run_parallel,
    trained_run,
)

#: HVPs of the scaled measurement round: 48 blocks of 64, divisible among 1, 2, 3, 4, 6, 8,
#: 12, 16 workers; enough that the products are not lost in each worker's start-up.
MEASUREMENTS = 3072
BLOCK = 64
CLUSTER_SCRIPT = ROOT / "slurm" / "local-cluster.sh"
POLL_S = 0.25


def slurm_environment() -> tuple[dict | None, str]:
    """The environment for Slurm commands, or None and the reason there is no cluster."""
    status = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "status"], capture_output=True, text=True, timeout=120
    )
    if status.returncode != 0:
        if os.geteuid() != 0:
            return None, "the local Slurm cluster does not answer and starting it needs root"
        log("Q4 starting the local Slurm cluster")
        status = subprocess.run(
            ["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=1200
        )
        if status.returncode != 0:
            return None, f"`slurm/local-cluster.sh start` failed: {status.stderr[-300:]}"
    conf = status.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    return {**os.environ, "SLURM_CONF": conf, "HESSOV": str(HESSOV)}, ""


def wait_until_gone(env: dict, job_ids: list[str], timeout: float = 900) -> float:
    """Poll until none of ``job_ids`` is queued or running; returns when that was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = subprocess.run(
            ["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)],
            env=env,
            capture_output=True,
            text=True,
        ).stdout.split()
        if not queued:
            return time.perf_counter()
        time.sleep(POLL_S)
    raise RuntimeError(f"Slurm jobs {job_ids} still queued after {timeout} s")


def failed_jobs(env: dict, job_ids: list[str], timeout: float = 60) -> list[str]:
    """Jobs (array tasks included) that did not complete, from sacct, once sacct has their
    final states: the accounting database may still say RUNNING after squeue has let go.
    """
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
            env=env,
            capture_output=True,
            text=True,
        ).stdout
        lines = [line for line in out.splitlines() if line]
        unsettled = any(state in line for line in lines for state in ("RUNNING", "PENDING"))
        if not unsettled or time.monotonic() > deadline:
            return [line for line in lines if "COMPLETED" not in line]
        time.sleep(POLL_S)


def laid_out_round(source: Path, name: str, workers: int) -> Path:
    """A fresh copy of the run laid out for one round of MEASUREMENTS in ``workers`` tasks."""
    run = WORK / "scaling" / name
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("snapshots"))
    run_cli(
        [
            "layout",
            str(run),
            "recovery=two_pass",
            f"k={MEASUREMENTS}",
            f"block_size={BLOCK}",
            f"MEAS_PER_JOB={MEASUREMENTS // workers}",
            "HESSIAN_SPLITS=[train]",
            f"HESSIAN_STEPS=[{STEP}]",
        ]
    )
    return run


def products_seconds(run: Path) -> float:
    """HVP seconds all workers recorded in the parts."""
    import h5py

    total = 0.0
    for part in (run / "measurements" / f"step_{STEP}_train" / "first").glob("part_*.h5"):
        with h5py.File(part, "r") as handle:
            total += float(handle.attrs.get("products_seconds", 0.0))
    return total


def slurm_round(source: Path, workers: int, env: dict) -> float:
    run = laid_out_round(source, f"slurm_{workers}", workers)
    logs = WORK / "scaling" / "slurm-logs"
    logs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    job = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--array=0-{workers - 1}",
            f"--output={logs}/%x-%A_%a.out",
            str(ROOT / "slurm" / "job.sbatch"),
            *["measure", str(run), f"step={STEP}", "split=train", "round=first"],
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout.strip()
    end = wait_until_gone(env, [job])
    failed = failed_jobs(env, [job])
    if failed:
        raise RuntimeError(f"measure array {job} failed: {failed}")
    return end - start


def local_round(source: Path, workers: int) -> float:
    run = laid_out_round(source, f"local_{workers}", workers)
    where = [str(run), f"step={STEP}", "split=train"]
    start = time.perf_counter()
    run_parallel([[HESSOV, "measure", *where, f"task={task}"] for task in range(workers)])
    return time.perf_counter() - start


def chain_overhead(env: dict, quick: bool) -> dict:
    """Wall seconds of the tiny pipeline as the sbatch chain and run sequentially, and the
    number of jobs the chain submitted.
    """
    # preset=tiny's training, one of its four sketches (step 300, train): 10 processes.
    args = ["problem=mnist_mini", "preset=tiny", "HESSIAN_STEPS=[300]", "HESSIAN_SPLITS=[train]"]
    if quick:
        args += ["MAX_STEPS=100", "RECORD_STEPS=[100]", "SNAPSHOT_STEPS=[]", "HESSIAN_STEPS=[100]"]
    result = {}
    for name in ("sequential", "slurm"):
        output = WORK / "chain" / name
        if output.exists():
            shutil.rmtree(output)
        output.mkdir(parents=True)
        job_env = {**env, "HESSOV_SLURM_LOGS": str(output / "slurm-logs")}
        script = "run_sequential.sh" if name == "sequential" else "submit_chain.sh"
        log(f"Q4 chain: {script}")
        start = time.perf_counter()
        child = run_child(
            ["bash", ROOT / "slurm" / script, *args, f"OUTPUT_DIR={output}"], env=job_env
        )
        if name == "slurm":
            jobs = [line.split()[-1] for line in child.stdout.splitlines()[:-1] if line.strip()]
            end = wait_until_gone(env, jobs)
            failed = failed_jobs(env, jobs)
            if failed:
                raise RuntimeError(f"chain jobs failed: {failed}")
            result["jobs"] = len(jobs)
            result["slurm"] = end - start
        else:
            result["sequential"] = child.seconds
    return result


def section(settings: Settings) -> str:
    started = time.perf_counter()
    source = trained_run()
    env, reason = slurm_environment()
    counts = sorted(set(settings.workers) | {1})
    reps = 1 if settings.quick else min(settings.reps, 2)
    local: dict[int, list[float]] = {n: [] for n in counts}
    slurm: dict[int, list[float]] = {n: [] for n in (1, 2)} if env else {}
    hvp_seconds: list[float] = []
    for rep in range(reps):
        for workers in counts:
            log(f"Q4 local, {workers} worker(s), repetition {rep + 1}")
            local[workers].append(local_round(source, workers))
            if workers == 1:
                hvp_seconds.append(products_seconds(WORK / "scaling" / "local_1"))
        for workers in slurm:
            log(f"Q4 Slurm, {workers} array task(s), repetition {rep + 1}")
            slurm[workers].append(slurm_round(source, workers, env))
    chain = chain_overhead(env, settings.quick) if env else {}
    return report(local, slurm, hvp_seconds, chain, reason, time.perf_counter() - started)


def scaling_rows(label: str, walls: dict[int, list[float]]) -> list[list[str]]:
    base = statistics.median(walls[1])
    rows = []
    for workers, values in walls.items():
        speedup = [base / v for v in values]
        rows.append(
            [
                label,
                workers,
                fmt_spread(values, 2, " s"),
                fmt_spread(speedup),
                fmt_spread([s / workers for s in speedup]),
            ]
        )
    return rows


def report(local, slurm, hvp_seconds, chain, reason, wall) -> str:
    rows = scaling_rows("processes on this machine", local)
    if slurm:
        rows += scaling_rows("Slurm array tasks (local cluster)", slurm)
    lines = [
        "## 4. Parallel scaling of the measurement stage",
        "",
        f"One measurement round of {MEASUREMENTS} HVPs of the mnist_mini Hessian (blocks of "
        f"{BLOCK}, float32, 1 thread per worker), split into equal tasks, each a "
        "`hessov measure` process; wall time from the first start (or `sbatch`) to the last "
        "end (or the last task leaving the queue), median (min-max) over repetitions. The "
        f"products alone take {fmt_spread(hvp_seconds, 2, ' s')} of one worker's time; the "
        "rest of every worker is process start-up, imports, building the operator and the "
        f"test matrices. This machine has {os.cpu_count()} cores, so more workers than that "
        "only share them.",
        "",
        markdown_table(
            ["workers", "count", "wall time", "speedup", "efficiency (speedup / workers)"], rows
        ),
    ]
    if slurm:
        one = statistics.median(slurm[1]) - statistics.median(local[1])
        lines += [
            "",
            f"Slurm adds {one:.1f} s to one task against the same process started directly "
            "(submission, scheduling, job start-up and the poll that sees it leave the queue).",
        ]
    else:
        lines += ["", f"Slurm rows: not measured: {reason}."]
    lines += ["", "### The whole sbatch chain against the same jobs run one after another", ""]
    if chain:
        overhead = chain["slurm"] - chain["sequential"]
        lines += [
            markdown_table(
                [
                    "pipeline `problem=mnist_mini preset=tiny HESSIAN_STEPS=[300] "
                    "HESSIAN_SPLITS=[train]` (train, layout, two measurement rounds of 3 array "
                    "tasks, basis, solve)",
                    "wall time",
                ],
                [
                    [
                        "`slurm/run_sequential.sh` (the same jobs, one after another)",
                        f"{chain['sequential']:.1f} s",
                    ],
                    [
                        f"`slurm/submit_chain.sh` on the local cluster ({chain['jobs']} jobs, "
                        "until the last leaves the queue)",
                        f"{chain['slurm']:.1f} s",
                    ],
                    [
                        "difference (scheduling overhead, less array parallelism)",
                        f"{overhead:+.1f} s",
                    ],
                ],
            ),
            "",
            (
                f"The chain costs {overhead / chain['jobs']:+.2f} s per job against running "
                "its scripts directly: every `afterok` dependency waits for Slurm to notice "
                "the previous job's end and start the next, which running a round's array "
                "tasks side by side on the CPUs does not make up for."
                if overhead > 0
                else "The chain is no slower than its scripts run one after another: what "
                "Slurm spends noticing each job's end and starting the next (the single-task "
                "row above) is made up by running each round's array tasks side by side on "
                "the CPUs."
            ),
        ]
    else:
        lines.append(f"Not measured: {reason}.")
    lines += ["", f"Section wall time {wall:.0f} s."]
    return "\n".join(lines)
