"""Figures of the noisy-quadratic-model study (``hessov.analysis.nqm``), one function per figure.

Why: the batch-size questions of Zhang et al. are answered by the shape of a few curves:
steps to a target loss against batch size (perfect scaling is a line of slope -1 on log-log
axes, saturation a flat tail), the optimal learning rate and momentum against batch size, and
the optimal learning-rate schedules. Each function takes plain numbers (batch sizes, steps,
rates), writes one PNG and returns its path, so the figures can be redrawn from ``nqm.json``.

Reference: G. Zhang et al., "Which Algorithmic Choices Matter at Which Batch Sizes? Insights
From a Noisy Quadratic Model", NeurIPS 2019, figures 3-7.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BATCH_LABEL = "batch size B (examples per step)"
Curve = tuple[Sequence[int], Sequence[float | None]]


def _finite(xs: Sequence[int], ys: Sequence[float | None]) -> tuple[list[int], list[float]]:
    """Drop unreachable points (``None`` or infinite), which log axes cannot show."""
    kept = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)]
    return [x for x, _ in kept], [y for _, y in kept]


def _steps_panel(ax, curves: Mapping[str, Curve], critical: Mapping[str, int | None]):
    """Steps against batch size, a perfect-scaling guide, and each curve's critical B."""
    for label, (batch_sizes, steps) in curves.items():
        xs, ys = _finite(batch_sizes, steps)
        if not xs:
            continue
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=label)
        b_crit = critical.get(label)
        if b_crit in xs:
            ax.plot(b_crit, ys[xs.index(b_crit)], marker="*", markersize=14, color=line.get_color())
    finite = [_finite(*curve) for curve in curves.values()]
    finite = [(xs, ys) for xs, ys in finite if xs]
    if finite:
        xs, ys = finite[0]
        # The guide stops at the lowest curve, so it does not stretch the axis.
        floor = min(min(ys) for _, ys in finite)
        guide = [(x, ys[0] * xs[0] / x) for x in xs if ys[0] * xs[0] / x >= floor]
        ax.plot(*zip(*guide, strict=True), "k:", linewidth=1, label="perfect scaling (∝ 1/B)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(BATCH_LABEL)
    ax.grid(True, which="major", alpha=0.3)
    ax.plot([], [], "k*", markersize=10, linestyle="none", label="critical batch size")
    ax.legend(fontsize=8)


def plot_steps_vs_batch_size(
    curves: Mapping[str, Curve],
    critical: Mapping[str, int | None],
    target: float,
    K: int,
    path: Path,
) -> Path:
    """Fewest steps to the target loss against batch size, one curve per algorithm, with
    the critical batch size of each marked by a star.
    """
    fig, ax = plt.subplots(figsize=(7, 5))
    _steps_panel(ax, curves, critical)
    ax.set_ylabel(f"steps to reach E[L] ≤ {target:g} (optimizer steps)")
    ax.set_title(f"NQM, K = {K}: steps to target at the best learning rate (and momentum)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_steps_by_preconditioner_power(
    curves: Mapping[str, Curve],
    critical: Mapping[str, int | None],
    target: float,
    K: int,
    path: Path,
) -> Path:
    """Fewest steps to the target against batch size for each preconditioner power ``p``
    (``P = h^-p``; p = 0 is SGD, p = 0.5 Adam-like), no momentum.
    """
    fig, ax = plt.subplots(figsize=(7, 5))
    _steps_panel(ax, curves, critical)
    ax.set_ylabel(f"steps to reach E[L] ≤ {target:g} (optimizer steps)")
    ax.set_title(f"NQM, K = {K}: preconditioner h^(-p), best learning rate per batch size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_optimal_hyperparameters(
    learning_rates: Mapping[str, Curve],
    momenta: Mapping[str, Curve],
    K: int,
    path: Path,
) -> Path:
    """Optimal learning rate ``a``, effective learning rate ``a / (1 - b)`` and ``1 - b`` of
    the optimal momentum ``b``, against batch size. ``momenta`` holds the algorithms with
    momentum (the others have ``b = 0``).
    """
    fig, (ax_lr, ax_eff, ax_mom) = plt.subplots(1, 3, figsize=(16, 4.8))
    for label, (batch_sizes, lrs) in learning_rates.items():
        xs, ys = _finite(batch_sizes, lrs)
        if not xs:
            continue
        (line,) = ax_lr.plot(xs, ys, marker="o", markersize=3, label=label)
        gaps = dict(zip(*_finite(*momenta[label]), strict=True)) if label in momenta else {}
        effective = [lr / (1.0 - gaps.get(x, 0.0)) for x, lr in zip(xs, ys, strict=True)]
        ax_eff.plot(xs, effective, marker="o", markersize=3, color=line.get_color(), label=label)
        if gaps:
            ax_mom.plot(
                list(gaps),
                [1.0 - b for b in gaps.values()],
                marker="o",
                markersize=3,
                color=line.get_color(),
                label=label,
            )
    for ax in (ax_lr, ax_eff):
        lines = [line for line in ax.get_lines() if len(line.get_xdata())]
        if lines:
            # The guide stops at the highest curve, so it does not stretch the axis.
            ceiling = max(max(line.get_ydata()) for line in lines)
            xs, ys = lines[0].get_xdata(), lines[0].get_ydata()
            guide = [(x, ys[0] * x / xs[0]) for x in xs if ys[0] * x / xs[0] <= ceiling]
            ax.plot(*zip(*guide, strict=True), "k:", linewidth=1, label="∝ B")
    ax_lr.set_ylabel("optimal learning rate a (dimensionless step size)")
    ax_eff.set_ylabel("effective learning rate a / (1 - b)")
    ax_mom.set_ylabel("1 - b at the optimal momentum b")
    ax_lr.set_title("learning rate")
    ax_eff.set_title("effective learning rate")
    ax_mom.set_title("momentum (algorithms with momentum)")
    for ax in (ax_lr, ax_eff, ax_mom):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(BATCH_LABEL)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"NQM, K = {K}: hyperparameters that reach the target in the fewest steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_schedules(schedules: Mapping[str, Mapping[int, Mapping]], K: int, path: Path) -> Path:
    """Optimal piecewise-constant schedules, one panel per algorithm, one line per batch
    size, against the fraction of the run; the legend gives each schedule's steps and the
    constant-rate steps it improves on.

    ``schedules[algorithm][B]`` has ``lrs``, ``piece_steps``, ``steps`` and
    ``constant_lr_steps`` (``analysis.nqm.fewest_steps_with_schedule``).
    """
    panels = [name for name, by_batch in schedules.items() if by_batch]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(7 * max(len(panels), 1), 5))
    axes = [axes] if len(panels) <= 1 else list(axes)
    for ax, name in zip(axes, panels, strict=False):
        for batch_size, found in sorted(schedules[name].items()):
            total = sum(found["piece_steps"])
            edges = [0.0]
            for n in found["piece_steps"]:
                edges.append(edges[-1] + n / total)
            lrs = list(found["lrs"])
            ax.step(
                edges,
                lrs + lrs[-1:],
                where="post",
                label=f"B = {batch_size}: {found['steps']:,} steps "
                f"(constant rate: {found['constant_lr_steps']:,})",
            )
        ax.set_yscale("log")
        ax.set_xlabel("fraction of the run (steps / total steps)")
        ax.set_ylabel("learning rate a (dimensionless step size)")
        ax.set_title(f"{name}: optimal schedule with the fewest steps to target")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if not panels:
        axes[0].text(0.5, 0.5, "no schedules computed", ha="center", va="center")
        axes[0].set_axis_off()
    fig.suptitle(f"NQM, K = {K}: piecewise-constant learning-rate schedules")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
