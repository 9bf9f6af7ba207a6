"""The local sequential emulation of the Slurm chain: every stage, in order, in-process.

The same stage functions a Slurm job runs, called one after the other on this machine,
with the same files and therefore the same numbers: train; the configured replay jobs, one
after another, and their comparison (Slurm runs the replays in parallel); layout; for every
step and split each measurement array task of the first round, (two-pass) the basis solve
and each task of the second round, the solve; the exhaustive check when ``EXHAUSTIVE=true``; the
analysis of each step as soon as it is solved, and the figures and report at the end.
Every stage skips what its files say is done (a finished training, measured blocks, a
solved step), so running it again on a run directory finishes only what is missing:
that is ``hessov resume`` for the local backend.
"""

from __future__ import annotations

import time

from pipeline.config import RunConfig, replay_jobs
from pipeline.rundir import RunDir
from pipeline.runlog import get_logger
from pipeline.sketchspec import load_spec
from pipeline.stages.analyze import analyze
from pipeline.stages.exhaustive import exhaustive
from pipeline.stages.layout import complete_layout, layout
from pipeline.stages.measure import measure
from pipeline.stages.replay import compare, run_replay
from pipeline.stages.solve import solve
from pipeline.stages.train import train


def run_local(cfg: RunConfig, run: RunDir | None = None, finish_on_disk: bool = False) -> RunDir:
    """Run (or finish) the whole pipeline of ``cfg`` on this machine; returns the run.

    ``finish_on_disk``: the sketch is the one ``run``'s layout holds, whatever ``cfg`` says
    (``hessov resume``); otherwise a layout that differs from ``cfg``'s is refused.
    """
    log = get_logger()
    started = time.perf_counter()
    if run is None or not run.summary("train").is_file():
        log.info("[train] %s", cfg.problem)
        run = train(cfg)
    cfg.RUN_DIR = str(run.root)
    jobs = replay_jobs(cfg.replays)
    for number, job in enumerate(jobs, start=1):
        log.info("[replay %d/%d] %s", number, len(jobs), job.name)
        run_replay(run, cfg, job)  # a finished replay returns at once
    if cfg.replays:
        log.info("[compare] replays: %s", compare(run))
    log.info("[layout] %s", run.root)
    # A resumed run finishes the sketch its files hold, which may differ from the config's
    # defaults (a layout made by hand with other k, s, block_size or recovery).
    if finish_on_disk and run.sketch_spec.is_file():
        spec = complete_layout(run, load_spec(run))
    else:
        spec = layout(run, cfg)
    cfg.dtype = spec.layout.dtype
    items = [(step, split) for step in spec.steps for split in spec.splits]
    for number, (step, split) in enumerate(items, start=1):
        prefix = f"[sketch {number}/{len(items)}] step {step} {split}"
        if run.eigen(step, split).is_file():
            log.info("%s: already solved", prefix)
        else:
            for round_name in spec.rounds:
                if round_name == "second" and not run.two_pass_basis(step, split).is_file():
                    log.info("%s: basis of the first round", prefix)
                    solve(run, cfg, spec, step, split)
                for task in range(spec.num_tasks):
                    log.info(
                        "%s: measure %s round, task %d/%d",
                        prefix,
                        round_name,
                        task + 1,
                        spec.num_tasks,
                    )
                    measure(
                        run,
                        cfg,
                        spec,
                        step,
                        split,
                        spec.task_indices(task),
                        f"task{task}",
                        round_name,
                    )
            if spec.recovery == "two_pass" and not run.two_pass_basis(step, split).is_file():
                solve(run, cfg, spec, step, split)
            log.info("%s: solve", prefix)
            solve(run, cfg, spec, step, split)
        if cfg.EXHAUSTIVE and not run.exhaustive(step, split).is_file():
            log.info("%s: exhaustive check", prefix)
            exhaustive(run, cfg, spec, step, split)
        log.info("%s: analyze", prefix)
        analyze(run, [(step, split)], report=False)
    log.info("[analyze] figures and report")
    analyze(run)
    log.info("pipeline finished in %.1f s: %s", time.perf_counter() - started, run.root)
    return run


def resume_local(run: RunDir, cfg: RunConfig) -> RunDir:
    """Finish whatever ``run`` is missing, reusing everything already measured: the sketch
    of the layout on disk."""
    cfg.RUN_DIR, cfg.resume = str(run.root), True
    return run_local(cfg, run, finish_on_disk=True)
