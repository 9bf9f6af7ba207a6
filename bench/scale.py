"""Question 8: the out-of-core chain at D = 10^7 with a 2 GB budget per task.

The operator is :mod:`bench.scale_operator`'s plug-in problem, a loss whose Hessian is
exactly ``U diag(lam) U^T`` with a known spectrum (a few hundred large eigenvalues and a
decaying, indefinite tail) in a random orthogonal basis applied by structured transforms, so
that HVPs cost ``O(D)`` and the recovered top-k can be checked against the truth.

What runs, each stage a ``hessov`` child process on one run directory, with the run's
config saying ``memory_gb=2`` (so the layout chooses row blocks, and ``hessov plan`` prices
and would refuse every job against 2 GiB): train (step 0 only: the Hessian does not depend
on the parameters), layout, the first round on ``WORKERS`` array tasks at once, the basis
(TSQR over row blocks), the second round on ``WORKERS`` tasks, the a-posteriori round, and
the solve in row blocks (block-Krylov Rayleigh-Ritz and the a-posteriori check). The basis
and solve run as the plan's jobs, one per row-block phase, the array tasks of a per-block
phase at once, as Slurm would run them.

Reported: each task's peak RSS (``ru_maxrss``) against the budget and against the plan's
estimate; the top-k's relative eigenvalue errors against the known spectrum; wall time per
phase; the row-block passes' throughput against this machine's sequential disk bandwidth
measured in the same run; and what the in-memory solve would need at the same D and k.
"""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np

from bench.common import (
    HESSOV,
    ROOT,
    WORK,
    Settings,
    fmt_bytes,
    log,
    markdown_table,
    run_cli,
    run_parallel,
)
from hessov.rundir import RunDir

PLUGIN = ROOT / "bench" / "scale_operator.py"
DIM, K, BUDGET_GB, WORKERS = 10_000_000, 256, 2, 2
#: Large eigenvalues of the spectrum, at most half of k (128 at k = 256): the sketch
#: oversamples them twice, and the tail below them is what a sketch does not resolve.
NUM_LARGE = 200
#: --quick: a budget below the in-memory solve's 0.9 GiB (and above the analysis's 0.75),
#: so that the smoke run takes the row-block phases too.
QUICK_DIM, QUICK_K, QUICK_BUDGET_GB = 1 << 18, 64, 0.8


def _measure(run, round_name: str, tasks: int) -> list:
    where = [str(run), "step=0", "split=train", f"round={round_name}"]
    return run_parallel([[HESSOV, "measure", *where, f"task={task}"] for task in range(tasks)])


def run_chain(run, dim: int, k: int, budget_gb: float) -> dict:
    """Every stage of the chain as child processes; their ChildRuns by phase."""
    factory = f"problem_{dim}_{min(NUM_LARGE, k // 2)}"
    settings = [
        f"problem={PLUGIN}:{factory}",
        "MAX_STEPS=0",
        "RECORD_STEPS=[0]",
        "HESSIAN_SPLITS=[train]",
        "NUM_HESSIAN_DATAPOINTS=8",
        # Gaussian test matrices: an SSRFT column costs seconds at this D (test_matrix_rows).
        "noise=gaussian",
        f"k={k}",
        "block_size=1",
        f"MEAS_PER_JOB={k // WORKERS}",
        f"memory_gb={budget_gb}",
        f"RUN_DIR={run}",
    ]
    calls = {"train": [run_cli(["train", *settings])]}
    calls["plan"] = [run_cli(["plan", str(run), "--json"])]
    jobs = json.loads(calls["plan"][0].stdout)["jobs"]
    calls["layout"] = [run_cli(["layout", str(run)])]
    log(f"scale: D={dim}, k={k}: first round on {WORKERS} tasks")
    calls["measure first"] = _measure(run, "first", WORKERS)
    log("scale: basis")
    calls |= _row_phases(jobs, "basis")
    log("scale: second round")
    calls["measure second"] = _measure(run, "second", WORKERS)
    calls["measure apost"] = _measure(run, "apost", 1)
    log("scale: solve")
    calls |= _row_phases(jobs, "solve")
    return calls


def _row_phases(jobs: list[dict], stage: str) -> dict:
    """The plan's jobs of ``stage``, one per row-block phase, as Slurm would run them: the
    array tasks of a per-block phase at once; their ChildRuns by phase.
    """
    calls = {}
    for job in jobs:
        if job["stage"] == stage:
            name = job["name"].split(" step=")[0]
            if job["tasks"] is None:
                calls[name] = [run_cli(job["argv"])]
            else:
                tasks = [[HESSOV, *job["argv"], f"task={task}"] for task in job["tasks"]]
                calls[name] = run_parallel(tasks)
    return calls


def test_matrix_rows(dim: int) -> list[list[str]]:
    """Seconds to draw one test-matrix column of each kind at ``dim``, in this process."""
    import time

    import torch

    from hessov.skerch_ext.random_matrices import RandomMatrix
    from hessov.skerch_ext.seeds import SeedRange

    rows = []
    for noise in ("ssrft", "gaussian"):
        matrix = RandomMatrix(dim, 2, SeedRange("omega", 1, 8), noise=noise)
        started = time.perf_counter()
        matrix.columns([1], dtype=torch.float32, device="cpu")
        rows.append([noise, f"{time.perf_counter() - started:.2f} s"])
    return rows


def estimates(plan: dict) -> dict[str, int]:
    """The plan's memory per task, by the phase names of :func:`run_chain`."""
    found = {}
    for job in plan["jobs"]:
        name = job["name"].split(" step=")[0]
        found[name] = max(found.get(name, 0), job["memory_bytes"])
    return found


def accuracy(run, dim: int, k: int) -> tuple[list[list[str]], float]:
    """Relative errors of the top eigenvalues against the known spectrum."""
    from bench.scale_operator import top_eigenvalues

    with h5py.File(RunDir(run).eigen(0, "train")) as handle:
        values = handle["eigenvalues"][:].astype(np.float64)
        apost = float(handle.attrs["apost_rel_err"])
    exact = np.asarray(top_eigenvalues(dim, k, min(NUM_LARGE, k // 2)), dtype=np.float64)
    rows = []
    for top in sorted({top for top in (1, 10, 50, 100, 200) if top < k} | {k}):
        error = np.abs(values[:top] - exact[:top]) / np.abs(exact[:top])
        rows.append([f"top {top}", f"{error.max():.1e}", f"{np.median(error):.1e}"])
    return rows, apost


#: ``D x k`` matrices each row-block pass reads and writes (from the algorithm; the
#: a-posteriori probes, ``D x 30``, left out): a TSQR ``local`` reads its input (and ``Q``)
#: and writes its local factor, ``apply`` reads it (and ``Q`` or ``H Q`` for a product) and
#: writes the result; each ``finish`` copies ``Q`` or ``W`` into the basis or eigen file.
MATRICES_MOVED = {
    "basis local": 2,
    "basis apply": 2,
    "basis finish": 2,
    "solve project": 2,
    "solve extend_local": 3,
    "solve extend_apply": 3,
    "solve reorth_local": 3,
    "solve reorth_apply": 3,
    "solve eigenvectors": 3,
    "solve apost_residuals": 2,
    "solve finish": 2,
}


def throughput_rows(calls: dict, dim: int, k: int, disk: dict) -> list[list[str]]:
    """Bytes the row-block passes move per second of their wall time, against the disk."""
    matrix = dim * k * 4
    rows = []
    for label, count in MATRICES_MOVED.items():
        if label not in calls:  # the plan kept the basis and solve in memory (--quick)
            continue
        moved = count * matrix
        seconds = max(child.seconds for child in calls[label])
        rate = moved / seconds
        rows.append(
            [
                f"`{label}`",
                fmt_bytes(moved),
                f"{seconds:.0f} s",
                f"{rate / 1e9:.2f} GB/s",
                f"{rate / disk['read_bytes_per_s']:.2f}",
                f"{rate / disk['write_bytes_per_s']:.2f}",
            ]
        )
    return rows


#: The paper's ImageNet setting (ResNet-18): its solve ran on 400 GB nodes, 90 minutes of QR
#: and 610 of least squares.
PAPER_DIM, PAPER_K, PAPER_SOLVE_MINUTES = 11_689_512, 1500, 90 + 610
#: The extrapolation's cluster: a budget per task, cores per task and MEAS_PER_JOB (30 array
#: tasks per round of k = 1,500, so 30 tasks per row-block phase).
CLUSTER_GB, TASK_CORES, CLUSTER_MEAS_PER_JOB = 8, 8, 50


def paper_spec():
    """The sketch settings hessov's plan gives the paper's ImageNet setting on that cluster."""
    from hessov.config import load_run_config
    from hessov.sketchspec import resolve_spec

    overrides = [f"k={PAPER_K}", f"MEAS_PER_JOB={CLUSTER_MEAS_PER_JOB}", f"memory_gb={CLUSTER_GB}"]
    # The problem only names the run: the sketch settings depend on D and these keys alone.
    cfg = load_run_config([*overrides, "noise=gaussian", "block_size=2", "problem=mnist_mini"])
    return resolve_spec(cfg, PAPER_DIM, [0])


def extrapolation_rows(calls: dict, measured, cores: int) -> tuple[list[list[str]], float]:
    """The basis and solve phases at the paper's ImageNet setting, from this run's walls.

    A phase's wall here is a process's start (the quickest combined phase's wall, a sum of
    ``k x k`` pieces) plus its work, whose core-seconds (work x this machine's cores) scale
    with its arithmetic: ``D k^2`` for a per-block phase (its QRs and products; the passes
    here were bound by arithmetic, not the disk), ``(D / row_block) k^3`` for a TSQR tree,
    ``k^3`` for the Ritz problem, ``(D / row_block) k^2`` for a sum over the blocks, ``D k``
    for the copy of a ``finish``; then they are spread over the phase's tasks of
    ``TASK_CORES`` cores. Returns the rows and the total wall in minutes.
    """
    from hessov.costs import format_bytes, row_phase_bytes
    from hessov.rowpass import program_phases

    spec = paper_spec()
    d_ratio = spec.layout.dim / measured.layout.dim
    k_ratio = spec.layout.num_outer / measured.layout.num_outer
    blocks_ratio = len(spec.row_ranges) / len(measured.row_ranges)
    walls = {label: max(child.seconds for child in children) for label, children in calls.items()}
    start = min(walls[label] for label in ("solve project_sum", "solve overlap_sum"))
    rows, total = [], 0.0
    for stage in ("basis", "solve"):
        for phase in program_phases(stage, spec.recovery):
            label, tasks = f"{stage} {phase}", spec.row_tasks if phase.per_block else 1
            if phase.per_block:
                scale = d_ratio * k_ratio**2
            elif phase.name == "finish":  # a copy
                scale = d_ratio * k_ratio
            elif phase.name.endswith("tree"):
                scale = blocks_ratio * k_ratio**3
            elif phase.name == "ritz":
                scale = k_ratio**3
            else:
                scale = blocks_ratio * k_ratio**2
            work = max(0.0, walls[label] - start) * cores * scale / (tasks * TASK_CORES)
            total += start + work
            memory = format_bytes(row_phase_bytes(spec, phase))
            rows.append([f"`{label}`", str(tasks), memory, f"{(start + work) / 60:.1f} min"])
    return rows, total / 60


def section(settings: Settings) -> str:
    """Question 8's table (see the module docstring)."""
    from bench.scale_operator import disk_bandwidth
    from hessov.costs import GIB, in_memory_solve_bytes, machine_memory_bytes
    from hessov.sketchspec import load_spec

    dim, k = (QUICK_DIM, QUICK_K) if settings.quick else (DIM, K)
    run = WORK / "scale" / "run"
    shutil.rmtree(run.parent, ignore_errors=True)
    run.parent.mkdir(parents=True)
    disk = disk_bandwidth(run.parent, 2 * GIB if not settings.quick else 64 * 2**20)
    budget_gb = QUICK_BUDGET_GB if settings.quick else BUDGET_GB
    calls = run_chain(run, dim, k, budget_gb)
    plan = json.loads(calls["plan"][0].stdout)
    planned = estimates(plan)
    spec = load_spec(RunDir(run))
    budget = int(budget_gb * GIB)
    rows = []
    for phase, children in calls.items():
        if phase == "plan":
            continue
        peak = max(child.peak_rss_bytes for child in children)
        estimate = planned.get(phase, 0)
        rows.append(
            [
                f"`hessov {phase}`"
                + (f" ({len(children)} tasks at once)" if len(children) > 1 else ""),
                f"{max(child.seconds for child in children):.0f} s",
                fmt_bytes(peak),
                "yes" if peak <= budget else "**no**",
                fmt_bytes(estimate) if estimate else "-",
                f"{peak / estimate:.2f}" if estimate else "-",
            ]
        )
    errors, apost = accuracy(run, dim, k)
    columns = test_matrix_rows(dim)
    in_memory = in_memory_solve_bytes(spec)
    machine = machine_memory_bytes()
    extrapolated = extrapolation_paragraphs(calls, spec)
    largest = max(max(child.peak_rss_bytes for child in children) for children in calls.values())
    verdict = "every task within" if largest <= budget else "NOT every task within"
    return "\n\n".join(
        [
            f"## 8. Scale: D = {dim:,}, k = {k}, a {budget_gb} GB budget per task",
            f"The chain of `bench/scale.py` on `{PLUGIN.name}` (a loss whose Hessian is "
            f"`U diag(lam) U^T` with a known spectrum), in float32 with `memory_gb={budget_gb}`: "
            f"the layout chose row blocks of {spec.row_block:,} rows, {WORKERS} measure tasks "
            f"ran at once per sketch round, blocks of 1 column. Every task's peak RSS against "
            f"the budget and against the plan's estimate (`hessov plan --json`, "
            f"`memory_bytes`): **{verdict} {budget_gb} GiB** (largest {fmt_bytes(largest)}).",
            markdown_table(
                [
                    "phase",
                    "wall",
                    "peak RSS",
                    f"within {budget_gb} GiB",
                    "plan's estimate",
                    "RSS / estimate",
                ],
                rows,
            ),
            "Accuracy of the top-k against the known spectrum (relative eigenvalue error); "
            f"the solve's a-posteriori relative Frobenius error estimate: {apost:.3g}. The "
            f"spectrum has {min(NUM_LARGE, k // 2)} large eigenvalues; below them the tail "
            "(a fifth of the smallest large one and less, of both signs) is what a sketch of "
            "this k does not resolve, so the errors past them are of the order of 1.",
            markdown_table(["eigenvalues", "largest error", "median error"], errors),
            "The row-block passes' throughput: bytes the passes read and write (counted from "
            "the algorithm) per second of the phase, against this machine's sequential disk "
            f"bandwidth measured in the same run ({disk['write_bytes_per_s'] / 1e9:.2f} GB/s "
            f"write with fsync, {disk['read_bytes_per_s'] / 1e9:.2f} GB/s read after "
            "dropping the file from the page cache). A pass that moves data faster than the disk "
            "reads it is served by the page cache; one far slower is bound by its arithmetic "
            "(the QRs and products of each block).",
            markdown_table(
                ["phase", "bytes moved", "wall", "rate", "rate / disk read", "rate / disk write"],
                throughput_rows(calls, dim, k, disk),
            ),
            "One test-matrix column at this D, drawn in this process (the measure tasks draw "
            "one per HVP column; the HVP itself costs the `measure` rows' wall time / "
            f"{k // WORKERS} columns per task): the SSRFT is skerch's, an FFT-based transform "
            "of a one-hot vector per column, so at D = 10^7 it costs several HVPs of this "
            "operator; this chain uses Gaussian test matrices.",
            markdown_table(["test matrix", "one column"], columns),
            f"The in-memory solve at the same D and k: {fmt_bytes(in_memory)} by the plan's model, "
            f"{in_memory / machine:.1f}x this machine's {fmt_bytes(machine)} and "
            f"{in_memory / budget:.0f}x the budget: "
            + (
                "it cannot run here."
                if in_memory > machine
                else "it fits the budget, and the layout kept the solve in memory."
                if in_memory <= budget
                else "it would fit this machine, not the budget."
            ),
            *extrapolated,
        ]
    )


def extrapolation_paragraphs(calls: dict, measured) -> list[str]:
    """The paper's ImageNet setting priced by the plan's model and timed from this run."""
    import os

    from hessov.costs import GIB, in_memory_solve_bytes

    spec = paper_spec()
    rows, minutes = extrapolation_rows(calls, measured, os.cpu_count() or 1)
    matrix = spec.layout.dim * spec.layout.num_outer * 4
    probes = spec.layout.dim * spec.num_apost * 4
    return [
        f"Extrapolated to the paper's ImageNet setting (ResNet-18, D = {PAPER_DIM:,}, "
        f"k = {PAPER_K:,}, two-pass: {2 * PAPER_K:,} HVPs, as many as the paper's s = 3,000), "
        f"on a cluster of {CLUSTER_GB} GB, {TASK_CORES}-core tasks with "
        f"`MEAS_PER_JOB={CLUSTER_MEAS_PER_JOB}`: the plan's model chooses row blocks of "
        f"{spec.row_block:,} rows ({len(spec.row_ranges)} blocks), and every per-block phase "
        f"is an array of {spec.row_tasks} tasks. Disk per step and split: "
        f"{fmt_bytes(2 * matrix + probes)} of measurements, {fmt_bytes(matrix)} for `Q`, "
        f"{fmt_bytes(2 * matrix)} at the solve's end (the eigen file and `W`'s blocks). The "
        f"in-memory solve would hold {in_memory_solve_bytes(spec) / GIB:.0f} GiB, beyond the "
        f"paper's 400 GB nodes. Time per phase: this run's wall per phase, a process's start "
        f"plus core-seconds of work scaled by the phase's arithmetic (`D k^2` per block, "
        f"`(D / row_block) k^3` for a TSQR tree, `k^3` for the Ritz problem, `D k` for the "
        f"copy of `finish`) and spread over the phase's tasks (`extrapolation_rows` in "
        f"bench/scale.py); a model, not a measurement. In all **{minutes:.0f} minutes** of "
        f"basis and solve on {spec.row_tasks} tasks of {TASK_CORES} cores, against the paper's "
        f"{PAPER_SOLVE_MINUTES} minutes of QR and least squares on one 400 GB node.",
        markdown_table(["phase", "tasks", "memory per task", "wall (extrapolated)"], rows),
    ]
