"""Where the time of one sketched eigendecomposition goes, phase by phase, through the CLI.

What it measures, for mnist_mini at step 1000 on the train split with the defaults
(k = 355, float32, automatic block of 64), once for ``recovery=single_pass`` (s = 710
HVPs) and once for ``recovery=two_pass`` (355 + 355 HVPs):

* the seconds of each phase the solve stage records (``hessov summary RUN``,
  ``solve.<step>.train.seconds_by_phase``): layout, measurements (the HVP blocks as the
  workers timed them), merge, QR, core solve, a-posteriori;
* the wall time of every CLI call (``hessov layout``, ``hessov measure``, ``hessov solve``,
  and for two-pass the second-round ``measure round=second`` and the second ``solve``),
  since process start-up, imports and building the operator are overhead too;
* two references measured in the same run: the start-up of a Python process that imports
  the stages, and the pure batched products ``H @ M`` for the same number of columns in
  blocks of 64 in one process (what the measurements would cost with no test-matrix work).

The headline is the share of everything that is not HVPs, relative to the HVP seconds:
the paper's CIFAR-10 run spent 44% of its HVP time again on layout, merge, QR and least
squares; the goal is under 10%. Each repetition works on a fresh copy of the trained run
(a run directory holds one layout), and the two recoveries alternate so that both see the
same machine load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch

from bench.common import (
    HESSOV,
    PYTHON,
    ROOT,
    STEP,
    WORK,
    fmt_spread,
    log,
    markdown_table,
    run_context,
    time_call,
    trained_run,
    write_section,
)

RECOVERIES = ("single_pass", "two_pass")
PHASES = ("layout", "merge", "qr", "core_solve", "a_posteriori")
#: The paper's non-HVP phases: layout, merge, QR and least squares (the core solve).
PAPER_OVERHEAD = ("layout", "merge", "qr", "core_solve")


def cli_calls(run: Path, recovery: str) -> list[tuple[str, list[str]]]:
    """The CLI calls of one sketch, in order, as ``(label, arguments)``."""
    where = [str(run), f"step={STEP}", "split=train"]
    calls = [
        ("layout", ["layout", str(run), f"recovery={recovery}", "HESSIAN_SPLITS=[train]"]),
        ("measure", ["measure", *where]),
        ("solve", ["solve", *where]),
    ]
    if recovery == "two_pass":
        calls += [
            ("measure round=second", ["measure", *where, "round=second"]),
            ("solve (second)", ["solve", *where]),
        ]
    return calls


def timed_cli(args: list[str]) -> float:
    """Wall seconds of one ``hessov`` call; its output is shown only if it fails."""
    start = time.perf_counter()
    done = subprocess.run([str(HESSOV), *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"hessov {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds


def fresh_copy(source: Path, name: str) -> Path:
    """A copy of the trained run without its snapshots (not needed by the sketch stages)."""
    target = WORK / "phases" / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("snapshots"))
    return target


def one_sketch(source: Path, recovery: str, repetition: int) -> dict:
    """Run the CLI stages of one sketch; returns phase seconds, wall times and HVPs."""
    run = fresh_copy(source, f"{recovery}_{repetition}")
    walls = {label: timed_cli(args) for label, args in cli_calls(run, recovery)}
    summary = json.loads(
        subprocess.run(
            [str(HESSOV), "summary", str(run)], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    )
    solved = summary["solve"][str(STEP)]["train"]
    setup = 0.0
    for path in sorted((run / "logs").glob("measure_*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["event"] == "start":
                setup += record["setup_seconds"]
    return {
        "phases": solved["seconds_by_phase"],
        "walls": walls,
        "hvps": solved["hvps"],
        "measure_setup": setup,
    }


def startup_seconds() -> tuple[float, float]:
    """Wall seconds of a Python process that only imports the stages (the floor of every
    CLI call), and the seconds of importing ``torch._dynamo`` after that: torch.func's
    ``jvp`` imports it lazily, so the first HVP of every process pays for it."""
    code = (
        "import time, pipeline.cli, pipeline.stages.measure, pipeline.stages.solve\n"
        "start = time.perf_counter()\n"
        "import torch._dynamo\n"
        "print(time.perf_counter() - start)"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [str(PYTHON), "-c", code], cwd=ROOT, check=True, capture_output=True, text=True
    )
    total = time.perf_counter() - start
    dynamo = float(done.stdout.split()[-1])
    return total - dynamo, dynamo


def pure_products_seconds(source: Path, rounds: list[int], block: int = 64) -> float:
    """Seconds of ``H @ M`` for random columns, ``rounds[i]`` of them in blocks of ``block``
    per round, float32, one thread, in this process: the measurements minus test-matrix
    and storage work."""
    from pipeline.hessian import hessian_at_step, load_run_config
    from pipeline.rundir import RunDir

    run = RunDir(source)
    hessian = hessian_at_step(run, load_run_config(run), STEP, "train", check_deterministic=False)
    generator = torch.Generator().manual_seed(0)
    blocks = [
        torch.randn(hessian.dim, min(block, columns - start), generator=generator)
        for columns in rounds
        for start in range(0, columns, block)
    ]
    hessian.matmat(blocks[0])  # warm-up

    def all_blocks():
        for matrix in blocks:
            hessian.matmat(matrix)

    return time_call(all_blocks, 3)


def share(values: list[float], reference: list[float]) -> str:
    """``median (min-max)`` of ``values / reference`` in percent, repetition by repetition."""
    return fmt_spread([100 * v / r for v, r in zip(values, reference, strict=True)], digits=0) + "%"


def table(
    results: dict[str, list[dict]],
    startup: list[float],
    dynamo: list[float],
    pure: dict[str, list[float]],
):
    """The phase table and the headline numbers per recovery."""
    rows, headline = [], {}
    hvp = {rec: [r["phases"]["measurements"] for r in results[rec]] for rec in RECOVERIES}

    def row(label: str, values: dict[str, list[float]]):
        cells = [label]
        for rec in RECOVERIES:
            if rec in values:
                cells += [fmt_spread(values[rec], 3), share(values[rec], hvp[rec])]
            else:
                cells += ["", ""]
        rows.append(cells)

    row("HVPs (summary: measurements)", hvp)
    row("  of which pure `H @ M`, same columns, in-process", pure)
    for phase in PHASES:
        row(phase, {rec: [r["phases"][phase] for r in results[rec]] for rec in RECOVERIES})
    row(
        "measure: operator setup (worker log)",
        {rec: [r["measure_setup"] for r in results[rec]] for rec in RECOVERIES},
    )
    labels = dict.fromkeys(label for rec in RECOVERIES for label in results[rec][0]["walls"])
    for label in labels:
        row(
            f"CLI wall: `hessov {label}`",
            {
                rec: [r["walls"][label] for r in results[rec]]
                for rec in RECOVERIES
                if label in results[rec][0]["walls"]
            },
        )
    walls = {rec: [sum(r["walls"].values()) for r in results[rec]] for rec in RECOVERIES}
    row("CLI wall: all calls", walls)
    row("reference: process start-up + imports", {rec: startup for rec in RECOVERIES})
    row(
        "reference: `import torch._dynamo` (first HVP of a process)",
        {rec: dynamo for rec in RECOVERIES},
    )
    paper = {
        rec: [sum(r["phases"][p] for p in PAPER_OVERHEAD) for r in results[rec]]
        for rec in RECOVERIES
    }
    with_apost = {
        rec: [
            p + r["phases"]["a_posteriori"] for p, r in zip(paper[rec], results[rec], strict=True)
        ]
        for rec in RECOVERIES
    }
    outside = {
        rec: [w - h for w, h in zip(walls[rec], hvp[rec], strict=True)] for rec in RECOVERIES
    }
    row("**non-HVP, paper's phases** (layout+merge+QR+core)", paper)
    row("**non-HVP, with a-posteriori**", with_apost)
    row("**everything but HVPs** (all CLI wall - HVPs)", outside)
    for rec in RECOVERIES:
        headline[rec] = {
            name: statistics.median(100 * v / h for v, h in zip(values[rec], hvp[rec], strict=True))
            for name, values in (("paper", paper), ("apost", with_apost), ("outside", outside))
        }
        headline[rec]["hvps"] = results[rec][0]["hvps"]
        headline[rec]["calls"] = len(results[rec][0]["walls"])
    headers = ["phase"]
    for rec in RECOVERIES:
        headers += [f"{rec}: seconds", f"{rec}: % of HVP seconds"]
    return markdown_table(headers, rows), headline


def summary_text(
    results: dict[str, list[dict]],
    headline: dict,
    startup: list[float],
    dynamo: list[float],
    pure: dict[str, list[float]],
) -> str:
    sp, tp = headline["single_pass"], headline["two_pass"]
    met = [rec for rec in RECOVERIES if headline[rec]["paper"] < 10]
    pure_share = statistics.median(
        100 * p / r["phases"]["measurements"]
        for p, r in zip(pure["single_pass"], results["single_pass"], strict=True)
    )

    def med(rec: str, phase: str) -> float:
        return statistics.median(r["phases"][phase] for r in results[rec])

    return (
        "Seconds per phase of one sketch of the mnist_mini train Hessian at step 1000 with "
        f"the defaults (k=355; single pass {sp['hvps']} HVPs, two-pass {tp['hvps']}), "
        "from `hessov summary` and the wall time of each CLI call, median (min-max) over "
        "repetitions, each also as a percentage of that repetition's HVP seconds. The "
        "paper's CIFAR-10 run spent 44% of its HVP time again on layout, merge, QR and "
        f"least squares; here those phases take {sp['paper']:.0f}% (single pass) and "
        f"{tp['paper']:.0f}% (two-pass) of the HVP seconds "
        f"({sp['apost']:.0f}% and {tp['apost']:.0f}% with the a-posteriori check).\n\n"
        "Goal 2 (non-HVP share under 10%): "
        + (f"met for {' and '.join(met)} within the stages. " if met else "NOT met. ")
        + "At D=7,030 a whole sketch is about a second of HVPs, so dense work on the "
        "D x 355 basis weighs as much as the products: in the single pass the core solve "
        f"({med('single_pass', 'core_solve'):.2f} s) is mostly the two SSRFT transforms "
        f"Psi Q and Omega^T Q, plus QR ({med('single_pass', 'qr'):.2f} s); in the two-pass "
        f"QR takes {med('two_pass', 'qr'):.2f} s (it runs in the first `hessov solve` "
        "before the stage sets the thread count, so on 2 threads of a busy 2-core machine) "
        f"and the block-Krylov extension {med('two_pass', 'core_solve'):.2f} s. The "
        f"a-posteriori phase ({med('single_pass', 'a_posteriori'):.1f} s for 30 HVPs) is "
        "mostly the first HVP of the solve process importing `torch._dynamo` "
        f"({statistics.median(dynamo):.1f} s). The HVP seconds themselves include "
        "generating Omega's columns and applying Psi: the same products alone take "
        f"{pure_share:.0f}% of them (single pass). Counting everything the CLI does, all "
        f"calls together spend {sp['outside']:.0f}% (single pass, {sp['calls']} calls) and "
        f"{tp['outside']:.0f}% (two-pass, {tp['calls']} calls) of the HVP seconds on "
        "something else: process start-up and imports "
        f"({statistics.median(startup):.1f} s per call), loading the data and building "
        "the operator in every process. These costs are fixed per process and per D x k "
        "matrix; the HVPs grow with the data and the network, so the share falls at scale."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions per recovery")
    parser.add_argument("--write", action="store_true", help="replace the RESULTS.md section")
    args = parser.parse_args()
    source = trained_run()
    started = time.perf_counter()
    torch.set_num_threads(1)  # the mnist_mini config's setting, as the CLI calls use it
    results: dict[str, list[dict]] = {rec: [] for rec in RECOVERIES}
    startup, dynamo, pure = [], [], {rec: [] for rec in RECOVERIES}
    for rep in range(args.reps):
        # Alternate the order so that neither recovery always runs first after a pause.
        for rec in RECOVERIES if rep % 2 == 0 else RECOVERIES[::-1]:
            results[rec].append(one_sketch(source, rec, rep))
            log(f"rep {rep + 1}/{args.reps} {rec}: {results[rec][-1]['phases']}")
        process, first_hvp = startup_seconds()
        startup.append(process)
        dynamo.append(first_hvp)
        for rec in RECOVERIES:
            hvps = results[rec][-1]["hvps"]
            rounds = [hvps] if rec == "single_pass" else [hvps // 2, hvps // 2]
            pure[rec].append(pure_products_seconds(source, rounds))
    text, headline = table(results, startup, dynamo, pure)
    body = "\n".join(
        [
            "## 2. Time per phase through the CLI (`bench/phases.py`)",
            "",
            summary_text(results, headline, startup, dynamo, pure),
            "",
            text,
            "",
            f"{args.reps} repetitions per recovery, float32, 1 thread (the mnist_mini config); "
            f"{run_context()} Script wall time {time.perf_counter() - started:.0f} s.",
        ]
    )
    print(body)
    if args.write:
        write_section("phases", body)


if __name__ == "__main__":
    main()
