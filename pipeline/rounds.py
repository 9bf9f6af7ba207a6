"""The Krylov rounds of a two-pass sketch: their names, and when a target stops them.

Two-pass recovery with ``rounds = q`` measures ``q`` rounds of ``k`` products
(:mod:`hessov.skerch_ext.krylov`): ``first`` is ``H Omega``; round ``j >= 2`` is ``H Q_{j-2}``
for the ``(j-1)``-th block of the block Krylov basis, which the basis job before it writes.
The rounds are named ``first``, ``second`` (today's two-pass), then ``round3``, ``round4``...

With ``target_rel_err = eps`` the stage graph holds ``max_rounds`` rounds, the worst case,
and the rounds are cut short at run time: the basis job before round ``j + 1`` (``j >= 2``)
already holds what the solve after round ``j`` would compute, the exactly projected space
and its extension, so it computes the error bounds of the top ``target_eigenpairs``
eigenvalues (:func:`hessov.skerch_ext.krylov.core_bounds`) and records the check in
``krylov_checks.json``. Once every one of them is below ``eps |lambda|`` the later rounds'
jobs exit at once and the solve uses the rounds taken. The file is the only place the
decision lives: a job of a later round, a resume and ``hessov status`` all read it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch

from hessov.fileio import atomic_write_json
from hessov.rundir import RunDir

#: The first two rounds' names (a sketch's own, and two-pass' ``H Q``).
FIRST, SECOND = "first", "second"


def round_name(number: int) -> str:
    """The name of round ``number`` (1-based): ``first``, ``second``, ``round3``, ..."""
    return {1: FIRST, 2: SECOND}.get(number, f"round{number}")


def round_number(name: str) -> int:
    """The inverse of :func:`round_name`."""
    return {FIRST: 1, SECOND: 2}.get(name) or int(name.removeprefix("round"))


def product_rounds(rounds: int) -> list[str]:
    """The rounds that multiply ``H`` onto a block of the Krylov basis: 2 to ``rounds``."""
    return [round_name(number) for number in range(2, rounds + 1)]


@dataclass
class RoundCheck:
    """The bounds after one round, as the basis job of the next one found them.

    Attributes:
        after_round: the round whose products the bounds use (>= 2).
        max_relative_bound: the largest ``bound / |lambda|`` over the target's pairs
            (``inf`` while one is unresolved).
        resolved: how many of the target's pairs have a finite bound.
        target_eigenpairs: how many pairs the target covers.
        target_rel_err: ``eps``.
        met: every bound of the target's pairs is below ``eps |lambda|``.
    """

    after_round: int
    max_relative_bound: float
    resolved: int
    target_eigenpairs: int
    target_rel_err: float
    met: bool


def relative_check(
    after_round: int, eigenvalues: torch.Tensor, bounds: torch.Tensor, count: int, target: float
) -> RoundCheck:
    """The check of the top ``count`` eigenvalues ``(>= count,)`` and their bounds against
    ``target``.
    """
    relative = bounds[:count].double() / eigenvalues[:count].double().abs()
    worst = float(relative.max()) if count else math.inf
    resolved = int(bounds[:count].isfinite().sum())
    return RoundCheck(after_round, worst, resolved, count, target, worst < target)


def read_checks(run: RunDir, step: int, split: str) -> list[RoundCheck]:
    """The checks recorded so far for ``step`` and ``split``, by round."""
    path = run.krylov_checks(step, split)
    if not path.is_file():
        return []
    entries = json.loads(path.read_text())
    for entry in entries:
        if entry["max_relative_bound"] is None:
            entry["max_relative_bound"] = math.inf
    return [RoundCheck(**entry) for entry in entries]


def record_check(run: RunDir, step: int, split: str, check: RoundCheck) -> None:
    """Add (or, for a job run again, replace) the check after ``check.after_round``."""
    checks = [old for old in read_checks(run, step, split) if old.after_round != check.after_round]
    entries = [asdict(entry) for entry in sorted([*checks, check], key=lambda c: c.after_round)]
    for entry in entries:  # JSON has no inf: an unresolved bound is null
        if not math.isfinite(entry["max_relative_bound"]):
            entry["max_relative_bound"] = None
    atomic_write_json(run.krylov_checks(step, split), entries)


def stopped_after(run: RunDir, step: int, split: str) -> int | None:
    """The round after which the target was met, ``None`` while it has not been."""
    met = [check.after_round for check in read_checks(run, step, split) if check.met]
    return min(met) if met else None


def rounds_taken(run: RunDir, spec, step: int, split: str) -> int:
    """The rounds the solve of ``step`` and ``split`` uses: all of the layout's, or those up
    to the one after which the target was met.
    """
    stop = stopped_after(run, step, split) if spec.target_rel_err else None
    return min(stop or spec.krylov_rounds, spec.krylov_rounds)


def not_needed(run: RunDir, spec, step: int, split: str, name: str) -> bool:
    """Whether round ``name`` comes after the target was met (its jobs have nothing to do)."""
    if name in ("first", "apost"):
        return False
    return round_number(name) > rounds_taken(run, spec, step, split)
