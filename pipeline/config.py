"""Structured run configuration: schema, loading, overrides and validation.

A run's configuration is assembled in one fixed order, later layers winning:

1. the schema defaults below (:class:`RunConfig`);
2. the problem's file ``config/problems/<problem>.yaml`` (none for a plug-in,
   ``problem=FILE.py:FACTORY`` or ``PACKAGE.MODULE:FACTORY``);
3. the tuning defaults for that problem and optimizer (``config/tuning.yaml``,
   like the paper's ``basic_config``);
4. a preset (``config/presets/<preset>.yaml``), when ``preset=`` is given;
5. ``KEY=VALUE`` overrides from the command line (omegaconf dotlist).

A plug-in's location is then made canonical and its source file's sha256 recorded
(:func:`hessov.problems.plugins.resolve`); building the problem later refuses a changed file.
The result is validated (:func:`validate`) before any work starts: an unknown key,
a wrong type or an impossible value raises :class:`ConfigError` naming the key.
The resolved configuration is saved in the run directory, and every later stage
reads it from there, so a stage never re-derives what training used.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from hessov.errors import ConfigError
from hessov.fileio import config_error, config_errors, merge_config
from hessov.rundir import RunDir
from hessov.skerch_ext.options import NOISE_TYPES, RECOVERIES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


@dataclass
class OptimizerConfig:
    """Which optimizer trains the network, and its hyperparameters.

    ``name`` is one of torch's SGD, Adam, AdamW, RMSprop, Adagrad, NAdam, RAdam, or
    ours: Eve, ScaledAdam. ``lookahead_k > 0`` wraps any of them in Lookahead.
    Fields an optimizer does not use are ignored by it.
    """

    name: str = "SGD"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    dampening: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    alpha: float = 0.99  # RMSprop smoothing constant
    # Eve: weight decay applies only while ||p|| > target_rms * sqrt(numel).
    target_rms: float = 0.1
    # ScaledAdam
    scalar_lr_scale: float = 0.1
    clipping_scale: float = 2.0
    param_min_rms: float = 1e-5
    # Lookahead: k fast steps, then slow <- slow + lookahead_alpha * (fast - slow).
    lookahead_k: int = 0
    lookahead_alpha: float = 0.5


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped once per training step.

    ``name``: constant | step | cosine | warmup | eden.
    - step: lr * gamma ** (step // step_size)
    - cosine: cosine decay from lr to min_lr over the run's MAX_STEPS
    - warmup: linear warmup over warmup_steps, then constant
    - eden: the Eden schedule (k2-fsa/icefall, Povey 2022) with eden_batches, eden_epochs
    ``warmup_steps`` also prepends a linear warmup to step and cosine.
    """

    name: str = "constant"
    gamma: float = 0.1
    step_size: int = 1000
    min_lr: float = 0.0
    warmup_steps: int = 0
    eden_batches: float = 5000.0
    eden_epochs: float = 6.0


@dataclass
class SlurmStageConfig:
    """One stage's Slurm resources; an unset (null) key keeps the ``slurm`` section's value.

    ``additional_parameters`` is merged over the section's (the stage's keys win).
    """

    partition: str | None = None
    time_minutes: int | None = None
    mem_gb: int | None = None
    cpus_per_task: int | None = None
    gpus_per_node: int | None = None
    additional_parameters: dict[str, Any] | None = None


@dataclass
class SlurmStagesConfig:
    """Per-stage overrides of the Slurm resources, e.g. ``slurm.stages.measure.time_minutes=30``:
    one field per stage of the graph (``analyze`` also covers the final report job).
    """

    train: SlurmStageConfig = field(default_factory=SlurmStageConfig)
    layout: SlurmStageConfig = field(default_factory=SlurmStageConfig)
    variant: SlurmStageConfig = field(default_factory=SlurmStageConfig)
    shift: SlurmStageConfig = field(default_factory=SlurmStageConfig)
    measure: SlurmStageConfig = field(default_factory=SlurmStageConfig)
    basis: SlurmStageConfig = field(default_factory=SlurmStageConfig)
    solve: SlurmStageConfig = field(default_factory=SlurmStageConfig)
    exhaustive: SlurmStageConfig = field(default_factory=SlurmStageConfig)
    trace: SlurmStageConfig = field(default_factory=SlurmStageConfig)
    diagonal: SlurmStageConfig = field(default_factory=SlurmStageConfig)
    density: SlurmStageConfig = field(default_factory=SlurmStageConfig)
    analyze: SlurmStageConfig = field(default_factory=SlurmStageConfig)
    replay: SlurmStageConfig = field(default_factory=SlurmStageConfig)
    compare: SlurmStageConfig = field(default_factory=SlurmStageConfig)


@dataclass
class SlurmConfig:
    """Jobs of ``backend=slurm`` (``hessov run``, ``hessov resume``): resources and waiting.

    Every job gets the values below unless its stage overrides them in ``stages``.
    ``additional_parameters`` are further sbatch options, ``{name: value}`` as in
    ``--name=value`` (``true`` for a bare flag), e.g. ``{account: proj, qos: high}``.
    """

    partition: str = ""  # "" = the cluster's default partition
    time_minutes: int = 60  # 0 = the partition's default time limit
    mem_gb: int = 0  # 0 = the cluster's default memory
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    stages: SlurmStagesConfig = field(default_factory=SlurmStagesConfig)
    logs: str = ""  # submitit's job files and job output; "" = RUN/logs/slurm
    wait_timeout_minutes: float = 1440.0  # `--wait` gives up (exit 1) after this long
    poll_seconds: float = 10.0  # `--wait` asks squeue/sacct this often


@dataclass
class ReplayConfig:
    """One spectral-filter replay (stage replay; README.md, "Spectral-filter replays"):
    training continued from the snapshot at step ``snapshot`` with the gradient filtered in the
    Hessian's top eigenbasis (:mod:`hessov.optim.spectral_filter`), written to
    ``RUN/replays/<name>/``.

    ``mode``: none | global_scaling | flat_scaling_v1 | flat_scaling_v2 | dynamic, with
    ``scaling`` = alpha and ``nfilter`` = N top directions (for dynamic: at most N frozen).
    The top ``max(neigs, N + 1)`` eigenpairs are recomputed every ``eig_freq`` steps
    (``eig_freq <= 0``: never, only for none and global_scaling) on the run's train Hessian
    subset, by ``eigensolver`` lanczos (scipy) or sketch (the in-core two-pass sketch).
    ``optimizer``: fields of the run's optimizer to change for this replay, e.g.
    ``{lr: 0.1}`` or ``{name: Adam, lr: 1e-3}``; empty = the run's optimizer with its saved
    state (a true continuation). Upper-case keys are the replay's own, counted in replay steps.

    ``seeds``: replay the snapshot once per seed, each run as its own job ``NAME.seedS``
    (:func:`replay_jobs`), so that conclusions need not rest on one trajectory: full-batch GD
    at the edge of stability amplifies last-bit floating-point differences (another CPU's
    kernels) into different trajectories. Seed 0 replays the snapshot itself; seed ``S > 0``
    first perturbs every parameter, ``p <- p (1 + perturbation z)`` with ``z ~ N(0, 1)`` drawn
    by a ``torch.Generator`` seeded with ``S``. The default ``perturbation`` 1e-3 is what
    another machine does to a snapshot: the edge-of-stability experiment's snapshot at step
    300, trained once with torch's default kernels and once with ``ATEN_CPU_CAPABILITY=default``
    from the same data, differed by 1.1e-3 in relative norm (its initialisation by 6e-8). A
    perturbation of the size of one step's rounding (1e-5 was tried) left most replays on the
    same step counts in every seed and did not span the other machine's trajectory. Empty
    ``seeds``: one unperturbed replay named ``NAME``.
    ``seed`` and ``group`` (the replay's ``NAME``) are set per job by :func:`replay_jobs`,
    never by hand.
    """

    name: str = ""  # unique; "" = derived from the settings, e.g. v1_a2_n20
    snapshot: int | None = None  # a step in SNAPSHOT_STEPS; None = the last one
    mode: str = "none"
    scaling: float = 1.0
    nfilter: int = 0
    eig_freq: int = 100
    neigs: int = 20  # eigenvalues logged per recomputation (the sharpness flow)
    eigensolver: str = "lanczos"  # lanczos | sketch
    eig_tol: float = 1e-5  # lanczos: relative residual of the eigenpairs
    warmup: int = 0  # steps over which alpha rises linearly from 1 to scaling
    optimizer: dict[str, Any] = field(default_factory=dict)
    MAX_STEPS: int = 1000
    EVAL_EVERY: int = 100
    TARGET_TRAIN_LOSS: float | None = None  # steps_to_target: first step with loss <= it
    STOP_AT_TARGET: bool = False  # stop once TARGET_TRAIN_LOSS is reached
    TARGET_TRAIN_ACCURACY: float | None = None  # stop once the train accuracy reaches it
    seeds: list[int] = field(default_factory=list)  # one job per seed; [] = one, unperturbed
    perturbation: float = 1e-3  # relative std of the parameters' perturbation for seeds > 0
    seed: int | None = None  # this job's seed (set by replay_jobs); None = unperturbed
    group: str = ""  # the NAME of the replay whose seed this job runs (set by replay_jobs)


@dataclass
class RunConfig:
    """Everything a run needs, saved as ``config.yaml`` in its run directory.

    Upper-case keys follow the paper's scripts (``MAX_STEPS``, ``RECORD_STEPS``, ...);
    lower-case keys are the per-run switches named in the docs (``problem``, ``device``).
    """

    problem: str = MISSING  # a name in config/problems, or a plug-in FILE.py:FACTORY
    # A plug-in (problem=FILE.py:FACTORY or PACKAGE.MODULE:FACTORY): its source file, absolute,
    # and that file's sha256, recorded when the run is configured and checked by every stage.
    problem_file: str = ""
    problem_sha256: str = ""
    data: str = ""  # problem-specific data source; "" = the problem's default
    loss: str = ""  # "ce" | "mse"; "" = the problem's default
    nqm_dim: int = 1000  # dimensions K of the trainable noisy quadratic model
    image_size: int = 224  # image-folder problems (imagenet_resnet18): side of the center crop
    OBS_DATASETS: str | None = None  # falls back to the environment variable
    OUTPUT_DIR: str = "output"
    RUN_DIR: str | None = None  # an explicit run directory instead of a new one
    resume: bool = False  # continue a stopped run from its last snapshot
    RANDOM_SEED: int = 12345
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0  # torch CPU threads; 0 = $SLURM_CPUS_PER_TASK, else all cores
    MAX_STEPS: int = 1000
    BATCH_SIZE: int = 128  # 0 = full batch (gradient descent)
    PHYSICAL_BATCH_SIZE: int = 0  # 0 = the whole (logical) batch in one pass
    EVAL_EVERY: int = 100
    EVAL_DATAPOINTS: int = 0  # examples of each split an evaluation uses; 0 = the whole split
    RECORD_STEPS: list[int] = field(default_factory=lambda: [0])
    SNAPSHOT_STEPS: list[int] = field(default_factory=list)
    RECORD_GRADIENTS: bool = False
    NUM_HESSIAN_DATAPOINTS: int = 500
    TARGET_TEST_ACCURACY: float | None = None  # stop once reached at an evaluation
    TARGET_TRAIN_LOSS: float | None = None  # stop once the running train loss is below
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # Sketched eigendecomposition (stages layout, measure, solve, exhaustive).
    k: int = 0  # outer measurements = eigenpairs returned; 0 = the paper's rule (hessov.costs)
    s: int = 0  # single pass: inner measurements = HVPs; 0 = 2k (two-pass: unused)
    params: list[str] = field(default_factory=list)  # globs of parameter names: a block of H
    which: str = "largest"  # largest |lambda| | smallest (most negative, shifted) | both
    curvature: str = "hessian"  # hessian | ggn (generalised Gauss-Newton, PSD) | both
    per_layer: bool = False  # `hessov run` also sketches every layer's block of H
    recovery: str = "two_pass"  # two_pass (k HVPs a round, block Krylov) | single_pass (s HVPs)
    rounds: int = 0  # two_pass: rounds of k HVPs (Krylov depth); 0 = 2 (single pass: unused)
    target_rel_err: float = 0.0  # two_pass: stop the rounds once every bound is below it; 0 = off
    max_rounds: int = 4  # with target_rel_err: the most rounds taken (the plan's worst case)
    target_eigenpairs: int = 0  # with target_rel_err: how many top pairs it covers; 0 = k - 5
    noise: str = "ssrft"  # test matrices: ssrft | gaussian | rademacher
    block_size: int = 0  # measurements per batched HVP and per part file; 0 = automatic
    MEAS_PER_JOB: int = 0  # measurements per array task; 0 = all in one task
    NUM_A_POSTERIORI: int = 30  # Gaussian probes of the a-posteriori error estimate
    memory_gb: float = 0  # every job's memory budget; 0 = slurm mem_gb, else this machine's
    row_block: int = 0  # rows per block of the basis and solve; 0 = automatic, -1 = in memory
    SKETCH_SEED: int = 1  # base of the sketch's non-overlapping seed ranges
    HESSIAN_BATCH_SIZE: int = 0  # examples per forward pass inside an HVP; 0 = all at once
    HESSIAN_STEPS: list[int] = field(default_factory=list)  # steps to sketch; [] = all recorded
    HESSIAN_SPLITS: list[str] = field(default_factory=lambda: ["train", "test"])
    EXHAUSTIVE: bool = False  # `hessov run` adds the exact-vs-sketch check (small D only)
    # Estimates that reuse the sketch (stages trace, diagonal, density; two_pass but density).
    estimates: list[str] = field(default_factory=list)  # `hessov run` adds them: trace, ...
    trace_probes: int = 640  # Hutchinson probes on the deflated remainder
    diagonal_probes: int = 640  # likewise, for the diagonal
    probes_per_task: int = 64  # probes of one trace or diagonal array task
    density_runs: int = 10  # stochastic Lanczos quadrature: one start vector per array task
    density_steps: int = 80  # Lanczos steps of each run (HVPs of one task)
    backend: str = "local"  # `hessov run`: local (sequential) | slurm
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # backend=slurm: job resources
    replays: list[ReplayConfig] = field(default_factory=list)  # spectral-filter replays


BACKENDS = ("local", "slurm")
#: Which eigenpairs a sketch finds: the largest in magnitude, or the most negative.
WHICH = ("largest", "smallest", "both")
#: What the Hessian stages multiply with: the Hessian, or the generalised Gauss-Newton matrix.
CURVATURES = ("hessian", "ggn", "both")


def own_sketch(cfg) -> tuple[str, str]:
    """The ``curvature`` and ``which`` of the run's own sketch: with ``both`` it sketches the
    Hessian's largest, and a variant the other (:mod:`hessov.variants`).
    """
    curvature = "hessian" if cfg.curvature == "both" else cfg.curvature
    return curvature, "largest" if cfg.which == "both" else cfg.which


#: The estimates that reuse a sketch, each a stage (``estimates=[...]``).
ESTIMATES = ("trace", "diagonal", "density")
#: The smallest ``image_size`` accepted: ResNet-18's five halvings bring 32 pixels to 1x1;
#: smaller crops would run, on padding more than on pixels.
MIN_IMAGE_SIZE = 32
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float64")
#: Where ``KEY=VALUE`` overrides come from, in error messages.
COMMAND_LINE = "the command line"


def _load_yaml(path: Path, what: str) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{what}: no file {path}")
    return OmegaConf.load(path)


def problem_names() -> list[str]:
    """Problems that have a config file in ``config/problems``."""
    return sorted(p.stem for p in (CONFIG_DIR / "problems").glob("*.yaml"))


def _split_dotlist(overrides: list[str]) -> dict[str, str]:
    pairs = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected KEY=VALUE, got {item!r}")
        pairs[key.strip()] = value
    return pairs


def _command_line(pairs: dict[str, str]) -> DictConfig:
    """The ``KEY=VALUE`` pairs of :func:`_split_dotlist` as an omegaconf layer
    (``params=PATTERN``, one pattern, as the list ``[PATTERN]``).
    """
    if "params" in pairs and not pairs["params"].lstrip().startswith("["):
        pairs = pairs | {"params": f"[{pairs['params']}]"}
    with config_errors(COMMAND_LINE):
        return OmegaConf.from_dotlist([f"{k}={v}" for k, v in pairs.items()])


def load_run_config(overrides: list[str], config_file: str | Path | None = None) -> RunConfig:
    """Assemble, type-check and validate a run configuration.

    Args:
        overrides: ``KEY=VALUE`` strings (omegaconf dotlist syntax, e.g.
            ``optimizer.lr=0.1``, ``RECORD_STEPS=[0,100]``); ``preset=NAME`` selects
            ``config/presets/NAME.yaml``.
        config_file: an optional YAML file applied after the problem defaults.

    Raises:
        ConfigError: naming the offending key, before any work starts.
    """
    pairs = _split_dotlist(overrides)
    preset = pairs.pop("preset", None)
    cli = _command_line(pairs)
    with config_errors(str(config_file)):
        user_file = OmegaConf.load(config_file) if config_file else OmegaConf.create()
    layers = _config_layers(cli, user_file, str(config_file) if config_file else None, preset)
    cfg: RunConfig = merge_config(
        RunConfig,
        *(layer for _, layer in layers),
        source=[source for source, _ in layers],
        adjust=lambda merged: _drop_default_steps_beyond_max(merged, explicit=[user_file, cli]),
    )
    problem_source = COMMAND_LINE if cli.get("problem") else str(config_file)
    _record_problem_source(cfg, problem_source)
    validate(cfg)
    return cfg


def _record_problem_source(cfg: RunConfig, source: str) -> None:
    """Make a plug-in's location canonical and record its file and sha256 in ``cfg``.

    A ``problem_sha256`` given by the user (a saved ``config.yaml`` used as a config file)
    must match the file; for a built-in problem both fields must stay empty.

    Args:
        cfg: the merged configuration, changed in place.
        source: where ``problem`` came from, for error messages.
    """
    if not is_plugin_problem(cfg.problem):
        for key in ("problem_file", "problem_sha256"):
            require(not getattr(cfg, key), key, "is recorded only for a plug-in problem")
        return
    from hessov.problems.plugins import resolve

    given = cfg.problem_sha256
    cfg.problem, cfg.problem_file, cfg.problem_sha256 = resolve(cfg.problem, source)
    require(
        not given or given == cfg.problem_sha256,
        "problem_sha256",
        f"{cfg.problem_file} has sha256 {cfg.problem_sha256}, not the {given} given; "
        "restore the file or start a new run without problem_sha256",
    )
    for key in ("data", "loss"):
        require(not getattr(cfg, key), key, f"{cfg.problem} brings its own; remove {key}=")


def is_plugin_problem(problem: str) -> bool:
    """Whether ``problem`` names a plug-in (``FILE.py:FACTORY``, ``PACKAGE.MODULE:FACTORY``)."""
    return ":" in problem or problem.endswith(".py")


def problem_label(problem: str) -> str:
    """A short name of ``problem`` for directory names: the built-in name, or a plug-in's
    file stem (or module) and factory, e.g. ``my_model.make_problem``.
    """
    if not is_plugin_problem(problem):
        return problem
    target, _, factory = problem.rpartition(":")
    stem = Path(target).stem if target.endswith(".py") or "/" in target else target
    return re.sub(r"[^0-9A-Za-z_.-]", "_", f"{stem}.{factory}" if factory else stem)


def _config_layers(
    cli: DictConfig, user_file: DictConfig, file_name: str | None, preset: str | None
) -> list[tuple[str, DictConfig]]:
    """The layers over the schema, in order, each with where it comes from (module docstring)."""
    problem = cli.get("problem") or user_file.get("problem")
    if not problem:
        raise ConfigError("problem: missing; choose one of " + ", ".join(problem_names()))
    if is_plugin_problem(str(problem)):
        defaults, layers = OmegaConf.create(), []  # a plug-in starts from the schema defaults
    elif problem not in problem_names():
        raise ConfigError(
            f"problem: unknown problem {problem!r}; choose one of "
            + ", ".join(problem_names())
            + ", or your own as path/to/file.py:FACTORY or package.module:FACTORY"
        )
    else:
        defaults = _load_yaml(CONFIG_DIR / "problems" / f"{problem}.yaml", "problem")
        layers = [(f"config/problems/{problem}.yaml", defaults)]
    optimizer = cli.get("optimizer", {}).get("name") or user_file.get("optimizer", {}).get("name")
    optimizer = optimizer or defaults.get("optimizer", {}).get("name", "SGD")
    with config_errors("config/tuning.yaml"):
        tuning = OmegaConf.load(CONFIG_DIR / "tuning.yaml")
    tuned = tuning.get(problem, {}).get(optimizer)
    if tuned is not None:
        layers.append(("config/tuning.yaml", OmegaConf.create({"optimizer": tuned})))
    if file_name is not None:
        layers.append((file_name, user_file))
    if preset:
        path = CONFIG_DIR / "presets" / f"{preset}.yaml"
        layers.append((f"config/presets/{preset}.yaml", _load_yaml(path, "preset")))
    layers.append((COMMAND_LINE, cli))
    return layers


def _drop_default_steps_beyond_max(merged: DictConfig, explicit: list[DictConfig]) -> None:
    """A shorter MAX_STEPS drops the *default* record/snapshot steps beyond it; steps the
    user gave explicitly are validated instead (an explicit step past the end is an error).
    """
    for key in ("RECORD_STEPS", "SNAPSHOT_STEPS"):
        if not any(key in layer for layer in explicit):
            merged[key] = [s for s in merged[key] if s <= merged.MAX_STEPS]


def require(condition: bool, key: str, message: str, prefix: str = "") -> None:
    """Raise :class:`ConfigError` ``"PREFIXKEY: MESSAGE"`` unless ``condition`` holds.

    Args:
        condition: What a valid value satisfies.
        key: The key checked, dotted (``optimizer.lr``).
        message: What is wrong when the condition fails.
        prefix: Prepended to the key, e.g. ``replays[0].`` for a replay's settings.
    """
    if not condition:
        raise config_error(f"{prefix}{key}", message)


def validate(cfg: RunConfig) -> None:
    """Refuse impossible values, naming the key (types are checked by omegaconf)."""
    _validate_training(cfg)
    _validate_sketch(cfg)
    obs = cfg.OBS_DATASETS or os.environ.get("OBS_DATASETS")
    if obs:
        require(Path(obs).expanduser().is_dir(), "OBS_DATASETS", f"{obs} is not a directory")
    _validate_slurm(cfg.slurm)
    validate_replays(cfg)


def _validate_training(cfg: RunConfig) -> None:
    """The device, the training length and records, the optimizer and the schedule."""
    require(cfg.device in DEVICES, "device", f"must be one of {DEVICES}, got {cfg.device!r}")
    require(cfg.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {cfg.dtype!r}")
    require(cfg.threads >= 0, "threads", "must be >= 0 (0 = automatic)")
    require(cfg.MAX_STEPS >= 0, "MAX_STEPS", f"must be >= 0, got {cfg.MAX_STEPS}")
    require(cfg.BATCH_SIZE >= 0, "BATCH_SIZE", "must be >= 0 (0 = full batch)")
    require(cfg.PHYSICAL_BATCH_SIZE >= 0, "PHYSICAL_BATCH_SIZE", "must be >= 0")
    require(cfg.EVAL_EVERY > 0, "EVAL_EVERY", f"must be > 0, got {cfg.EVAL_EVERY}")
    require(cfg.NUM_HESSIAN_DATAPOINTS > 0, "NUM_HESSIAN_DATAPOINTS", "must be > 0")
    require(cfg.nqm_dim > 0, "nqm_dim", "must be > 0")
    require(cfg.image_size >= MIN_IMAGE_SIZE, "image_size", f"must be >= {MIN_IMAGE_SIZE}")
    require(cfg.EVAL_DATAPOINTS >= 0, "EVAL_DATAPOINTS", "must be >= 0 (0 = the whole split)")
    for key in ("RECORD_STEPS", "SNAPSHOT_STEPS"):
        steps = getattr(cfg, key)
        require(len(set(steps)) == len(steps), key, f"has repeated steps {steps}")
        for step in steps:
            require(
                0 <= step <= cfg.MAX_STEPS,
                key,
                f"step {step} is outside 0..MAX_STEPS={cfg.MAX_STEPS}",
            )
    opt = cfg.optimizer
    require(opt.lr > 0, "optimizer.lr", f"must be > 0, got {opt.lr}")
    require(opt.momentum >= 0, "optimizer.momentum", f"must be >= 0, got {opt.momentum}")
    require(opt.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    require(opt.eps > 0, "optimizer.eps", "must be > 0")
    require(
        len(opt.betas) == 2 and all(0 <= b < 1 for b in opt.betas),  # noqa: PLR2004 (a pair)
        "optimizer.betas",
        f"must be two values in [0, 1), got {opt.betas}",
    )
    require(opt.lookahead_k >= 0, "optimizer.lookahead_k", "must be >= 0 (0 = no Lookahead)")
    require(0 < opt.lookahead_alpha <= 1, "optimizer.lookahead_alpha", "must be in (0, 1]")
    sched = cfg.schedule
    require(sched.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
    require(sched.step_size > 0, "schedule.step_size", "must be > 0")
    require(sched.min_lr >= 0, "schedule.min_lr", "must be >= 0")
    if cfg.TARGET_TEST_ACCURACY is not None:
        require(0 < cfg.TARGET_TEST_ACCURACY <= 1, "TARGET_TEST_ACCURACY", "must be in (0, 1]")
    if cfg.TARGET_TRAIN_LOSS is not None:
        require(cfg.TARGET_TRAIN_LOSS > 0, "TARGET_TRAIN_LOSS", "must be > 0")


def _validate_rounds(cfg: RunConfig) -> None:
    """``rounds``, ``target_rel_err``, ``max_rounds`` and ``target_eigenpairs``: two-pass
    settings, either a fixed number of rounds or a target with a most.
    """
    require(
        cfg.rounds != 1,
        "rounds",
        "one round of products is single-pass recovery: set recovery=single_pass",
    )
    require(cfg.rounds >= 0, "rounds", f"must be >= 2 (0 = 2), got {cfg.rounds}")
    require(0 <= cfg.target_rel_err < 1, "target_rel_err", "must be in [0, 1) (0 = off)")
    require(cfg.max_rounds >= 2, "max_rounds", f"must be >= 2, got {cfg.max_rounds}")  # noqa: PLR2004
    require(cfg.target_eigenpairs >= 0, "target_eigenpairs", "must be >= 0 (0 = k - 5)")
    require(
        not cfg.target_eigenpairs or cfg.target_rel_err,
        "target_eigenpairs",
        "says which pairs target_rel_err covers: set target_rel_err too",
    )
    # rounds alone is left to two-pass (a problem's default, e.g. nqm's, must not refuse
    # recovery=single_pass); a target would never be checked.
    if cfg.recovery == "single_pass":
        require(
            not cfg.target_rel_err, "target_rel_err", "is for two_pass: single pass has no bounds"
        )
    require(
        not (cfg.rounds and cfg.target_rel_err),
        "rounds",
        "with target_rel_err the rounds are chosen as they go, up to max_rounds: pass "
        "rounds=0 (a problem's config may set rounds, e.g. nqm's rounds: 3)",
    )
    require(
        not cfg.target_rel_err or cfg.max_rounds >= 3,  # noqa: PLR2004
        "max_rounds",
        "must be >= 3 with target_rel_err: the first check comes after round 2",
    )


def _validate_sketch(cfg: RunConfig) -> None:
    """The sketch settings, the backend and the steps and splits to sketch."""
    require(cfg.k >= 0, "k", f"must be >= 0 (0 = the default rule), got {cfg.k}")
    require(cfg.memory_gb >= 0, "memory_gb", f"must be >= 0 (0 = automatic), got {cfg.memory_gb}")
    require(cfg.row_block >= -1, "row_block", f"must be >= -1 (0 = automatic), got {cfg.row_block}")
    require(cfg.s >= 0, "s", f"must be >= 0 (0 = 2k), got {cfg.s}")
    require(cfg.backend in BACKENDS, "backend", f"must be one of {BACKENDS}")
    require(cfg.recovery in RECOVERIES, "recovery", f"must be one of {RECOVERIES}")
    require(
        cfg.which in WHICH,
        "which",
        f"must be one of {WHICH}, got {cfg.which!r}",
    )
    require(
        not (cfg.which in ("smallest", "both") and cfg.target_rel_err),
        "target_rel_err",
        "with which=smallest the rounds' checks bound sigma - lambda, not lambda: pass rounds=q",
    )
    require(
        cfg.curvature in CURVATURES,
        "curvature",
        f"must be one of {CURVATURES}, got {cfg.curvature!r}",
    )
    if cfg.recovery == "two_pass":
        require(
            not cfg.s,
            "s",
            "two-pass recovery takes no inner sketch: its budget is k HVPs "
            "on Omega plus k on Q (2k in all); set only k",
        )
    elif cfg.k and cfg.s:
        require(cfg.k < cfg.s, "k", f"k={cfg.k} must be smaller than s={cfg.s}")
    _validate_rounds(cfg)
    _validate_estimates(cfg)
    require(
        not (cfg.params and cfg.replays),
        "params",
        "a replay filters the gradient of every parameter in the whole Hessian's eigenbasis: "
        "sketch a block of H in a run without replays",
    )
    require(cfg.noise in NOISE_TYPES, "noise", f"must be one of {NOISE_TYPES}")
    require(cfg.block_size >= 0, "block_size", "must be >= 0 (0 = automatic)")
    require(cfg.MEAS_PER_JOB >= 0, "MEAS_PER_JOB", "must be >= 0 (0 = one task)")
    require(cfg.NUM_A_POSTERIORI >= 1, "NUM_A_POSTERIORI", "must be >= 1")
    require(cfg.HESSIAN_BATCH_SIZE >= 0, "HESSIAN_BATCH_SIZE", "must be >= 0")
    for split in cfg.HESSIAN_SPLITS:
        require(split in ("train", "test"), "HESSIAN_SPLITS", f"unknown split {split!r}")
    for step in cfg.HESSIAN_STEPS:
        require(
            step in cfg.RECORD_STEPS,
            "HESSIAN_STEPS",
            f"step {step} is not in RECORD_STEPS={cfg.RECORD_STEPS}",
        )


def _validate_estimates(cfg: RunConfig) -> None:
    """``estimates`` and the probe counts of the trace, diagonal and density stages."""
    for name in cfg.estimates:
        require(name in ESTIMATES, "estimates", f"unknown estimate {name!r}: one of {ESTIMATES}")
    require(len(set(cfg.estimates)) == len(cfg.estimates), "estimates", "has repeated names")
    require(
        not {"trace", "diagonal"} & set(cfg.estimates) or cfg.recovery == "two_pass",
        "estimates",
        "trace and diagonal reuse the two-pass sketch's basis and its products H Q: set "
        "recovery=two_pass (density needs only the eigenpairs)",
    )
    for key in ("trace_probes", "diagonal_probes", "probes_per_task", "density_runs"):
        require(getattr(cfg, key) >= 1, key, f"must be >= 1, got {getattr(cfg, key)}")
    require(cfg.density_steps >= 2, "density_steps", "must be >= 2")  # noqa: PLR2004


#: sbatch options that hessov itself sets on every job (names as in ``--name``, with ``_``).
SLURM_RESERVED_OPTIONS = ("array", "dependency", "job_name", "output", "error", "wrap")


def _validate_slurm(slurm: SlurmConfig) -> None:
    require(slurm.wait_timeout_minutes > 0, "slurm.wait_timeout_minutes", "must be > 0")
    require(slurm.poll_seconds > 0, "slurm.poll_seconds", "must be > 0")
    sections = [("slurm", slurm)] + [
        (f"slurm.stages.{name}", getattr(slurm.stages, name))
        for name in SlurmStagesConfig.__dataclass_fields__
    ]
    for prefix, section in sections:
        for key, minimum in (
            ("time_minutes", 0),
            ("mem_gb", 0),
            ("cpus_per_task", 1),
            ("gpus_per_node", 0),
        ):
            value = getattr(section, key)
            if value is not None:
                require(value >= minimum, f"{prefix}.{key}", f"must be >= {minimum}, got {value}")
        for option in section.additional_parameters or {}:
            require(
                option.replace("-", "_") not in SLURM_RESERVED_OPTIONS,
                f"{prefix}.additional_parameters.{option}",
                "is set by hessov for each job; remove it",
            )


REPLAY_EIGENSOLVERS = ("lanczos", "sketch")
_REPLAY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_REPLAY_SHORT_MODES = {
    "global_scaling": "global",
    "flat_scaling_v1": "v1",
    "flat_scaling_v2": "v2",
    "dynamic": "dynamic",
}


def replay_default_name(replay: ReplayConfig) -> str:
    """``none``, ``global_a2``, ``v1_a2_n20``, ``v2_a1.5_n10``, ``dynamic_a2_n40_w100``; a
    changed optimizer is appended, e.g. ``none_lr0.1`` or ``v1_a2_n20_nameAdam_lr0.001``.
    """
    if replay.mode == "none":
        name = "none"
    else:
        name = f"{_REPLAY_SHORT_MODES[replay.mode]}_a{replay.scaling:g}"
        if replay.mode != "global_scaling":
            name += f"_n{replay.nfilter}"
        name += f"_w{replay.warmup}" if replay.warmup else ""
    for key, value in sorted(replay.optimizer.items()):
        name += f"_{key}{value:g}" if isinstance(value, float) else f"_{key}{value}"
    return name


def replay_optimizer(cfg: RunConfig, replay: ReplayConfig, prefix: str = "") -> OptimizerConfig:
    """The run's optimizer with the replay's ``optimizer`` fields changed."""
    optimizer: OptimizerConfig = merge_config(
        cfg.optimizer,
        replay.optimizer,
        source="the replay's optimizer",
        key_prefix=f"{prefix}optimizer.",
    )
    require(optimizer.lr > 0, "optimizer.lr", f"must be > 0, got {optimizer.lr}", prefix)
    return optimizer


def validate_replay(cfg: RunConfig, replay: ReplayConfig, prefix: str = "") -> None:
    """Refuse an impossible replay of ``cfg``'s run, naming ``prefix + key``; resolve its
    default ``snapshot`` (the run's last) and ``name`` in place. ``nfilter < D`` and the
    snapshot file are checked by the replay stage, which knows D and the run directory.
    """
    check = functools.partial(require, prefix=prefix)
    _validate_replay_filter(replay, check)
    check(replay.MAX_STEPS >= 1, "MAX_STEPS", f"must be >= 1, got {replay.MAX_STEPS}")
    check(replay.EVAL_EVERY >= 1, "EVAL_EVERY", f"must be >= 1, got {replay.EVAL_EVERY}")
    if replay.TARGET_TRAIN_LOSS is not None:
        check(replay.TARGET_TRAIN_LOSS > 0, "TARGET_TRAIN_LOSS", "must be > 0")
    check(
        not replay.STOP_AT_TARGET or replay.TARGET_TRAIN_LOSS is not None,
        "STOP_AT_TARGET",
        "needs TARGET_TRAIN_LOSS",
    )
    if replay.TARGET_TRAIN_ACCURACY is not None:
        check(0 < replay.TARGET_TRAIN_ACCURACY <= 1, "TARGET_TRAIN_ACCURACY", "must be in (0, 1]")
    if replay.snapshot is None:
        check(bool(cfg.SNAPSHOT_STEPS), "snapshot", "the run saves no snapshots (SNAPSHOT_STEPS)")
        replay.snapshot = max(cfg.SNAPSHOT_STEPS)
    check(
        replay.snapshot in cfg.SNAPSHOT_STEPS,
        "snapshot",
        f"the run saves no snapshot at step {replay.snapshot}; SNAPSHOT_STEPS={cfg.SNAPSHOT_STEPS}",
    )
    for index, seed in enumerate(replay.seeds):
        check(seed >= 0, "seeds", f"seed {seed} must be >= 0")
        check(seed not in replay.seeds[:index], "seeds", f"seed {seed} is given twice")
    check(
        math.isfinite(replay.perturbation) and replay.perturbation >= 0,
        "perturbation",
        f"must be a finite number >= 0, got {replay.perturbation}",
    )
    replay_optimizer(cfg, replay, prefix)
    replay.name = replay.name or replay_default_name(replay)
    check(
        bool(_REPLAY_NAME.match(replay.name)) and replay.name != "figures",
        "name",
        f"{replay.name!r} must be letters, digits, '_', '.', '-' (and not 'figures')",
    )


def _validate_replay_filter(replay: ReplayConfig, check) -> None:
    """The filter's mode, scaling and size, and how its eigenpairs are recomputed;
    ``check`` is :func:`require` with the replay's key prefix.
    """
    from hessov.optim.spectral_filter import FILTERING_MODES, MODES

    mode = replay.mode
    check(mode in MODES, "mode", f"must be one of {MODES}, got {mode!r}")
    check(replay.scaling > 0, "scaling", f"must be > 0, got {replay.scaling}")
    check(replay.warmup >= 0, "warmup", f"must be >= 0, got {replay.warmup}")
    if mode == "none":
        check(replay.scaling == 1, "scaling", "mode=none continues unchanged; must be 1")
        check(replay.warmup == 0, "warmup", "mode=none continues unchanged; must be 0")
    check(replay.nfilter >= 0, "nfilter", f"must be >= 0, got {replay.nfilter}")
    if mode in FILTERING_MODES:
        check(
            replay.nfilter >= 1,
            "nfilter",
            f"mode={mode} filters the top nfilter eigendirections; must be >= 1",
        )
        check(
            replay.eig_freq >= 1,
            "eig_freq",
            f"mode={mode} recomputes U every eig_freq steps; must be >= 1, got {replay.eig_freq}",
        )
    check(replay.neigs >= 0, "neigs", f"must be >= 0, got {replay.neigs}")
    check(
        replay.eigensolver in REPLAY_EIGENSOLVERS,
        "eigensolver",
        f"must be one of {REPLAY_EIGENSOLVERS}, got {replay.eigensolver!r}",
    )
    check(replay.eig_tol > 0, "eig_tol", "must be > 0")


def _refuse_job_keys(replay: ReplayConfig, prefix: str) -> None:
    """``seed`` and ``group`` belong to the jobs :func:`replay_jobs` makes, not to settings."""
    for key, unset in (("seed", replay.seed is None), ("group", not replay.group)):
        if not unset:
            raise ConfigError(f"{prefix}{key}: set per job from seeds; give seeds=[...] instead")


def validate_replays(cfg: RunConfig) -> None:
    """Validate every configured replay (keys named ``replays[i].KEY``); the names of their
    jobs (:func:`replay_jobs`) are unique.
    """
    seen: dict[str, int] = {}
    for index, replay in enumerate(cfg.replays):
        _refuse_job_keys(replay, f"replays[{index}].")
        validate_replay(cfg, replay, f"replays[{index}].")
        for job in replay_jobs([replay]):
            if job.name in seen:
                raise ConfigError(
                    f"replays[{index}].name: {job.name!r} is also a job of "
                    f"replays[{seen[job.name]}]; give one of them another name"
                )
            seen[job.name] = index


def seeded_name(name: str, seed: int) -> str:
    """The name (and directory) of seed ``seed``'s job of replay ``name``: ``NAME.seedS``."""
    return f"{name}.seed{seed}"


def replay_jobs(replays: list[ReplayConfig]) -> list[ReplayConfig]:
    """The independent jobs of validated replays, in order: a replay without ``seeds`` is its
    own job; one with seeds is one job per seed, named :func:`seeded_name`, with ``seed`` and
    ``group`` (the replay's name) set and no ``seeds``. Every launcher runs exactly these:
    ``hessov replay --list``, ``hessov run`` (local and Slurm) and ``hessov plan``.
    """
    jobs = []
    for replay in replays:
        if not replay.seeds:
            jobs.append(replay)
            continue
        for seed in replay.seeds:
            jobs.append(
                replace(
                    replay,
                    name=seeded_name(replay.name, seed),
                    seeds=[],
                    seed=seed,
                    group=replay.name,
                    optimizer=dict(replay.optimizer),
                )
            )
    return jobs


def replay_from_overrides(cfg: RunConfig, overrides: list[str]) -> ReplayConfig:
    """An ad-hoc replay of ``cfg``'s run from ``KEY=VALUE`` strings (``mode=flat_scaling_v1
    scaling=2 nfilter=20 eig_freq=50 optimizer.lr=0.1``), validated.
    """
    pairs = _split_dotlist(overrides)
    replay: ReplayConfig = merge_config(ReplayConfig, _command_line(pairs), source=COMMAND_LINE)
    _refuse_job_keys(replay, "")
    validate_replay(cfg, replay)
    return replay


#: Keys a stage after training may still override: how and where to compute, and the
#: sketch settings the layout fixes. Everything else is what training did.
LATER_STAGE_KEYS = (
    "device",
    "dtype",
    "threads",
    "k",
    "s",
    "recovery",
    "curvature",
    "params",
    "which",
    "rounds",
    "target_rel_err",
    "max_rounds",
    "target_eigenpairs",
    "noise",
    "block_size",
    "MEAS_PER_JOB",
    "NUM_A_POSTERIORI",
    "SKETCH_SEED",
    "memory_gb",
    "row_block",
    "HESSIAN_BATCH_SIZE",
    "HESSIAN_STEPS",
    "HESSIAN_SPLITS",
    "trace_probes",
    "diagonal_probes",
    "probes_per_task",
    "density_runs",
    "density_steps",
)


def override_run_config(
    cfg: RunConfig, overrides: list[str], allowed: tuple[str, ...] = LATER_STAGE_KEYS
) -> RunConfig:
    """Apply ``KEY=VALUE`` overrides to a trained run's config, only for ``allowed`` keys."""
    pairs = _split_dotlist(overrides)
    for key in pairs:
        # A section name in ``allowed`` (e.g. "slurm") allows every key below it.
        if key not in allowed and key.split(".")[0] not in allowed:
            raise ConfigError(
                f"{key}: cannot be changed after training; this stage accepts {', '.join(allowed)}"
            )
    updated: RunConfig = merge_config(cfg, _command_line(pairs), source=COMMAND_LINE)
    validate(updated)
    return updated


def config_text(cfg: Any) -> str:
    """A resolved configuration as the YAML :func:`save_config` writes."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, path: Path) -> None:
    """Write a resolved configuration as YAML."""
    path.write_text(config_text(cfg))


def read_config(path: Path) -> RunConfig:
    """Read a run's saved configuration back into a typed :class:`RunConfig`."""
    return merge_config(RunConfig, OmegaConf.load(path), source=str(path))


def saved_run_config(run: RunDir) -> RunConfig:
    """The configuration the train stage saved in ``run`` (``config.yaml``).

    Raises:
        MissingInputError: the directory holds no trained run (``hessov train`` first).
        ConfigError: the saved file does not fit the schema, naming the key and the file.
    """
    return read_config(run.require(run.config, "train"))
