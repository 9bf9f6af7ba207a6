"""What a run's replays recorded, read back: settings, logged curves, the baseline's history.

A replay (README.md, "Spectral-filter replays") leaves ``RUN/replays/NAME/replay.yaml``
(its settings), ``log.jsonl`` (``start``, ``step``, ``eval``, ``eigen`` and ``finished``
events) and ``summary.json``; the train stage's ``RUN/log.jsonl`` holds the baseline's
losses before the snapshot. The replay stage reads the settings to tell a finished replay
from a new one, and ``hessov compare`` reads everything as arrays
(:class:`~hessov.analysis.replay_figures.ReplayCurves`) to draw and rank the replays.
"""

from __future__ import annotations

import json

import numpy as np
from omegaconf import OmegaConf

from hessov.analysis.replay_figures import ReplayCurves
from hessov.config import ReplayConfig
from hessov.fileio import merge_config
from hessov.rundir import RunDir
from hessov.runlog import read_events


def saved_replay_settings(run: RunDir, name: str) -> ReplayConfig:
    """Replay ``name``'s saved settings.

    Keys added to :class:`~hessov.config.ReplayConfig` since it was written (``seeds``,
    ...) take their defaults, so older replays still match.

    Args:
        run: the run directory.
        name: the replay's directory name under ``RUN/replays/``.

    Returns:
        The settings of ``RUN/replays/NAME/replay.yaml``.
    """
    path = run.replay_config(name)
    return merge_config(ReplayConfig, OmegaConf.load(path), source=str(path))


def load_replay_curves(run: RunDir, name: str) -> ReplayCurves:
    """What replay ``name`` logged, as arrays (see :class:`ReplayCurves`).

    Args:
        run: the run directory.
        name: the replay's directory name under ``RUN/replays/``.

    Returns:
        Its settings, train-loss curve ``(S,)``, eigenvalues ``(E, k)`` and recorded summary
        (empty if it did not finish).
    """
    settings = saved_replay_settings(run, name)
    events = read_events(run.require(run.replay_log(name), f"replay {run.root} name={name}"))
    start = next(e for e in events if e["event"] == "start")
    steps = [e for e in events if e["event"] == "step"]
    eigen = [e for e in events if e["event"] == "eigen"]
    summary_path = run.replay_summary(name)
    recorded = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return ReplayCurves(
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
    """The train stage's batch losses before a snapshot.

    Args:
        run: the run directory.
        before: the snapshot's global step.

    Returns:
        Global steps ``(H,)`` and losses ``(H,)`` of the train stage's batches before step
        ``before`` (a resumed run's repeated steps count once, the latest).
    """
    losses = {
        e["step"]: e["loss"]
        for e in read_events(run.require(run.log, "train"), "batch")
        if e["stage"] == "train" and e["step"] < before
    }
    steps = np.array(sorted(losses), dtype=np.int64)
    return steps, np.array([losses[s] for s in steps], dtype=np.float64)
