"""Figures of the spectral-filter replays (README.md, "Spectral-filter replays").

Three kinds: the train-loss curves of every replay of one snapshot on one axis (the
baseline's pre-snapshot history drawn before the switch step, which is marked; the seeds of
one replay as thin lines of one colour), the same zoomed on the first steps after the
switch (where global scaling spikes and the flat modes do not), and per replay a sharpness
flow over its seeds: the loss above, the top Hessian eigenvalues below with the maximal
stable sharpness ``2 / eta`` and, for a scaled mode, ``2 / (alpha eta)`` (the edge of
stability of Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at
the Edge of Stability"). Every function draws from arrays only (:class:`ReplayCurves`,
read from a run by :mod:`hessov.replay_logs`), so notebooks can call them on anything
read from a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

#: Colour map per mode: replays of one mode share a hue, lighter for smaller alpha and N.
MODE_COLORMAPS = {
    "global_scaling": "Reds",
    "flat_scaling_v1": "Greens",
    "flat_scaling_v2": "Oranges",
    "dynamic": "Purples",
}


@dataclass
class ReplayCurves:
    """What one replay logged, in replay steps ``s`` (global step ``snapshot + s``).

    Attributes:
        group: the replay whose seed this is (its own name without seeds); the seeds of one group
            are drawn in one colour.
        seed: the seed of its starting point (None: the snapshot, unseeded).
        steps: ``(S,)`` steps of ``train_loss``.
        train_loss: ``(S,)`` loss at the parameters after ``s`` updates.
        eigen_steps: ``(E,)`` steps of the eigenvalue recomputations.
        eigenvalues: ``(E, k)``, each row by ``|lambda|`` descending (``k = 0``: none).
        lr: the base learning rate ``eta``.
        summary: the replay's recorded summary.
    """

    name: str
    group: str
    seed: int | None
    mode: str
    scaling: float
    nfilter: int
    snapshot: int
    lr: float
    steps: np.ndarray
    train_loss: np.ndarray
    eigen_steps: np.ndarray
    eigenvalues: np.ndarray
    summary: dict = field(default_factory=dict)


def _colors(curves: list[ReplayCurves]) -> dict[str, object]:
    """Per group: black for the baseline (mode none); one hue per mode, shaded by (alpha, N)."""
    colors: dict[str, object] = {}
    for mode, cmap_name in MODE_COLORMAPS.items():
        groups = sorted({(c.scaling, c.nfilter, c.group) for c in curves if c.mode == mode})
        cmap = plt.get_cmap(cmap_name)
        for rank, (_, _, group) in enumerate(groups):
            colors[group] = cmap(0.45 + 0.5 * (rank + 1) / len(groups))
    for curve in curves:
        colors.setdefault(curve.group, "black")
    return colors


def _label(curve: ReplayCurves, seeds: int = 1) -> str:
    """The group's name and settings, and its number of seeds if more than one."""
    label = curve.group
    if curve.mode == "none":
        label += " (baseline)"
    elif curve.mode == "global_scaling":
        label += f": alpha={curve.scaling:g}"
    else:
        label += f": alpha={curve.scaling:g}, N={curve.nfilter}"
    return label + (f", {seeds} seeds" if seeds > 1 else "")


def _group_sizes(curves: list[ReplayCurves]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for curve in curves:
        sizes[curve.group] = sizes.get(curve.group, 0) + 1
    return sizes


def _draw_history(axis, history_steps: np.ndarray, history_loss: np.ndarray) -> None:
    if len(history_steps):
        axis.plot(history_steps, history_loss, color="0.35", lw=1.0, label="before the snapshot")


def draw_loss_comparison(
    path: Path,
    curves: list[ReplayCurves],
    history_steps: np.ndarray,
    history_loss: np.ndarray,
    zoom: int | None = None,
) -> Path:
    """Train loss of every replay of one snapshot against the global step (the seeds of a
    group as thin lines of one colour), the switch step dashed; ``zoom``: only the first
    ``zoom`` steps after the switch (and a fifth as many before it), with the loss axis
    fitted to them. ``history_*``: ``(H,)`` global steps and
    losses of the baseline run before the snapshot.
    """
    snapshot = curves[0].snapshot
    colors = _colors(curves)
    figure, axis = plt.subplots(figsize=(10, 6))
    low, high = (snapshot - max(1, zoom // 5), snapshot + zoom) if zoom else (None, None)
    visible = []
    if zoom:
        keep = history_steps >= low
        _draw_history(axis, history_steps[keep], history_loss[keep])
        visible.append(history_loss[keep])
    else:
        _draw_history(axis, history_steps, history_loss)
    sizes, labelled = _group_sizes(curves), set()
    for curve in curves:
        steps, loss = curve.steps + snapshot, curve.train_loss
        if zoom:
            keep = steps <= high
            steps, loss = steps[keep], loss[keep]
            visible.append(loss)
        # Seeds of one group: thin lines of one colour, the group labelled once.
        lw = (2.0 if curve.mode == "none" else 1.2) / (1.6 if sizes[curve.group] > 1 else 1)
        label = None if curve.group in labelled else _label(curve, sizes[curve.group])
        labelled.add(curve.group)
        axis.plot(steps, loss, color=colors[curve.group], lw=lw, label=label)
    axis.axvline(snapshot, color="0.2", ls="--", lw=1.0, label=f"switch at step {snapshot}")
    axis.set_yscale("log")
    if zoom:
        axis.set_xlim(low, high)
        values = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in visible] or [np.ones(1)])
        if values.size:
            axis.set_ylim(values.min() * 0.9, values.max() * 1.1)
    axis.set_xlabel("step")
    axis.set_ylabel("train loss")
    title = "first steps after the switch" if zoom else "train loss of every replay"
    axis.set_title(f"{title} (snapshot {snapshot})")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def draw_sharpness_flow(
    path: Path, curves: list[ReplayCurves], history_steps: np.ndarray, history_loss: np.ndarray
) -> Path:
    """Loss above; below, each of the top eigenvalues against the global step, with the
    lines ``2 / eta`` (the maximal stable sharpness) and, if ``alpha != 1``,
    ``2 / (alpha eta)``; for filtering modes eigenvalue N+1 (the first unfrozen) is bold.
    ``curves``: the seeds of one group, drawn over each other (thinner lines for several).
    """
    curve = curves[0]
    snapshot, thin = curve.snapshot, 1.6 if len(curves) > 1 else 1.0
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    _draw_history(top, history_steps, history_loss)
    for index, seed_curve in enumerate(curves):
        top.plot(
            seed_curve.steps + snapshot,
            seed_curve.train_loss,
            color="tab:green",
            lw=1.5 / thin,
            label=None if index else _label(curve, len(curves)),
        )
        _draw_eigenvalues(bottom, seed_curve, thin, labelled=not index)
    top.set_yscale("log")
    top.set_ylabel("train loss")
    top.legend(fontsize=8)
    mss = 2.0 / curve.lr
    bottom.axhline(mss, color="tab:red", ls="--", label=f"2/eta = {mss:.3g}")
    if curve.scaling != 1:
        bottom.axhline(
            mss / curve.scaling,
            color="tab:blue",
            ls=":",
            label=f"2/(alpha eta) = {mss / curve.scaling:.3g}",
        )
    for axis in (top, bottom):
        axis.axvline(snapshot, color="0.2", ls="--", lw=1.0)
    bottom.set_xlabel("step")
    bottom.set_ylabel("top Hessian eigenvalues")
    bottom.legend(fontsize=8)
    top.set_title(f"sharpness flow of {curve.group}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _draw_eigenvalues(axis, curve: ReplayCurves, thin: float, labelled: bool) -> None:
    """Every recorded eigenvalue of one replay against the global step; N+1 bold black."""
    if not curve.eigenvalues.size:
        return
    steps = curve.eigen_steps + curve.snapshot
    count = curve.eigenvalues.shape[1]
    cmap = plt.get_cmap("viridis")
    for index in range(count):
        first_free = curve.mode != "none" and curve.nfilter and index == curve.nfilter
        axis.plot(
            steps,
            curve.eigenvalues[:, index],
            color="black" if first_free else cmap(index / max(1, count - 1)),
            lw=(2.0 if first_free else 0.9) / thin,
            label=f"eigenvalue N+1 = {index + 1}" if first_free and labelled else None,
        )
