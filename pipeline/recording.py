"""What a run records of its training, shared by the train stage and a user's own loop.

The stages after training read four things from a run directory: ``config.yaml`` (how to
rebuild the problem), ``params.h5`` (the trainable parameters and the buffers at every
recorded step), the Hessian subsets in ``log.jsonl`` and the ``train`` summary that marks the
record finished. :func:`begin_record` writes the first three's headers, :func:`record_state`
appends a step; the train stage (:mod:`hessov.stages.train`) and :class:`hessov.Recorder` both
use them, so a run recorded either way is the same to every later stage.
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from hessov.config import RunConfig, save_config
from hessov.errors import ConfigError
from hessov.paramstore import (
    ColumnStore,
    buffer_layout,
    flatten_buffers,
    flatten_parameters,
    frozen_layout,
    parameter_layout,
)
from hessov.problems import Problem
from hessov.problems.data import class_balanced_subset
from hessov.rundir import SPLITS, RunDir
from hessov.runlog import EventLog, read_events


def hessian_subsets(problem: Problem, size: int) -> dict[str, torch.Tensor]:
    """The deterministic Hessian subsets ``(size,)`` of both splits: class-balanced for a
    labelled problem, the first ``size`` examples otherwise.
    """
    subsets = {}
    for split in SPLITS:
        targets = getattr(problem, split).targets.cpu()
        if size > targets.shape[0]:
            raise ConfigError(
                f"NUM_HESSIAN_DATAPOINTS={size} is larger than the {split} split "
                f"({targets.shape[0]} examples)"
            )
        subsets[split] = class_balanced_subset(targets, size, problem.num_classes)
    return subsets


def begin_record(
    run: RunDir,
    cfg: RunConfig,
    problem: Problem,
    subsets: dict[str, torch.Tensor],
    events: EventLog,
) -> ColumnStore:
    """Save the config, log the run's globals and Hessian subsets, and create ``params.h5``
    (replacing one a run without config left); returns the parameter store.
    """
    run.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.config)
    layout = parameter_layout(problem.model)
    frozen, buffers = frozen_layout(problem.model), buffer_layout(problem.model)
    events.write("config", config=OmegaConf.to_container(OmegaConf.structured(cfg)))
    events.write(
        "globals",
        problem=cfg.problem,
        num_params=problem.num_params,
        data=problem.data_note,
        train_size=len(problem.train),
        test_size=len(problem.test),
        parameters=layout,
        frozen_parameters=frozen,
        buffers=buffers,
        record_steps=cfg.RECORD_STEPS,
        snapshot_steps=cfg.SNAPSHOT_STEPS,
    )
    events.write("hessian_subsets", **{split: idx for split, idx in subsets.items()})
    store = ColumnStore(run.params)
    if run.params.exists():
        run.params.unlink()  # a run without config holds no finished result
    description = f"{cfg.problem} parameters, one float32 column per recorded step"
    store.create(problem.num_params, layout, description, frozen=frozen, buffers=buffers)
    return store


def record_state(store: ColumnStore, step: int, model: torch.nn.Module) -> bool:
    """Append ``model``'s trainable parameters and buffers as the column of ``step``; False
    when that step is recorded already.
    """
    return store.append(step, flatten_parameters(model), flatten_buffers(model))


def refuse_unfinished_record(run: RunDir) -> None:
    """Refuse to go on with a run a :class:`hessov.Recorder` began and never finished: the
    train stage would otherwise train the factory's model over the user's record.
    """
    if run.summary("train").is_file() or not run.log.is_file():
        return
    if any(event["stage"] == "record" for event in read_events(run.log, "globals")):
        raise ConfigError(
            f"RUN_DIR: {run.root} holds a record a hessov.Recorder began and never finished "
            "(its loop failed, or finish() was not called); record again into a new directory"
        )
