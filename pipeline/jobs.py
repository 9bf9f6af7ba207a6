"""What a job runs: every stage's entry point, called with the job's arguments.

A job of the stage graph (:mod:`hessov.launch.graph`) is an argument list
``[STAGE, RUN_DIR, KEY=VALUE ...]`` (``train`` takes a config file instead of a run
directory). :func:`run_job` turns it into the stage function's call: it opens the run, reads
the run's saved config, applies the few overrides a later stage may take (device, threads and
the Hessian batch size) and the sketch settings the layout fixed. ``hessov STAGE ...`` on the
command line, the local launcher, a submitit job and ``slurm/job.sbatch`` all call this one
function, so a job computes the same thing whichever launcher started it.

Adding a stage means one stage module, one :class:`StageEntry` here and one entry in the
graph.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hessov.config import (
    load_run_config,
    override_run_config,
    replay_from_overrides,
    replay_jobs,
    saved_run_config,
)
from hessov.errors import ConfigError, MissingInputError
from hessov.rundir import RunDir

#: Run-config keys every stage after training may still change: where and how it computes.
COMPUTE_KEYS = ("device", "threads", "HESSIAN_BATCH_SIZE", "row_block", "memory_gb")
#: A replay may also change the dtype it computes in.
REPLAY_COMPUTE_KEYS = ("device", "dtype", "threads", "HESSIAN_BATCH_SIZE")


@dataclass(frozen=True)
class StageEntry:
    """One stage as a job: its entry point and the arguments it takes.

    Attributes:
        run: ``run(run_dir, arguments, overrides)``: ``arguments`` are the per-job
            ``KEY=VALUE`` pairs named in ``keys`` (``step``, ``split``, ...), ``overrides`` the
            other ``KEY=VALUE`` strings (config overrides). Returns what the command line
            prints (``None``: nothing).
        keys: the per-job argument names.
        summary: one line for ``hessov --help``.
        description: what ``hessov STAGE --help`` explains.
    """

    run: Callable[[RunDir, dict[str, str], list[str]], str | None]
    keys: tuple[str, ...]
    summary: str
    description: str


def split_arguments(items: list[str], keys: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """Separate the per-job arguments named in ``keys`` from config overrides."""
    arguments, overrides = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"expected KEY=VALUE, got {item!r}")
        if key in keys:
            arguments[key] = value
        else:
            overrides.append(item)
    return arguments, overrides


def int_argument(arguments: dict[str, str], key: str) -> int:
    """``arguments[key]`` as an integer; a clear error naming ``key`` otherwise."""
    try:
        return int(arguments[key])
    except KeyError:
        raise ConfigError(f"{key}: missing; pass {key}=...") from None
    except ValueError:
        raise ConfigError(f"{key}: expected an integer, got {arguments[key]!r}") from None


def open_run(path: str | Path) -> RunDir:
    """The run directory at ``path``; a clear error when there is none."""
    run = RunDir(Path(path))
    if not run.root.is_dir():
        raise MissingInputError(f"{run.root} is not a run directory")
    return run


def refuse_overrides(stage: str, overrides: list[str], accepted: str) -> None:
    """A stage that takes no config overrides names the first one it was given."""
    if overrides:
        raise ConfigError(f"{overrides[0].partition('=')[0]}: {stage} accepts only {accepted}")


def sketch_inputs(run: RunDir, overrides: list[str], keys: tuple[str, ...] = ()):
    """What every stage after the layout starts from: the run's config (only
    :data:`COMPUTE_KEYS` and ``keys`` overridden) with the layout's dtype, and the layout's
    sketch spec,
    whose row block ``row_block=`` or ``memory_gb=`` may choose again: it decides how the
    basis and solve compute, not what is measured.
    """
    from hessov.costs import rechoose_row_block
    from hessov.sketchspec import load_spec

    cfg = override_run_config(saved_run_config(run), overrides, (*COMPUTE_KEYS, *keys))
    spec = load_spec(run)
    cfg.dtype = spec.layout.dtype  # the layout fixed the sketch's dtype and curvature
    cfg.curvature, cfg.params = spec.curvature, list(spec.params)
    rechoose_row_block(cfg, spec, overrides)
    return cfg, spec


def steps_and_splits(arguments: dict[str, str], spec) -> list[tuple[int, str]]:
    """``step=`` and ``split=`` of a job, each defaulting to all of the layout's."""
    steps = [int_argument(arguments, "step")] if "step" in arguments else spec.steps
    splits = [arguments["split"]] if "split" in arguments else spec.splits
    return [(step, split) for step in steps for split in splits]


def is_config_file(argument: str) -> bool:
    """Whether a first argument names a config file (or a run directory) rather than being
    a ``KEY=VALUE`` override: a path may hold ``=`` too (``runs/lr=0.1/config.yaml``).
    """
    return "=" not in argument or argument.endswith((".yaml", ".yml")) or Path(argument).exists()


def train_job(config_file: str | None, overrides: list[str]) -> RunDir:
    """Stage 1 from a config file (optional) and overrides; returns the run."""
    from hessov.stages.train import train

    return train(load_run_config(overrides, config_file))


def _layout(run: RunDir, arguments: dict, overrides: list[str]) -> None:
    from hessov.sketchspec import load_spec
    from hessov.stages.layout import complete_layout, layout

    if run.sketch_spec.is_file() and not overrides:
        # A layout on disk is finished as it is, whatever the config's defaults say: it may
        # have been made by hand with other k, s, block_size or recovery.
        complete_layout(run, load_spec(run))
    else:
        layout(run, override_run_config(saved_run_config(run), overrides))


def measured_indices(arguments: dict[str, str], spec, round_name: str) -> tuple[range, str]:
    """The measurement indices of a job's round and its task name: ``indices=a:b``,
    ``task=i`` (or ``$SLURM_ARRAY_TASK_ID``), or all of them.
    """
    if "indices" in arguments:
        start, _, stop = arguments["indices"].partition(":")
        try:
            return range(int(start), int(stop)), f"{int(start)}-{int(stop)}"
        except ValueError:
            raise ConfigError(f"indices: expected a:b, got {arguments['indices']!r}") from None
    task = arguments.get("task", os.environ.get("SLURM_ARRAY_TASK_ID"))
    if task is None:
        return range(spec.round_layout(round_name).num_measurements), "all"
    task = int_argument({"task": task}, "task")
    return spec.task_indices(task, round_name), f"task{task}"


def _measure(run: RunDir, arguments: dict, overrides: list[str]) -> None:
    from hessov.stages.measure import measure

    cfg, spec = sketch_inputs(run, overrides)
    for round_name in measured_rounds(arguments, spec):
        indices, task_name = measured_indices(arguments, spec, round_name)
        for step, split in steps_and_splits(arguments, spec):
            measure(run, cfg, spec, step, split, indices, task_name, round_name)


def measured_rounds(arguments: dict[str, str], spec) -> list[str]:
    """``round=``'s round; without it, the first round, and with it the a-posteriori round
    when the whole round is asked for (no task or indices): both need only the layout.
    """
    if "round" in arguments:
        if arguments["round"] not in spec.rounds:
            raise ConfigError(f"round: {arguments['round']!r} is not one of {spec.rounds}")
        return [arguments["round"]]
    whole = not ({"indices", "task"} & set(arguments) or "SLURM_ARRAY_TASK_ID" in os.environ)
    return ["first", "apost"] if whole and "apost" in spec.rounds else ["first"]


def row_phase(
    arguments: dict[str, str], spec, stage: str, round_name: str = "second"
) -> tuple[str | None, list[int] | None]:
    """``phase=`` of a row-block basis (of ``round_name``) or solve and, for a per-block
    phase, the row blocks of its array task ``task=i`` (or ``$SLURM_ARRAY_TASK_ID``);
    ``(None, None)``: the whole program.
    """
    from hessov.rowpass import program_phases

    if "phase" not in arguments:
        return None, None
    phases = {phase.name: phase for phase in program_phases(stage, spec.recovery, round_name)}
    if not spec.row_block:
        raise ConfigError(f"phase: the {stage} runs in memory (row_block=-1); it has no phases")
    if arguments["phase"] not in phases:
        raise ConfigError(f"phase: {arguments['phase']!r} is not one of {', '.join(phases)}")
    task = arguments.get("task", os.environ.get("SLURM_ARRAY_TASK_ID"))
    if not phases[arguments["phase"]].per_block or task is None:
        return arguments["phase"], None
    return arguments["phase"], list(spec.row_task_blocks(int_argument({"task": task}, "task")))


def _basis(run: RunDir, arguments: dict, overrides: list[str]) -> None:
    from hessov.stages.basis import basis

    cfg, spec = sketch_inputs(run, overrides)
    if spec.recovery != "two_pass":
        raise ConfigError(
            f"recovery: the basis stage is for two_pass, the layout is {spec.recovery}"
        )
    round_name = arguments.get("round", "second")
    if round_name not in spec.rounds or round_name in ("first", "apost"):
        later = [name for name in spec.rounds if name not in ("first", "apost")]
        raise ConfigError(f"round: {round_name!r} has no basis; the rounds that do: {later}")
    phase, blocks = row_phase(arguments, spec, "basis", round_name)
    for step, split in steps_and_splits(arguments, spec):
        basis(run, cfg, spec, step, split, phase, blocks, round_name)


def _solve(run: RunDir, arguments: dict, overrides: list[str]) -> None:
    from hessov.stages.solve import solve

    cfg, spec = sketch_inputs(run, overrides)
    phase, blocks = row_phase(arguments, spec, "solve")
    for step, split in steps_and_splits(arguments, spec):
        solve(run, cfg, spec, step, split, phase, blocks)


def _variant(run: RunDir, arguments: dict, overrides: list[str]) -> str:
    from hessov.paramblock import recorded_layout
    from hessov.variants import create_variant, variant_config, variants_of

    cfg = override_run_config(saved_run_config(run), overrides, ("row_block",))
    found = {v.name: v for v in variants_of(cfg, recorded_layout(run))}
    name = arguments.get("name", "")
    if name not in found:
        raise ConfigError(
            f"name: {name!r} is not a variant of {run.config}; its variants: "
            f"{', '.join(found) or 'none (per_layer=true, curvature=both or which=both make them)'}"
        )
    variant = found[name]
    return str(create_variant(run, variant_config(cfg, variant, run), variant.key).root)


def _shift(run: RunDir, arguments: dict, overrides: list[str]) -> None:
    from hessov.stages.shift import shift

    cfg, spec = sketch_inputs(run, overrides)
    if spec.which != "smallest":
        raise ConfigError(f"which: the shift is for which=smallest; the layout is {spec.which}")
    for step, split in steps_and_splits(arguments, spec):
        shift(run, cfg, spec, step, split)


def _exhaustive(run: RunDir, arguments: dict, overrides: list[str]) -> None:
    from hessov.stages.exhaustive import exhaustive

    cfg, spec = sketch_inputs(run, overrides)
    for step, split in steps_and_splits(arguments, spec):
        exhaustive(run, cfg, spec, step, split)


def _analyze(run: RunDir, arguments: dict, overrides: list[str]) -> str | None:
    from hessov.sketchspec import load_spec
    from hessov.stages.analyze import analyze

    refuse_overrides("analyze", overrides, "step= split= report=")
    report = arguments.get("report", "true").lower()
    if report not in ("true", "false"):
        raise ConfigError(f"report: expected true or false, got {arguments['report']!r}")
    chosen = {key: arguments[key] for key in ("step", "split") if key in arguments}
    items = steps_and_splits(chosen, load_spec(run)) if chosen else None
    analyze(run, items, report=report == "true")
    return str(run.report) if report == "true" else None


def estimate_stage(name: str) -> Callable[[RunDir, dict, list[str]], str]:
    """The entry point of estimate ``name`` (trace, diagonal, density; :mod:`hessov.probes`):
    ``phase=probes`` runs array tasks (``task=i``, ``$SLURM_ARRAY_TASK_ID`` or every task
    without a file), ``phase=finish`` writes the estimate, no phase both in turn.
    """

    def run_stage(run: RunDir, arguments: dict, overrides: list[str]) -> str:
        import importlib

        from hessov.probes import ESTIMATE_KEYS, missing_tasks, probe_plan

        stage = importlib.import_module(f"hessov.stages.{name}")
        cfg, spec = sketch_inputs(run, overrides, ESTIMATE_KEYS)
        phase = arguments.get("phase", "all")
        if phase not in ("probes", "finish", "all"):
            raise ConfigError(f"phase: one of probes, finish (or none: both), got {phase!r}")
        task = arguments.get("task", os.environ.get("SLURM_ARRAY_TASK_ID"))
        written = []
        for where in steps_and_splits(arguments, spec):
            run.require(run.eigen(*where), "solve")
            plan = probe_plan(cfg, name)
            if phase != "finish":
                chosen = missing_tasks(run, plan, where)
                if task is not None:
                    chosen = [int_argument({"task": task}, "task")]
                    plan.indices(chosen[0])  # refuses a task outside the plan
                    if run.estimate_task(*where, name, chosen[0]).is_file():
                        chosen = []  # computed already: never overwritten
                for number in chosen:
                    stage.task(run, cfg, spec, where, number)
            if phase != "probes":
                written.append(stage.finish(run, cfg, spec, where)["file"])
        return "\n".join(written) or None

    return run_stage


def _check_operator(run: RunDir, arguments: dict, overrides: list[str]) -> str:
    import json

    from hessov.stages.check_operator import check_operator

    cfg = override_run_config(saved_run_config(run), overrides, (*COMPUTE_KEYS, "dtype"))
    if run.sketch_spec.is_file():  # the operator the layout fixed: a block, the GGN
        from hessov.sketchspec import load_spec

        spec = load_spec(run)
        cfg.curvature, cfg.params = spec.curvature, list(spec.params)
    step = int_argument(arguments, "step")
    return json.dumps(check_operator(run, cfg, step, arguments.get("split", "train")), indent=2)


def replays_to_run(run: RunDir, cfg, settings: list[str]):
    """The replay jobs ``settings`` name: ``name=NAME`` alone names a configured job or a
    configured replay with seeds (all its jobs); otherwise an ad-hoc replay from the keys
    (one job per seed of ``seeds=[...]``).
    """
    configured = {job.name: job for job in replay_jobs(cfg.replays)}
    seeded = {replay.name: replay_jobs([replay]) for replay in cfg.replays if replay.seeds}
    if [item.partition("=")[0] for item in settings] == ["name"]:
        name = settings[0].partition("=")[2]
        if name in seeded:
            return seeded[name]
        if name not in configured:
            raise ConfigError(
                f"name: no replay {name!r} in {run.config} (configured: "
                f"{', '.join(configured) or 'none'}); for an ad-hoc replay pass snapshot= mode= "
                "scaling= nfilter= eig_freq= ..."
            )
        return [configured[name]]
    if not settings:
        raise ConfigError(
            "name: pass name=NAME of a configured replay ("
            + (", ".join(configured) or "none")
            + ") or the settings of an ad-hoc one: snapshot=T mode=... scaling=... nfilter=..."
        )
    jobs = replay_jobs([replay_from_overrides(cfg, settings)])
    for job in jobs:
        if job.name in configured and configured[job.name] != job:
            raise ConfigError(
                f"name: {job.name!r} is a configured replay with other settings; pass name=... "
                "to give this ad-hoc replay its own name"
            )
    return jobs


def _replay(run: RunDir, arguments: dict, overrides: list[str]) -> str:
    from hessov.stages.replay import finished_replay, run_replay

    compute = [item for item in overrides if item.partition("=")[0] in REPLAY_COMPUTE_KEYS]
    settings = [item for item in overrides if item not in compute]
    cfg = override_run_config(saved_run_config(run), compute, REPLAY_COMPUTE_KEYS)
    jobs = replays_to_run(run, cfg, settings)
    for job in jobs:  # every name free (or finished alike) before the first step of any job
        finished_replay(run, job)
    for job in jobs:
        run_replay(run, cfg, job)
    return "\n".join(str(run.replay(job.name)) for job in jobs)


def _compare(run: RunDir, arguments: dict, overrides: list[str]) -> str:
    from hessov.stages.compare import compare

    refuse_overrides("compare", overrides, "zoom=")
    return str(compare(run, int_argument(arguments, "zoom") if "zoom" in arguments else 0))


STAGES: dict[str, StageEntry] = {
    "layout": StageEntry(
        _layout,
        (),
        "stage 2: fix the sketch settings and create the measurement storage",
        "Resolve k (default: the paper's rule, 5% of D up to 1,000), s (default 2k), "
        "the two-pass rounds (rounds=q, or target_rel_err= with max_rounds= and "
        "target_eigenpairs=), block_size, MEAS_PER_JOB, the row block of the basis and "
        "solve (from memory_gb, "
        "or row_block=) and the steps/splits to measure; write RUN/measurements/sketch.json; "
        "create the part files (flags 'initialized') and virtual views per step and split, "
        "and (in memory) each split's monolithic merge arrays. Overrides: k= s= recovery= "
        "rounds= target_rel_err= max_rounds= target_eigenpairs= "
        "noise= block_size= memory_gb= row_block= "
        "MEAS_PER_JOB= NUM_A_POSTERIORI= SKETCH_SEED= HESSIAN_STEPS= HESSIAN_SPLITS=, and "
        "what is sketched: curvature=hessian|ggn, params=[GLOB,...] (a block of H), "
        "which=largest|smallest. "
        "Without overrides, a layout already on disk is completed as it is.",
    ),
    "measure": StageEntry(
        _measure,
        ("step", "split", "indices", "task", "round"),
        "stage 3: take one worker's share of the Hessian sketch measurements",
        "Measure step=T split=train|test (default: every step and split of the layout) for "
        "indices=a:b, task=i, or $SLURM_ARRAY_TASK_ID with MEAS_PER_JOB (default: all). "
        "Without round=, task= or indices=, the first round and the a-posteriori round. "
        "Skips measured blocks; writes each finished block atomically. With two-pass "
        "recovery (the default), round=second multiplies H onto the basis Q that "
        "`hessov basis` wrote after the first round, round=roundJ (rounds=q) onto the "
        "Krylov block `hessov basis round=roundJ` wrote; round=apost multiplies H onto the "
        "a-posteriori error's Gaussian probes (any time after the layout). Also device= "
        "threads=.",
    ),
    "basis": StageEntry(
        _basis,
        ("step", "split", "phase", "task", "round"),
        "stage 4a (two-pass): the block of the Krylov basis the next round multiplies",
        "For step=T split=train|test (default: every step and split of the layout): verify "
        "every flag and checksum of the first round, merge, and write Q = qr(H Omega) to "
        "RUN/measurements/step_T_SPLIT/basis.h5 for the second round: in memory, or by TSQR "
        "in row blocks when the layout chose a row block (row_block=N or memory_gb= choose "
        "again, row_block=-1 forces memory). In row blocks the basis is the phases local "
        "(array tasks over the row blocks), tree, apply (the same) and finish; phase=NAME "
        "[task=i or $SLURM_ARRAY_TASK_ID] runs one of them (the stage graph's jobs), "
        "without phase= all in turn. With rounds=q, round=roundJ (J = 3..q) writes "
        "basis_roundJ.h5, the next block of the block Krylov basis from the rounds before "
        "(in row blocks the phases project, ..., reorth_apply, check, finish), after "
        "bounding the eigenvalues the solve would report after round J-1; with "
        "target_rel_err met it writes nothing and the later rounds are skipped. Also "
        "threads=.",
    ),
    "solve": StageEntry(
        _solve,
        ("step", "split", "phase", "task"),
        "stage 4b: verify and merge the measurements, solve for the top-k eigenpairs",
        "Solve step=T split=train|test (default: every step and split of the layout): "
        "verify every flag and checksum, merge, then Rayleigh-Ritz on the block Krylov space "
        "of the rounds taken (two-pass, the default: the basis and H Q, and with rounds=q "
        "every block and its products) or the single-pass SEIGH core; the a-posteriori error from "
        "the apost round. In memory, or in row blocks when the layout chose a row block "
        "(row_block=N or memory_gb= choose again, row_block=-1 forces memory): then a "
        "sequence of phases, each an array over the row blocks or one job (`hessov plan` lists "
        "them); phase=NAME [task=i or $SLURM_ARRAY_TASK_ID] runs one, without phase= all "
        "in turn, skipping what is done. Writes RUN/eigen/step_T_SPLIT.h5 and the 'solve' "
        "summary.",
    ),
    "variant": StageEntry(
        _variant,
        ("name",),
        "make the directory of one variant of a trained run (a layer, the GGN, the smallest)",
        "name=NAME: RUN/variants/NAME, a run of its own with the run's config and the "
        "variant's settings (per_layer=true: layer_MODULE with params= the module's "
        "parameters; curvature=both: ggn; which=both: smallest), linking params.h5, "
        "snapshots/ and the train summary; every stage then runs on it as on any run. "
        "`hessov run` adds this job after training, then the variant's layout, sketches and "
        "report. Also row_block=. Prints the variant's directory.",
    ),
    "shift": StageEntry(
        _shift,
        ("step", "split"),
        "which=smallest: the spectral shift sigma the sketch of sigma I - H uses",
        "For a layout with which=smallest, step=T split=S (default: all): sigma = |theta| + "
        "||H u - theta u|| from Lanczos' largest-magnitude eigenpair (theta, u), at least "
        "||H||_2, so that the top eigenpairs of sigma I - H are H's most negative. Writes "
        "RUN/measurements/step_T_SPLIT/shift.json and the 'shift' summary; every measurement "
        "round multiplies with sigma I - H, and the solve reports lambda = sigma - mu. Also "
        "device= threads=.",
    ),
    "exhaustive": StageEntry(
        _exhaustive,
        ("step", "split"),
        "small networks: exact eigendecomposition next to the sketch",
        "For D up to ~10,000: the dense Hessian (H @ I in blocks, float64), exact eigh, and "
        "next to it the sketch at the layout's settings (the solve stage's result, or the "
        "in-core sketch): top-20 eigenvalue errors, sign-invariant eigenvector residuals, "
        "subspace overlaps at k = 1, 5, 10, 20, 50, 100 and k. step= split= (default all).",
    ),
    "analyze": StageEntry(
        _analyze,
        ("step", "split", "report"),
        "stage 5: magnitude masks vs eigenspaces, crystallization, figures and report",
        "For step=T split=S (default: every solved step and split): overlap(k) of the "
        "top-k parameter-magnitude mask with the top-k eigenspace for k = 1..K against "
        "chance k/D, random masks and the best k-sparse mask; Grassmannian similarities "
        "across steps for eigenspaces and masks (sparsity 0.005, 0.01, 0.05, 0.2). Writes "
        "RUN/analysis/analysis.h5, figures/*.png, report.md and the 'analyze' summary; "
        "names the steps not solved yet and adds them when re-run. report=false analyses "
        "only, leaving the figures and report to a later call. Prints the report path.",
    ),
    "check-operator": StageEntry(
        _check_operator,
        ("step", "split"),
        "check that a recorded step's Hessian is deterministic, symmetric and finite",
        "Build the Hessian of step=T split=train|test as the measurements will, and "
        "report a determinism probe (two passes over the data), a symmetry probe "
        "(v^T H w vs w^T H v), NaN/inf detection and the time of one HVP. Also device= "
        "dtype= threads=.",
    ),
    "replay": StageEntry(
        _replay,
        (),
        "stage 6: continue a run from a snapshot with a spectral filter on the gradient",
        "Replay a snapshot of a trained run with the gradient filtered in the Hessian's "
        "top eigenbasis before the optimizer (README, 'Spectral-filter replays'): name=NAME "
        "runs that replay of the run's config (replays: [...]); or an ad-hoc one: snapshot=T "
        "mode=none|global_scaling|flat_scaling_v1|flat_scaling_v2|dynamic scaling=ALPHA "
        "nfilter=N eig_freq=F [neigs= eigensolver=lanczos|sketch eig_tol= warmup=W "
        "MAX_STEPS= EVAL_EVERY= TARGET_TRAIN_LOSS= STOP_AT_TARGET= TARGET_TRAIN_ACCURACY= "
        "optimizer.lr= optimizer.name= seeds=[0,1,2] perturbation=1e-3 name=]. Also "
        "device= dtype= threads= HESSIAN_BATCH_SIZE=. With seeds=[...] a replay is one "
        "independent job per seed, NAME.seedS in RUN/replays/NAME.seedS/: seed 0 replays "
        "the snapshot itself, seed S > 0 first perturbs every parameter p <- p (1 + "
        "perturbation z), z ~ N(0, 1) seeded with S, so that `hessov compare` reports "
        "what holds across seeds. --list prints one line per job, name=NAME.seedS runs one "
        "job and name=NAME all of a replay's seeds in turn. Writes RUN/replays/NAME/ and "
        "the 'replay' summary; a finished replay is not run again, a name used with other "
        "settings is refused. Prints the directory of each job it ran, one a line.",
    ),
    "trace": StageEntry(
        estimate_stage("trace"),
        ("step", "split", "phase", "task"),
        "the Hessian trace: exact on the sketch's basis, Hutchinson probes beyond it",
        "Hutch++ that reuses a solved two-pass sketch of step=T split=S (default: every "
        "step and split of the layout): tr(H) = tr(V^T H V), exact from the measured H V, "
        "plus Hutchinson's Rademacher probes on the deflated remainder (I - V V^T) H "
        "(I - V V^T), trace_probes= of them (default 640) in array tasks of "
        "probes_per_task= (default 64). phase=probes runs the tasks (task=i or "
        "$SLURM_ARRAY_TASK_ID: one; otherwise every task without a file), phase=finish "
        "adds them up, no phase both. Writes RUN/estimates/step_T_SPLIT/trace.h5 and the "
        "'trace' summary: value, ci95 (the probes' 95% half-width), hvps. Also device= "
        "threads=.",
    ),
    "diagonal": StageEntry(
        estimate_stage("diagonal"),
        ("step", "split", "phase", "task"),
        "the Hessian diagonal: exact on the sketch's basis, probes beyond it",
        "For a solved two-pass sketch of step=T split=S (default: all): diag(H) from the "
        "sketch's basis V and its measured products H V (exact, no HVP) plus diag(P H P), "
        "P = I - V V^T, by diagonal_probes= Rademacher probes (default 640) in array "
        "tasks of probes_per_task= (default 64). Phases and tasks as `hessov trace`. "
        "Writes RUN/estimates/step_T_SPLIT/diagonal.h5 (diagonal, ci95, sketched), a "
        "per-layer figure in RUN/estimates/figures/ and the 'diagonal' summary. Also "
        "device= threads=.",
    ),
    "density": StageEntry(
        estimate_stage("density"),
        ("step", "split", "phase", "task"),
        "the Hessian eigenvalue density: deflated stochastic Lanczos quadrature",
        "For a solved sketch of step=T split=S (default: all): density_runs= "
        "(default 10) independent Lanczos runs of density_steps= (default 80) steps, one "
        "array task each, on the complement of the solve's eigenvectors; the solve's "
        "eigenvalues added back with weight 1/D each. Phases and tasks as `hessov trace`. "
        "Writes RUN/estimates/step_T_SPLIT/density.h5 (nodes and weights, the broadened "
        "density on a grid, the outliers), a log-scale figure in RUN/estimates/figures/ "
        "and the 'density' summary. Also device= threads=.",
    ),
    "compare": StageEntry(
        _compare,
        ("zoom",),
        "figures and report comparing every finished replay of a run",
        "Per snapshot: the train-loss curves of every finished replay (the switch "
        "marked, the baseline's history before it; the seeds of one replay in one "
        "colour), a zoom on the first zoom=Z steps after the switch (default a tenth of "
        "the longest replay), and per replay its sharpness flow over its seeds; "
        "RUN/replays/report.md gives per replay the median and min-max over its seeds "
        "of the steps to the loss target and the final loss, and states only what holds "
        "across seeds: which replay reaches the target first (A is ahead of B only if "
        "A's slowest seed beats B's fastest), and whether flat_scaling_v1 sent the frozen "
        "eigenvalues up. Drawing again replaces them. Prints RUN/replays last.",
    ),
}


def run_job(argv: list[str]) -> str | None:
    """Run one job, ``[STAGE, RUN_DIR or CONFIG, KEY=VALUE ...]``; returns what the command
    line prints. Raises :class:`hessov.errors.HessovError` for what a user can fix.
    """
    stage, *rest = argv
    if stage == "train":
        if rest and is_config_file(rest[0]):  # a config file, then overrides
            return str(train_job(rest[0], rest[1:]).root)
        return str(train_job(None, rest).root)
    if not rest:
        raise ConfigError(f"{stage}: pass the run directory")
    target, *items = rest
    entry = STAGES[stage]
    arguments, overrides = split_arguments(items, entry.keys)
    return entry.run(open_run(target), arguments, overrides)
