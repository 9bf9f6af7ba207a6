r"""``RUN/replays/report.md``: the spectral-filter replays of a run, as Markdown.

Written by ``hessov compare`` (README.md, "Spectral-filter replays") from the findings of
:func:`hessov.analysis.replay_findings.snapshot_findings`, one section per snapshot: the
baseline's sharpness against ``2 / eta`` (the edge of stability of Cohen et al. 2021,
"Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability"), a table
per group of seeds (median and min-max), the orders that hold across seeds
(:data:`~hessov.analysis.replay_groups.RANKING_RULE`), whether flat_scaling_v1 resumed progressive
sharpening, how many directions ``dynamic`` froze, a table of every replay, and the figures
of :mod:`hessov.analysis.replay_figures`. Every function returns lines, joined by ``\n``.
"""

from __future__ import annotations

import numpy as np

from hessov.analysis.replay_figures import ReplayCurves
from hessov.analysis.replay_findings import seed_groups


def report_header(run_name: str, cfg, unfinished: list[str]) -> list[str]:
    """Title and the run's setting.

    Args:
        run_name: the run directory's name.
        cfg: the run's :class:`~hessov.config.RunConfig`.
        unfinished: replays with settings but no summary, named as not drawn.

    Returns:
        The report's first lines.
    """
    lines = [
        f"# Spectral-filter replays of {run_name}",
        "",
        f"Problem {cfg.problem} ({cfg.loss or 'default'} loss, data {cfg.data or 'default'}), "
        f"optimizer {cfg.optimizer.name} lr {cfg.optimizer.lr:g}, batch size "
        f"{cfg.BATCH_SIZE or 'full (GD)'}; Hessians on the {cfg.NUM_HESSIAN_DATAPOINTS}-example "
        "train Hessian subset. Modes and formulas: README.md, 'Spectral-filter replays'.",
        "",
    ]
    if unfinished:
        lines += [f"Unfinished replays, not drawn: {', '.join(unfinished)}.", ""]
    return lines


def report_section(
    snapshot: int, curves: list[ReplayCurves], findings: dict, figures: dict
) -> list[str]:
    """The section of one snapshot.

    Args:
        snapshot: the snapshot's global step.
        curves: every finished replay of that snapshot.
        findings: their :func:`~hessov.analysis.replay_findings.snapshot_findings`.
        figures: label -> path of each figure, relative to the report.

    Returns:
        The section's lines, ending with an empty one.
    """
    members = seed_groups(curves)
    lines = [f"## Snapshot at step {snapshot}", ""]
    lines += _baseline_lines(findings) + _reading_lines(findings)
    lines += _group_table(findings, members)
    lines += _ranking_lines(findings) + _v1_lines(findings) + _dynamic_lines(members)
    lines += ["Every replay:", ""] + _replay_table(curves)
    lines += ["Figures:", ""] + [f"- {label}: `{path}`" for label, path in figures.items()]
    return lines + [""]


def _fmt(value, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


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


def _baseline_lines(findings: dict) -> list[str]:
    """The baseline's sharpness at the snapshot against ``2 / eta``, if it has eigenvalues."""
    baseline = findings.get("baseline")
    if not baseline:
        return []
    return [
        f"Baseline `{baseline['name']}`: sharpness at the snapshot "
        f"lambda_1 = {baseline['sharpness_at_snapshot']:.4g}, 2/eta = {baseline['mss']:.4g} "
        f"(ratio {baseline['sharpness_over_mss']:.3f}); over its replays lambda_1 stays in "
        f"[{baseline['sharpness_range'][0]:.4g}, {baseline['sharpness_range'][1]:.4g}].",
        "",
    ]


def _reading_lines(findings: dict) -> list[str]:
    """How to read the section: the target, what a group is, the ranking rule."""
    return [
        f"Loss target: {findings['target_train_loss']}. Steps count from the snapshot. A group "
        "is one replay setting over its seeds (seed 0: the snapshot itself; seed S > 0: its "
        "parameters perturbed, p <- p (1 + perturbation z)), reported as median (min-max). "
        f"Ranking rule: {findings['ranking_rule']}.",
        "",
    ]


def _group_table(findings: dict, members: dict[str, list[ReplayCurves]]) -> list[str]:
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
    """The first group to the target, or why there is none."""
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


def _ahead_lines(findings: dict) -> list[str]:
    """Per group that is ahead of any other across seeds, the groups it is ahead of."""
    groups, ahead_of = findings["groups"], findings["ahead_of"]
    ranked = [o["name"] for o in findings["order_to_target"] if ahead_of.get(o["name"])]
    return [
        f"- `{name}` {_steps_text(groups[name])} is ahead of "
        + ", ".join(f"`{other}`" for other in ahead_of[name])
        for name in ranked
    ] or ["- no group is ahead of another in every seed"]


def _global_scaling_lines(findings: dict) -> list[str]:
    """Each global-scaling group against the baseline, if both are there."""
    groups, baseline = findings["groups"], findings.get("baseline")
    if not (baseline and findings["global_scaling_vs_baseline"]):
        return []
    return [
        "",
        f"Global scaling against the baseline `{baseline['name']}` "
        f"{_steps_text(groups[baseline['name']])}: "
        + "; ".join(
            f"`{name}` {_steps_text(groups[name])} {verdict}"
            for name, verdict in findings["global_scaling_vs_baseline"].items()
        )
        + ".",
    ]


def _best_lines(findings: dict) -> list[str]:
    """The fastest group of each mode by median, and the lowest median final loss."""
    groups = findings["groups"]
    best_per_mode: dict[str, str] = {}
    for item in findings["order_to_target"]:
        best_per_mode.setdefault(groups[item["name"]]["mode"], item["name"])
    lines = []
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
    return lines


def _ranking_lines(findings: dict) -> list[str]:
    """First to the target, the orders that hold across seeds, global scaling against the
    baseline, and the fastest per mode by median.
    """
    lines = _first_lines(findings) + ["", "Ahead across seeds (the rule above):", ""]
    lines += _ahead_lines(findings) + _global_scaling_lines(findings) + _best_lines(findings)
    return lines + [""]


def _v1_group_text(name: str, item: dict) -> str:
    """One flat_scaling_v1 group's sharpening over its seeds, as a list item."""

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
    """flat_scaling_v1 and progressive sharpening, per group and across groups."""
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


def _dynamic_lines(members: dict[str, list[ReplayCurves]]) -> list[str]:
    """How many directions each ``dynamic`` group froze at most, per seed."""
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


def _replay_table(curves: list[ReplayCurves]) -> list[str]:
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
