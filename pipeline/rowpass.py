"""Row-block phases: the out-of-core basis and solve as steps a cluster runs as job arrays.

When the layout fixed a row block (the plan's choice when ``D x k`` matrices do not fit the
memory budget), the basis and the solve of one step and split are sequences of phases
(:data:`ROW_PHASES`) over the row blocks of their ``D``-row matrices:

* a **per-block** phase is a function of one row block: it reads the rows it needs (of the
  measurements, of ``Q``, of an earlier phase's results for the same block) and returns
  that block's results, tall ones (``(rows, k)``: a local ``Q_i``, a block of ``P`` or
  ``W``) and small ones (a local ``R_i``, a partial ``Q_i^T (H Q)_i``, column checksums);
* a **combined** phase is one function of every block's small results: a sum over the
  blocks, the TSQR tree that turns the local ``R_i`` into each block's factor ``F_i``
  (Demmel, Grigori, Hoemmen and Langou 2012), the Ritz problem.

On Slurm every per-block phase is a job array whose tasks share the row blocks, as many as
the first measurement round has (:attr:`hessov.sketchspec.SketchSpec.row_tasks`), and every
combined phase one job, so a TSQR round is three jobs (local QRs, tree, apply); locally the
same phases run as a loop. Each result is one HDF5 file written atomically in the step's
work directory (:meth:`hessov.rundir.RunDir.row_work`): a task killed at any point is run
again from its inputs, and a result on disk is never recomputed. Memory per task is
``O(row_block x k)`` for a per-block phase and ``O(num_blocks x k^2)`` for a combined one,
independent of ``D``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from hessov.errors import MissingInputError
from hessov.fileio import atomic_write
from hessov.merge import tall_dataset
from hessov.runlog import get_logger
from hessov.skerch_ext.rowblocks import row_pass


@dataclass(frozen=True)
class Phase:
    """One step of a row-block program.

    Attributes:
        name: unique in its program.
        per_block: a task per row block (else one job over every block's small results).
        consumes: an earlier per-block phase whose block file this one removes once its own
            is written (its tall results are read by no later phase): the work directory
            holds about two ``D x k`` matrices at a time.
    """

    name: str
    per_block: bool
    consumes: str = ""

    def __str__(self) -> str:
        return self.name


def _phases(*names: str) -> tuple[Phase, ...]:
    """Phases from names: ``"name/"`` a per-block one, ``"name/earlier"`` one that consumes
    ``earlier``.
    """
    phases = []
    for name in names:
        own, per_block, consumed = name.partition("/")
        phases.append(Phase(own, bool(per_block), consumed))
    return tuple(phases)


#: The next block ``P`` of the block Krylov basis, an orthonormal basis of
#: ``(I - V V^T) H Q_last`` (:func:`hessov.skerch_ext.solve.next_block`): ``V^T H V`` summed,
#: TSQR of the residual, then TSQR again of its reorthogonalisation against ``V``.
EXTENSION = (
    "project/",
    "project_sum",
    "extend_local/",
    "extend_tree",
    "extend_apply/extend_local",
    "overlap_sum",
    "reorth_local/extend_apply",
    "reorth_tree",
)
#: The phases of each row-block program, in order (``/``: per block, see :func:`_phases`).
#: TSQR is ``local/``, ``tree``, ``apply/local``: the first round's basis, and twice in the
#: :data:`EXTENSION` that the basis of a later round and the two-pass solve start with.
ROW_PHASES: dict[str, tuple[Phase, ...]] = {
    "basis": _phases("local/", "tree", "apply/local", "finish"),
    "basis krylov": _phases(*EXTENSION, "reorth_apply/reorth_local", "check", "finish"),
    "solve two_pass": _phases(
        *EXTENSION,
        "reorth_apply/reorth_local",
        "ritz",
        "eigenvectors/reorth_apply",
        "apost_sum",
        "apost_residuals/",
        "finish",
    ),
    "solve single_pass": _phases(
        "local/",
        "tree",
        "apply/local",
        "ritz",
        "eigenvectors/apply",
        "apost_sum",
        "apost_residuals/",
        "finish",
    ),
}

#: A per-block phase: ``(block number, rows) -> results``; a combined one: ``() -> results``.
#: Results are named tensors or arrays; the last phase writes the stage's outputs instead
#: and returns nothing.
PhaseFunction = Callable[..., Mapping[str, torch.Tensor | np.ndarray] | None]


def program_phases(stage: str, recovery: str, round_name: str = "second") -> tuple[Phase, ...]:
    """The phases of ``stage`` (``basis`` or ``solve``) for the layout's ``recovery``; a
    basis for a round after the second is the next Krylov block's.
    """
    if stage == "basis":
        return ROW_PHASES["basis" if round_name == "second" else "basis krylov"]
    return ROW_PHASES[f"solve {recovery}"]


def work_name(stage: str, round_name: str = "second") -> str:
    """The name of a program's work directory: the stage, and a later round's basis its
    round (``basis_round3``), so that the rounds' programs never share one.
    """
    return f"basis_{round_name}" if stage == "basis" and round_name != "second" else stage


class RowWork:
    """The work directory of one row-block program: every phase's results, one file each
    (per block for a per-block phase).

    Args:
        directory: where the results live (:meth:`hessov.rundir.RunDir.row_work`).
        phases: the program's phases, in order.
        ranges: the row blocks.
    """

    def __init__(self, directory: Path, phases: tuple[Phase, ...], ranges: list[range]):
        self.directory = Path(directory)
        self.phases = phases
        self.ranges = ranges

    def path(self, phase: str, number: int | None = None) -> Path:
        """The results of ``phase`` (of its block ``number`` for a per-block phase)."""
        suffix = "" if number is None else f".block{number:05d}"
        return self.directory / f"{phase}{suffix}.h5"

    def read(self, phase: str, number: int | None = None, names=None) -> dict[str, torch.Tensor]:
        """The results ``names`` (default: all) of ``phase`` (block ``number``)."""
        with h5py.File(self.path(phase, number), "r") as handle:
            keys = list(handle) if names is None else names
            return {key: torch.from_numpy(handle[key][()]) for key in keys}

    def columns(self, phase: str, start: int, stop: int) -> torch.Tensor:
        """Columns ``start:stop`` of per-block ``phase``'s tall result ``block``, every
        block's rows stacked: ``(D, stop - start)``.
        """
        parts = []
        for number in self.numbers:
            with h5py.File(self.path(phase, number), "r") as handle:
                parts.append(handle["block"][:, start:stop])
        return torch.from_numpy(np.concatenate(parts))

    def stacked(self, phase: str, name: str) -> torch.Tensor:
        """The small result ``name`` of per-block ``phase`` for every block, stacked
        ``(num_blocks, ...)`` in row order.
        """
        return torch.stack([self.read(phase, number, [name])[name] for number in self.numbers])

    def write(self, path: Path, results: Mapping) -> None:
        """``results`` into ``path``, atomically."""
        with atomic_write(path) as tmp, h5py.File(tmp, "w") as handle:
            for key, value in results.items():
                data = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
                if key == "block":  # tall: read by rows and, as Q, by columns
                    tall_dataset(handle, key, data.shape, data.dtype)[...] = data
                else:
                    handle.create_dataset(key, data=data)

    def done(self, phase: Phase, number: int | None = None) -> bool:
        """Whether ``phase`` (for block ``number``) is done: its results, or those of any
        later phase, are on disk (a later phase's inputs may be removed once it has read
        them).
        """
        later = self.phases[self.phases.index(phase) :]
        for other in later:
            if not other.per_block:
                if self.path(other.name).is_file():
                    return True
            elif number is not None and self.path(other.name, number).is_file():
                return True
            elif number is None and any(self.path(other.name, n).is_file() for n in self.numbers):
                return True
        return False

    @property
    def numbers(self) -> range:
        """The row blocks' numbers."""
        return range(len(self.ranges))

    def missing_blocks(self, phase: Phase) -> list[int]:
        """The blocks of per-block ``phase`` not done yet."""
        return [number for number in self.numbers if not self.done(phase, number)]

    def discard(self, phase: str) -> None:
        """Remove every block's results of ``phase`` (computed from measurements found
        corrupt), so that the next attempt recomputes them.
        """
        for number in self.numbers:
            self.path(phase, number).unlink(missing_ok=True)

    def record_seconds(self, phase: str, seconds: float) -> None:
        """Append a phase's (or one block's) wall time to the work directory's log: one
        short line appended at once, which array tasks on one file system do not interleave.
        """
        line = json.dumps({"phase": phase, "seconds": round(seconds, 4)}) + "\n"
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        descriptor = os.open(self.directory / "seconds.jsonl", flags)
        try:
            os.write(descriptor, line.encode())
        finally:
            os.close(descriptor)

    def seconds(self) -> dict[str, float]:
        """Wall seconds of every phase so far, its blocks' summed (a rerun's included)."""
        totals: dict[str, float] = {}
        path = self.directory / "seconds.jsonl"
        for line in path.read_text().splitlines() if path.is_file() else []:
            entry = json.loads(line)
            totals[entry["phase"]] = totals.get(entry["phase"], 0.0) + entry["seconds"]
        return totals

    def remove(self) -> None:
        """Remove the work directory once the program's outputs are written."""
        shutil.rmtree(self.directory, ignore_errors=True)


def run_phases(
    work: RowWork,
    functions: Mapping[str, PhaseFunction],
    only: str | None = None,
    numbers: list[int] | None = None,
    label: str = "",
) -> None:
    """Run ``work``'s phases in order (or the phase ``only``; of a per-block phase, the
    blocks ``numbers``, default all), skipping what is done. The last phase writes the
    stage's outputs and removes the work directory.
    """
    names = [phase.name for phase in work.phases]
    if sorted(names) != sorted(functions):
        raise ValueError(f"phases {names} need functions, got {sorted(functions)}")
    if only is not None and only not in names:
        raise ValueError(f"phase {only!r} is not one of {names}")
    for phase in work.phases:
        if only is None or phase.name == only:
            _run_phase(work, phase, functions[phase.name], numbers, label)


def _run_phase(work: RowWork, phase: Phase, function, numbers, label: str) -> None:
    last = phase == work.phases[-1]
    if phase.per_block:
        asked = work.numbers if numbers is None else numbers
        todo = [number for number in asked if not work.done(phase, number)]
        _require_previous(work, phase, todo)
        for number in row_pass(todo, f"{label}{phase}"):
            started = time.perf_counter()
            work.write(work.path(phase.name, number), function(number, work.ranges[number]))
            work.record_seconds(phase.name, time.perf_counter() - started)
            if phase.consumes:
                work.path(phase.consumes, number).unlink(missing_ok=True)
        return
    if last or not work.done(phase):
        _require_previous(work, phase, work.numbers)
    if last:
        function()
        work.remove()
    elif not work.done(phase):
        started = time.perf_counter()
        work.write(work.path(phase.name), function())
        work.record_seconds(phase.name, time.perf_counter() - started)
    else:
        get_logger().debug("%s%s: done already", label, phase)


def _require_previous(work: RowWork, phase: Phase, numbers) -> None:
    """Refuse to run ``phase`` (for the blocks ``numbers``) before the phase it reads.

    Raises:
        MissingInputError: naming the phase to run first.
    """
    index = work.phases.index(phase)
    if index == 0:
        return
    previous = work.phases[index - 1]
    if previous.per_block:
        missing = [number for number in numbers if not work.done(previous, number)]
    else:
        missing = [] if work.done(previous) else [None]
    if missing:
        raise MissingInputError(
            f"phase {phase} needs phase {previous} first ({work.directory} has not its "
            f"results{'' if missing == [None] else f' for row blocks {missing}'})"
        )
