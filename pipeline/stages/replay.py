"""Stage replay: continue a run from a snapshot with a spectral filter on the gradient.

REFERENCE section 5 and the research README (seeds/000, "Spectral_Acceleration"): the
baseline run saved its full training state at step ``T`` (before that step's update); each
replay loads it and trains on with its own step counter ``s = 0, 1, ...`` (global step
``T + s``, with the batches the baseline would have seen), the gradient filtered in the
Hessian's top eigenbasis by :class:`~pipeline.optim.spectral_filter.FilteredOptimizer`
before the run's optimizer steps. Replays of one snapshot differ only in the filter, so
their curves compare directly; ``mode=none`` is the baseline continued unchanged.

Every ``eig_freq`` steps the top ``max(neigs, nfilter + 1)`` eigenpairs of the Hessian of
the run's train Hessian subset (the class-balanced ``NUM_HESSIAN_DATAPOINTS`` examples the
sketch stages use; set it to the train size for the full-batch Hessian) are recomputed, by
Lanczos (:mod:`skerch_ext.lanczos`) or the in-core two-pass sketch
(:mod:`skerch_ext.incore`), on the live model with the Hessian-vector products the sketch
stages use (:class:`skerch_ext.operator.AutogradHessian`). Only the current eigenvectors
are kept. ``nfilter + 1`` makes ``lambda_{N+1}`` visible: the README observed
that under flat_scaling_v1 the frozen top-N eigenvalues keep rising until ``lambda_{N+1}``
reaches ``2 / eta``.

Logged to ``RUN/replays/NAME/log.jsonl``: per step (``step``) the train loss and accuracy
of the step's batch (the whole train split under GD) at the parameters after ``s`` updates,
the gradient norm, the filtered-gradient norm, the share of the gradient in the top-N
eigenspace, alpha after warmup and the number of frozen directions; every ``EVAL_EVERY``
steps (``eval``) the test loss and accuracy; every ``eig_freq`` steps (``eigen``) the
eigenvalues, largest magnitude first (the sharpness flow). The replay stops at its
``MAX_STEPS``, at ``TARGET_TRAIN_ACCURACY``, at ``TARGET_TRAIN_LOSS`` with
``STOP_AT_TARGET``, or when the loss is no longer finite, and records the ``replay`` summary.

A replay with ``seeds`` is one job per seed (:func:`~pipeline.config.replay_jobs`), each
with its own ``RUN/replays/NAME.seedS/`` and summary: seed 0 continues the snapshot itself,
seed ``S > 0`` a copy perturbed by :func:`perturb_parameters`, because at the edge of
stability a single trajectory follows the last bits of the floating-point arithmetic.

:func:`compare` reads every finished replay, takes the seeds of one replay together
(:mod:`analysis.replay_groups`), draws the loss curves per snapshot (with the baseline's
pre-snapshot history), a zoom on the first steps after the switch, one sharpness flow per
replay over its seeds, and writes ``RUN/replays/report.md``: medians and min-max over the
seeds, and an order between replays only where every seed agrees.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from analysis import replay_figures, replay_groups
from pipeline import summary
from pipeline.config import (
    ReplayConfig,
    RunConfig,
    replay_jobs,
    replay_optimizer,
    save_config,
    validate_replay,
)
from pipeline.errors import ConfigError, MissingInputError, RunExistsError
from pipeline.hessian import recorded_subsets
from pipeline.optim import build_optimizer, build_schedule
from pipeline.optim.spectral_filter import (
    FilteredOptimizer,
    SpectralFilter,
    max_stable_sharpness,
)
from pipeline.problems import build_problem
from pipeline.rundir import RunDir
from pipeline.runlog import EventLog, get_logger, read_events
from pipeline.training import (
    BatchSchedule,
    evaluate,
    load_snapshot,
    loss_and_gradient,
    set_cpu_threads,
    to_device,
)
from skerch_ext.incore import sketched_eigh
from skerch_ext.lanczos import top_eigenpairs
from skerch_ext.operator import AutogradHessian

#: Columns per batched HVP of the in-core sketch when the run's ``block_size`` is automatic.
SKETCH_BLOCK_SIZE = 32


def num_eigenpairs(replay: ReplayConfig, dim: int) -> int:
    """Eigenpairs computed per recomputation: ``max(neigs, nfilter + 1)`` (0 if never),
    at most ``D - 1`` (Lanczos cannot return all ``D``)."""
    if replay.eig_freq <= 0:
        return 0
    wanted = max(replay.neigs, replay.nfilter + 1 if replay.nfilter else 0)
    return min(wanted, dim - 1)


def check_replay_inputs(run: RunDir, replay: ReplayConfig, dim: int) -> None:
    """Refuse, before any step, a missing snapshot or an ``nfilter``/``neigs`` >= D."""
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


def _saved_settings(run: RunDir, name: str) -> ReplayConfig:
    """Replay ``name``'s saved settings; keys added to :class:`ReplayConfig` since it was
    written (``seeds``, ...) take their defaults, so older replays still match."""
    saved = OmegaConf.merge(
        OmegaConf.structured(ReplayConfig), OmegaConf.load(run.replay_config(name))
    )
    return OmegaConf.to_object(saved)


def _refuse_mixed_group(run: RunDir, replay: ReplayConfig) -> None:
    """Seeds of a replay and an unseeded replay of the same name would mix in one group of
    :func:`compare`. Only directory names are read: sibling seeds may be writing theirs."""
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

    Raises:
        RunExistsError: the name holds a replay with other settings (never overwritten), or
            seeded and unseeded replays would share one name (see :func:`_refuse_mixed_group`).
    """
    _refuse_mixed_group(run, replay)
    path = run.replay_config(replay.name)
    if not path.is_file():
        return None
    saved, wanted = _settings(_saved_settings(run, replay.name)), _settings(replay)
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
    settings, see :func:`finished_replay`) is started again from the snapshot."""
    if run.replay(replay.name).exists():
        shutil.rmtree(run.replay(replay.name))
    run.replay(replay.name).mkdir(parents=True)
    save_config(replay, run.replay_config(replay.name))


def _loss_accuracy_and_gradient(model, loss_fn, inputs, targets, chunk, num_classes):
    """Mean loss (gradients accumulated into ``.grad``) and accuracy (None if unlabelled)
    of one batch, from the same forward passes (a hook collects the predictions)."""
    predictions = []
    handle = model.register_forward_hook(
        lambda _module, _inputs, output: predictions.append(output.detach().argmax(dim=1))
    )
    try:
        loss = loss_and_gradient(model, loss_fn, inputs, targets, chunk)
    finally:
        handle.remove()
    if not num_classes:
        return loss, None
    return loss, float((torch.cat(predictions) == targets).double().mean())


@dataclass
class _Eigen:
    """Top eigenpairs at one replay step: ``values`` ``(k,)`` float64 on CPU, ``vectors``
    ``(D, k)`` in the model's dtype and device."""

    values: torch.Tensor
    vectors: torch.Tensor
    hvps: int
    relative_error: float | None


def _hessian_eigenpairs(
    model,
    loss_fn,
    inputs,
    targets,
    cfg: RunConfig,
    replay: ReplayConfig,
    k: int,
    step: int,
    previous: torch.Tensor | None,
) -> _Eigen:
    """Top-``k`` eigenpairs of the Hessian of the mean loss over ``inputs`` at the model's
    current parameters (eval mode, as the sketch stages; the model is put back in train
    mode). Lanczos starts from the sum of the ``previous`` eigenvectors ``(D, k)``."""
    # Built anew at every recomputation: it keeps the gradient graph of the current
    # parameters, which the optimizer then changes in place.
    operator = AutogradHessian(model, loss_fn, inputs, targets, batch_size=cfg.HESSIAN_BATCH_SIZE)
    dim = operator.dim
    dtype, device = inputs.dtype, inputs.device
    try:
        if replay.eigensolver == "lanczos":
            start = None if previous is None else previous.sum(dim=1)
            result = top_eigenpairs(
                operator.matmat,
                dim,
                k,
                dtype=dtype,
                device=device,
                tol=replay.eig_tol,
                start=start,
                seed=cfg.RANDOM_SEED + step,
            )
            return _Eigen(result.eigenvalues, result.eigenvectors, result.hvps, None)
        # Oversampled basis (the top k of 2k + 10 are accurate), at most D/2 so that the
        # block Krylov space span(Q, HQ) of the two-pass recovery fits in D dimensions.
        outer = max(k, min(2 * k + 10, dim // 2))
        sketch = sketched_eigh(
            operator.matmat,
            dim,
            outer,
            seed=cfg.SKETCH_SEED + step,
            noise=cfg.noise,
            recovery="two_pass",
            block_size=cfg.block_size or SKETCH_BLOCK_SIZE,
            dtype=dtype,
            device=device,
            num_apost=cfg.NUM_A_POSTERIORI,
            num_eigenpairs=k,
        )
        values = sketch.eigenvalues.detach().to("cpu", torch.float64)
        return _Eigen(values, sketch.eigenvectors, sketch.num_hvps, sketch.relative_error)
    finally:
        model.train()


def perturb_parameters(model: torch.nn.Module, seed: int, perturbation: float) -> float:
    """Move the model to seed ``seed``'s starting point: every parameter
    ``p <- p (1 + perturbation z)``, ``z ~ N(0, 1)`` drawn on the CPU by a generator seeded
    with ``seed``, parameter after parameter (the same point on every device). Seed 0 leaves
    the parameters untouched. Why and how large: :class:`~pipeline.config.ReplayConfig`.
    Returns the relative change ``||delta|| / ||p||`` over all parameters."""
    if seed == 0:
        return 0.0
    generator = torch.Generator().manual_seed(seed)
    moved = size = 0.0
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            delta = param * noise.to(param.device) * perturbation
            size += float(param.double().pow(2).sum())
            moved += float(delta.double().pow(2).sum())
            param.add_(delta)
    return math.sqrt(moved / size) if size else 0.0


def run_replay(run: RunDir, cfg: RunConfig, replay: ReplayConfig) -> dict:
    """Run one replay job of ``run`` (see the module docstring); returns its summary. A
    replay with ``seeds`` is several jobs: run each of :func:`~pipeline.config.replay_jobs`.

    A replay that already finished with the same settings is not run again: its recorded
    summary is returned.

    Raises:
        ConfigError, MissingInputError: bad settings, ``seeds`` (not one job), a missing
            snapshot, ``nfilter >= D``; all before any step.
        RunExistsError: the name is taken by a replay with other settings.
    """
    log = get_logger()
    if replay.seeds:
        jobs = ", ".join(job.name for job in replay_jobs([replay]))
        raise ConfigError(f"seeds: replay {replay.name!r} is one job per seed ({jobs}); run each")
    validate_replay(cfg, replay)
    finished = finished_replay(run, replay)
    if finished is not None:
        log.info(
            "replay %s already finished in %s; not run again", replay.name, run.replay(replay.name)
        )
        return finished
    set_cpu_threads(cfg.threads)
    problem = build_problem(cfg)
    to_device(problem, cfg.device, cfg.dtype)
    dim = problem.num_params
    check_replay_inputs(run, replay, dim)
    k = num_eigenpairs(replay, dim)
    if k and problem.augmented:
        raise ConfigError(f"problem: {cfg.problem} augments its data; its Hessian is not fixed")
    optimizer_cfg = replay_optimizer(cfg, replay)
    model = problem.model
    state = load_snapshot(run.snapshot(replay.snapshot), cfg.device)
    model.load_state_dict(state["model"])
    seed_fields = {}
    if replay.seed is not None:
        moved = perturb_parameters(model, replay.seed, replay.perturbation)
        seed_fields = dict(
            group=replay.group,
            seed=replay.seed,
            perturbation=replay.perturbation,
            relative_perturbation=moved,
        )
    optimizer = build_optimizer(model.parameters(), optimizer_cfg)
    batches = BatchSchedule(len(problem.train), cfg.BATCH_SIZE, cfg.RANDOM_SEED)
    schedule = build_schedule(
        optimizer, cfg.schedule, max_steps=cfg.MAX_STEPS, steps_per_epoch=batches.steps_per_epoch
    )
    # With the run's optimizer the replay continues its state (momentum, moments); a changed
    # optimizer starts fresh but keeps the schedule's clock, at the replay's base rate.
    continued = not replay.optimizer
    schedule_state = dict(state["schedule"])
    if continued:
        optimizer.load_state_dict(state["optimizer"])
    else:
        schedule_state["base_lrs"] = [group["initial_lr"] for group in optimizer.param_groups]
    schedule.load_state_dict(schedule_state)
    torch.set_rng_state(state["torch_rng"])

    _create_directory(run, replay)
    subset = recorded_subsets(run)["train"].to(cfg.device)
    hessian_inputs = problem.train.images[subset]
    hessian_targets = problem.train.labels[subset]
    spectral_filter = SpectralFilter(replay.mode, replay.scaling, replay.warmup)
    stepper = FilteredOptimizer(optimizer, list(model.parameters()), spectral_filter)
    lr = optimizer.param_groups[0]["lr"]
    events = EventLog(run.replay_log(replay.name), "replay")
    run_events = EventLog(run.log, "replay")
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
        num_params=dim,
        eigenpairs=k,
        hessian_datapoints=int(subset.numel()),
        **seed_fields,
    )
    events.write("start", **start_fields)
    run_events.write("replay_started", **start_fields)
    log.info(
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
    result = _replay_loop(
        cfg,
        replay,
        problem,
        batches,
        stepper,
        schedule,
        k,
        events,
        (hessian_inputs, hessian_targets),
    )
    torch.save(model.state_dict(), run.replay_final(replay.name))
    fields = {**start_fields, **result}
    events.write("finished", **result)
    run_events.write("replay_finished", name=replay.name, **result)
    events.close()
    run_events.close()
    summary.record(run, "replay", fields, replay.name)
    log.info(
        "replay %s: %d steps (%s), train loss %.4g, steps to target %s, max sharpness %s",
        replay.name,
        fields["steps"],
        fields["stopped_by"],
        fields["final_train_loss"],
        fields["steps_to_target"],
        fields["max_sharpness"],
    )
    return fields


def _replay_loop(cfg, replay, problem, batches, stepper, schedule, k, events, hessian_data):
    model, loss_fn = problem.model, problem.loss
    train_x, train_y = problem.train.images, problem.train.labels
    eigen: _Eigen | None = None
    steps_to_target = test_loss = test_acc = max_sharpness = None
    eig_computations = hvps = max_frozen = 0
    stopped_by, train_loss, train_acc = "MAX_STEPS", float("nan"), None
    started = time.perf_counter()
    model.train()
    progress = tqdm(
        range(replay.MAX_STEPS + 1), desc=f"replay {replay.name}", unit="step", mininterval=2.0
    )
    step = 0
    for step in progress:
        if k and step % replay.eig_freq == 0:
            eigen = _hessian_eigenpairs(
                model,
                loss_fn,
                *hessian_data,
                cfg,
                replay,
                k,
                replay.snapshot + step,
                None if eigen is None else eigen.vectors,
            )
            eig_computations, hvps = eig_computations + 1, hvps + eigen.hvps
            if replay.nfilter:
                stepper.filter.set_eigenbasis(
                    eigen.values[: replay.nfilter].to(eigen.vectors.device),
                    eigen.vectors[:, : replay.nfilter],
                )
            top = float(eigen.values.max())
            max_sharpness = top if max_sharpness is None else max(max_sharpness, top)
            events.write(
                "eigen",
                step=step,
                eigenvalues=eigen.values,
                hvps=eigen.hvps,
                relative_error=eigen.relative_error,
            )
        if step % replay.EVAL_EVERY == 0 or step == replay.MAX_STEPS:
            test_loss, test_acc = evaluate(
                model, loss_fn, problem.test.images, problem.test.labels, problem.num_classes
            )
            events.write("eval", step=step, test_loss=test_loss, test_accuracy=test_acc)
        if step == replay.MAX_STEPS:
            train_loss, train_acc = evaluate(model, loss_fn, train_x, train_y, problem.num_classes)
            events.write("step", step=step, train_loss=train_loss, train_accuracy=train_acc)
            break
        idx = batches.indices(replay.snapshot + step).to(train_x.device)
        stepper.zero_grad(set_to_none=True)
        loss, train_acc = _loss_accuracy_and_gradient(
            model,
            loss_fn,
            train_x[idx],
            train_y[idx],
            cfg.PHYSICAL_BATCH_SIZE,
            problem.num_classes,
        )
        train_loss = float(loss)
        if not math.isfinite(train_loss):
            events.write("step", step=step, train_loss=train_loss, train_accuracy=train_acc)
            stopped_by = "diverged"
            break
        if replay.TARGET_TRAIN_LOSS is not None and steps_to_target is None:
            if train_loss <= replay.TARGET_TRAIN_LOSS:
                steps_to_target = step
        if replay.STOP_AT_TARGET and steps_to_target is not None:
            events.write("step", step=step, train_loss=train_loss, train_accuracy=train_acc)
            stopped_by = "TARGET_TRAIN_LOSS"
            break
        if replay.TARGET_TRAIN_ACCURACY is not None and train_acc is not None:
            if train_acc >= replay.TARGET_TRAIN_ACCURACY:
                events.write("step", step=step, train_loss=train_loss, train_accuracy=train_acc)
                stopped_by = "TARGET_TRAIN_ACCURACY"
                break
        lr = stepper.param_groups[0]["lr"]
        stats = stepper.step(step)
        schedule.step()
        max_frozen = max(max_frozen, stats.frozen)
        events.write(
            "step",
            step=step,
            train_loss=train_loss,
            train_accuracy=train_acc,
            grad_norm=stats.grad_norm,
            filtered_grad_norm=stats.filtered_norm,
            subspace_fraction=stats.subspace_fraction,
            scaling=stats.scaling,
            frozen=stats.frozen,
            lr=lr,
        )
        if step % 10 == 0:
            progress.set_postfix(loss=f"{train_loss:.4g}", refresh=False)
    progress.close()
    return {
        "steps": step,
        "stopped_by": stopped_by,
        "final_train_loss": train_loss,
        "final_train_accuracy": train_acc,
        "final_test_loss": test_loss,
        "final_test_accuracy": test_acc,
        "target_train_loss": replay.TARGET_TRAIN_LOSS,
        "steps_to_target": steps_to_target,
        "max_sharpness": max_sharpness,
        "max_frozen": max_frozen,
        "eig_computations": eig_computations,
        "hvps": hvps,
        "wall_seconds": round(time.perf_counter() - started, 3),
    }


def load_replay_curves(run: RunDir, name: str) -> replay_figures.ReplayCurves:
    """What replay ``name`` logged, as arrays (see :class:`ReplayCurves`)."""
    settings = _saved_settings(run, name)
    events = read_events(run.require(run.replay_log(name), f"replay {run.root} name={name}"))
    start = next(e for e in events if e["event"] == "start")
    steps = [e for e in events if e["event"] == "step"]
    eigen = [e for e in events if e["event"] == "eigen"]
    summary_path = run.replay_summary(name)
    recorded = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return replay_figures.ReplayCurves(
        name=name,
        group=settings.group or name,
        seed=settings.seed,
        mode=settings.mode,
        scaling=settings.scaling,
        nfilter=settings.nfilter,
        snapshot=settings.snapshot,
        lr=start["lr"],
        steps=np.array([e["step"] for e in steps], dtype=np.int64),
        train_loss=np.array([e["train_loss"] for e in steps], dtype=np.float64),
        eigen_steps=np.array([e["step"] for e in eigen], dtype=np.int64),
        eigenvalues=np.array([e["eigenvalues"] for e in eigen] or np.zeros((0, 0))),
        summary=recorded,
    )


def baseline_history(run: RunDir, before: int) -> tuple[np.ndarray, np.ndarray]:
    """Global steps ``(H,)`` and losses ``(H,)`` of the train stage's batches before step
    ``before`` (a resumed run's repeated steps count once, the latest)."""
    losses = {
        e["step"]: e["loss"]
        for e in read_events(run.require(run.log, "train"), "batch")
        if e["stage"] == "train" and e["step"] < before
    }
    steps = np.array(sorted(losses), dtype=np.int64)
    return steps, np.array([losses[s] for s in steps], dtype=np.float64)


def _fmt(value, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def sharpening_under_v1(curve: replay_figures.ReplayCurves) -> dict | None:
    """Did flat_scaling_v1 send its frozen top-N eigenvalues up (progressive sharpening
    resumed), and when did eigenvalue N+1 (the largest unfrozen one) reach ``2 / (alpha eta)``,
    where the unfrozen directions stop being stable at the rate ``alpha eta``, and ``2 / eta``?
    From the first and last eigenvalue recomputation; None without two of them."""
    values, n = curve.eigenvalues, curve.nfilter
    if values.shape[0] < 2 or values.shape[1] < n:
        return None
    result = {
        "lambda_1": [values[0, 0], values[-1, 0]],
        "lambda_N": [values[0, n - 1], values[-1, n - 1]],
        "top_N_mean_ratio": float(values[-1, :n].mean() / values[0, :n].mean()),
        "frozen_went_up": bool(values[-1, :n].mean() > values[0, :n].mean()),
        "mss": max_stable_sharpness(curve.lr),
        "scaled_mss": max_stable_sharpness(curve.lr, curve.scaling),
    }
    if values.shape[1] > n:
        result["lambda_N_plus_1"] = [values[0, n], values[-1, n]]
        result["lambda_N_plus_1_max"] = float(values[:, n].max())
        # The quadratic oracle: v1 is stable iff alpha eta lambda_{N+1} < 2.
        result["alpha_eta_lambda_N_plus_1_at_switch"] = float(
            curve.scaling * curve.lr * values[0, n]
        )
        for key, threshold in (("scaled_mss", result["scaled_mss"]), ("mss", result["mss"])):
            above = np.nonzero(values[:, n] >= threshold)[0]
            result[f"lambda_N_plus_1_reached_{key}_at"] = (
                int(curve.eigen_steps[above[0]]) if above.size else None
            )
    return result


def _seed_groups(
    curves: list[replay_figures.ReplayCurves],
) -> dict[str, list[replay_figures.ReplayCurves]]:
    """The replays of each group (one setting over its seeds), seeds ascending."""
    groups: dict[str, list] = {}
    for curve in curves:
        groups.setdefault(curve.group, []).append(curve)
    return {
        name: sorted(members, key=lambda c: -1 if c.seed is None else c.seed)
        for name, members in groups.items()
    }


def _group_findings(members: list[replay_figures.ReplayCurves]) -> dict:
    first = members[0]
    return {
        "mode": first.mode,
        "scaling": first.scaling,
        "nfilter": first.nfilter,
        "replays": [c.name for c in members],
        "seeds": [c.seed for c in members],
        **replay_groups.group_statistics([c.summary for c in members]),
    }


def _baseline_findings(members: list[replay_figures.ReplayCurves]) -> dict | None:
    """Sharpness of the baseline group at the snapshot (median over its seeds) and its range
    over every seed's replay; None without eigenvalues."""
    members = [c for c in members if c.eigenvalues.size]
    if not members:
        return None
    at_snapshot = float(np.median([c.eigenvalues[0, 0] for c in members]))
    lr = members[0].lr
    return {
        "name": members[0].group,
        "sharpness_at_snapshot": at_snapshot,
        "mss": max_stable_sharpness(lr),
        "sharpness_over_mss": at_snapshot * lr / 2,
        "sharpness_range": [
            float(min(c.eigenvalues[:, 0].min() for c in members)),
            float(max(c.eigenvalues[:, 0].max() for c in members)),
        ],
    }


def _v1_across_seeds(items: list[dict]) -> dict:
    """:func:`sharpening_under_v1` of one group's seeds: in how many of them the frozen top-N
    went up and eigenvalue N+1 reached each line, and the spread of the eigenvalues."""
    spread = replay_groups.spread
    result = {
        "seeds": len(items),
        "frozen_went_up": sum(item["frozen_went_up"] for item in items),
        "top_N_mean_ratio": spread([item["top_N_mean_ratio"] for item in items]),
        "lambda_1_first": spread([item["lambda_1"][0] for item in items]),
        "lambda_1_last": spread([item["lambda_1"][1] for item in items]),
    }
    if all("lambda_N_plus_1" in item for item in items):
        result["lambda_N_plus_1_first"] = spread([item["lambda_N_plus_1"][0] for item in items])
        result["lambda_N_plus_1_last"] = spread([item["lambda_N_plus_1"][1] for item in items])
        result["alpha_eta_lambda_N_plus_1_at_switch"] = spread(
            [item["alpha_eta_lambda_N_plus_1_at_switch"] for item in items]
        )
        for key in ("scaled_mss", "mss"):
            reached = [item[f"lambda_N_plus_1_reached_{key}_at"] for item in items]
            result[f"lambda_N_plus_1_reached_{key}"] = sum(step is not None for step in reached)
            result[key] = items[0][key]
    return result


def _ranking_findings(members: dict[str, list], groups: dict[str, dict]) -> dict:
    """The order to the loss target by median, and what holds across seeds, among the
    groups with a loss target."""
    ranked = {
        name: groups[name]
        for name, group in members.items()
        if any(c.summary.get("target_train_loss") is not None for c in group)
    }
    by_median = sorted(
        (stats["steps_to_target_median"], name)
        for name, stats in ranked.items()
        if stats["steps_to_target_median"] is not None
    )
    finite_loss = [name for name in groups if np.isfinite(groups[name]["final_train_loss_median"])]
    return {
        "order_to_target": [
            {
                "name": name,
                "steps": steps,
                "steps_min": groups[name]["steps_to_target_min"],
                "steps_max": groups[name]["steps_to_target_max"],
                "seeds_reaching_target": groups[name]["seeds_reaching_target"],
                "seeds": len(groups[name]["seeds"]),
            }
            for steps, name in by_median
        ],
        "first_to_target": replay_groups.first_to_target(ranked),
        "first_by_median": by_median[0][1] if by_median else None,
        "ahead_of": replay_groups.ranking(ranked),
        "best_final_loss": min(
            finite_loss, key=lambda name: groups[name]["final_train_loss_median"], default=None
        ),
    }


def _snapshot_findings(curves: list[replay_figures.ReplayCurves]) -> dict:
    """Numbers behind the report for the replays of one snapshot, per group of seeds; an
    order holds only across seeds (:data:`~analysis.replay_groups.RANKING_RULE`)."""
    members = _seed_groups(curves)
    groups = {name: _group_findings(group) for name, group in members.items()}
    targets = sorted({c.summary.get("target_train_loss") for c in curves} - {None})
    findings: dict = {
        "replays": len(curves),
        "groups": groups,
        "ranking_rule": replay_groups.RANKING_RULE,
        "target_train_loss": targets[0] if len(targets) == 1 else targets,
        **_ranking_findings(members, groups),
    }
    baseline = next((name for name, stats in groups.items() if stats["mode"] == "none"), None)
    if baseline is not None:
        findings["baseline"] = _baseline_findings(members[baseline])
        findings["global_scaling_vs_baseline"] = {
            name: replay_groups.verdict(stats, groups[baseline])
            for name, stats in groups.items()
            if stats["mode"] == "global_scaling"
        }
    v1 = {c.name: sharpening_under_v1(c) for c in curves if c.mode == "flat_scaling_v1"}
    findings["flat_scaling_v1"] = v1
    findings["flat_scaling_v1_groups"] = {}
    for name, group in members.items():
        items = [v1[c.name] for c in group if v1.get(c.name)]
        if items:
            findings["flat_scaling_v1_groups"][name] = _v1_across_seeds(items)
    return findings


def _steps_text(stats: dict) -> str:
    """A group's steps to the target: ``median (min-max)``, just the value for one seed."""
    seeds, reached = len(stats["steps_to_target"]), stats["seeds_reaching_target"]
    if not reached:
        return "not reached"
    median = stats["steps_to_target_median"]
    text = "not reached" if median is None else format(median, "g")
    if seeds > 1:
        text += f" ({stats['steps_to_target_min']}-{stats['steps_to_target_max']})"
    return text if reached == seeds else f"{text}, {reached} of {seeds} seeds reached it"


def _spread_text(median: float, low: float, high: float, seeds: int, spec: str = ".4g") -> str:
    text = format(median, spec)
    return text if seeds == 1 else f"{text} ({low:{spec}}-{high:{spec}})"


def _loss_text(stats: dict) -> str:
    return _spread_text(
        stats["final_train_loss_median"],
        stats["final_train_loss_min"],
        stats["final_train_loss_max"],
        len(stats["seeds"]),
    )


def _group_label(name: str, stats: dict) -> str:
    return f"`{name}` ({stats['mode']}, alpha={stats['scaling']:g}, N={stats['nfilter']})"


def _group_table(findings: dict, members: dict[str, list]) -> list[str]:
    """One row per group, fastest median first."""
    groups, ahead_of = findings["groups"], findings["ahead_of"]

    def order(name):
        median = groups[name]["steps_to_target_median"]
        return (median is None, median or 0, groups[name]["final_train_loss_median"])

    lines = [
        "| group | mode | alpha | N | seeds | steps to target: median (min-max) "
        "| final train loss: median (min-max) | ahead of / behind (groups) "
        "| lambda_1 first -> last (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(groups, key=order):
        stats = groups[name]
        behind = sum(name in others for others in ahead_of.values())
        ranks = f"{len(ahead_of[name])} / {behind}" if name in ahead_of else "-"
        eigen = [c.eigenvalues for c in members[name] if c.eigenvalues.size]
        first_last = "-"
        if eigen:
            first, last = (np.median([e[row, 0] for e in eigen]) for row in (0, -1))
            first_last = f"{first:.4g} -> {last:.4g}"
        seeds = ", ".join("-" if seed is None else str(seed) for seed in stats["seeds"])
        lines.append(
            f"| {name} | {stats['mode']} | {stats['scaling']:g} | {stats['nfilter']} | {seeds} | "
            f"{_steps_text(stats)} | {_loss_text(stats)} | {ranks} | {first_last} |"
        )
    return lines + [""]


def _first_lines(findings: dict) -> list[str]:
    groups, target = findings["groups"], findings["target_train_loss"]
    first = findings["first_to_target"]
    if first is not None:
        return [
            f"**First to the loss target {target}: {_group_label(first, groups[first])} after "
            f"{_steps_text(groups[first])} steps, ahead of every other group in every seed.**"
        ]
    leader = findings["first_by_median"]
    if leader is None:
        return [f"No replay reached the loss target {target}."]
    overlapping = [
        f"`{name}` {_steps_text(groups[name])}"
        for name in findings["ahead_of"]
        if name != leader and name not in findings["ahead_of"][leader]
    ]
    return [
        f"**First to the loss target {target}: not resolved across seeds.** Fastest by median: "
        f"{_group_label(leader, groups[leader])} after {_steps_text(groups[leader])} steps, "
        f"but the seeds of {', '.join(overlapping)} overlap its own."
    ]


def _ranking_lines(findings: dict) -> list[str]:
    """First to the target, the orders that hold across seeds, global scaling against the
    baseline, and the fastest per mode by median."""
    groups, ahead_of = findings["groups"], findings["ahead_of"]
    lines = _first_lines(findings) + ["", "Ahead across seeds (the rule above):", ""]
    ranked = [o["name"] for o in findings["order_to_target"] if ahead_of.get(o["name"])]
    lines += [
        f"- `{name}` {_steps_text(groups[name])} is ahead of "
        + ", ".join(f"`{other}`" for other in ahead_of[name])
        for name in ranked
    ] or ["- no group is ahead of another in every seed"]
    baseline = findings.get("baseline")
    if baseline and findings["global_scaling_vs_baseline"]:
        lines += [
            "",
            f"Global scaling against the baseline `{baseline['name']}` "
            f"{_steps_text(groups[baseline['name']])}: "
            + "; ".join(
                f"`{name}` {_steps_text(groups[name])} {verdict}"
                for name, verdict in findings["global_scaling_vs_baseline"].items()
            )
            + ".",
        ]
    best_per_mode: dict[str, str] = {}
    for item in findings["order_to_target"]:
        best_per_mode.setdefault(groups[item["name"]]["mode"], item["name"])
    if best_per_mode:
        lines += [
            "",
            "Fastest per mode by median (an order only where stated above): "
            + "; ".join(
                f"{mode} `{name}` {_steps_text(groups[name])}"
                for mode, name in best_per_mode.items()
            )
            + ".",
        ]
    best = findings["best_final_loss"]
    if best is not None:
        lines.append(f"Lowest median final train loss: `{best}` {_loss_text(groups[best])}.")
    return lines + [""]


def _v1_group_text(name: str, item: dict) -> str:
    def spread(key: str) -> str:
        value = item[key]
        return _spread_text(value["median"], value["min"], value["max"], item["seeds"])

    seeds = item["seeds"]
    text = (
        f"- `{name}`: the mean of the frozen top-N went up in {item['frozen_went_up']} of "
        f"{seeds} seeds (x{spread('top_N_mean_ratio')}); lambda_1 {spread('lambda_1_first')} "
        f"-> {spread('lambda_1_last')}"
    )
    if "lambda_N_plus_1_first" in item:
        text += (
            f", lambda_N+1 {spread('lambda_N_plus_1_first')} -> "
            f"{spread('lambda_N_plus_1_last')} (alpha eta lambda_N+1 at the switch "
            f"{spread('alpha_eta_lambda_N_plus_1_at_switch')}, < 2 is stable on a quadratic); "
            f"it reached 2/(alpha eta) = {item['scaled_mss']:.4g} in "
            f"{item['lambda_N_plus_1_reached_scaled_mss']} of {seeds} seeds and 2/eta = "
            f"{item['mss']:.4g} in {item['lambda_N_plus_1_reached_mss']} of {seeds}"
        )
    return text + "."


def _v1_lines(findings: dict) -> list[str]:
    v1 = findings["flat_scaling_v1_groups"]
    if not v1:
        return []
    lines = [
        "flat_scaling_v1 and progressive sharpening (first -> last eigenvalue recomputation, "
        "median (min-max) over the seeds; the README observed the frozen top-N eigenvalues "
        "rising until eigenvalue N+1 reaches the maximal stable sharpness):",
        "",
    ]
    lines += [_v1_group_text(name, item) for name, item in v1.items()]
    up = [name for name, item in v1.items() if item["frozen_went_up"] == item["seeds"]]
    down = [name for name, item in v1.items() if item["frozen_went_up"] == 0]
    mixed = [name for name in v1 if name not in up + down]
    lines += [
        "",
        f"Across seeds, the frozen top eigenvalues went up in every seed of {len(up)} of "
        f"{len(v1)} v1 groups ({', '.join(up) or 'none'}), in no seed of {len(down)} "
        f"({', '.join(down) or 'none'}); not resolved across seeds: {', '.join(mixed) or 'none'}.",
        "",
    ]
    return lines


def _dynamic_lines(members: dict[str, list]) -> list[str]:
    lines = []
    for name, group in members.items():
        frozen = [c.summary["max_frozen"] for c in group if "max_frozen" in c.summary]
        if group[0].mode == "dynamic" and frozen:
            every = ""
            if min(frozen) == group[0].nfilter:
                every = " (all of them: more eigenvalues may exceed 2/(alpha eta))"
            lines.append(
                f"- `{name}` froze at most {', '.join(map(str, frozen))} (per seed) of its "
                f"N={group[0].nfilter} computed directions{every}."
            )
    return lines + [""] if lines else []


def _replay_table(curves: list[replay_figures.ReplayCurves]) -> list[str]:
    """One row per replay (every seed of every group), fastest first."""
    lines = [
        "| replay | seed | mode | alpha | N | steps | stopped by | final train loss "
        "| steps to target | max sharpness | lambda_1 first -> last |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def order(curve):
        reached = curve.summary.get("steps_to_target")
        return (reached is None, reached or 0, curve.summary.get("final_train_loss", np.inf))

    for curve in sorted(curves, key=order):
        s = curve.summary
        first_last = (
            f"{curve.eigenvalues[0, 0]:.4g} -> {curve.eigenvalues[-1, 0]:.4g}"
            if curve.eigenvalues.size
            else "-"
        )
        lines.append(
            f"| {curve.name} | {_fmt(curve.seed, 'd')} | {curve.mode} | {curve.scaling:g} | "
            f"{curve.nfilter} | {s.get('steps', '-')} | {s.get('stopped_by', 'unfinished')} | "
            f"{_fmt(s.get('final_train_loss'))} | {_fmt(s.get('steps_to_target'), 'd')} | "
            f"{_fmt(s.get('max_sharpness'))} | {first_last} |"
        )
    return lines + [""]


def _report_section(snapshot: int, curves, findings: dict, figures: dict) -> list[str]:
    members = _seed_groups(curves)
    lines = [f"## Snapshot at step {snapshot}", ""]
    baseline = findings.get("baseline")
    if baseline:
        lines += [
            f"Baseline `{baseline['name']}`: sharpness at the snapshot "
            f"lambda_1 = {baseline['sharpness_at_snapshot']:.4g}, 2/eta = {baseline['mss']:.4g} "
            f"(ratio {baseline['sharpness_over_mss']:.3f}); over its replays lambda_1 stays in "
            f"[{baseline['sharpness_range'][0]:.4g}, {baseline['sharpness_range'][1]:.4g}].",
            "",
        ]
    lines += [
        f"Loss target: {findings['target_train_loss']}. Steps count from the snapshot. A group "
        "is one replay setting over its seeds (seed 0: the snapshot itself; seed S > 0: its "
        "parameters perturbed, p <- p (1 + perturbation z)), reported as median (min-max). "
        f"Ranking rule: {findings['ranking_rule']}.",
        "",
    ]
    lines += _group_table(findings, members)
    lines += _ranking_lines(findings) + _v1_lines(findings) + _dynamic_lines(members)
    lines += ["Every replay:", ""] + _replay_table(curves)
    lines += ["Figures:", ""] + [f"- {label}: `{path}`" for label, path in figures.items()]
    return lines + [""]


def compare(run: RunDir, zoom: int = 0) -> Path:
    """Figures and ``report.md`` of every finished replay of ``run``, the seeds of one replay
    taken together as a group (median and spread, an order only where it holds across
    seeds); returns their folder. The ``replay_compare`` summary holds the numbers.

    ``zoom``: steps after the switch in the zoomed loss figure (0 = a tenth of the longest
    replay, at least 10). Drawing again replaces the previous figures and report.

    Raises:
        MissingInputError: no replay of the run has finished.
    """
    from pipeline.hessian import load_run_config

    cfg = load_run_config(run)
    names = [name for name in run.replay_names() if run.replay_summary(name).is_file()]
    if not names:
        raise MissingInputError(
            f"replays: no finished replay in {run.replays}; run `hessov replay {run.root} "
            "name=NAME` (or snapshot=T mode=...) first"
        )
    unfinished = sorted(set(run.replay_names()) - set(names))
    curves = [load_replay_curves(run, name) for name in names]
    lines = [
        f"# Spectral-filter replays of {run.root.name}",
        "",
        f"Problem {cfg.problem} ({cfg.loss or 'default'} loss, data {cfg.data or 'default'}), "
        f"optimizer {cfg.optimizer.name} lr {cfg.optimizer.lr:g}, batch size "
        f"{cfg.BATCH_SIZE or 'full (GD)'}; Hessians on the {cfg.NUM_HESSIAN_DATAPOINTS}-example "
        "train Hessian subset. Modes and formulas: REFERENCE section 5.",
        "",
    ]
    if unfinished:
        lines += [f"Unfinished replays, not drawn: {', '.join(unfinished)}.", ""]
    all_findings = {}
    for snapshot in sorted({c.snapshot for c in curves}):
        replays = [c for c in curves if c.snapshot == snapshot]
        history = baseline_history(run, snapshot)
        longest = max(int(c.steps.max(initial=0)) for c in replays)
        figures = {
            "loss curves": replay_figures.draw_loss_comparison(
                run.replay_figures / f"loss_snapshot_{snapshot}.png", replays, *history
            ),
            "zoom after the switch": replay_figures.draw_loss_comparison(
                run.replay_figures / f"loss_snapshot_{snapshot}_zoom.png",
                replays,
                *history,
                zoom=zoom or max(10, longest // 10),
            ),
        }
        for name, members in _seed_groups(replays).items():
            figures[f"sharpness flow {name}"] = replay_figures.draw_sharpness_flow(
                run.replay_figures / f"sharpness_flow_{name}.png", members, *history
            )
        findings = _snapshot_findings(replays)
        lines += _report_section(
            snapshot, replays, findings, {k: p.relative_to(run.replays) for k, p in figures.items()}
        )
        all_findings[str(snapshot)] = findings
    run.replay_report.write_text("\n".join(lines))
    summary.record(run, "replay_compare", json.loads(json.dumps(all_findings, default=float)))
    get_logger().info("compared %d replays: %s", len(curves), run.replay_report)
    return run.replays
