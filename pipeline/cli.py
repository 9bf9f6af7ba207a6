"""The ``hessov`` command: one thin subcommand per pipeline stage.

Parsing only: each subcommand turns ``KEY=VALUE`` arguments into a validated config and
calls its stage function. Errors a user can fix (bad config, missing data, a run that
would be overwritten) are printed as one clear line and exit with status 2 before any
work starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import load_run_config, problem_names
from pipeline.errors import HessovError, MissingInputError
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
