"""Replays grouped over seeds: the spread of each group and a ranking that holds across seeds.

Full-batch GD at the edge of stability amplifies last-bit floating-point differences, so one
trajectory per replay setting is not a reproducible result: the same replays on another
CPU's kernels reached the loss target in a different order. A group is the seeds of one
replay (``ReplayConfig.seeds``: the snapshot itself and slightly perturbed copies of it);
:func:`group_statistics` gives its steps to the target and final train loss per seed, with
median, min and max, and :func:`ahead` orders two groups only where every seed agrees
(:data:`RANKING_RULE`). Everything works on the recorded summaries alone (plain dicts).
"""

from __future__ import annotations

import numpy as np

#: When group A counts as ahead of group B (reaching the loss target sooner). Seeds are not
#: paired: seed s starts every group from the same point, but the edge of stability
#: decorrelates the trajectories within a few steps; and groups may have different seeds.
#: With one seed per group it is the plain order of the steps.
RANKING_RULE = (
    "group A is ahead of group B only if A's slowest seed reaches the loss target in fewer "
    "steps than B's fastest seed (a seed that never reaches it counts as infinitely slow)"
)


def _steps(steps_to_target: list[int | None]) -> np.ndarray:
    """Steps per seed as floats, ``inf`` for a seed that never reached the target."""
    return np.array([np.inf if s is None else s for s in steps_to_target], dtype=np.float64)


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def spread(values: list[float]) -> dict:
    """``median``, ``min`` and ``max`` of ``values``."""
    array = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(array)), "min": float(array.min()), "max": float(array.max())}


def group_statistics(summaries: list[dict]) -> dict:
    """Steps to the loss target and final train loss of one group's seeds (their recorded
    ``replay`` summaries): the per-seed lists, in the order given, and their spread.

    ``steps_to_target_median`` counts a seed that never reached the target as infinitely
    slow (None when the median did not reach it); ``steps_to_target_min``/``_max`` are over
    the ``seeds_reaching_target`` seeds that did (None if none did). A final loss that is not
    finite (diverged) counts as ``inf``.
    """
    steps_to_target = [s.get("steps_to_target") for s in summaries]
    steps = _steps(steps_to_target)
    reached = steps[np.isfinite(steps)]
    loss = np.array([s.get("final_train_loss", np.nan) for s in summaries], dtype=np.float64)
    loss[~np.isfinite(loss)] = np.inf
    return {
        "steps_to_target": steps_to_target,
        "steps_to_target_median": _finite_or_none(np.median(steps)),
        "steps_to_target_min": int(reached.min()) if reached.size else None,
        "steps_to_target_max": int(reached.max()) if reached.size else None,
        "seeds_reaching_target": int(reached.size),
        "final_train_loss": loss.tolist(),
        **{f"final_train_loss_{key}": value for key, value in spread(loss).items()},
    }


def ahead(a: dict, b: dict) -> bool:
    """Whether group ``a`` is ahead of group ``b`` (:data:`RANKING_RULE`); both are
    :func:`group_statistics`.
    """
    return bool(_steps(a["steps_to_target"]).max() < _steps(b["steps_to_target"]).min())


def ranking(groups: dict[str, dict]) -> dict[str, list[str]]:
    """For every group (name -> :func:`group_statistics`), the groups it is ahead of."""
    return {
        name: [other for other in groups if other != name and ahead(stats, groups[other])]
        for name, stats in groups.items()
    }


def first_to_target(groups: dict[str, dict]) -> str | None:
    """The group ahead of every other one, whose seeds all reached the target; None where
    no group is (the first place is not resolved across seeds).
    """
    for name, stats in groups.items():
        others = [groups[other] for other in groups if other != name]
        if stats["seeds_reaching_target"] == len(stats["steps_to_target"]) and all(
            ahead(stats, other) for other in others
        ):
            return name
    return None


def verdict(a: dict, b: dict) -> str:
    """``ahead``, ``behind`` or ``not resolved across seeds``: group ``a`` against ``b``."""
    if ahead(a, b):
        return "ahead"
    if ahead(b, a):
        return "behind"
    return "not resolved across seeds"
