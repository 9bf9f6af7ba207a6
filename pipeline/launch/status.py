"""What of a run is done, read from its files: the source of truth for status and resume.

:func:`run_status` reads every flag and output file to say which stages are done and which
measurement indices (and array tasks) are missing, so that ``hessov status`` and the stage
graph of ``hessov resume`` (:func:`hessov.launch.graph.build_graph`) never trust a
scheduler's memory of a job.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from hessov.config import ESTIMATES
from hessov.rounds import not_needed, product_rounds, read_checks, rounds_taken
from hessov.rowpass import RowWork, program_phases, work_name
from hessov.rundir import RunDir
from hessov.skerch_ext.storage import describe_indices
from hessov.sketchspec import SketchSpec, load_spec


@dataclass
class RoundStatus:
    """Flags of one measurement round of one step and split."""

    total: int
    missing: list[int]
    tasks_missing: list[int]  # array tasks with at least one missing index
    #: A round after the one that met ``target_rel_err``: nothing to measure.
    not_needed: bool = False

    @property
    def done(self) -> bool:
        """Every measurement of the round is flagged measured (or none is needed)."""
        return not self.missing


@dataclass
class SketchStatus:
    """One step and split: its rounds and whether it is solved."""

    step: int
    split: str
    rounds: dict[str, RoundStatus] = field(default_factory=dict)
    #: Per round after the first (two-pass): its basis file is written, or is not needed.
    bases_written: dict[str, bool] = field(default_factory=dict)
    #: The bounds after each round (:class:`hessov.rounds.RoundCheck`), and the rounds the
    #: solve uses.
    round_checks: list = field(default_factory=list)
    rounds_taken: int = 0
    solved: bool = False
    #: Every round's part files exist: a layout made before a round was added lacks one.
    stores_laid_out: bool = True
    exhaustive_done: bool = False
    analysed: bool = False
    #: The estimates (trace, diagonal, density) whose file is written.
    estimated: list[str] = field(default_factory=list)
    #: Where an unfinished row-block basis or solve stands, e.g. ``"solve: phase
    #: extend_apply, 93/234 row blocks done"`` (:func:`row_progress`).
    row_progress: list[str] = field(default_factory=list)


def row_progress(
    run: RunDir, spec: SketchSpec, where: tuple[int, str], stage: str, round_name: str = "second"
) -> list[str]:
    """Where each row-block ``stage`` (a basis: of ``round_name``) of ``where`` (step, split)
    that has started and not finished stands: its first phase not done, with the row blocks
    done for a per-block phase (one line per row block it was started with).
    """
    lines, name = [], work_name(stage, round_name)
    for row_block, work_dir in sorted(run.row_works(*where, name).items()):
        ranges = replace(spec, row_block=row_block).row_ranges
        work = RowWork(work_dir, program_phases(stage, spec.recovery, round_name), ranges)
        for phase in work.phases:
            missing = work.missing_blocks(phase) if phase.per_block else []
            if missing:
                done = f"{len(ranges) - len(missing)}/{len(ranges)} row blocks done"
                lines.append(f"{name}: phase {phase}, {done}")
                break
            if not phase.per_block and not work.done(phase):
                lines.append(f"{name}: phase {phase}")
                break
    return lines


def round_status(
    run: RunDir, spec: SketchSpec, step: int, split: str, round_name: str
) -> RoundStatus:
    """The flags of one round of one step and split; all missing before the round started."""
    store = spec.store(run, step, split, round_name)
    total = store.layout.num_measurements
    if not_needed(run, spec, step, split, round_name):
        return RoundStatus(total, [], [], not_needed=True)
    missing = store.missing_indices() if store.directory.is_dir() else list(range(total))
    missing_set = set(missing)
    tasks = [
        t
        for t in range(spec.round_tasks(round_name))
        if any(m in missing_set for m in spec.task_indices(t, round_name))
    ]
    return RoundStatus(total, missing, tasks)


def run_status(run: RunDir) -> dict:
    """Everything ``hessov status`` shows, as plain data."""
    status = {
        "run": str(run.root),
        "train": run.summary("train").is_file(),
        "layout": run.sketch_spec.is_file(),
        "sketches": [],
        # A variant (hessov.variants) is a run directory of its own, once its job made it.
        "variants": {name: run_status(run.variant(name)) for name in run.variant_names()},
    }
    if not status["layout"]:
        return status
    spec = load_spec(run)
    for step in spec.steps:
        for split in spec.splits:
            item = SketchStatus(step, split)
            for round_name in spec.rounds:
                item.rounds[round_name] = round_status(run, spec, step, split, round_name)
            item.stores_laid_out = all(
                spec.store(run, step, split, name).directory.is_dir() for name in spec.rounds
            )
            item.solved = run.eigen(step, split).is_file()
            item.exhaustive_done = run.exhaustive(step, split).is_file()
            item.analysed = run.analysis_step(step, split).is_file()
            item.estimated = [n for n in ESTIMATES if run.estimate(step, split, n).is_file()]
            _krylov_status(run, spec, item)
            if not item.solved:
                item.row_progress += row_progress(run, spec, (step, split), "solve")
            status["sketches"].append(item)
    return status


def _krylov_status(run: RunDir, spec: SketchSpec, item: SketchStatus) -> None:
    """The basis files of a two-pass sketch's rounds, the checks after them, the rounds
    taken and the progress of an unfinished row-block basis.
    """
    if spec.recovery != "two_pass":
        return
    where = (item.step, item.split)
    for name in product_rounds(spec.krylov_rounds):
        written = run.two_pass_basis(*where, name).is_file()
        item.bases_written[name] = written or not_needed(run, spec, *where, name)
        if not item.bases_written[name] and not item.solved:
            item.row_progress += row_progress(run, spec, where, "basis", name)
    item.round_checks = read_checks(run, *where)
    item.rounds_taken = rounds_taken(run, spec, *where)


def missing_work(status: dict, exhaustive: bool = False, estimates=()) -> list[str]:
    """What :func:`run_status` says is still to do, one line per item; empty when the run is
    complete (with ``exhaustive``, the exact checks count too).
    """
    if not status["train"]:
        return ["train: not finished (everything after it is missing)"]
    if not status["layout"]:
        return ["layout: not created (every measurement and solve is missing)"]
    lines = []
    for item in status["sketches"]:
        where = f"step {item.step} {item.split}"
        for name, rnd in item.rounds.items():
            if rnd.missing and not item.solved:  # a solved step needs no more measurements
                lines.append(
                    f"{where}: {name} round missing indices {describe_indices(rnd.missing)} "
                    f"(array tasks {rnd.tasks_missing})"
                )
        if not item.solved:
            lines.append(f"{where}: not solved")
        if exhaustive and not item.exhaustive_done:
            lines.append(f"{where}: exhaustive check missing")
        lines += [f"{where}: {name} missing" for name in estimates if name not in item.estimated]
    for name, variant in status.get("variants", {}).items():
        lines += [f"{name}: {line}" for line in missing_work(variant, exhaustive)]
    return lines


def describe_status(status: dict) -> str:
    """A human-readable report of :func:`run_status`."""
    lines = [
        f"run {status['run']}",
        f"  train:  {'done' if status['train'] else 'not finished'}",
        f"  layout: {'done' if status['layout'] else 'not created'}",
    ]
    for item in status["sketches"]:
        parts = []
        for name, rnd in item.rounds.items():
            if rnd.not_needed:
                parts.append(f"{name} round not needed")
                continue
            measured = rnd.total - len(rnd.missing)
            text = f"{name} round {measured}/{rnd.total} measured"
            if rnd.missing:
                text += (
                    f" (missing indices {describe_indices(rnd.missing)}; "
                    f"array tasks {rnd.tasks_missing})"
                )
            parts.append(text)
        state = "solved" if item.solved else "not solved"
        if item.solved:
            state += ", analysed" if item.analysed else ", not analysed"
        state += "".join(f" ({progress})" for progress in item.row_progress)
        lines.append(f"  step {item.step} {item.split}: {'; '.join(parts)}; {state}")
        lines += [f"    {describe_check(check)}" for check in item.round_checks]
    for name, variant in status.get("variants", {}).items():
        nested = describe_status(variant).splitlines()
        lines += [f"  variant {name}:"] + [f"  {line}" for line in nested[1:]]
    return "\n".join(lines)


def describe_check(check) -> str:
    """One line of a :class:`hessov.rounds.RoundCheck`: the bound reached after a round."""
    line = (
        f"after round {check.after_round}: top {check.target_eigenpairs} eigenvalues within "
        f"{check.max_relative_bound:.3g} relative ({check.resolved} bounded)"
    )
    if check.target_rel_err:
        line += f", target_rel_err={check.target_rel_err:g} " + (
            "met: no more rounds" if check.met else "not met"
        )
    return line
