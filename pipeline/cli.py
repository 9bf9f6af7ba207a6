"""The ``hessov`` command: one thin subcommand per pipeline stage.

Parsing only: each subcommand turns ``KEY=VALUE`` arguments into a validated config and
calls its stage function. Errors a user can fix (bad config, missing data, a run that
would be overwritten) are printed as one clear line and exit with status 2 before any
work starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline.config import load_run_config, override_run_config, problem_names
from pipeline.errors import ConfigError, HessovError, MissingInputError
from pipeline.rundir import RunDir
from pipeline.runlog import setup_terminal_logging

OVERRIDES_HELP = (
    "KEY=VALUE overrides (omegaconf dotlist), e.g. problem=mnist_mini MAX_STEPS=2000 "
    "optimizer.name=Adam optimizer.lr=1e-3 RECORD_STEPS=[0,100,1000] device=cuda dtype=float64 "
    "preset=tiny"
)


def _cmd_train(args: argparse.Namespace) -> int:
    from pipeline.stages.train import train

    cfg = load_run_config(args.overrides, args.config)
    run = train(cfg)
    print(run.root)
    return 0


def _split_stage_args(items: list[str], stage_keys: tuple[str, ...]) -> tuple[dict, list[str]]:
    """Separate per-invocation arguments (``step=``, ``split=``, ...) from config overrides."""
    stage, overrides = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"expected KEY=VALUE, got {item!r}")
        if key in stage_keys:
            stage[key] = value
        else:
            overrides.append(item)
    return stage, overrides


def _int_arg(stage: dict, key: str) -> int:
    try:
        return int(stage[key])
    except KeyError:
        raise ConfigError(f"{key}: missing; pass {key}=...") from None
    except ValueError:
        raise ConfigError(f"{key}: expected an integer, got {stage[key]!r}") from None


def _open_run(path: str) -> RunDir:
    run = RunDir(Path(path))
    if not run.root.is_dir():
        raise MissingInputError(f"{run.root} is not a run directory")
    return run


def _cmd_layout(args: argparse.Namespace) -> int:
    from pipeline.hessian import load_run_config as run_config
    from pipeline.stages.layout import layout

    run = _open_run(args.run_dir)
    cfg = override_run_config(run_config(run), args.overrides)
    layout(run, cfg)
    return 0


def _sketch_stage_inputs(args: argparse.Namespace, stage_keys: tuple[str, ...]):
    """What every stage after the layout starts from: the run, its per-invocation
    arguments, the run's config (only device, threads and the Hessian batch size may be
    overridden) with the layout's dtype, and the layout's sketch spec."""
    from pipeline.hessian import load_run_config as run_config
    from pipeline.sketchspec import load_spec

    run = _open_run(args.run_dir)
    stage, overrides = _split_stage_args(args.overrides, stage_keys)
    cfg = override_run_config(
        run_config(run), overrides, ("device", "threads", "HESSIAN_BATCH_SIZE")
    )
    spec = load_spec(run)
    cfg.dtype = spec.layout.dtype  # the layout fixed the sketch's dtype
    return run, stage, cfg, spec


def _steps_and_splits(stage: dict, spec) -> list[tuple[int, str]]:
    steps = [_int_arg(stage, "step")] if "step" in stage else spec.steps
    splits = [stage["split"]] if "split" in stage else spec.splits
    return [(step, split) for step in steps for split in splits]


def _cmd_measure(args: argparse.Namespace) -> int:
    from pipeline.stages.measure import measure

    run, stage, cfg, spec = _sketch_stage_inputs(
        args, ("step", "split", "indices", "task", "round")
    )
    if "indices" in stage:
        start, sep, stop = stage["indices"].partition(":")
        try:
            indices, task_name = range(int(start), int(stop)), f"{int(start)}-{int(stop)}"
        except ValueError:
            raise ConfigError(f"indices: expected a:b, got {stage['indices']!r}") from None
    else:
        task = stage.get("task", os.environ.get("SLURM_ARRAY_TASK_ID"))
        if task is None:
            indices, task_name = range(spec.layout.num_measurements), "all"
        else:
            indices = spec.task_indices(_int_arg({"task": task}, "task"))
            task_name = f"task{int(task)}"
    for step, split in _steps_and_splits(stage, spec):
        measure(run, cfg, spec, step, split, indices, task_name, stage.get("round", "first"))
    return 0


def _cmd_solve(args: argparse.Namespace) -> int:
    from pipeline.stages.solve import solve

    run, stage, cfg, spec = _sketch_stage_inputs(args, ("step", "split"))
    for step, split in _steps_and_splits(stage, spec):
        result = solve(run, cfg, spec, step, split)
        if result.get("state") == "awaiting_second_round":
            print(
                f"next: hessov measure {run.root} step={step} split={split} round=second; "
                f"then hessov solve {run.root} step={step} split={split}",
                file=sys.stderr,
            )
    return 0


def _cmd_exhaustive(args: argparse.Namespace) -> int:
    from pipeline.stages.exhaustive import exhaustive

    run, stage, cfg, spec = _sketch_stage_inputs(args, ("step", "split"))
    for step, split in _steps_and_splits(stage, spec):
        exhaustive(run, cfg, spec, step, split)
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from pipeline.sketchspec import load_spec
    from pipeline.stages.analyze import analyze

    run = _open_run(args.run_dir)
    stage, overrides = _split_stage_args(args.overrides, ("step", "split"))
    if overrides:
        raise ConfigError(f"{overrides[0].partition('=')[0]}: analyze accepts only step= split=")
    items = _steps_and_splits(stage, load_spec(run)) if stage else None
    analyze(run, items)
    print(run.report)
    return 0


def _cmd_check_operator(args: argparse.Namespace) -> int:
    from pipeline.hessian import load_run_config as run_config
    from pipeline.stages.check_operator import check_operator

    run = _open_run(args.run_dir)
    stage, overrides = _split_stage_args(args.overrides, ("step", "split"))
    cfg = override_run_config(
        run_config(run), overrides, ("device", "threads", "dtype", "HESSIAN_BATCH_SIZE")
    )
    report = check_operator(run, cfg, _int_arg(stage, "step"), stage.get("split", "train"))
    print(json.dumps(report, indent=2))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.launch.local import run_local

    cfg = load_run_config(args.overrides, args.config)
    if cfg.backend == "slurm":
        from pipeline.launch.slurm import submit_run

        return submit_run(cfg, wait=args.wait)
    run = run_local(cfg)
    print(run.root)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.launch.chain import plan_chain

    plan = plan_chain(load_run_config(args.overrides, args.config))
    print(json.dumps(plan.as_dict(), indent=2) if args.json else plan.as_lines())
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from pipeline.launch.plan import describe_status, run_status
    from pipeline.launch.slurm import describe_jobs

    run = _open_run(args.run_dir)
    print(describe_status(run_status(run)))
    jobs = describe_jobs(run)  # None: never submitted to Slurm
    if jobs is not None:
        print(jobs)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from pipeline.hessian import load_run_config as run_config
    from pipeline.launch.local import resume_local

    run = _open_run(args.run_dir)
    # The backend is this call's choice (default local), not the one the run started with.
    stage, overrides = _split_stage_args(args.overrides, ("backend",))
    backend = stage.get("backend", "local")
    if backend not in ("local", "slurm"):
        raise ConfigError(f"backend: must be local or slurm, got {backend!r}")
    cfg = override_run_config(run_config(run), overrides, ("device", "threads", "slurm"))
    if backend == "slurm":
        from pipeline.launch.slurm import submit_resume

        compute = [item for item in overrides if item.split("=")[0] in ("device", "threads")]
        return submit_resume(run, cfg, compute, wait=args.wait)
    resume_local(run, cfg)
    print(run.root)
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from pipeline import summary

    run = RunDir(Path(args.run_dir))
    if not run.root.is_dir():
        raise MissingInputError(f"{run.root} is not a directory")
    print(json.dumps(summary.load(run), indent=2, sort_keys=True))
    return 0


def _cmd_nqm(args: argparse.Namespace) -> int:
    from pipeline.stages.nqm import load_nqm_config, run_nqm

    cfg = load_nqm_config(args.overrides)
    result = run_nqm(cfg, Path(cfg.out_dir), progress=not args.json)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(Path(cfg.out_dir).resolve())
    return 0


#: Run-config keys a replay may still change: where and how precisely it computes.
REPLAY_COMPUTE_KEYS = ("device", "dtype", "threads", "HESSIAN_BATCH_SIZE")


def _replay_jobs_from_args(run: RunDir, cfg, settings: list[str]):
    """The replay jobs to run: ``name=NAME`` alone names a configured job (``--list``) or a
    configured replay with seeds (all its jobs); otherwise an ad-hoc replay from the keys
    (one job per seed of ``seeds=[...]``)."""
    from pipeline.config import replay_from_overrides, replay_jobs

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


def _cmd_replay(args: argparse.Namespace) -> int:
    from pipeline.config import replay_jobs
    from pipeline.hessian import load_run_config as run_config
    from pipeline.stages.replay import finished_replay, run_replay

    run = _open_run(args.run_dir)
    if args.list:
        for job in replay_jobs(run_config(run).replays):
            print(job.name)
        return 0
    compute = [item for item in args.overrides if item.partition("=")[0] in REPLAY_COMPUTE_KEYS]
    settings = [item for item in args.overrides if item not in compute]
    cfg = override_run_config(run_config(run), compute, REPLAY_COMPUTE_KEYS)
    jobs = _replay_jobs_from_args(run, cfg, settings)
    for job in jobs:  # every name free (or finished alike) before the first step of any job
        finished_replay(run, job)
    for job in jobs:
        run_replay(run, cfg, job)
        print(run.replay(job.name))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.stages.replay import compare

    run = _open_run(args.run_dir)
    stage, overrides = _split_stage_args(args.overrides, ("zoom",))
    if overrides:
        raise ConfigError(f"{overrides[0].partition('=')[0]}: compare accepts only zoom=")
    print(compare(run, _int_arg(stage, "zoom") if "zoom" in stage else 0))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hessov",
        description=(
            "Sketched Hessian eigenspaces of neural networks: train a problem and record its "
            "parameters, measure the loss Hessian with random sketches (in parallel, on "
            "Slurm or locally), solve for the top-k eigenpairs with error bounds, and "
            "analyse them. Every stage reads and writes one run directory."
        ),
        epilog="Problems: " + ", ".join(problem_names()),
    )
    parser.add_argument("--log-level", default="INFO", help="terminal log level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="stage 1: train a problem, record parameters (and gradients) and snapshots",
        description=(
            "Train a problem and append the flattened parameters at RECORD_STEPS to "
            "RUN/params.h5, save SNAPSHOT_STEPS for replay, log to RUN/log.jsonl. Prints "
            "the run directory as the last line. An existing RUN_DIR is never overwritten: "
            "a finished run is refused, an unfinished one continues with resume=true."
        ),
    )
    train.add_argument("config", nargs="?", help="optional YAML config file")
    train.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    train.set_defaults(func=_cmd_train)

    stage_parsers = {
        "layout": (
            _cmd_layout,
            "stage 2: fix the sketch settings and create the measurement storage",
            "Resolve k (default 5%% of D), s (default 2k), block_size, MEAS_PER_JOB and the "
            "steps/splits to measure; write RUN/measurements/sketch.json; create the part files "
            "(flags 'initialized') and virtual views per step and split, and each split's "
            "monolithic merge arrays. Overrides: k= s= recovery= noise= block_size= "
            "MEAS_PER_JOB= NUM_A_POSTERIORI= SKETCH_SEED= HESSIAN_STEPS= HESSIAN_SPLITS=.",
        ),
        "measure": (
            _cmd_measure,
            "stage 3: take one worker's share of the Hessian sketch measurements",
            "Measure step=T split=train|test (default: every step and split of the layout) for "
            "indices=a:b, task=i, or $SLURM_ARRAY_TASK_ID with MEAS_PER_JOB (default: all). "
            "Skips measured blocks; writes each finished block atomically. With two-pass "
            "recovery, round=second multiplies H onto the basis Q written by the first-round "
            "solve. Also device= threads=.",
        ),
        "solve": (
            _cmd_solve,
            "stage 4: verify and merge the measurements, solve for the top-k eigenpairs",
            "Solve step=T split=train|test (default: every step and split of the layout): "
            "verify every flag and checksum, merge, single-pass SEIGH core, a-posteriori error. "
            "Writes RUN/eigen/step_T_SPLIT.h5 and the 'solve' summary.",
        ),
        "exhaustive": (
            _cmd_exhaustive,
            "small networks: exact eigendecomposition next to the sketch",
            "For D up to ~10,000: the dense Hessian (H @ I in blocks, float64), exact eigh, and "
            "next to it the sketch at the layout's settings (the solve stage's result, or the "
            "in-core sketch): top-20 eigenvalue errors, sign-invariant eigenvector residuals, "
            "subspace overlaps at k = 1, 5, 10, 20, 50, 100 and k. step= split= (default all).",
        ),
        "analyze": (
            _cmd_analyze,
            "stage 5: magnitude masks vs eigenspaces, crystallization, figures and report",
            "For step=T split=S (default: every solved step and split): overlap(k) of the "
            "top-k parameter-magnitude mask with the top-k eigenspace for k = 1..K against "
            "chance k/D, random masks and the best k-sparse mask; Grassmannian similarities "
            "across steps for eigenspaces and masks (sparsity 0.005, 0.01, 0.05, 0.2). Writes "
            "RUN/analysis/analysis.h5, figures/*.png, report.md and the 'analyze' summary; "
            "names the steps not solved yet and adds them when re-run. Prints the report path.",
        ),
        "check-operator": (
            _cmd_check_operator,
            "check that a recorded step's Hessian is deterministic, symmetric and finite",
            "Build the Hessian of step=T split=train|test as the measurements will, and "
            "report a determinism probe (two passes over the data), a symmetry probe "
            "(v^T H w vs w^T H v), NaN/inf detection and the time of one HVP. Also device= "
            "dtype= threads=.",
        ),
    }
    for name, (func, short, long) in stage_parsers.items():
        sub = commands.add_parser(name, help=short, description=long)
        sub.add_argument("run_dir", help="the run directory printed by `hessov train`")
        sub.add_argument("overrides", nargs="*", help="KEY=VALUE arguments (see above)")
        sub.set_defaults(func=func)

    pipeline = commands.add_parser(
        "run",
        help="the whole pipeline: train, layout, measurements, solve (and exhaustive)",
        description=(
            "Build the stage graph from the config and run it: train, layout, every "
            "measurement task of every recorded step and split, the solves (and with "
            "EXHAUSTIVE=true the exact check). backend=local runs the stages one after "
            "another on this machine; backend=slurm submits them as Slurm jobs through "
            "submitit (resources: slurm.* keys), prints the job ids and returns. "
            "problem=NAME picks that problem's config; preset=tiny "
            "shrinks any problem to about a minute. Prints the run directory last."
        ),
    )
    pipeline.add_argument("config", nargs="?", help="optional YAML config file")
    pipeline.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    pipeline.add_argument(
        "--wait",
        action="store_true",
        help="backend=slurm: follow the jobs until they end (at most "
        "slurm.wait_timeout_minutes); exit 1 naming failed jobs and missing work",
    )
    pipeline.set_defaults(func=_cmd_run)

    plan = commands.add_parser(
        "plan",
        help="the jobs a run will need (run directory, D, rounds, array tasks, sketches)",
        description=(
            "Resolve a config as `hessov run` would and print, before anything runs, the run "
            "directory it will use, D, the measurement rounds, the array tasks per round and "
            "the (step, split) pairs to sketch: what slurm/submit_chain.sh submits."
        ),
    )
    plan.add_argument("config", nargs="?", help="optional YAML config file")
    plan.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    plan.add_argument("--json", action="store_true", help="print JSON instead of lines")
    plan.set_defaults(func=_cmd_plan)

    status = commands.add_parser(
        "status",
        help="what is done and what is missing in a run, read from its files",
        description="Per recorded step and split: measured and missing indices (and the "
        "array tasks they belong to) of every round, and whether it is solved. For a run "
        "submitted with backend=slurm, also its latest jobs' ids and Slurm states.",
    )
    status.add_argument("run_dir")
    status.set_defaults(func=_cmd_status)

    resume = commands.add_parser(
        "resume",
        help="finish only what is missing in a run, reusing everything measured",
        description="Resume an interrupted run: unfinished training continues from "
        "its last snapshot, measured blocks are kept, only missing measurements and "
        "unsolved steps are computed. backend=local (default) computes them here; "
        "backend=slurm submits only those jobs. Also device= threads= slurm.*=.",
    )
    resume.add_argument("run_dir")
    resume.add_argument("overrides", nargs="*")
    resume.add_argument(
        "--wait",
        action="store_true",
        help="backend=slurm: follow the jobs until they end (at most "
        "slurm.wait_timeout_minutes); exit 1 naming failed jobs and missing work",
    )
    resume.set_defaults(func=_cmd_resume)

    show = commands.add_parser(
        "summary",
        help="print one JSON object with what every finished stage of a run recorded",
        description="Print the merged summaries of RUN_DIR: one key per finished stage.",
    )
    show.add_argument("run_dir")
    show.set_defaults(func=_cmd_summary)

    nqm = commands.add_parser(
        "nqm",
        help="noisy quadratic model: exact dynamics, steps to target vs batch size, schedules",
        description=(
            "Exact expected-loss dynamics of SGD, heavy-ball momentum and diagonal "
            "preconditioning on the noisy quadratic model; the fewest steps to a target "
            "loss per batch size at the best learning rate (and momentum); optimal "
            "piecewise-constant schedules. Writes nqm.json and PNG figures to out_dir."
        ),
    )
    nqm.add_argument(
        "overrides",
        nargs="*",
        help="KEY=VALUE overrides, e.g. K=1000 target=0.01 algorithms=[sgd,momentum,precond] "
        "p=0.5 batch_sizes=[4,8,16] out_dir=output/nqm",
    )
    nqm.add_argument("--json", action="store_true", help="print the result object as JSON")
    nqm.set_defaults(func=_cmd_nqm)

    replay = commands.add_parser(
        "replay",
        help="continue a run from a snapshot with a spectral filter on the gradient",
        description=(
            "Replay a snapshot of a trained run with the gradient filtered in the Hessian's "
            "top eigenbasis before the optimizer (REFERENCE section 5): name=NAME runs that "
            "replay of the run's config (replays: [...]); or an ad-hoc one: snapshot=T "
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
            "settings is refused. Prints the directory of each job it ran, one a line."
        ),
    )
    replay.add_argument("run_dir", help="the run directory printed by `hessov train`")
    replay.add_argument("overrides", nargs="*", help="KEY=VALUE arguments (see above)")
    replay.add_argument(
        "--list",
        action="store_true",
        help="print the configured replay jobs (one per seed), one name a line, and exit",
    )
    replay.set_defaults(func=_cmd_replay)

    compare = commands.add_parser(
        "compare",
        help="figures and report comparing every finished replay of a run",
        description=(
            "Per snapshot: the train-loss curves of every finished replay (the switch "
            "marked, the baseline's history before it; the seeds of one replay in one "
            "colour), a zoom on the first zoom=Z steps after the switch (default a tenth of "
            "the longest replay), and per replay its sharpness flow over its seeds; "
            "RUN/replays/report.md gives per replay the median and min-max over its seeds "
            "of the steps to the loss target and the final loss, and states only what holds "
            "across seeds: which replay reaches the target first (A is ahead of B only if "
            "A's slowest seed beats B's fastest), and whether flat_scaling_v1 sent the frozen "
            "eigenvalues up. Drawing again replaces them. Prints RUN/replays last."
        ),
    )
    compare.add_argument("run_dir")
    compare.add_argument("overrides", nargs="*", help="zoom=Z")
    compare.set_defaults(func=_cmd_compare)
    return parser


def _split_config_file(args: argparse.Namespace) -> None:
    """``hessov train KEY=VALUE ...`` without a file: the first positional is an override."""
    config = getattr(args, "config", None)
    if config is not None and "=" in config:
        args.overrides = [config, *args.overrides]
        args.config = None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _split_config_file(args)
    setup_terminal_logging(args.log_level)
    try:
        return args.func(args)
    except HessovError as err:
        print(f"hessov {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
