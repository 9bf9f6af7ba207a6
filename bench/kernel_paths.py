"""Question 7: how far one sketch's numbers move across kernel paths, thread counts, block
widths and Hessian batch chunks, against the tolerances of :mod:`hessov.skerch_ext.tolerances`.

The demo's sketch (mnist_mini at step 1000, train Hessian, two-pass, k = 355, three array
tasks per round) is measured again with every array task, or each task, on another setting:
a rerun, ``threads=2``, ``block_size=16``, ``HESSIAN_BATCH_SIZE=100``,
``ATEN_CPU_CAPABILITY=default``, ``MKL_CBWR=COMPATIBLE``, and the three tasks of each round
on three different kernel paths (a heterogeneous cluster). Each is compared with the
reference: bitwise or not, the largest eigenvalue difference over the resolved top against
``2 g(D) ||H||``, over all k against the sketch's own error, and the largest principal-angle
sine of the gapped top-m spaces (m <= 10) against its Davis-Kahan bound. In float32 and in
float64.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import torch

from bench.common import STEP, WORK, Settings, log, markdown_table, run_cli, trained_run
from hessov.skerch_ext.tolerances import Agreement, compare_eigenpairs

ATEN_DEFAULT = {"ATEN_CPU_CAPABILITY": "default"}
MKL_COMPATIBLE = {"MKL_CBWR": "COMPATIBLE"}
#: 355 measurements in blocks of 64 (16 for the block variant), 128 per task: three tasks.
LAYOUT = ["HESSIAN_SPLITS=[train]", f"HESSIAN_STEPS=[{STEP}]", "MEAS_PER_JOB=128"]
WHERE = [f"step={STEP}", "split=train"]
EIGEN = f"eigen/step_{STEP}_train.h5"


@dataclass
class Variant:
    """One way of computing the same sketch: task environments and extra arguments."""

    name: str
    task_env: tuple[dict, dict, dict] = ({}, {}, {})
    stage_args: list[str] = field(default_factory=list)  # measure and solve
    layout_args: list[str] = field(default_factory=list)


VARIANTS = (
    Variant("rerun, same settings"),
    Variant("threads=2 (all tasks and the solve)", stage_args=["threads=2"]),
    Variant("block_size=16 (other GEMM widths)", layout_args=["block_size=16"]),
    Variant("HESSIAN_BATCH_SIZE=100 (5 chunks)", stage_args=["HESSIAN_BATCH_SIZE=100"]),
    Variant("ATEN_CPU_CAPABILITY=default (all tasks)", task_env=(ATEN_DEFAULT,) * 3),
    Variant("MKL_CBWR=COMPATIBLE (all tasks)", task_env=(MKL_COMPATIBLE,) * 3),
    Variant(
        "mixed: one task per kernel path (default, ATen default, MKL compatible)",
        task_env=({}, ATEN_DEFAULT, MKL_COMPATIBLE),
    ),
)


def sketch(source: Path, name: str, dtype: str, variant: Variant) -> Path:
    """Lay out, measure (task by task, each with its environment) and solve one copy."""
    run = WORK / "kernel_paths" / name
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("snapshots"))
    run_cli(["layout", str(run), *LAYOUT, f"dtype={dtype}", *variant.layout_args])
    for round_name in ("first", "second"):
        if round_name == "second":
            run_cli(["basis", str(run), *WHERE, *variant.stage_args])
        for task, env in enumerate(variant.task_env):
            args = ["measure", str(run), *WHERE, f"round={round_name}", f"task={task}"]
            run_cli([*args, *variant.stage_args], env={**os.environ, **env})
    run_cli(["measure", str(run), *WHERE, "round=apost", *variant.stage_args])
    run_cli(["solve", str(run), *WHERE, *variant.stage_args])
    return run


def _read(run: Path) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    with h5py.File(run / EIGEN) as handle:
        pairs = (
            torch.from_numpy(handle["eigenvalues"][:]),
            torch.from_numpy(handle["eigenvectors"][:]),
        )
        return pairs, float(handle.attrs["apost_error"])


def compare(reference: Path, other: Path, dtype: torch.dtype) -> tuple[bool, Agreement]:
    (ref_pairs, ref_error), (pairs, error) = _read(reference), _read(other)
    bitwise = all(torch.equal(a, b) for a, b in zip(ref_pairs, pairs, strict=True))
    agreement = compare_eigenpairs(ref_pairs, pairs, dtype, sketch_error=2 * (ref_error + error))
    return bitwise, agreement


def row(name: str, bitwise: bool, agreement: Agreement) -> list[str]:
    worst = max(agreement.sines, key=lambda m: agreement.sines[m] / agreement.bounds[m])
    resolved = max(agreement.bounds)
    return [
        name,
        "yes" if bitwise else "no",
        f"{agreement.resolved_difference:.2g} / {agreement.tolerance:.2g} (top {resolved})",
        f"{agreement.all_difference:.2g} / {agreement.sketch_tolerance:.2g}",
        f"{agreement.sines[worst]:.2g} / {agreement.bounds[worst]:.2g} (m={worst})",
        "yes" if agreement.holds else "**no**",
    ]


def section(settings: Settings) -> str:
    source = trained_run()
    variants = VARIANTS[:2] if settings.quick else VARIANTS
    tables = []
    for dtype in ("float32", "float64"):
        log(f"Q7 reference sketch, {dtype}")
        reference = sketch(source, f"reference_{dtype}", dtype, Variant("reference"))
        rows = []
        for number, variant in enumerate(variants):
            log(f"Q7 {variant.name}, {dtype}")
            other = sketch(source, f"variant{number}_{dtype}", dtype, variant)
            rows.append(row(variant.name, *compare(reference, other, getattr(torch, dtype))))
        headers = [
            f"{dtype}: computed with",
            "bitwise",
            "max abs eigenvalue difference / tolerance",
            "all k / sketch's own error",
            "worst sin theta / Davis-Kahan bound",
            "within",
        ]
        tables.append(markdown_table(headers, rows))
    return (
        "## 7. Numbers across kernel paths, thread counts and block widths\n\n"
        "The demo's sketch (mnist_mini, step 1000, train Hessian, two-pass, k=355, three "
        "array tasks per round) computed again, each row against a reference computed "
        "with every task on this machine's default kernel path. Tolerances from "
        "`hessov.skerch_ext.tolerances`: resolved eigenvalues within 2 g(D) ||H|| (probabilistic "
        "rounding, D = 7,030), all k within the two runs' a-posteriori errors, top-m spaces "
        "(m <= 10, where a gap defines them) within Davis-Kahan.\n\n" + "\n\n".join(tables)
    )
