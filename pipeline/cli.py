"""The ``hessov`` command: one subcommand per stage, plus the launchers and the run's state.

Parsing only. A stage's subcommand hands its arguments to the stage's entry point
(:func:`hessov.jobs.run_job`), the very call a local run, a submitit job and an sbatch
script make. Flags and ``KEY=VALUE`` arguments may come in any order. Errors a user can fix
(bad config, missing data, a run that would be overwritten) are printed as one clear line
and exit with status 2 before any work starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hessov.config import load_run_config, override_run_config, problem_names, saved_run_config
from hessov.costs import ROW_BLOCK_KEYS
from hessov.errors import ConfigError, HessovError, MissingInputError
from hessov.jobs import STAGES, is_config_file, open_run, run_job, split_arguments
from hessov.rundir import RunDir
from hessov.runlog import setup_terminal_logging

#: What `hessov resume` may change: where and how to compute, Slurm's resources, and the
#: memory budget or row block of the basis and solve.
RESUME_KEYS = ("device", "threads", "slurm", *ROW_BLOCK_KEYS)

OVERRIDES_HELP = (
    "KEY=VALUE overrides (omegaconf dotlist), e.g. problem=mnist_mini MAX_STEPS=2000 "
    "optimizer.name=Adam optimizer.lr=1e-3 RECORD_STEPS=[0,100,1000] device=cuda dtype=float64 "
    "preset=tiny"
)
WAIT_HELP = (
    "backend=slurm: follow the jobs until they end (at most slurm.wait_timeout_minutes); "
    "exit 1 naming failed jobs and missing work"
)


def _print(output: str | None) -> int:
    if output:
        print(output)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    return _print(run_job(["train", *([args.config] if args.config else []), *args.overrides]))


def _cmd_stage(args: argparse.Namespace) -> int:
    return _print(run_job([args.command, args.run_dir, *args.overrides]))


def _cmd_replay(args: argparse.Namespace) -> int:
    if args.list:
        from hessov.config import replay_jobs

        for job in replay_jobs(saved_run_config(open_run(args.run_dir)).replays):
            print(job.name)
        return 0
    return _cmd_stage(args)


def _names_a_run(config: str | None) -> bool:
    """Whether the positional argument of ``run`` or ``plan`` is a run directory, not a
    config file.
    """
    return config is not None and Path(config, "config.yaml").is_file()


def _cmd_run(args: argparse.Namespace) -> int:
    if _names_a_run(args.config):
        # A run directory (a Recorder's, an import's, or an interrupted run): its stage graph.
        return _cmd_resume(argparse.Namespace(**{**vars(args), "run_dir": args.config}))
    cfg = load_run_config(args.overrides, args.config)
    if cfg.backend == "slurm":
        from hessov.launch.slurm import submit_run

        return submit_run(cfg, wait=args.wait)
    from hessov.launch.local import run_local

    return _print(str(run_local(cfg).root))


def _cmd_plan(args: argparse.Namespace) -> int:
    from hessov.launch.graph import plan_resume, plan_run, prepare_run
    from hessov.launch.resources import sbatch_lines

    if _names_a_run(args.config):
        # A run directory: what it is missing, from its files (as `hessov run RUN`); the
        # sbatch scripts resume a run with it.
        run = open_run(args.config)
        cfg = override_run_config(saved_run_config(run), args.overrides, ("slurm", *ROW_BLOCK_KEYS))
        plan = plan_resume(run, cfg, row_overrides=args.overrides)
    else:
        cfg = load_run_config(args.overrides, args.config)
        plan = plan_run(cfg)
        if args.prepare:
            prepare_run(cfg, plan)
    if args.jobs:
        return _print(sbatch_lines(plan, cfg.slurm))
    return _print(json.dumps(plan.as_dict(), indent=2) if args.json else plan.as_lines())


def _cmd_status(args: argparse.Namespace) -> int:
    from hessov.launch.jobstore import describe_jobs
    from hessov.launch.status import describe_status, run_status

    run = open_run(args.run_dir)
    print(describe_status(run_status(run)))
    return _print(describe_jobs(run))  # None: never submitted to Slurm


def _cmd_resume(args: argparse.Namespace) -> int:
    run = open_run(args.run_dir)
    # The backend is this call's choice (default local), not the one the run started with.
    chosen, overrides = split_arguments(args.overrides, ("backend",))
    backend = chosen.get("backend", "local")
    if backend not in ("local", "slurm"):
        raise ConfigError(f"backend: must be local or slurm, got {backend!r}")
    cfg = override_run_config(saved_run_config(run), overrides, RESUME_KEYS)
    compute = [item for item in overrides if item.split("=")[0] in ("device", "threads")]
    rows = [item for item in overrides if item.split("=")[0] in ROW_BLOCK_KEYS]
    if backend == "slurm":
        from hessov.launch.slurm import submit_resume

        return submit_resume(run, cfg, compute, wait=args.wait, row_overrides=rows)
    from hessov.launch.local import resume_local

    return _print(str(resume_local(run, cfg, compute, row_overrides=rows).root))


def _cmd_summary(args: argparse.Namespace) -> int:
    from hessov import summary

    run = RunDir(Path(args.run_dir))
    if not run.root.is_dir():
        raise MissingInputError(f"{run.root} is not a directory")
    return _print(json.dumps(summary.load(run), indent=2, sort_keys=True))


def _cmd_nqm(args: argparse.Namespace) -> int:
    from hessov.stages.nqm import load_nqm_config, run_nqm

    cfg = load_nqm_config(args.overrides)
    result = run_nqm(cfg, Path(cfg.out_dir), progress=not args.json)
    if args.json:
        return _print(json.dumps(result, indent=2, sort_keys=True))
    return _print(str(Path(cfg.out_dir).resolve()))


def _cmd_import(args: argparse.Namespace) -> int:
    from hessov.recorder import import_checkpoints

    checkpoints, overrides = {}, []
    for item in args.items:
        if "=" in item:
            overrides.append(item)
            continue
        path, sep, step = item.rpartition("@")
        if not sep or not step.isdigit():
            raise ConfigError(f"checkpoint: expected PATH@STEP, got {item!r}")
        checkpoints[int(step)] = Path(path)
    if not checkpoints:
        raise ConfigError("checkpoint: pass at least one PATH@STEP")
    return _print(str(import_checkpoints(args.run_dir, args.problem, checkpoints, overrides).root))


def _config_command(commands, name: str, func, summary: str, description: str):
    """A subcommand that takes an optional config file and ``KEY=VALUE`` overrides."""
    sub = commands.add_parser(name, help=summary, description=description)
    sub.add_argument(
        "config", nargs="?", help="optional YAML config file (hessov run: or a run directory)"
    )
    sub.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    sub.set_defaults(func=func)
    return sub


def _run_dir_command(commands, name: str, func, summary: str, description: str, items=True):
    """A subcommand on a run directory, with ``KEY=VALUE`` arguments unless ``items`` is off."""
    sub = commands.add_parser(name, help=summary, description=description)
    sub.add_argument("run_dir", help="the run directory printed by `hessov train`")
    if items:
        sub.add_argument("overrides", nargs="*", help="KEY=VALUE arguments (see above)")
    sub.set_defaults(func=func)
    return sub


def _add_pipeline_commands(commands) -> None:
    """``train`` and every stage of :data:`hessov.jobs.STAGES`."""
    _config_command(
        commands,
        "train",
        _cmd_train,
        "stage 1: train a problem, record parameters (and gradients) and snapshots",
        "Train a problem and append the flattened parameters at RECORD_STEPS to "
        "RUN/params.h5, save SNAPSHOT_STEPS for replay, log to RUN/log.jsonl. Prints "
        "the run directory as the last line. An existing RUN_DIR is never overwritten: "
        "a finished run is refused, an unfinished one continues with resume=true.",
    )
    for name, entry in STAGES.items():
        func = _cmd_replay if name == "replay" else _cmd_stage
        # argparse formats help with %-interpolation.
        sub = _run_dir_command(
            commands, name, func, entry.summary, entry.description.replace("%", "%%")
        )
        if name == "replay":
            sub.add_argument(
                "--list",
                action="store_true",
                help="print the configured replay jobs (one per seed), one name a line, and exit",
            )


def _add_launch_commands(commands) -> None:
    """``run``, ``plan``, ``status`` and ``resume``: the stage graph as a whole."""
    run = _config_command(
        commands,
        "run",
        _cmd_run,
        "the whole pipeline: train, replays, layout, measurements, solve, analysis",
        "Build the stage graph from the config and run every job of it: train; the replays "
        "listed under replays: and their comparison; the layout; every measurement task of "
        "every recorded step and split, the basis (two-pass) and the solves; with "
        "EXHAUSTIVE=true the exact check; with estimates=[trace,diagonal,density] those "
        "estimates (array tasks of probes); with per_layer=true, curvature=both or which=both "
        "the variants (RUN/variants/NAME: every layer's block, the GGN, the most negative "
        "eigenpairs), each its own layout, sketch and report; the analysis, figures and "
        "report. backend=local runs "
        "the jobs one after another on this machine; backend=slurm submits them as Slurm jobs "
        "through submitit (resources: slurm.* keys), prints the job ids and returns. "
        "problem=NAME picks that problem's config; preset=tiny shrinks any problem to about a "
        "minute. Given a run directory instead of a config (one a hessov.Recorder or `hessov "
        "import` wrote, or an interrupted run), runs what that run is missing, as `hessov "
        "resume RUN` (backend=slurm submits it). Prints the run directory last.",
    )
    run.add_argument("--wait", action="store_true", help=WAIT_HELP)
    plan = _config_command(
        commands,
        "plan",
        _cmd_plan,
        "the job graph a run will need, before anything runs",
        "Resolve a config as `hessov run` would and print, before anything runs, the run "
        "directory it will use, D, the measurement rounds, the array tasks per round and "
        "every job of the stage graph with what it waits for: what `hessov run` and "
        "slurm/submit_chain.sh submit. Given a run directory instead of a config, the jobs "
        "that run is missing (as `hessov resume RUN` would run them).",
    )
    plan.add_argument("--json", action="store_true", help="print JSON, with every job")
    plan.add_argument(
        "--jobs",
        action="store_true",
        help="one tab-separated line per job for shell scripts: name, stage, jobs it waits "
        "for, array tasks, sbatch options, then the hessov arguments (see slurm/submit_chain.sh)",
    )
    plan.add_argument(
        "--prepare",
        action="store_true",
        help="also create the run directory and save its config, so that the jobs can be "
        "submitted (refuses a finished run)",
    )
    _run_dir_command(
        commands,
        "status",
        _cmd_status,
        "what is done and what is missing in a run, read from its files",
        "Per recorded step and split: measured and missing indices (and the array tasks they "
        "belong to) of every round, and whether it is solved. For a run submitted with "
        "backend=slurm, also its latest jobs' ids and Slurm states.",
        items=False,
    )
    resume = _run_dir_command(
        commands,
        "resume",
        _cmd_resume,
        "finish only what is missing in a run, reusing everything measured",
        "Resume an interrupted run: unfinished training continues from its last snapshot, "
        "measured blocks are kept, and only the jobs of the stage graph that the run's files "
        "say are missing run. backend=local (default) computes them here; backend=slurm "
        "submits only those jobs. Also device= threads= slurm.*=.",
    )
    resume.add_argument("--wait", action="store_true", help=WAIT_HELP)


def _add_other_commands(commands) -> None:
    """``import``, ``summary`` and ``nqm``."""
    imported = commands.add_parser(
        "import",
        help="make a run from state_dict checkpoints saved by any training code",
        description="Record the checkpoints CHECKPOINT@STEP (torch state dicts, read with "
        "weights_only=True; a dict under 'model' or 'state_dict' is found too) into the new "
        "run directory RUN, as the parameters of those steps, with --problem the factory that "
        "rebuilds the model and the data (README, 'Your own model'). Then `hessov run RUN` "
        "measures, solves and analyses them. KEY=VALUE settings of the run may follow (e.g. "
        "NUM_HESSIAN_DATAPOINTS=500 k=100). Prints the run directory.",
    )
    imported.add_argument("run_dir", help="the run directory to create")
    imported.add_argument("items", nargs="+", help="CHECKPOINT@STEP ... and KEY=VALUE ...")
    imported.add_argument(
        "--problem", required=True, help="path/to/file.py:FACTORY or module:FACTORY"
    )
    imported.set_defaults(func=_cmd_import)
    _run_dir_command(
        commands,
        "summary",
        _cmd_summary,
        "print one JSON object with what every finished stage of a run recorded",
        "Print the merged summaries of RUN_DIR: one key per finished stage.",
        items=False,
    )
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


def build_parser() -> argparse.ArgumentParser:
    """The ``hessov`` parser, with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="hessov",
        description=(
            "Sketched Hessian eigenspaces of neural networks: train a problem and record its "
            "parameters, measure the loss Hessian with random sketches (in parallel, on "
            "Slurm or locally), solve for the top-k eigenpairs with error bounds, and "
            "analyse them. Every stage reads and writes one run directory."
        ),
        epilog="Problems: "
        + ", ".join(problem_names())
        + "; or your own: problem=path/to/file.py:FACTORY or problem=module:FACTORY (README, "
        "'Your own model').",
    )
    parser.add_argument("--log-level", default="INFO", help="terminal log level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_pipeline_commands(commands)
    _add_launch_commands(commands)
    _add_other_commands(commands)
    for sub in commands.choices.values():  # also after the command, in any position
        sub.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """Parse ``hessov [--log-level L] COMMAND ...`` with the command's flags and positional
    arguments in any order (argparse's intermixed parsing, which cannot see through
    subparsers, so the command is found first).
    """
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 (argparse API)
    index, head = 0, argparse.Namespace(log_level="INFO")
    while index < len(argv) and argv[index] not in commands:
        if argv[index] == "--log-level" and index + 1 < len(argv):
            head.log_level, index = argv[index + 1], index + 2
        elif argv[index].startswith("--log-level="):
            head.log_level, index = argv[index].partition("=")[2], index + 1
        else:
            return parser.parse_args(argv)  # --help, or an error naming the problem
    if index == len(argv):
        return parser.parse_args(argv)
    args = commands[argv[index]].parse_intermixed_args(argv[index + 1 :], namespace=head)
    args.command = argv[index]
    config = getattr(args, "config", None)
    if config is not None and not is_config_file(config):  # the first is an override
        args.overrides, args.config = [config, *args.overrides], None
    return args


def main(argv: list[str] | None = None) -> int:
    """Run ``hessov ARGV``; returns the exit status (2: an error the user can fix)."""
    args = parse_arguments(sys.argv[1:] if argv is None else list(argv))
    setup_terminal_logging(args.log_level)
    try:
        return args.func(args)
    except HessovError as err:
        print(f"hessov {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
