"""Stage 1, train: train a problem and record parameters, gradients and snapshots.

Trains ``cfg.problem`` with ``cfg.optimizer`` and ``cfg.schedule`` to ``MAX_STEPS`` or a
goal (``TARGET_TEST_ACCURACY`` at an evaluation, ``TARGET_TRAIN_LOSS`` on the evaluated
train loss). Step ``t`` means the parameters after ``t`` updates: at every step in
``RECORD_STEPS`` the flattened float32 parameter vector is appended to ``params.h5``
(and, with ``RECORD_GRADIENTS``, the full gradient on each Hessian subset to
``grads_{split}.h5``); at every step in ``SNAPSHOT_STEPS`` the full training state is
saved before that step's update, for the replay stage. A rolling ``latest`` snapshot at
every evaluation lets a killed run resume (``resume=true``) and reproduce the
uninterrupted run exactly on CPU.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import summary
from pipeline.config import RunConfig, save_config
from pipeline.errors import ConfigError, RunExistsError
from pipeline.optim import build_optimizer, build_schedule
from pipeline.paramstore import ColumnStore, flatten_parameters, parameter_layout
from pipeline.problems import Problem, build_problem
from pipeline.problems.data import class_balanced_subset
from pipeline.rundir import SPLITS, RunDir
from pipeline.runlog import EventLog, get_logger
from pipeline.training import (
    BatchSchedule,
    evaluate,
    flat_gradient,
    load_snapshot,
    loss_and_gradient,
    save_snapshot,
    set_cpu_threads,
    to_device,
)

LATEST_SNAPSHOT = "latest"


def new_run_dir(cfg: RunConfig) -> RunDir:
    """A fresh directory ``OUTPUT_DIR/<time>__<problem>__<seed>`` (never an existing one)."""
    stamp = datetime.now().strftime("%Y_%m_%d_%H_%M_%S.%f")[:-3]
    base = Path(cfg.OUTPUT_DIR) / f"{stamp}__{cfg.problem}__{cfg.RANDOM_SEED}"
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
    if not cfg.resume:
        raise RunExistsError(
            f"{run.root} holds an unfinished training run. Pass resume=true to continue it "
            "from its last snapshot, or choose another RUN_DIR."
        )
    candidates = [run.snapshot(s) for s in run.snapshot_steps()]
    latest = run.snapshots / f"{LATEST_SNAPSHOT}.pt"
    if latest.is_file():
        candidates.append(latest)
    if not candidates:
        return run, None
    best = max(candidates, key=lambda p: torch.load(p, weights_only=False)["step"])
    return run, best


def hessian_subsets(problem: Problem, size: int) -> dict[str, torch.Tensor]:
    """The deterministic class-balanced Hessian subsets of both splits."""
    subsets = {}
    for split in SPLITS:
        labels = getattr(problem, split).labels.cpu()
        if size > labels.shape[0]:
            raise ConfigError(
                f"NUM_HESSIAN_DATAPOINTS={size} is larger than the {split} split "
                f"({labels.shape[0]} examples)"
            )
        subsets[split] = class_balanced_subset(labels, size, problem.num_classes)
    return subsets


def train(cfg: RunConfig) -> RunDir:
    """Run the train stage; returns the run directory."""
    log = get_logger()
    run, resume_from = prepare_run_dir(cfg)
    set_cpu_threads(cfg.threads)
    problem = build_problem(cfg)
    to_device(problem, cfg.device, cfg.dtype)
    subsets = hessian_subsets(problem, cfg.NUM_HESSIAN_DATAPOINTS)
    batches = BatchSchedule(len(problem.train), cfg.BATCH_SIZE, cfg.RANDOM_SEED)
    model = problem.model
    optimizer = build_optimizer(model.parameters(), cfg.optimizer)
    schedule = build_schedule(
        optimizer, cfg.schedule, max_steps=cfg.MAX_STEPS, steps_per_epoch=batches.steps_per_epoch
    )
    events = EventLog(run.log, "train")
    params_store = ColumnStore(run.params)
    grad_stores = {split: ColumnStore(run.gradients(split)) for split in SPLITS}
    start_step = 0
    if resume_from is None:
        run.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config)
        layout = parameter_layout(model)
        events.write("config", config=_config_dict(cfg))
        events.write(
            "globals",
            problem=cfg.problem,
            num_params=problem.num_params,
            data=problem.data_note,
            train_size=len(problem.train),
            test_size=len(problem.test),
            parameters=layout,
            record_steps=cfg.RECORD_STEPS,
            snapshot_steps=cfg.SNAPSHOT_STEPS,
        )
        events.write("hessian_subsets", **{s: idx for s, idx in subsets.items()})
        description = f"{cfg.problem} parameters, one float32 column per recorded step"
        if run.params.exists():
            run.params.unlink()  # a run without config holds no finished result
        params_store.create(problem.num_params, layout, description)
        if cfg.RECORD_GRADIENTS:
            for split, store in grad_stores.items():
                if store.path.exists():
                    store.path.unlink()
                store.create(problem.num_params, layout, f"full gradient on the {split} subset")
    else:
        state = load_snapshot(resume_from, cfg.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        start_step = state["step"]
        events.write("resume", step=start_step, snapshot=resume_from.name)
        log.info("resuming %s from %s (step %d)", run.root, resume_from.name, start_step)
    log.info(
        "training %s (%d parameters; data: %s) for %d steps into %s",
        cfg.problem,
        problem.num_params,
        problem.data_note,
        cfg.MAX_STEPS,
        run.root,
    )
    result = _training_loop(
        cfg,
        run,
        problem,
        subsets,
        batches,
        optimizer,
        schedule,
        start_step,
        events,
        params_store,
        grad_stores,
    )
    summary.record(run, "train", result)
    events.write("finished", **result)
    events.close()
    log.info(
        "trained to step %d: train loss %.4f, test accuracy %s in %.1f s",
        result["steps_run"],
        result["final_train_loss"],
        result["final_test_accuracy"],
        result["wall_seconds"],
    )
    return run


def _config_dict(cfg: RunConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))


def _training_loop(
    cfg,
    run,
    problem,
    subsets,
    batches,
    optimizer,
    schedule,
    start_step,
    events,
    params_store,
    grad_stores,
) -> dict:
    model, loss_fn = problem.model, problem.loss
    train_x, train_y = problem.train.images, problem.train.labels
    chunk = cfg.PHYSICAL_BATCH_SIZE
    record_steps, snapshot_steps = set(cfg.RECORD_STEPS), set(cfg.SNAPSHOT_STEPS)
    started = time.perf_counter()
    train_loss = test_loss = float("nan")
    train_acc = test_acc = None
    stopped_by, step = "MAX_STEPS", start_step
    model.train()
    progress = tqdm(
        range(start_step, cfg.MAX_STEPS + 1),
        desc="train",
        unit="step",
        initial=start_step,
        total=cfg.MAX_STEPS + 1,
        mininterval=1.0,
    )
    for step in progress:
        if step in record_steps:
            params_store.append(step, flatten_parameters(model))
            if cfg.RECORD_GRADIENTS:
                for split, store in grad_stores.items():
                    idx = subsets[split].to(train_x.device)
                    data = getattr(problem, split)
                    grad = flat_gradient(model, loss_fn, data.images[idx], data.labels[idx], chunk)
                    store.append(step, grad)
            events.write("record", step=step)
        if step in snapshot_steps:
            save_snapshot(run.snapshot(step), step, model, optimizer, schedule, {})
            events.write("snapshot", step=step)
        if step % cfg.EVAL_EVERY == 0 or step == cfg.MAX_STEPS:
            train_loss, train_acc = evaluate(model, loss_fn, train_x, train_y, problem.num_classes)
            test_loss, test_acc = evaluate(
                model, loss_fn, problem.test.images, problem.test.labels, problem.num_classes
            )
            events.write(
                "eval",
                step=step,
                train_loss=train_loss,
                train_accuracy=train_acc,
                test_loss=test_loss,
                test_accuracy=test_acc,
                lr=optimizer.param_groups[0]["lr"],
            )
            progress.set_postfix(train_loss=f"{train_loss:.4f}", test_acc=test_acc)
            save_snapshot(
                run.snapshots / f"{LATEST_SNAPSHOT}.pt", step, model, optimizer, schedule, {}
            )
            if cfg.TARGET_TEST_ACCURACY is not None and test_acc is not None:
                if test_acc >= cfg.TARGET_TEST_ACCURACY:
                    stopped_by = "TARGET_TEST_ACCURACY"
                    break
            if cfg.TARGET_TRAIN_LOSS is not None and train_loss <= cfg.TARGET_TRAIN_LOSS:
                stopped_by = "TARGET_TRAIN_LOSS"
                break
        if step == cfg.MAX_STEPS:
            break
        idx = batches.indices(step).to(train_x.device)
        optimizer.zero_grad(set_to_none=True)
        batch_loss = loss_and_gradient(model, loss_fn, train_x[idx], train_y[idx], chunk)
        optimizer.step()
        schedule.step()
        events.write("batch", step=step, loss=float(batch_loss))
        if not torch.isfinite(batch_loss):
            stopped_by, step = "diverged", step + 1
            break
    progress.close()
    return {
        "num_params": problem.num_params,
        "recorded_steps": params_store.steps(),
        "snapshot_steps": run.snapshot_steps(),
        "final_train_loss": train_loss,
        "final_train_accuracy": train_acc,
        "final_test_loss": test_loss,
        "final_test_accuracy": test_acc,
        "steps_run": step,
        "stopped_by": stopped_by,
        "wall_seconds": round(time.perf_counter() - started, 3),
        "data": problem.data_note,
        "problem": cfg.problem,
    }
