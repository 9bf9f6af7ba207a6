"""Stage replay: continue a run from a snapshot with a spectral filter on the gradient.

README.md, "Spectral-filter replays": the baseline run saved its full training state at
step ``T`` (before that step's update); each replay loads it and trains on with its own
step counter ``s = 0, 1, ...`` (global step ``T + s``, with the batches the baseline would
have seen), the gradient filtered in the Hessian's top eigenbasis by
:class:`~hessov.optim.spectral_filter.FilteredOptimizer` before the run's optimizer
steps. Replays of one snapshot differ only in the filter, so their curves compare
directly; ``mode=none`` is the baseline continued unchanged.

Every ``eig_freq`` steps the top ``max(neigs, nfilter + 1)`` eigenpairs of the Hessian of
the run's train Hessian subset (the class-balanced ``NUM_HESSIAN_DATAPOINTS`` examples the
sketch stages use; set it to the train size for the full-batch Hessian) are recomputed on
the live model (:mod:`hessov.replay_eigen`). Only the current eigenvectors are kept.
``nfilter + 1`` makes ``lambda_{N+1}`` visible: under flat_scaling_v1 the frozen top-N
eigenvalues may keep rising (progressive sharpening, Cohen et al. 2021, "Gradient Descent
on Neural Networks Typically Occurs at the Edge of Stability") until ``lambda_{N+1}``
reaches ``2 / eta``.

Logged to ``RUN/replays/NAME/log.jsonl``: per step (``step``) the train loss and accuracy
of the step's batch (the whole train split under GD) at the parameters after ``s`` updates,
the gradient norm, the filtered-gradient norm, the share of the gradient in the top-N
eigenspace, alpha after warmup and the number of frozen directions; every ``EVAL_EVERY``
steps (``eval``) the test loss and accuracy; every ``eig_freq`` steps (``eigen``) the
eigenvalues, largest magnitude first (the sharpness flow). The replay stops at its
``MAX_STEPS``, at ``TARGET_TRAIN_ACCURACY``, at ``TARGET_TRAIN_LOSS`` with
``STOP_AT_TARGET``, or when the loss is no longer finite, and records the ``replay`` summary.

A replay with ``seeds`` is one job per seed (:func:`~hessov.config.replay_jobs`), each
with its own ``RUN/replays/NAME.seedS/`` and summary: seed 0 continues the snapshot itself,
seed ``S > 0`` a copy perturbed by :func:`perturb_parameters`, because at the edge of
stability a single trajectory follows the last bits of the floating-point arithmetic.
``hessov compare`` (:mod:`hessov.stages.compare`) draws and ranks the finished replays.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from hessov import batching, summary
from hessov.config import (
    OptimizerConfig,
    ReplayConfig,
    RunConfig,
    replay_jobs,
    replay_optimizer,
    save_config,
    validate_replay,
)
from hessov.errors import ConfigError, MissingInputError, RunExistsError
from hessov.hessian import recorded_subsets
from hessov.optim import build_optimizer, build_schedule
from hessov.optim.spectral_filter import (
    FilteredOptimizer,
    SpectralFilter,
    max_stable_sharpness,
)
from hessov.paramstore import trainable_parameters
from hessov.problems import Problem, build_problem
from hessov.replay_eigen import Eigenpairs, hessian_eigenpairs, num_eigenpairs
from hessov.replay_logs import saved_replay_settings
from hessov.rundir import RunDir
from hessov.runlog import EventLog, get_logger
from hessov.training import (
    BatchSchedule,
    evaluate,
    load_snapshot,
    loss_and_gradient,
    set_cpu_threads,
    to_device,
)

__all__ = [
    "check_replay_inputs",
    "finished_replay",
    "num_eigenpairs",
    "perturb_parameters",
    "run_replay",
]


def check_replay_inputs(run: RunDir, replay: ReplayConfig, dim: int) -> None:
    """Refuse, before any step, a missing snapshot or an ``nfilter``/``neigs`` >= D.

    Args:
        run: the trained run.
        replay: one job's settings.
        dim: the number of parameters ``D``.

    Raises:
        MissingInputError: the run saved no snapshot at ``replay.snapshot``.
        ConfigError: ``nfilter >= D``, or ``neigs >= D`` with eigenpairs recomputed.
    """
    if not run.snapshot(replay.snapshot).is_file():
        raise MissingInputError(
            f"snapshot: no snapshot of step {replay.snapshot} in {run.snapshots} "
            f"(saved: {run.snapshot_steps()}); did training stop before it?"
        )
    if replay.nfilter >= dim:
        raise ConfigError(
            f"nfilter: {replay.nfilter} must be smaller than the number of parameters D={dim}"
        )
    if replay.eig_freq > 0 and replay.neigs >= dim:
        raise ConfigError(f"neigs: {replay.neigs} must be smaller than D={dim}")


def _settings(replay: ReplayConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(replay))


def _refuse_mixed_group(run: RunDir, replay: ReplayConfig) -> None:
    """Seeds of a replay and an unseeded replay of the same name would mix in one group of
    ``hessov compare``. Only directory names are read: sibling seeds may be writing theirs.
    """
    if replay.seed is not None and run.replay_config(replay.group).is_file():
        raise RunExistsError(
            f"seeds: replay {replay.group!r} in {run.replay(replay.group)} was run without seeds; "
            "give the seeded replay another name"
        )
    if replay.seed is None and run.replays.is_dir():
        pattern = re.compile(re.escape(replay.name) + r"\.seed[0-9]+")
        seeded = sorted(p.name for p in run.replays.iterdir() if pattern.fullmatch(p.name))
        if seeded:
            raise RunExistsError(
                f"name: {replay.name!r} is the group of the seeded replays {', '.join(seeded)} "
                f"in {run.replays}; choose another name"
            )


def finished_replay(run: RunDir, replay: ReplayConfig) -> dict | None:
    """The recorded summary if ``replay`` already finished with these settings, else None.

    Args:
        run: the trained run.
        replay: one job's settings.

    Returns:
        The job's ``summary.json``, or None if it has not run or did not finish.

    Raises:
        RunExistsError: the name holds a replay with other settings (never overwritten), or
            seeded and unseeded replays would share one name (see :func:`_refuse_mixed_group`).
    """
    _refuse_mixed_group(run, replay)
    path = run.replay_config(replay.name)
    if not path.is_file():
        return None
    saved, wanted = _settings(saved_replay_settings(run, replay.name)), _settings(replay)
    if saved != wanted:
        changed = sorted(
            key for key in saved.keys() | wanted.keys() if saved.get(key) != wanted.get(key)
        )
        raise RunExistsError(
            f"name: replay {replay.name!r} in {run.replay(replay.name)} was run with other "
            f"settings ({', '.join(changed)} differ); choose another name"
        )
    if run.replay_summary(replay.name).is_file():
        return json.loads(run.replay_summary(replay.name).read_text())
    return None


def _create_directory(run: RunDir, replay: ReplayConfig) -> None:
    """A fresh directory with the settings; an unfinished one (a killed job with the same
    settings, see :func:`finished_replay`) is started again from the snapshot.
    """
    if run.replay(replay.name).exists():
        shutil.rmtree(run.replay(replay.name))
    run.replay(replay.name).mkdir(parents=True)
    save_config(replay, run.replay_config(replay.name))


def _loss_accuracy_and_gradient(model, loss_fn, inputs, targets, chunk, num_classes):
    """Mean loss (gradients accumulated into ``.grad``) and accuracy (None if unlabelled)
    of one batch of ``B`` examples, ``inputs`` (:mod:`hessov.batching`) and ``targets``
    ``(B,)``, in chunks of ``chunk``, from the same forward passes (a hook collects the
    predictions).
    """
    if not num_classes:  # a regression output has no classes to take the argmax over
        return loss_and_gradient(model, loss_fn, inputs, targets, chunk), None
    if isinstance(loss_fn, batching.ModelLoss):  # it calls the model as it likes: call again
        loss = loss_and_gradient(model, loss_fn, inputs, targets, chunk)
        with torch.no_grad():
            outputs = batching.call_model(model, inputs)
        return loss, float((outputs.argmax(dim=1) == targets).double().mean())
    predictions = []
    handle = model.register_forward_hook(
        lambda _module, _inputs, output: predictions.append(output.detach().argmax(dim=1))
    )
    try:
        loss = loss_and_gradient(model, loss_fn, inputs, targets, chunk)
    finally:
        handle.remove()
    return loss, float((torch.cat(predictions) == targets).double().mean())


def perturb_parameters(model: torch.nn.Module, seed: int, perturbation: float) -> float:
    """Move the model to seed ``seed``'s starting point: every trainable parameter
    ``p <- p (1 + perturbation z)``, ``z ~ N(0, 1)`` drawn on the CPU by a generator seeded
    with ``seed``, parameter after parameter (the same point on every device). Seed 0 leaves
    the parameters untouched. Why and how large: :class:`~hessov.config.ReplayConfig`.

    Args:
        model: its parameters are moved in place.
        seed: the seed ``S >= 0``.
        perturbation: the relative size of the noise.

    Returns:
        The relative change ``||delta|| / ||p||`` over the trainable parameters.
    """
    if seed == 0:
        return 0.0
    generator = torch.Generator().manual_seed(seed)
    moved = size = 0.0
    with torch.no_grad():
        for param in trainable_parameters(model):
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            delta = param * noise.to(param.device) * perturbation
            size += float(param.double().pow(2).sum())
            moved += float(delta.double().pow(2).sum())
            param.add_(delta)
    return math.sqrt(moved / size) if size else 0.0


def run_replay(run: RunDir, cfg: RunConfig, replay: ReplayConfig) -> dict:
    """Run one replay job of ``run`` (see the module docstring). A replay with ``seeds`` is
    several jobs: run each of :func:`~hessov.config.replay_jobs`.

    A replay that already finished with the same settings is not run again: its recorded
    summary is returned.

    Args:
        run: the trained run, with the replay's snapshot.
        cfg: the run's settings.
        replay: one job's settings (no ``seeds``).

    Returns:
        The ``replay`` summary: the start fields and :func:`_replay_loop`'s result.

    Raises:
        ConfigError, MissingInputError: bad settings, ``seeds`` (not one job), a missing
            snapshot, ``nfilter >= D``; all before any step.
        RunExistsError: the name is taken by a replay with other settings.
    """
    finished = _finished_or_refused(run, cfg, replay)
    if finished is not None:
        return finished
    problem, k = _load_problem(run, cfg, replay)
    optimizer_cfg = replay_optimizer(cfg, replay)
    state, seed_fields = _start_from_snapshot(run, cfg, replay, problem.model)
    optimizer, batches, schedule, continued = _restore_training(
        cfg, replay, problem, state, optimizer_cfg
    )
    _create_directory(run, replay)
    subset = recorded_subsets(run)["train"].to(cfg.device)
    hessian_data = (
        batching.take(problem.train.inputs, subset),
        batching.take(problem.train.targets, subset),
    )
    spectral_filter = SpectralFilter(replay.mode, replay.scaling, replay.warmup)
    stepper = FilteredOptimizer(optimizer, trainable_parameters(problem.model), spectral_filter)
    lr = optimizer.param_groups[0]["lr"]
    start_fields = dict(
        name=replay.name,
        snapshot=replay.snapshot,
        mode=replay.mode,
        scaling=replay.scaling,
        nfilter=replay.nfilter,
        lr=lr,
        mss=max_stable_sharpness(lr),
        mss_scaled=max_stable_sharpness(lr, replay.scaling),
        optimizer=optimizer_cfg.name,
        continued_optimizer_state=continued,
        num_params=problem.num_params,
        eigenpairs=k,
        hessian_datapoints=int(subset.numel()),
        **seed_fields,
    )
    replay_log, run_log = run.replay_log(replay.name), run.log
    with EventLog(replay_log, "replay") as events, EventLog(run_log, "replay") as run_events:
        events.write("start", **start_fields)
        run_events.write("replay_started", **start_fields)
        _log_start(run, replay, lr)
        job = _ReplayJob(cfg, replay, problem, batches, stepper, schedule, k, events, hessian_data)
        result = _replay_loop(job)
        return _finish(run, job, run_events, start_fields, result)


def _finished_or_refused(run: RunDir, cfg: RunConfig, replay: ReplayConfig) -> dict | None:
    """Refuse a job with ``seeds`` and bad settings; the summary if it already finished."""
    if replay.seeds:
        jobs = ", ".join(job.name for job in replay_jobs([replay]))
        raise ConfigError(f"seeds: replay {replay.name!r} is one job per seed ({jobs}); run each")
    validate_replay(cfg, replay)
    finished = finished_replay(run, replay)
    if finished is not None:
        get_logger().info(
            "replay %s already finished in %s; not run again", replay.name, run.replay(replay.name)
        )
    return finished


def _load_problem(run: RunDir, cfg: RunConfig, replay: ReplayConfig) -> tuple[Problem, int]:
    """The run's problem on its device, and the eigenpairs per recomputation; refuses a
    missing snapshot and ``nfilter``/``neigs`` >= D.
    """
    set_cpu_threads(cfg.threads)
    problem = build_problem(cfg)
    to_device(problem, cfg.device, cfg.dtype)
    dim = problem.num_params
    check_replay_inputs(run, replay, dim)
    return problem, num_eigenpairs(replay, dim)


def _start_from_snapshot(
    run: RunDir, cfg: RunConfig, replay: ReplayConfig, model: torch.nn.Module
) -> tuple[dict, dict]:
    """Load the snapshot's parameters into ``model`` and move them to the job's seed.

    Returns:
        The snapshot's saved training state, and the fields that record the seed (``group``,
        ``seed``, ``perturbation``, ``relative_perturbation``; none without a seed).
    """
    state = load_snapshot(run.snapshot(replay.snapshot), cfg.device)
    model.load_state_dict(state["model"])
    if replay.seed is None:
        return state, {}
    moved = perturb_parameters(model, replay.seed, replay.perturbation)
    return state, dict(
        group=replay.group,
        seed=replay.seed,
        perturbation=replay.perturbation,
        relative_perturbation=moved,
    )


def _restore_training(
    cfg: RunConfig,
    replay: ReplayConfig,
    problem: Problem,
    state: dict,
    optimizer_cfg: OptimizerConfig,
) -> tuple[torch.optim.Optimizer, BatchSchedule, object, bool]:
    """The optimizer, batch order and schedule where the snapshot left them.

    With the run's optimizer the replay continues its state (momentum, moments); a changed
    optimizer starts fresh but keeps the schedule's clock, at the replay's base rate. The
    torch RNG state is the snapshot's.

    Returns:
        The optimizer, the batch schedule, the learning-rate schedule, and whether the
        optimizer's state was continued.
    """
    optimizer = build_optimizer(trainable_parameters(problem.model), optimizer_cfg)
    batches = BatchSchedule(len(problem.train), cfg.BATCH_SIZE, cfg.RANDOM_SEED)
    schedule = build_schedule(
        optimizer, cfg.schedule, max_steps=cfg.MAX_STEPS, steps_per_epoch=batches.steps_per_epoch
    )
    continued = not replay.optimizer
    schedule_state = dict(state["schedule"])
    if continued:
        _check_snapshot_optimizer(state, optimizer)
        optimizer.load_state_dict(state["optimizer"])
    else:
        schedule_state["base_lrs"] = [group["initial_lr"] for group in optimizer.param_groups]
    if state["schedule"]:  # a Recorder's snapshot has no schedule: the run's starts afresh
        schedule.load_state_dict(schedule_state)
    torch.set_rng_state(state["torch_rng"])
    return optimizer, batches, schedule, continued


def _check_snapshot_optimizer(state: dict, optimizer: torch.optim.Optimizer) -> None:
    """Refuse to continue another optimizer's state (a Recorder's snapshot of a user's loop
    names its optimizer's class).
    """
    saved = state.get("optimizer_class")
    if saved is not None and saved != type(optimizer).__name__:
        raise ConfigError(
            f"optimizer.name: the snapshot holds the state of a {saved} optimizer and the run's "
            f"config builds {type(optimizer).__name__}; record the run with "
            f"overrides=['optimizer.name={saved}', ...] (and its settings), or give the replay "
            "its own optimizer (optimizer.name=...), which starts fresh"
        )


def _log_start(run: RunDir, replay: ReplayConfig, lr: float) -> None:
    get_logger().info(
        "replay %s: %s alpha=%g N=%d from step %d of %s, lr %g, %d steps",
        replay.name,
        replay.mode,
        replay.scaling,
        replay.nfilter,
        replay.snapshot,
        run.root,
        lr,
        replay.MAX_STEPS,
    )


def _finish(
    run: RunDir, job: _ReplayJob, run_events: EventLog, start_fields: dict, result: dict
) -> dict:
    """Save the final parameters, log and record the summary; returns the summary."""
    replay = job.replay
    torch.save(job.problem.model.state_dict(), run.replay_final(replay.name))
    fields = {**start_fields, **result}
    job.events.write("finished", **result)
    run_events.write("replay_finished", name=replay.name, **result)
    summary.record(run, "replay", fields, replay.name)
    get_logger().info(
        "replay %s: %d steps (%s), train loss %.4g, steps to target %s, max sharpness %s",
        replay.name,
        fields["steps"],
        fields["stopped_by"],
        fields["final_train_loss"],
        fields["steps_to_target"],
        fields["max_sharpness"],
    )
    return fields


@dataclass
class _ReplayJob:
    """What the step loop of one replay works with.

    Attributes:
        cfg: the run's settings.
        replay: the job's settings.
        problem: the model (at the job's starting point) and data, on the run's device.
        batches: the run's batch order.
        stepper: the run's optimizer behind the job's spectral filter.
        schedule: the learning-rate schedule, at the snapshot's clock.
        eigenpairs: eigenpairs per recomputation ``k`` (0: never recomputed).
        events: the job's ``log.jsonl``.
        hessian_data: inputs (``n`` examples, :mod:`hessov.batching`) and targets
            ``(n, ...)`` of the train Hessian subset.
    """

    cfg: RunConfig
    replay: ReplayConfig
    problem: Problem
    batches: BatchSchedule
    stepper: FilteredOptimizer
    schedule: object
    eigenpairs: int
    events: EventLog
    hessian_data: tuple[batching.Inputs, torch.Tensor]


@dataclass
class _LoopState:
    """What the step loop has seen so far; its end is the summary's result fields."""

    started: float
    step: int = 0
    eigen: Eigenpairs | None = None
    steps_to_target: int | None = None
    test_loss: float | None = None
    test_acc: float | None = None
    max_sharpness: float | None = None
    eig_computations: int = 0
    hvps: int = 0
    max_frozen: int = 0
    stopped_by: str = "MAX_STEPS"
    train_loss: float = float("nan")
    train_acc: float | None = None

    def result(self, replay: ReplayConfig) -> dict:
        return {
            "steps": self.step,
            "stopped_by": self.stopped_by,
            "final_train_loss": self.train_loss,
            "final_train_accuracy": self.train_acc,
            "final_test_loss": self.test_loss,
            "final_test_accuracy": self.test_acc,
            "target_train_loss": replay.TARGET_TRAIN_LOSS,
            "steps_to_target": self.steps_to_target,
            "max_sharpness": self.max_sharpness,
            "max_frozen": self.max_frozen,
            "eig_computations": self.eig_computations,
            "hvps": self.hvps,
            "wall_seconds": round(time.perf_counter() - self.started, 3),
        }


def _replay_loop(job: _ReplayJob) -> dict:
    """Steps ``s = 0 .. MAX_STEPS`` of the replay until a stop; returns the result fields
    (``steps``, ``stopped_by``, final losses and accuracies, ``steps_to_target``,
    ``max_sharpness``, ``max_frozen``, ``eig_computations``, ``hvps``, ``wall_seconds``).
    """
    replay = job.replay
    state = _LoopState(started=time.perf_counter())
    job.problem.model.train()
    progress = tqdm(
        range(replay.MAX_STEPS + 1), desc=f"replay {replay.name}", unit="step", mininterval=2.0
    )
    for step in progress:
        state.step = step
        if job.eigenpairs and step % replay.eig_freq == 0:
            _recompute_eigenbasis(job, state, step)
        if step % replay.EVAL_EVERY == 0 or step == replay.MAX_STEPS:
            _evaluate_test(job, state, step)
        if step == replay.MAX_STEPS:
            _evaluate_train(job, state, step)
            break
        if _train_step(job, state, step):
            break
        if step % 10 == 0:
            progress.set_postfix(loss=f"{state.train_loss:.4g}", refresh=False)
    progress.close()
    return state.result(replay)


def _recompute_eigenbasis(job: _ReplayJob, state: _LoopState, step: int) -> None:
    """New top eigenpairs at replay step ``step``, handed to the filter and logged."""
    replay = job.replay
    eigen = hessian_eigenpairs(
        job.problem.model,
        job.problem.loss,
        *job.hessian_data,
        cfg=job.cfg,
        replay=replay,
        k=job.eigenpairs,
        step=replay.snapshot + step,
        previous=None if state.eigen is None else state.eigen.vectors,
    )
    state.eigen = eigen
    state.eig_computations, state.hvps = state.eig_computations + 1, state.hvps + eigen.hvps
    if replay.nfilter:
        job.stepper.filter.set_eigenbasis(
            eigen.values[: replay.nfilter].to(eigen.vectors.device),
            eigen.vectors[:, : replay.nfilter],
        )
    top = float(eigen.values.max())
    state.max_sharpness = top if state.max_sharpness is None else max(state.max_sharpness, top)
    job.events.write(
        "eigen",
        step=step,
        eigenvalues=eigen.values,
        hvps=eigen.hvps,
        relative_error=eigen.relative_error,
    )


def _evaluate_test(job: _ReplayJob, state: _LoopState, step: int) -> None:
    """The loss and accuracy on the test split (its ``EVAL_DATAPOINTS``), logged."""
    problem = job.problem
    state.test_loss, state.test_acc = evaluate(
        problem.model,
        problem.loss,
        problem.test.inputs,
        problem.test.targets,
        problem.num_classes,
        job.cfg.EVAL_DATAPOINTS,
    )
    job.events.write("eval", step=step, test_loss=state.test_loss, test_accuracy=state.test_acc)


def _evaluate_train(job: _ReplayJob, state: _LoopState, step: int) -> None:
    """The loss and accuracy on the train split (its ``EVAL_DATAPOINTS``) after the last
    step, logged.
    """
    problem = job.problem
    state.train_loss, state.train_acc = evaluate(
        problem.model,
        problem.loss,
        problem.train.inputs,
        problem.train.targets,
        problem.num_classes,
        job.cfg.EVAL_DATAPOINTS,
    )
    _write_step(job, state, step)


def _write_step(job: _ReplayJob, state: _LoopState, step: int, **fields) -> None:
    job.events.write(
        "step", step=step, train_loss=state.train_loss, train_accuracy=state.train_acc, **fields
    )


def _train_step(job: _ReplayJob, state: _LoopState, step: int) -> bool:
    """The gradient of step ``step``'s batch, then, unless the replay stops here, one
    filtered optimizer step; returns whether it stopped (``state.stopped_by`` says why).
    """
    problem, replay = job.problem, job.replay
    train_x, train_y = problem.train.inputs, problem.train.targets
    idx = job.batches.indices(replay.snapshot + step).to(train_y.device)
    job.stepper.zero_grad(set_to_none=True)
    loss, state.train_acc = _loss_accuracy_and_gradient(
        problem.model,
        problem.loss,
        batching.take(train_x, idx),
        batching.take(train_y, idx),
        job.cfg.PHYSICAL_BATCH_SIZE,
        problem.num_classes,
    )
    state.train_loss = float(loss)
    stopped_by = _stop_reason(replay, state, step)
    if stopped_by is not None:
        _write_step(job, state, step)
        state.stopped_by = stopped_by
        return True
    lr = job.stepper.param_groups[0]["lr"]
    stats = job.stepper.step(step)
    job.schedule.step()
    state.max_frozen = max(state.max_frozen, stats.frozen)
    _write_step(
        job,
        state,
        step,
        grad_norm=stats.grad_norm,
        filtered_grad_norm=stats.filtered_norm,
        subspace_fraction=stats.subspace_fraction,
        scaling=stats.scaling,
        frozen=stats.frozen,
        lr=lr,
    )
    return False


def _stop_reason(replay: ReplayConfig, state: _LoopState, step: int) -> str | None:
    """Why the replay stops at step ``step``'s batch loss and accuracy (None: it goes on);
    the first step at the loss target is noted in ``state.steps_to_target`` on the way.
    """
    if not math.isfinite(state.train_loss):
        return "diverged"
    if replay.TARGET_TRAIN_LOSS is not None and state.steps_to_target is None:
        if state.train_loss <= replay.TARGET_TRAIN_LOSS:
            state.steps_to_target = step
    if replay.STOP_AT_TARGET and state.steps_to_target is not None:
        return "TARGET_TRAIN_LOSS"
    if replay.TARGET_TRAIN_ACCURACY is not None and state.train_acc is not None:
        if state.train_acc >= replay.TARGET_TRAIN_ACCURACY:
            return "TARGET_TRAIN_ACCURACY"
    return None
