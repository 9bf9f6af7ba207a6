"""What of a run is done, read from its files: the source of truth for status and resume.

:func:`run_status` reads every flag and output file to say which stages are done and which
measurement indices (and array tasks) are missing, so that ``hessov status`` and the stage
graph of ``hessov resume`` (:func:`hessov.launch.graph.build_graph`) never trust a
scheduler's memory of a job.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from hessov.rowpass import RowWork, program_phases
from hessov.rundir import RunDir
from hessov.skerch_ext.storage import describe_indices
from hessov.sketchspec import SketchSpec, load_spec


@dataclass
class RoundStatus:
    """Flags of one measurement round of one step and split."""

    total: int
    missing: list[int]
    tasks_missing: list[int]  # array tasks with at least one missing index

    @property
    def done(self) -> bool:
        """Every measurement of the round is flagged measured."""
        return not self.missing


@dataclass
class SketchStatus:
    """One step and split: its rounds and whether it is solved."""

    step: int
    split: str
    rounds: dict[str, RoundStatus] = field(default_factory=dict)
    basis_written: bool = False
    solved: bool = False
    #: Every round's part files exist: a layout made before a round was added lacks one.
    stores_laid_out: bool = True
    exhaustive_done: bool = False
    analysed: bool = False
    #: Where an unfinished row-block basis or solve stands, e.g. ``"solve: phase
    #: extend_apply, 93/234 row blocks done"`` (:func:`row_progress`).
    row_progress: list[str] = field(default_factory=list)


def row_progress(run: RunDir, spec: SketchSpec, step: int, split: str, stage: str) -> list[str]:
    """Where each row-block ``stage`` that has started and not finished stands: its first
    phase not done, with the row blocks done for a per-block phase (one line per row block
    it was started with).
    """
    lines = []
    for row_block, work_dir in sorted(run.row_works(step, split, stage).items()):
        ranges = replace(spec, row_block=row_block).row_ranges
        work = RowWork(work_dir, program_phases(stage, spec.recovery), ranges)
        for phase in work.phases:
            missing = work.missing_blocks(phase) if phase.per_block else []
            if missing:
                done = f"{len(ranges) - len(missing)}/{len(ranges)} row blocks done"
                lines.append(f"{stage}: phase {phase}, {done}")
                break
            if not phase.per_block and not work.done(phase):
                lines.append(f"{stage}: phase {phase}")
                break
    return lines


def round_status(
    run: RunDir, spec: SketchSpec, step: int, split: str, round_name: str
) -> RoundStatus:
    """The flags of one round of one step and split; all missing before the round started."""
    store = spec.store(run, step, split, round_name)
    total = store.layout.num_measurements
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
            item.basis_written = run.two_pass_basis(step, split).is_file()
            item.solved = run.eigen(step, split).is_file()
            item.exhaustive_done = run.exhaustive(step, split).is_file()
            item.analysed = run.analysis_step(step, split).is_file()
            for stage, done in (("basis", item.basis_written), ("solve", item.solved)):
                item.row_progress += [] if done else row_progress(run, spec, step, split, stage)
            status["sketches"].append(item)
    return status


def missing_work(status: dict, exhaustive: bool = False) -> list[str]:
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
    return "\n".join(lines)
