"""A recorder for your own training loop: the run layout, without hessov's train stage.

A few lines in any PyTorch loop record what the later stages need::

    with hessov.Recorder("runs/mine", problem="my_model.py:make_problem",
                         record_steps=[0, 100, 1000]) as recorder:
        for step in range(1001):
            recorder.step(step, model, optimizer)  # before the step's update
            ...

and ``hessov run runs/mine`` (locally, or with ``backend=slurm``) continues with the layout,
measurements, solves and analysis. The problem factory (README, "Your own model") is how
every later job rebuilds the network and the data: the recorded model must have the
factory model's parameters (names and shapes). The record is written with the train stage's
own functions (:mod:`hessov.recording`), so the run is the same to every later stage.
:func:`import_checkpoints` records ``state_dict`` checkpoints that any training code saved
(``hessov import``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from hessov import summary
from hessov.config import load_run_config
from hessov.errors import ConfigError
from hessov.paramstore import buffer_layout, parameter_layout
from hessov.problems import build_problem
from hessov.problems.checks import check_eval_deterministic
from hessov.recording import begin_record, hessian_subsets, record_state
from hessov.rundir import RunDir
from hessov.runlog import EventLog, get_logger
from hessov.training import save_snapshot


class Recorder:
    """Record parameters, buffers and snapshots of a user's training into a run directory.

    Args:
        run_dir: the run directory to create: new or empty.
        problem: the problem factory, ``path/to/file.py:FACTORY`` or ``module:FACTORY``
            (or a built-in problem's name).
        record_steps: the steps whose parameters the Hessian stages will sketch.
        snapshot_steps: steps whose training state (model, optimizer, schedule if given) is
            saved for ``hessov replay``, which continues the optimizer's state only when the
            run's ``optimizer.name`` (an override) names the same class.
        overrides: further ``KEY=VALUE`` settings of the run, e.g.
            ``["NUM_HESSIAN_DATAPOINTS=500", "k=100", "optimizer.name=Adam"]``.
    """

    def __init__(self, run_dir, problem: str, record_steps, snapshot_steps=(), overrides=()):
        steps = sorted(int(step) for step in record_steps)
        if not steps:
            raise ConfigError("record_steps: name at least one step to record")
        self.cfg = load_run_config(
            [
                f"problem={problem}",
                f"RUN_DIR={Path(run_dir).resolve()}",
                f"RECORD_STEPS={steps}",
                f"SNAPSHOT_STEPS={sorted(int(step) for step in snapshot_steps)}",
                f"MAX_STEPS={max([*steps, *(int(step) for step in snapshot_steps)])}",
                *overrides,
            ]
        )
        self.run = RunDir(Path(self.cfg.RUN_DIR))
        if self.run.root.exists() and any(self.run.root.iterdir()):
            raise ConfigError(f"RUN_DIR: {self.run.root} is not empty; record into a new directory")
        self.problem = build_problem(self.cfg)
        check_eval_deterministic(self.problem.model, self.problem.train.inputs)
        self.layout = _layout(self.problem.model)
        subsets = hessian_subsets(self.problem, self.cfg.NUM_HESSIAN_DATAPOINTS)
        self.events = EventLog(self.run.log, "record")
        self.store = begin_record(self.run, self.cfg, self.problem, subsets, self.events)
        self.started, self.recorded, self.finished = time.perf_counter(), [], False

    def step(self, step: int, model: torch.nn.Module, optimizer=None, schedule=None) -> None:
        """Record ``model`` at ``step`` if it is a record step, and save a snapshot at a
        snapshot step (model, ``optimizer`` and ``schedule`` state); call it before the
        step's update, as the train stage records.
        """
        if step in self.cfg.RECORD_STEPS:
            self._check_layout(model)
            if record_state(self.store, step, model):
                self.recorded.append(step)
                self.events.write("record", step=step)
        if step in self.cfg.SNAPSHOT_STEPS:
            if optimizer is None:
                raise ConfigError(f"SNAPSHOT_STEPS: step {step} needs the optimizer to snapshot")
            save_snapshot(self.run.snapshot(step), step, model, optimizer, schedule)
            self.events.write("snapshot", step=step)

    def _check_layout(self, model: torch.nn.Module) -> None:
        if _layout(model) != self.layout:
            raise ConfigError(
                f"problem: the recorded model's parameters or buffers differ from those of "
                f"{self.cfg.problem}'s model (names, shapes, dtypes or requires_grad); every "
                "later job rebuilds the model with that factory"
            )

    def finish(self, **metrics) -> RunDir:
        """Mark the record finished (the ``train`` summary, with ``metrics`` such as
        ``final_test_accuracy``) and close the log; returns the run. A second call (the
        ``with`` block's end after an explicit one) changes nothing.
        """
        if self.finished:
            return self.run
        missing = [step for step in self.cfg.RECORD_STEPS if step not in self.recorded]
        if missing:
            raise ConfigError(f"RECORD_STEPS: steps {missing} were never recorded")
        fields = {
            "steps_run": max(self.recorded),
            "recorded_steps": sorted(self.recorded),
            "wall_seconds": round(time.perf_counter() - self.started, 3),
            "problem": self.cfg.problem,
            "data": self.problem.data_note,
            "recorded_by": "hessov.Recorder",
            **metrics,
        }
        summary.record(self.run, "train", fields)
        self.events.write("finished", **fields)
        self.events.close()
        self.finished = True
        get_logger().info("recorded steps %s into %s", sorted(self.recorded), self.run.root)
        return self.run

    def discard(self) -> None:
        """Remove the unfinished record (nothing else is in its directory: it was empty)."""
        self.events.close()
        shutil.rmtree(self.run.root)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.events.close()  # unfinished: nothing marks it done


def _layout(model: torch.nn.Module) -> tuple[list[dict], list[dict]]:
    """What must match between a recorded model and the factory's: the trainable parameters
    and the state recorded next to them (buffers, frozen parameters).
    """
    return parameter_layout(model), buffer_layout(model)


def import_checkpoints(run_dir, problem: str, checkpoints: dict[int, Path], overrides=()):
    """Record ``state_dict`` checkpoints ``{step: path}`` saved by any training code; each is
    read with ``weights_only=True`` (a plain state dict, or one under ``"model"`` or
    ``"state_dict"``) into the factory's model. Returns the run.
    """
    states = {step: _read_checkpoint(Path(path)) for step, path in sorted(checkpoints.items())}
    recorder = Recorder(run_dir, problem, list(checkpoints), overrides=overrides)
    try:
        for step, state in states.items():
            try:
                recorder.problem.model.load_state_dict(state)
            except (RuntimeError, TypeError, AttributeError) as err:
                first = str(err).strip().splitlines()[0]
                raise ConfigError(
                    f"checkpoint: {checkpoints[step]} does not fit {problem}'s model: {first}"
                ) from None
            recorder.step(step, recorder.problem.model)
    except ConfigError:
        recorder.discard()
        raise
    return recorder.finish(imported=[str(path) for _, path in sorted(checkpoints.items())])


def _read_checkpoint(path: Path) -> dict:
    """A checkpoint's state dict, read with ``weights_only=True``: the file itself, or the
    dict under ``"model"`` or ``"state_dict"``.
    """
    if not path.is_file():
        raise ConfigError(f"checkpoint: no file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch reports bad pickles with many types)
        raise ConfigError(f"checkpoint: cannot read {path} as a state dict: {err}") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state
