"""Shared plumbing of the benchmarks: the trained run they measure, timing statistics,
markdown tables, and the sections of ``bench/RESULTS.md``.

Every benchmark measures on the same short mnist_mini run (1,000 SGD steps, parameters
recorded at step 1000), trained once through the real CLI into ``bench/_work`` and reused,
so that all numbers in RESULTS.md describe one Hessian. Timings are reported as the median
over repetitions with their min-max spread, as ratios to a reference measured in the same
run: the machine is shared and its absolute speed drifts, ratios drift much less.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
RESULTS = ROOT / "bench" / "RESULTS.md"
HESSOV = ROOT / ".venv" / "bin" / "hessov"
PYTHON = ROOT / ".venv" / "bin" / "python"

#: The run every benchmark measures, and the recorded step of its Hessian.
RUN_NAME = "mnist_mini_step1000"
STEP = 1000
TRAIN_ARGS = ["problem=mnist_mini", "MAX_STEPS=1000", f"RECORD_STEPS=[{STEP}]"]


def trained_run() -> Path:
    """The benchmark run directory, trained with ``hessov train`` if not there yet."""
    run = WORK / RUN_NAME
    if (run / "summary").is_dir() and (run / "params.h5").is_file():
        return run
    if run.exists():
        # A half-written run (a killed benchmark) would be refused by train; start over.
        raise SystemExit(f"{run} exists but holds no finished run: delete it and rerun")
    WORK.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(HESSOV), "train", *TRAIN_ARGS, f"RUN_DIR={run}"], check=True, cwd=ROOT)
    return run


def time_call(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (the median resists the other
    session's bursts better than the mean)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """``(median, min, max)``."""
    return statistics.median(values), min(values), max(values)


def fmt_spread(values: Sequence[float], digits: int = 2) -> str:
    """``median (min-max)`` of ``values``."""
    med, lo, hi = spread(values)
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def fmt_seconds(values: Sequence[float]) -> str:
    """Seconds as ``median (min-max)``, in ms below one second."""
    med, lo, hi = spread(values)
    if med < 1:
        return f"{1e3 * med:.1f} ms ({1e3 * lo:.1f}-{1e3 * hi:.1f})"
    return f"{med:.2f} s ({lo:.2f}-{hi:.2f})"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def load_average() -> str:
    """The 1-minute load average: how busy the shared machine was during a benchmark."""
    return f"{os.getloadavg()[0]:.2f}"


def machine_header() -> str:
    """The RESULTS.md header: machine, versions, date."""
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
            ("h5py", "h5py"),
        )
    )
    return (
        "# Benchmark results\n\n"
        "Written by the scripts in `bench/`: `.venv/bin/python -m bench.<script> --write` "
        "replaces that script's own section. Timings are the "
        "median over repetitions with their min-max spread, as ratios to a reference "
        "measured in the same run.\n\n"
        f"- machine: {cpu}, {os.cpu_count()} cores, {memory_kb / 2**20:.0f} GiB memory, "
        "no GPU; **shared**: another session ran the test suite on the same 2 cores at the "
        "same time, so absolute times are noisy and multi-threaded runs are penalised\n"
        f"- software: Python {platform.python_version()}, {versions}\n"
        f"- last updated: {datetime.date.today().isoformat()}\n"
    )


def write_section(name: str, body: str) -> None:
    """Replace (or append) section ``name`` of RESULTS.md; refresh the header.

    Sections are delimited by HTML comments so that each script owns exactly its part.
    """
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{body.strip()}\n{end}\n"
    text = RESULTS.read_text() if RESULTS.is_file() else ""
    # Header: everything before the first section marker, regenerated.
    first = text.find("<!-- begin ")
    sections = text[first:] if first >= 0 else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(sections):
        sections = pattern.sub(lambda _: block, sections)
    else:
        sections = (sections.rstrip() + "\n\n" if sections else "") + block
    RESULTS.write_text(machine_header() + "\n" + sections)


def run_context() -> str:
    """One line for a section: when it ran and how loaded the machine was."""
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"Ran {now}; load average at the end {load_average()} (2 cores, shared)."


def log(message: str) -> None:
    """Progress on stderr, so that stdout holds only the table."""
    print(message, file=sys.stderr, flush=True)
