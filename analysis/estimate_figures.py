"""Figures of the estimates that reuse a sketch: the diagonal per layer, the spectral density.

Each function takes plain data, as the stages write it (the ``layers`` summary of the
diagonal; the density's grid and the sketch's eigenvalues from ``density.h5``), and returns a
matplotlib figure; :func:`hessov.analysis.figures.save_figure` writes it.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

#: The density axis' floor on the log scale, relative to its largest value.
DENSITY_FLOOR = 1e-7


def plot_layer_diagonal(layers: dict[str, dict], step: int, split: str):
    """The mean diagonal entry of each parameter tensor (``layers[name]["mean"]``) with the
    95% half-width of that mean (``mean_ci95``) as an error bar, one bar per tensor in
    ``D``'s order.
    """
    names = list(layers)
    means = np.array([layers[name]["mean"] for name in names])
    spread = np.array([layers[name]["mean_ci95"] for name in names])
    fig, ax = plt.subplots(figsize=(max(6.4, 0.45 * len(names)), 4.2), layout="constrained")
    positions = np.arange(len(names))
    colors = ["tab:blue" if value >= 0 else "tab:red" for value in means]
    ax.bar(positions, np.abs(means), yerr=spread, color=colors, capsize=2)
    ax.set_xticks(positions, names, rotation=60, ha="right", fontsize=7)
    ax.set(
        yscale="log",
        ylabel="|mean diagonal entry| (red: negative)",
        title=f"Hessian diagonal per layer, step {step} {split}",
    )
    ax.grid(True, axis="y", which="major", alpha=0.3)
    return fig


def plot_density(grid: np.ndarray, density: np.ndarray, outliers: np.ndarray, where, sigma):
    """The broadened eigenvalue density ``(G,)`` on ``grid`` ``(G,)``, log scale, with the
    sketch's eigenvalues ``outliers`` marked below it.
    """
    step, split = where
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    floor = DENSITY_FLOOR * density.max()
    ax.plot(grid, np.maximum(density, floor), color="tab:blue", lw=1.2, label="density (SLQ)")
    ax.plot(outliers, np.full(outliers.shape, floor), "|", color="tab:red", ms=12)
    ax.plot([], [], "|", color="tab:red", label=f"sketched eigenvalues ({outliers.size})")
    ax.set(
        yscale="log",
        ylim=(floor / 2, None),
        xlabel="eigenvalue λ",
        ylabel=f"density (Gaussian σ = {sigma:.2g})",
        title=f"Hessian eigenvalue density, step {step} {split}",
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return fig
