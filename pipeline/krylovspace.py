"""The block Krylov space of a two-pass sketch's rounds, read from a run's files.

After ``r`` rounds (:mod:`hessov.rounds`) the exactly projected basis is
``V = [Q_0, ..., Q_{r-2}]`` ``(D, n)``, ``n = (r - 1) k``: the blocks the basis stage wrote
for rounds ``second`` to round ``r``, and ``H V`` ``(D, n)`` is those rounds' products. The
basis job of round ``r + 1`` and the solve after round ``r`` both start from this pair:
the next block ``Q_{r-1}`` comes from the last ``k`` columns of ``H V``
(:func:`hessov.skerch_ext.solve.next_block`), and the extended core from all of them
(:func:`hessov.skerch_ext.solve.extended_core`; :mod:`hessov.skerch_ext.krylov` for the
mathematics and the bounds). In memory the pair is read whole (:func:`space_in_memory`); in
row blocks as readers of a block's rows with the rounds' checksums (:func:`space_rows`).
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import torch

from hessov.errors import MissingInputError
from hessov.merge import merged_round, read_columns, round_block, verify_round
from hessov.rounds import (
    RoundCheck,
    not_needed,
    product_rounds,
    record_check,
    relative_check,
)
from hessov.rowpass import work_name
from hessov.rundir import RunDir
from hessov.runlog import get_logger
from hessov.skerch_ext.krylov import core_bounds
from hessov.skerch_ext.solve import ritz_coefficients
from hessov.sketchspec import SketchSpec
from hessov.spectralshift import hessian_eigenvalues, shift_of


def require_basis(run: RunDir, step: int, split: str, round_name: str = "second"):
    """The basis file of ``round_name``; a clear error naming the job that writes it."""
    path = run.two_pass_basis(step, split, round_name)
    if not path.is_file():
        raise MissingInputError(
            f"{path} is missing: write it with "
            f"`hessov basis {run.root} step={step} split={split} round={round_name}`"
        )
    return path


def joined(parts: list) -> torch.Tensor:
    """Blocks side by side; one block as it is (a copy may change the last bits of what is
    computed with it, and two rounds keep the two-pass solve's bits).
    """
    tensors = [torch.from_numpy(part) if isinstance(part, np.ndarray) else part for part in parts]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


def space_in_memory(
    run: RunDir, spec: SketchSpec, step: int, split: str, rounds: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """``V`` ``(D, n)`` and ``H V`` ``(D, n)`` after ``rounds`` rounds, every part verified
    as it is merged, and the seconds the basis jobs took (``merge`` and ``qr``).
    """
    bases, products, seconds = [], [], {"merge": 0.0, "qr": 0.0}
    for name in product_rounds(rounds):
        with h5py.File(require_basis(run, step, split, name), "r") as handle:
            bases.append(read_columns(handle["basis"]))
            for key in seconds:
                seconds[key] += float(handle.attrs[f"{key}_seconds"])
        products.append(merged_round(run, spec, step, split, name)[0])
    return joined(bases), joined(products), seconds


def space_rows(run: RunDir, spec: SketchSpec, step: int, split: str, rounds: int):
    """Row readers of the space after ``rounds`` rounds: ``V``'s rows ``(rows, n)`` from the
    basis files, ``H V``'s rows ``(rows, n)`` as stored (numpy, to be checksummed), and the
    check of their column CRCs ``(num_blocks, n)``, round by round.
    """
    names = product_rounds(rounds)
    paths = [require_basis(run, step, split, name) for name in names]
    readers = [round_block(run, spec, step, split, name) for name in names]
    checks = [verify_round(run, spec, step, split, name) for name in names]
    width = spec.layout.num_outer

    def basis(rows: range) -> torch.Tensor:
        parts = []
        for path in paths:
            with h5py.File(path, "r") as handle:
                parts.append(handle["basis"][rows.start : rows.stop])
        return joined(parts)

    def products(rows: range) -> np.ndarray:
        parts = [read(rows) for read in readers]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def verify(crcs: torch.Tensor) -> None:
        for number, check in enumerate(checks):
            check(crcs[:, number * width : (number + 1) * width])

    return basis, products, verify


def remove_unneeded_work(run: RunDir, spec: SketchSpec, step: int, split: str) -> None:
    """Remove the row-block work of basis rounds after a met target: the ``check`` phase
    that found it met leaves its results for the round's ``finish``, which may never run.
    """
    for name in product_rounds(spec.krylov_rounds):
        if not_needed(run, spec, step, split, name):
            for work_dir in run.row_works(step, split, work_name("basis", name)).values():
                shutil.rmtree(work_dir, ignore_errors=True)


def check_after_round(
    run: RunDir, spec: SketchSpec, where: tuple[int, str, int], core: torch.Tensor, num: int
) -> RoundCheck:
    """Bound the top ``spec.target_eigenpairs`` eigenvalues of the extended ``core``
    (``num`` rows exactly projected) after round ``where[2]`` of step ``where[0]`` and split
    ``where[1]``, and record the check against ``target_rel_err``.
    """
    step, split, after = where
    count = spec.checked_eigenpairs
    eigenvalues, _ = ritz_coefficients(core, count)
    dim, k = spec.layout.dim, spec.layout.num_outer
    bounds, _ = core_bounds(core, num, eigenvalues, (core.dtype, dim), k)
    # Relative to H's eigenvalues (which=smallest sketches sigma I - H; bounds are the same).
    eigenvalues = hessian_eigenvalues(eigenvalues, shift_of(run, spec, step, split))
    check = relative_check(after, eigenvalues, bounds, count, spec.target_rel_err)
    record_check(run, step, split, check)
    get_logger().info(
        "basis step %d %s: after round %d the top %d eigenvalues are within %.3g relative "
        "(%d of them bounded)%s",
        step,
        split,
        after,
        count,
        check.max_relative_bound,
        check.resolved,
        f": target_rel_err={spec.target_rel_err:g} met, no more rounds" if check.met else "",
    )
    return check
