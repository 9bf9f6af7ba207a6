"""Shared plumbing of the benchmarks: the trained run they measure, timing statistics,
child processes with their peak memory, markdown tables, and the RESULTS.md header.

Every mnist_mini figure is taken on the same short run (1,000 SGD steps, parameters
recorded at step 1000), trained once through the real CLI into ``bench/_work`` and reused,
so that all numbers in RESULTS.md describe one Hessian. Timings are reported as the median
over repetitions with their min-max spread, and as ratios to a reference measured in the
same run (interleaved with the measurement where it can be): a shared machine's absolute
speed drifts, ratios drift much less.
"""

from __future__ import annotations

import datetime
import functools
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
RESULTS = ROOT / "bench" / "RESULTS.md"
HESSOV = ROOT / ".venv" / "bin" / "hessov"
PYTHON = ROOT / ".venv" / "bin" / "python"

#: The run every mnist_mini benchmark measures, and the recorded step of its Hessian.
RUN_NAME = "mnist_mini_step1000"
STEP = 1000
TRAIN_ARGS = ["problem=mnist_mini", "MAX_STEPS=1000", f"RECORD_STEPS=[{STEP}]"]


@dataclass
class Settings:
    """What every section of one ``python -m bench`` run shares.

    Attributes:
        reps: repetitions of each timed measurement (the median is reported).
        device: where the in-process products run (``cpu`` or ``cuda``).
        quick: a smoke run (fewer sizes and repetitions) to check the scripts, not to report.
        workers: measurement processes of the CPU scaling table (question 4).
    """

    reps: int = 5
    device: str = "cpu"
    quick: bool = False
    workers: tuple[int, ...] = (1, 2)


@functools.cache
def test_oracles() -> ModuleType:
    """``tests/oracles.py``: the reference operators the tests check hessov's against
    (curvlinops' Hessian), which the benchmarks time as well. ``tests/`` is not a package
    (pytest puts it on ``sys.path``), so the module is loaded from its file.
    """
    spec = importlib.util.spec_from_file_location("oracles", ROOT / "tests" / "oracles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trained_run() -> Path:
    """The benchmark run directory, trained with ``hessov train`` if not there yet."""
    run = WORK / RUN_NAME
    if (run / "summary").is_dir() and (run / "params.h5").is_file():
        return run
    if run.exists():
        # A half-written run (a killed benchmark) would be refused by train; start over.
        raise SystemExit(f"{run} exists but holds no finished run: delete it and rerun")
    WORK.mkdir(parents=True, exist_ok=True)
    run_cli(["train", *TRAIN_ARGS, f"RUN_DIR={run}"])
    return run


@dataclass
class ChildRun:
    """A finished child process: wall seconds, peak resident memory, output."""

    seconds: float
    peak_rss_bytes: int
    stdout: str
    stderr: str


#: Runs its arguments as a child and reports that child's peak resident memory. The
#: benchmark process itself grows to gigabytes, and Linux keeps a forked child's peak RSS
#: across ``exec`` (the fork briefly maps the parent's pages), so children must be started
#: by a small process for ``ru_maxrss`` to be theirs alone.
PEAK_RSS_WRAPPER = """
import os, sys
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\n{PEAK_MARKER} {usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""
PEAK_MARKER = "BENCH_PEAK_RSS_KIB"


def wrapped(args: Sequence[object]) -> list[str]:
    """``args`` as started through :data:`PEAK_RSS_WRAPPER`."""
    code = PEAK_RSS_WRAPPER.replace("{PEAK_MARKER}", PEAK_MARKER)
    return [str(PYTHON), "-c", code, *(str(a) for a in args)]


def finished(args, status: int, seconds: float, out, err, check: bool) -> ChildRun:
    """The :class:`ChildRun` of a reaped wrapper: its outputs, its child's peak RSS."""
    out.seek(0)
    err.seek(0)
    stdout = out.read()
    stderr, _, peak = err.read().rstrip().rpartition(f"\n{PEAK_MARKER} ")
    code = os.waitstatus_to_exitcode(status)
    if check and code:
        command = " ".join(str(a) for a in args)
        raise RuntimeError(f"{command} exited {code}:\n{stderr[-3000:]}")
    return ChildRun(seconds, int(peak) * 1024 if peak.isdigit() else 0, stdout, stderr)


def run_child(args: Sequence[object], env: dict | None = None, check: bool = True) -> ChildRun:
    """Run ``args`` in the repository root; its wall time and its own peak RSS (through
    :data:`PEAK_RSS_WRAPPER`, whose Python start-up adds a few tens of milliseconds).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(wrapped(args), cwd=ROOT, env=env, stdout=out, stderr=err)
        _, status, _ = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        return finished(args, status, seconds, out, err, check)


def run_cli(args: Sequence[str], env: dict | None = None) -> ChildRun:
    """One ``hessov`` call as a child process (see :func:`run_child`)."""
    return run_child([HESSOV, *args], env=env)


def median_seconds(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    """Median seconds of ``calls`` calls of ``fn`` after one untimed warm-up call."""
    fn()
    sync()
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def device_sync(device: str) -> Callable[[], None]:
    """A function that waits for the device (CUDA runs asynchronously); a no-op on CPU."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """``(median, min, max)``."""
    return statistics.median(values), min(values), max(values)


def fmt_spread(values: Sequence[float], digits: int = 2, unit: str = "") -> str:
    """``median (min-max)`` of ``values``; just the value when there is one."""
    med, lo, hi = spread(values)
    if len(values) == 1:
        return f"{med:.{digits}f}{unit}"
    return f"{med:.{digits}f}{unit} ({lo:.{digits}f}-{hi:.{digits}f})"


def fmt_seconds(values: Sequence[float]) -> str:
    """Seconds as ``median (min-max)``, in ms below one second."""
    med, lo, hi = spread(values)
    if med < 1:
        if len(values) == 1:
            return f"{1e3 * med:.1f} ms"
        return f"{1e3 * med:.1f} ms ({1e3 * lo:.1f}-{1e3 * hi:.1f})"
    if len(values) == 1:
        return f"{med:.2f} s"
    return f"{med:.2f} s ({lo:.2f}-{hi:.2f})"


def fmt_bytes(count: float) -> str:
    """Bytes in MiB or GiB."""
    if count >= 2**30:
        return f"{count / 2**30:.2f} GiB"
    return f"{count / 2**20:.0f} MiB"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def met(condition: bool) -> str:
    """The goal verdict as RESULTS.md writes it."""
    return "**met**" if condition else "**NOT met**"


def load_average() -> float:
    """The 1-minute load average: how busy the machine was."""
    return os.getloadavg()[0]


def machine_lines(device: str) -> list[str]:
    """Machine and versions, one markdown bullet each."""
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            memory_kb = int(line.split()[1])
    versions = ", ".join(
        f"{name} {metadata.version(dist)}"
        for name, dist in (
            ("torch", "torch"),
            ("curvlinops", "curvlinops-for-pytorch"),
            ("skerch", "skerch"),
            ("scipy", "scipy"),
            ("h5py", "h5py"),
            ("numpy", "numpy"),
        )
    )
    import torch

    gpu = (
        f"GPU: {torch.cuda.get_device_name(0)}"
        if torch.cuda.is_available()
        else "no GPU on this machine"
    )
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, {memory_kb / 2**20:.0f} GiB memory; {gpu}; "
        f"products in this run on `{device}`",
        f"- software: Python {platform.python_version()}, {versions}, "
        f"torch threads by default {torch.get_num_threads()}",
    ]


def now() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M")


def log(message: str) -> None:
    """Progress on stderr, so that stdout stays clean."""
    print(f"[bench {datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def run_parallel(commands: Sequence[Sequence[object]], env: dict | None = None) -> list[ChildRun]:
    """Start every command at once and wait for all; each child's own wall time and peak
    RSS (see :func:`run_child`).
    """
    pending = {}
    for args in commands:
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        start = time.perf_counter()
        process = subprocess.Popen(wrapped(args), cwd=ROOT, env=env, stdout=out, stderr=err)
        pending[process.pid] = (process, out, err, start, args)
    order = list(pending)
    results: dict[int, ChildRun] = {}
    while pending:
        # Whichever child ends first (the bench starts no other children meanwhile).
        pid, status, _ = os.wait4(-1, 0)
        if pid not in pending:
            continue
        process, out, err, start, args = pending.pop(pid)
        process.returncode = os.waitstatus_to_exitcode(status)
        with out, err:
            results[pid] = finished(args, status, time.perf_counter() - start, out, err, True)
    return [results[pid] for pid in order]
