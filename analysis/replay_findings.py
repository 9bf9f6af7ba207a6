"""The numbers behind the replay report: per group of seeds, ranking, baseline, sharpening.

``hessov compare`` (README.md, "Spectral-filter replays") reads every finished replay of a
run as :class:`~hessov.analysis.replay_figures.ReplayCurves` and, per snapshot, takes the seeds of
one replay setting together (:func:`seed_groups`). :func:`snapshot_findings` gathers what
the report states and the ``replay_compare`` summary records: each group's spread over its
seeds (:func:`hessov.analysis.replay_groups.group_statistics`), the order to the loss target that
holds across seeds (:data:`~hessov.analysis.replay_groups.RANKING_RULE`), the baseline's sharpness
against the maximal stable sharpness ``2 / eta``, global scaling against the baseline, and
whether flat_scaling_v1 sent its frozen top-N eigenvalues up (:func:`sharpening_under_v1`).

Progressive sharpening and the edge of stability, the behaviour these findings look for,
are from Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the
Edge of Stability": under GD at rate ``eta`` the top Hessian eigenvalue rises until it
reaches ``2 / eta`` and then hovers there.
"""

from __future__ import annotations

import numpy as np

from hessov.analysis import replay_groups
from hessov.analysis.replay_figures import ReplayCurves
from hessov.optim.spectral_filter import max_stable_sharpness


def seed_groups(curves: list[ReplayCurves]) -> dict[str, list[ReplayCurves]]:
    """The replays of each group (one setting over its seeds).

    Args:
        curves: replays of one run, in any order.

    Returns:
        Group name -> its replays, seeds ascending (an unseeded replay first), the groups in
        the order of their first replay in ``curves``.
    """
    groups: dict[str, list] = {}
    for curve in curves:
        groups.setdefault(curve.group, []).append(curve)
    return {
        name: sorted(members, key=lambda c: -1 if c.seed is None else c.seed)
        for name, members in groups.items()
    }


def sharpening_under_v1(curve: ReplayCurves) -> dict | None:
    """Did flat_scaling_v1 send its frozen top-N eigenvalues up (progressive sharpening
    resumed), and when did eigenvalue N+1 (the largest unfrozen one) reach ``2 / (alpha eta)``,
    where the unfrozen directions stop being stable at the rate ``alpha eta``, and ``2 / eta``?

    Args:
        curve: one flat_scaling_v1 replay; ``eigenvalues`` ``(E, k)``.

    Returns:
        From the first and last eigenvalue recomputation: ``lambda_1``, ``lambda_N``, the
        ratio of the top-N means, whether it went up, the two thresholds and, with ``k > N``,
        ``lambda_N+1`` and the first step it reached each threshold. None without two
        recomputations of at least N eigenvalues.
    """
    values, n = curve.eigenvalues, curve.nfilter
    if values.shape[0] < 2 or values.shape[1] < n:  # noqa: PLR2004 (first and last)
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


def group_findings(members: list[ReplayCurves]) -> dict:
    """One group's settings, replays, seeds and statistics.

    The statistics are :func:`~hessov.analysis.replay_groups.group_statistics`.
    """
    first = members[0]
    return {
        "mode": first.mode,
        "scaling": first.scaling,
        "nfilter": first.nfilter,
        "replays": [c.name for c in members],
        "seeds": [c.seed for c in members],
        **replay_groups.group_statistics([c.summary for c in members]),
    }


def _baseline_findings(members: list[ReplayCurves]) -> dict | None:
    """Sharpness of the baseline group at the snapshot (median over its seeds) and its range
    over every seed's replay; None without eigenvalues.
    """
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
    went up and eigenvalue N+1 reached each line, and the spread of the eigenvalues.
    """
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
    groups with a loss target.
    """
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


def _v1_findings(curves: list[ReplayCurves], members: dict[str, list]) -> dict:
    """``flat_scaling_v1``: :func:`sharpening_under_v1` per replay; ``flat_scaling_v1_groups``:
    the same over the seeds of each group that has it.
    """
    v1 = {c.name: sharpening_under_v1(c) for c in curves if c.mode == "flat_scaling_v1"}
    across_seeds = {}
    for name, group in members.items():
        items = [v1[c.name] for c in group if v1.get(c.name)]
        if items:
            across_seeds[name] = _v1_across_seeds(items)
    return {"flat_scaling_v1": v1, "flat_scaling_v1_groups": across_seeds}


def snapshot_findings(curves: list[ReplayCurves]) -> dict:
    """Numbers behind the report for the replays of one snapshot, per group of seeds; an
    order holds only across seeds (:data:`~hessov.analysis.replay_groups.RANKING_RULE`).

    Args:
        curves: every finished replay of one snapshot.

    Returns:
        ``replays``, ``groups`` (:func:`group_findings` per group), ``ranking_rule``,
        ``target_train_loss``, the ranking (``order_to_target``, ``first_to_target``,
        ``first_by_median``, ``ahead_of``, ``best_final_loss``), with a ``none`` group
        ``baseline`` and ``global_scaling_vs_baseline``, and ``flat_scaling_v1`` (per replay)
        and ``flat_scaling_v1_groups`` (per group).
    """
    members = seed_groups(curves)
    groups = {name: group_findings(group) for name, group in members.items()}
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
    findings.update(_v1_findings(curves, members))
    return findings
