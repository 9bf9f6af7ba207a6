"""``python -m bench`` (what ``make bench`` runs): answer the six questions of the benchmark
issue in one run and write ``bench/RESULTS.md``.

Sections, each a module of this package, each measuring its figures against a reference
taken in the same run:

1. :mod:`bench.hvp`: seconds of a Hessian-vector product against one gradient;
2. :mod:`bench.eigensolvers`: wall time and HVPs to 1% eigenvalue error, sketch against
   Lanczos, power iteration and skerch;
3. and 5. :mod:`bench.stages`: time per pipeline phase through the CLI, and peak memory of
   every stage against what it must hold (RESULTS.md orders the sections by question);
4. :mod:`bench.scaling`: the measurement stage on 1 and 2 Slurm array tasks of the local
   cluster, and the scheduling overhead of the whole sbatch chain;
6. GPU: the same tables with ``--device cuda`` on a machine with one;
7. :mod:`bench.kernel_paths`: one sketch's numbers across kernel paths, thread counts and
   block widths, against the tolerances of ``hessov.skerch_ext.tolerances``;
8. :mod:`bench.scale`: the out-of-core chain at D = 10^7 with a 2 GB budget per task;
9. :mod:`bench.paper_configs`: the paper's three cluster experiments, as ``hessov plan``
   prices them (no timing);
10. :mod:`bench.krylov_rounds`: the three goals of issue 15, block Krylov rounds against
    Lanczos (HVPs, sequential HVPs, errors, and every finite error bound checked);
11. :mod:`bench.estimates`: the trace, diagonal and density that reuse the sketch, against
    PyHessian and curvlinops at equal HVPs.
12. :mod:`bench.variants`: a layer's block, the GGN and the most negative eigenpairs against
    their exact values, PyHessian's power iteration and scipy's Lanczos.

Benchmarks are not tests: nothing here asserts a timing. A section that fails (e.g. no
Slurm on this machine) says so in RESULTS.md and the others still run. ``--quick`` runs
every section at its smallest size to check the scripts; its figures are not for reporting.
"""

from __future__ import annotations

import argparse
import importlib
import re
import time
import traceback
from pathlib import Path

from bench.common import RESULTS, WORK, Settings, load_average, log, machine_lines, now

#: Section modules of this package, in the order of the questions; each has ``section()``.
SECTIONS = (
    "hvp",
    "eigensolvers",
    "stages",
    "scaling",
    "kernel_paths",
    "scale",
    "paper_configs",
    "krylov_rounds",
    "estimates",
    "variants",
)


def gpu_section(settings: Settings) -> str:
    """Question 6: the tables on CUDA when this run had a GPU, else how to produce them."""
    import torch

    if settings.device.startswith("cuda"):
        return (
            "## 6. GPU\n\nThe products of sections 1 and 2 ran on "
            f"`{torch.cuda.get_device_name(0)}` in this run (`--device cuda`); every table "
            "above that names the device is a CUDA table."
        )
    found = "a GPU is visible" if torch.cuda.is_available() else "no GPU is visible"
    return (
        "## 6. GPU\n\n"
        f"Not measured: this run used `{settings.device}` and {found} to it; no GPU machine "
        "was lent to the session that wrote this file. On a machine with one, "
        "`.venv/bin/python -m bench --device cuda` repeats sections 1 and 2 with the "
        "products on CUDA (CUDA-synchronised timings) and writes the same tables, marked with "
        "the device in the header; `--only hvp,eigensolvers` limits it to those. Question 4's "
        "1..16-process scaling on such a machine's CPUs is "
        "`.venv/bin/python -m bench --only scaling --workers 1,2,4,8,16`.\n\n"
        "The scale issue's CUDA check, the paper's CIFAR-10 setting end to end (DeepOBS "
        "3c3d, D = 895,210, k = 1,000, 500 Hessian points, two rounds) on CIFAR-shaped "
        "synthetic inputs (the HVP cost is the same), to compare the phase table "
        "(`hessov summary RUN`, `solve.seconds_by_phase`) with the paper's 97 minutes, 24 of "
        "them HVPs:\n\n"
        "```bash\n"
        ".venv/bin/python -c 'from pathlib import Path; from bench.stages import "
        'write_synthetic_cifar; write_synthetic_cifar(Path("/tmp/cifar"), '
        '{"train": 200, "test": 500})\'\n'
        ".venv/bin/hessov run config/clusters/cifar10_3c3d_paper.yaml OBS_DATASETS=/tmp/cifar "
        "recovery=two_pass s=0 MAX_STEPS=0 RECORD_STEPS=[0] HESSIAN_SPLITS=[train]\n"
        "```\n\n"
        "The paper-configs issue's CUDA check, CIFAR-100 All-CNN-C as configured (single pass, "
        "k = 1,000, s = 2,000, 1,000 Hessian points) on synthetic CIFAR-100 files, one step "
        "and split, against the paper's 126 minutes:\n\n"
        "```bash\n"
        ".venv/bin/python -c 'from pathlib import Path; from bench.paper_configs import "
        'write_synthetic_cifar100; write_synthetic_cifar100(Path("/tmp/cifar"))\'\n'
        ".venv/bin/hessov run config/clusters/cifar100_allcnnc_paper.yaml "
        "OBS_DATASETS=/tmp/cifar MAX_STEPS=0 RECORD_STEPS=[0] HESSIAN_SPLITS=[train]\n"
        "```"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions per timing")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for sections 1 and 2")
    parser.add_argument("--quick", action="store_true", help="smallest sizes: check the scripts")
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of {', '.join(SECTIONS)}"
    )
    parser.add_argument(
        "--output",
        default=None,
        help="where to write (default bench/RESULTS.md; bench/_work/RESULTS.partial.md "
        "with --quick or --only)",
    )
    parser.add_argument(
        "--workers",
        default="1,2",
        help="measurement processes for the CPU scaling table (section 4)",
    )
    args = parser.parse_args()
    settings = Settings(reps=2 if args.quick else args.reps, device=args.device, quick=args.quick)
    settings.workers = tuple(int(w) for w in args.workers.split(","))
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(SECTIONS)
    partial = args.quick or bool(args.only)
    output = (
        Path(args.output) if args.output else (WORK / "RESULTS.partial.md" if partial else RESULTS)
    )
    started = time.perf_counter()
    load_start = load_average()
    bodies: list[str] = []
    for index, name in enumerate(chosen):
        log(f"section {name}")
        try:
            module = importlib.import_module(f"bench.{name}")
            bodies.append(module.section(settings))
        except Exception:  # a failed section must not lose the others' figures
            bodies.append(f"## {name}\n\nThis section failed:\n\n```\n{traceback.format_exc()}```")
        log(f"section {name} done after {time.perf_counter() - started:.0f} s")
        if index + 1 < len(chosen):  # what is measured so far survives an interrupted run
            write(output, settings, bodies, started, load_start, f"{index + 1} of {len(chosen)}")
    bodies.append(gpu_section(settings))
    write(output, settings, bodies, started, load_start)
    log(f"wrote {output} after {time.perf_counter() - started:.0f} s")


def write(output, settings: Settings, bodies, started, load_start, progress: str = "") -> None:
    """RESULTS.md: the header (machine, versions, the run) and the sections so far."""
    total = time.perf_counter() - started
    header = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`.venv/bin/python -m bench`) in one run: every figure below "
        "was measured in that run, and every ratio divides two figures measured in it (the "
        "median over repetitions, min-max in brackets), so the ratios hold on a machine "
        "whose absolute speed drifts. Goals and verdicts are the benchmark issue's.",
        "",
        *machine_lines(settings.device),
        f"- run: {now()}, {total / 60:.1f} minutes, {settings.reps} repetitions per timing"
        + (" (--quick: smoke sizes, not for reporting)" if settings.quick else "")
        + (f"; INCOMPLETE, {progress} sections so far" if progress else "")
        + f"; load average {load_start:.2f} at the start and {load_average():.2f} at the end "
        f"(a load above the core count means other processes shared the cores)",
        "",
    ]
    output.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(body for text in bodies for body in split_questions(text))
    output.write_text("\n".join(header) + "\n" + "\n\n".join(b for _, b in ordered) + "\n")


def split_questions(text: str) -> list[tuple[int, str]]:
    """A section's text cut at its ``## N.`` headings (one module may answer two questions),
    each with its question number; a failed section sorts last.
    """
    parts = re.split(r"\n(?=## \d+\.)", text)
    numbered = []
    for part in parts:
        match = re.match(r"## (\d+)\.", part)
        numbered.append((int(match.group(1)) if match else 99, part.strip()))
    return numbered


if __name__ == "__main__":
    main()
