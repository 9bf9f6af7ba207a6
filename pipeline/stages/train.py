"""Stage 1, train: train a problem and record parameters, gradients and snapshots.

Trains ``cfg.problem`` with ``cfg.optimizer`` and ``cfg.schedule`` to ``MAX_STEPS`` or a
goal (``TARGET_TEST_ACCURACY`` at an evaluation, ``TARGET_TRAIN_LOSS`` on the evaluated
train loss). Step ``t`` means the parameters after ``t`` updates: at every step in
``RECORD_STEPS`` the flattened float32 vector of the trainable parameters and the model's
buffers (BatchNorm statistics, registered buffers) are appended to ``params.h5`` (and,
with ``RECORD_GRADIENTS``, the full gradient on each Hessian subset to
``grads_{split}.h5``); at every step in ``SNAPSHOT_STEPS`` the full training state is
saved before that step's update, for the replay stage. A rolling ``latest`` snapshot at
every evaluation lets a killed run resume (``resume=true``) and reproduce the
uninterrupted run exactly on CPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hessov import batching, summary
from hessov.config import RunConfig, problem_label
from hessov.errors import RunExistsError
from hessov.fileio import atomic_write_json
from hessov.optim import build_optimizer, build_schedule
from hessov.paramstore import (
    ColumnStore,
    parameter_layout,
    trainable_parameters,
)
from hessov.problems import Problem, build_problem
from hessov.problems.checks import check_eval_deterministic
from hessov.recording import (
    begin_record,
    hessian_subsets,
    record_state,
    refuse_unfinished_record,
)
from hessov.rundir import SPLITS, RunDir
from hessov.runlog import EventLog, get_logger
from hessov.training import (
    BatchSchedule,
    evaluate,
    flat_gradient,
    load_snapshot,
    loss_and_gradient,
    save_snapshot,
    set_cpu_threads,
    to_device,
)


def new_run_dir(cfg: RunConfig) -> RunDir:
    """A fresh directory ``OUTPUT_DIR/<time>__<problem>__<seed>`` (never an existing one)."""
    stamp = datetime.now().strftime("%Y_%m_%d_%H_%M_%S.%f")[:-3]
    base = Path(cfg.OUTPUT_DIR) / f"{stamp}__{problem_label(cfg.problem)}__{cfg.RANDOM_SEED}"
    path, suffix = base, 1
    while path.exists():
        path, suffix = base.with_name(f"{base.name}_{suffix}"), suffix + 1
    return RunDir(path)


def prepare_run_dir(cfg: RunConfig) -> tuple[RunDir, Path | None]:
    """Choose the run directory and, when resuming, the snapshot to resume from.

    Refuses (:class:`RunExistsError`) to touch a directory whose training finished, or
    one with partial results unless ``resume=true``.
    """
    if cfg.RUN_DIR is None:
        if cfg.resume:
            raise RunExistsError("resume=true needs RUN_DIR=<the run to resume>")
        return new_run_dir(cfg), None
    run = RunDir(Path(cfg.RUN_DIR))
    if run.summary("train").is_file():
        raise RunExistsError(
            f"{run.root} already holds a finished training run; it is never overwritten. "
            "Choose another RUN_DIR (or leave it unset for a new directory)."
        )
    if not run.config.is_file():
        if run.root.exists() and any(run.root.iterdir()):
            raise RunExistsError(f"{run.root} exists and is not a hessov run directory")
        return run, None
    refuse_unfinished_record(run)
    if not cfg.resume:
        raise RunExistsError(
            f"{run.root} holds an unfinished training run. Pass resume=true to continue it "
            "from its last snapshot, or choose another RUN_DIR."
        )
    # The steps come from the names and the latest snapshot's index, never from unpickling
    # every snapshot; the resumed step is the one the chosen file holds.
    candidates = {run.snapshot(step): step for step in run.snapshot_steps()}
    if run.latest_snapshot.is_file():
        candidates[run.latest_snapshot] = _latest_snapshot_step(run)
    if not candidates:
        return run, None
    return run, max(candidates, key=candidates.get)


@dataclass
class _Training:
    """What the training loop works on, set up by :func:`train`.

    Attributes:
        cfg: The run's configuration.
        run: Its directory.
        problem: The network, loss and data, on the run's device and dtype.
        subsets: The Hessian subset indices ``(N,)`` of each split.
        batches: Which examples form each step's batch.
        optimizer, schedule: The optimizer and its learning-rate schedule.
        events: The run's event log.
        params_store: ``params.h5``, one column per recorded step.
        grad_stores: ``grads_{split}.h5`` per split (written with ``RECORD_GRADIENTS``).
    """

    cfg: RunConfig
    run: RunDir
    problem: Problem
    subsets: dict[str, torch.Tensor]
    batches: BatchSchedule
    optimizer: Any
    schedule: Any
    events: EventLog
    params_store: ColumnStore
    grad_stores: dict[str, ColumnStore]


def train(cfg: RunConfig) -> RunDir:
    """Run the train stage; returns the run directory."""
    log = get_logger()
    run, resume_from = prepare_run_dir(cfg)
    set_cpu_threads(cfg.threads)
    problem = build_problem(cfg)
    to_device(problem, cfg.device, cfg.dtype)
    check_eval_deterministic(problem.model, problem.train.inputs)
    subsets = hessian_subsets(problem, cfg.NUM_HESSIAN_DATAPOINTS)
    batches = BatchSchedule(len(problem.train), cfg.BATCH_SIZE, cfg.RANDOM_SEED)
    optimizer = build_optimizer(trainable_parameters(problem.model), cfg.optimizer)
    schedule = build_schedule(
        optimizer, cfg.schedule, max_steps=cfg.MAX_STEPS, steps_per_epoch=batches.steps_per_epoch
    )
    with EventLog(run.log, "train") as events:
        training = _Training(
            cfg,
            run,
            problem,
            subsets,
            batches,
            optimizer,
            schedule,
            events,
            ColumnStore(run.params),
            {split: ColumnStore(run.gradients(split)) for split in SPLITS},
        )
        if resume_from is None:
            start_step = _start_new_run(training)
        else:
            start_step = _resume(training, resume_from)
        log.info(
            "training %s (%d parameters; data: %s) for %d steps into %s",
            cfg.problem,
            problem.num_params,
            problem.data_note,
            cfg.MAX_STEPS,
            run.root,
        )
        result = _training_loop(training, start_step)
        summary.record(run, "train", result)
        events.write("finished", **result)
    log.info(
        "trained to step %d: train loss %.4f, test accuracy %s in %.1f s",
        result["steps_run"],
        result["final_train_loss"],
        result["final_test_accuracy"],
        result["wall_seconds"],
    )
    return run


def _start_new_run(t: _Training) -> int:
    """Begin the record of a new run (:func:`hessov.recording.begin_record`) and create the
    gradient stores; returns the first step, 0.
    """
    cfg, run, problem = t.cfg, t.run, t.problem
    t.params_store = begin_record(run, cfg, problem, t.subsets, t.events)
    if cfg.RECORD_GRADIENTS:
        layout = parameter_layout(problem.model)
        for split, store in t.grad_stores.items():
            if store.path.exists():
                store.path.unlink()
            store.create(problem.num_params, layout, f"full gradient on the {split} subset")
    return 0


def _resume(t: _Training, snapshot: Path) -> int:
    """Restore model, optimizer, schedule and RNG state from ``snapshot``; returns its step."""
    state = load_snapshot(snapshot, t.cfg.device)
    t.problem.model.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    start_step = state["step"]
    t.events.write("resume", step=start_step, snapshot=snapshot.name)
    get_logger().info("resuming %s from %s (step %d)", t.run.root, snapshot.name, start_step)
    return start_step


def _latest_snapshot_step(run: RunDir) -> int:
    """The rolling snapshot's step, from its index (one safe load for runs made before it)."""
    if run.latest_snapshot_step.is_file():
        return json.loads(run.latest_snapshot_step.read_text())["step"]
    return load_snapshot(run.latest_snapshot)["step"]


def _training_loop(t: _Training, start_step: int) -> dict:
    """Train from ``start_step`` to ``MAX_STEPS`` or a goal, recording, snapshotting and
    evaluating on the way; returns the train summary.
    """
    cfg, problem = t.cfg, t.problem
    started = time.perf_counter()
    nan = float("nan")
    metrics = {"train_loss": nan, "train_accuracy": None, "test_loss": nan, "test_accuracy": None}
    stopped_by, step = "MAX_STEPS", start_step
    latest = t.run.latest_snapshot
    problem.model.train()
    progress = tqdm(
        range(start_step, cfg.MAX_STEPS + 1),
        desc="train",
        unit="step",
        initial=start_step,
        total=cfg.MAX_STEPS + 1,
        mininterval=1.0,
    )
    for step in progress:
        _record(t, step)
        if step % cfg.EVAL_EVERY == 0 or step == cfg.MAX_STEPS:
            metrics = _evaluate(t, step)
            progress.set_postfix(
                train_loss=f"{metrics['train_loss']:.4f}", test_acc=metrics["test_accuracy"]
            )
            save_snapshot(latest, step, problem.model, t.optimizer, t.schedule)
            atomic_write_json(t.run.latest_snapshot_step, {"step": step})
            goal = _goal_reached(cfg, metrics)
            if goal is not None:
                stopped_by = goal
                break
        if step == cfg.MAX_STEPS:
            break
        if not torch.isfinite(_train_step(t, step)):
            stopped_by, step = "diverged", step + 1
            break
    progress.close()
    return {
        "num_params": problem.num_params,
        "recorded_steps": t.params_store.steps(),
        "snapshot_steps": t.run.snapshot_steps(),
        "final_train_loss": metrics["train_loss"],
        "final_train_accuracy": metrics["train_accuracy"],
        "final_test_loss": metrics["test_loss"],
        "final_test_accuracy": metrics["test_accuracy"],
        "steps_run": step,
        "stopped_by": stopped_by,
        "wall_seconds": round(time.perf_counter() - started, 3),
        "data": problem.data_note,
        "problem": cfg.problem,
    }


def _record(t: _Training, step: int) -> None:
    """At a recorded step, append the parameters (and gradients); at a snapshot step, save
    the training state.
    """
    cfg, problem, model = t.cfg, t.problem, t.problem.model
    if step in cfg.RECORD_STEPS:
        record_state(t.params_store, step, model)
        if cfg.RECORD_GRADIENTS:
            for split, store in t.grad_stores.items():
                data = getattr(problem, split)
                idx = t.subsets[split].to(data.targets.device)
                grad = flat_gradient(
                    model,
                    problem.loss,
                    batching.take(data.inputs, idx),
                    batching.take(data.targets, idx),
                    cfg.PHYSICAL_BATCH_SIZE,
                )
                store.append(step, grad)
        t.events.write("record", step=step)
    if step in cfg.SNAPSHOT_STEPS:
        save_snapshot(t.run.snapshot(step), step, model, t.optimizer, t.schedule)
        t.events.write("snapshot", step=step)


def _evaluate(t: _Training, step: int) -> dict:
    """Loss and accuracy on both splits (their ``EVAL_DATAPOINTS``), logged as an ``eval``
    event.
    """
    problem, count = t.problem, t.cfg.EVAL_DATAPOINTS
    train_loss, train_acc = evaluate(
        problem.model,
        problem.loss,
        problem.train.inputs,
        problem.train.targets,
        problem.num_classes,
        count,
    )
    test_loss, test_acc = evaluate(
        problem.model,
        problem.loss,
        problem.test.inputs,
        problem.test.targets,
        problem.num_classes,
        count,
    )
    metrics = {
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
    }
    t.events.write("eval", step=step, **metrics, lr=t.optimizer.param_groups[0]["lr"])
    return metrics


def _goal_reached(cfg: RunConfig, metrics: dict) -> str | None:
    """The goal an evaluation reached (``TARGET_TEST_ACCURACY``, ``TARGET_TRAIN_LOSS``), if any."""
    test_acc = metrics["test_accuracy"]
    if cfg.TARGET_TEST_ACCURACY is not None and test_acc is not None:
        if test_acc >= cfg.TARGET_TEST_ACCURACY:
            return "TARGET_TEST_ACCURACY"
    if cfg.TARGET_TRAIN_LOSS is not None and metrics["train_loss"] <= cfg.TARGET_TRAIN_LOSS:
        return "TARGET_TRAIN_LOSS"
    return None


def _train_step(t: _Training, step: int) -> torch.Tensor:
    """One update on step ``step``'s batch; returns the batch loss (logged as ``batch``)."""
    train = t.problem.train
    idx = t.batches.indices(step).to(train.targets.device)
    t.optimizer.zero_grad(set_to_none=True)
    batch_loss = loss_and_gradient(
        t.problem.model,
        t.problem.loss,
        batching.take(train.inputs, idx),
        batching.take(train.targets, idx),
        t.cfg.PHYSICAL_BATCH_SIZE,
    )
    t.optimizer.step()
    t.schedule.step()
    t.events.write("batch", step=step, loss=float(batch_loss))
    return batch_loss
