"""Figures of the analyze stage, one function each, drawn from the arrays of ``analysis.h5``.

Every plot function takes plain arrays (as read from the file with h5py) and returns a
matplotlib figure, so the stage and the notebook ``analysis/notebooks/analyze_run.ipynb``
draw the same pictures from the same data. :func:`draw_all` reads ``analysis.h5`` and writes
every figure as PNG. Axes carry their quantity; the chance levels are always drawn.

Shapes: overlap curves are ``(K,)`` over ``k = 1..K``; the empirical random masks are
``(n,)`` at the reported sizes; crystallization columns are ``(n_pairs,)``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SIMILARITY_LABELS = {
    "overlap": "overlap (mean cos² θ)",
    "geodesic": "geodesic",
    "chordal_2": "chordal-2",
    "chordal_f": "chordal-F",
    "projection_2": "projection-2",
    "projection_f": "projection-F",
    "fubini_study": "Fubini-Study",
}
REFERENCES = {
    "last": "against the last recorded step",
    "consecutive": "between consecutive recorded steps",
}
DPI = 110
#: The mask ratio whose crystallization is drawn in detail, when the run recorded it.
MASK_DETAIL_RATIO = 0.05


def _panels(count: int, width: float = 4.6, height: float = 3.6):
    columns = 2 if count == 4 else min(count, 3)  # noqa: PLR2004 (four panels: a 2 x 2 grid)
    rows = -(-count // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(width * columns, height * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def plot_overlap(curves: dict[int, dict[str, np.ndarray]], split: str, dimension: int):
    """Overlap(k) of the magnitude mask for each step, with the random baselines and the best
    ``k``-sparse mask, on log-log axes. ``curves[step]`` holds the datasets of
    ``overlap/{split}/step_T``.
    """
    fig, axes = _panels(len(curves))
    for ax, (step, c) in zip(axes, sorted(curves.items()), strict=True):
        k = c["k"]
        # On log axes a band reaching below zero would stretch the axis to nothing: the
        # spread is clipped a little below the smallest value that is plotted.
        positive = c["overlap"][c["overlap"] > 0]
        floor = min(positive.min() if positive.size else 1.0, c["baseline"][0]) / 3
        ax.plot(k, c["best_mask_overlap"], ":", color="tab:green", label="best k-sparse mask")
        ax.plot(k, c["overlap"], color="tab:blue", lw=2, label="top-k magnitude mask")
        mean, spread = c["random_mask_mean"], 2 * c["random_mask_std"]
        ax.fill_between(
            k, np.maximum(mean - spread, floor), mean + spread, color="0.85",
            label="random mask, mean ± 2 sd",
        )  # fmt: skip
        ax.plot(k, c["baseline"], "--", color="black", lw=1, label="chance k/D")
        drawn_mean, drawn_std = c["empirical_mean"], c["empirical_std"]
        ax.errorbar(
            c["empirical_k"], drawn_mean,
            # A mean below the log axis' floor gets no lower bar (matplotlib refuses < 0).
            yerr=[np.maximum(np.minimum(drawn_std, drawn_mean - floor), 0), drawn_std], fmt="o",
            ms=3,
            color="tab:gray", label="drawn random masks, mean ± sd",
        )  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="k (mask size = eigenspace dimension)")
        ax.set_ylim(bottom=floor)
        ax.set_title(f"step {step}")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("overlap ||W[mask, :k]||² / k")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{split} Hessian: magnitude mask vs top-k eigenspace (D = {dimension:,})")
    return fig


def plot_overlap_ratio(curves: dict[int, dict[str, np.ndarray]], split: str):
    """Overlap divided by the chance level ``k / D``, one line per step (the best mask dotted);
    1 means no better than chance.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(curves)))
    for color, (step, c) in zip(colors, sorted(curves.items()), strict=True):
        ax.plot(c["k"], c["overlap"] / c["baseline"], color=color, lw=2, label=f"step {step}")
        ax.plot(c["k"], c["best_mask_overlap"] / c["baseline"], ":", color=color)
    ax.axhline(1.0, color="black", ls="--", lw=1, label="chance (ratio 1)")
    ax.plot([], [], ":", color="gray", label="best k-sparse mask")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="k (mask size = eigenspace dimension)",
        ylabel="overlap / (k / D)",
        title=f"{split} Hessian: overlap relative to chance",
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_spectra(eigenvalues: dict[int, np.ndarray], split: str):
    """``|lambda_i|`` against rank ``i`` (by ``|lambda|``) per step, log-log; negative
    eigenvalues as open markers.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(eigenvalues)))
    for color, (step, values) in zip(colors, sorted(eigenvalues.items()), strict=True):
        rank = np.arange(1, values.size + 1)
        ax.plot(rank, np.abs(values), color=color, lw=1.5, label=f"step {step}")
        negative = values < 0
        ax.plot(rank[negative], -values[negative], "o", mfc="none", ms=3, color=color)
    ax.plot([], [], "o", mfc="none", color="gray", label="negative eigenvalue")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="rank i (by |λ|)",
        ylabel="|λ_i| (loss per parameter²)",
        title=f"{split} Hessian: top eigenvalue spectrum",
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _pair_x(reference: str, pairs: dict[str, np.ndarray]) -> np.ndarray:
    # Against the last step, a point is the earlier step; between neighbours, the later one.
    return pairs["step_a"] if reference == "last" else pairs["step_b"]


X_LABELS = {
    "last": "training step (compared with the last recorded step)",
    "consecutive": "training step (compared with the previous recorded step)",
}


def plot_crystallization(data: dict, title: str, size_label: str, detail_key):
    """How a subspace settles during training. ``data[size][reference]`` holds the columns of a
    ``crystallization/.../{size}/{reference}`` group and ``"random"`` (the chance levels).

    Top row: the overlap similarity at every size; bottom row: all seven similarities at
    ``detail_key``. Left: against the last step; right: between consecutive steps. Dotted
    lines are the random baselines, in the same colours.
    """
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False, layout="constrained")
    sizes = sorted(data)
    size_colors = plt.cm.plasma(np.linspace(0, 0.85, len(sizes)))
    metric_colors = plt.cm.tab10(np.arange(len(SIMILARITY_LABELS)))
    for column, (reference, description) in enumerate(REFERENCES.items()):
        top, bottom = axes[0][column], axes[1][column]
        for color, size in zip(size_colors, sizes, strict=True):
            pairs = data[size][reference]
            x = _pair_x(reference, pairs)
            top.plot(x, pairs["overlap"], "o-", color=color, label=f"{size_label} {size}")
            top.axhline(pairs["random"]["overlap"], color=color, ls=":", lw=1)
        pairs = data[detail_key][reference]
        x = _pair_x(reference, pairs)
        for color, (name, label) in zip(metric_colors, SIMILARITY_LABELS.items(), strict=True):
            bottom.plot(x, pairs[name], "o-", color=color, label=label)
            bottom.axhline(pairs["random"][name], color=color, ls=":", lw=1)
        top.set_title(f"overlap similarity {description}", fontsize=10)
        bottom.set_title(f"similarities at {size_label} {detail_key}, {description}", fontsize=10)
        steps = np.concatenate([pairs["step_a"], pairs["step_b"]])
        first_positive = steps[steps > 0].min() if (steps > 0).any() else 1
        for ax in (top, bottom):
            # Step 0 is a recorded step: a linear stretch up to the first positive step keeps it.
            ax.set_xscale("symlog", linthresh=first_positive)
            ax.set(xlim=(0, steps.max() * 1.3), ylim=(-0.02, 1.02), xlabel=X_LABELS[reference])
            ax.grid(True, alpha=0.3)
        top.set_ylabel("similarity 1 − d / max")
        bottom.set_ylabel("similarity 1 − d / max")
    axes[0][1].legend(fontsize=7, title="dotted: random baseline", title_fontsize=7)
    axes[1][1].legend(fontsize=7, title="dotted: random baseline", title_fontsize=7)
    fig.suptitle(title)
    return fig


def read_overlap_curves(handle: h5py.File, split: str) -> dict[int, dict[str, np.ndarray]]:
    """``{step: {dataset: array}}`` from ``overlap/{split}`` of an open ``analysis.h5``."""
    group = handle[f"overlap/{split}"]
    return {int(sub.attrs["step"]): {name: sub[name][:] for name in sub} for sub in group.values()}


def read_crystallization(group: h5py.Group) -> dict:
    """``{size: {reference: {column: array, "random": {metric: float}}}}`` from a
    ``crystallization/eigenspaces/{split}`` or ``crystallization/masks`` group; ``size`` is the
    subspace dimension (eigenspaces) or the sparsity ratio (masks).
    """
    data = {}
    for sub in group.values():
        key = sub.attrs["ratio"] if "ratio" in sub.attrs else int(sub.attrs["size"])
        data[float(key) if "ratio" in sub.attrs else key] = {
            reference: {
                **{name: pairs[name][:] for name in pairs},
                "random": {
                    name.removeprefix("random_"): float(value)
                    for name, value in pairs.attrs.items()
                },
            }
            for reference, pairs in sub.items()
        }
    return data


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as PNG at the resolution of every analysis figure, then close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def draw_all(results: Path, out_dir: Path) -> list[dict]:
    """Write every figure of ``results`` (an ``analysis.h5``) into ``out_dir`` as PNG.

    Returns ``[{"name", "title", "path"}]`` in report order.
    """
    drawn = []

    def add(name: str, title: str, fig) -> None:
        drawn.append(
            {"name": name, "title": title, "path": save_figure(fig, out_dir / f"{name}.png")}
        )

    with h5py.File(results, "r") as handle:
        dimension = int(handle.attrs["dimension"])
        for split in sorted(handle.get("overlap", {})):
            curves = read_overlap_curves(handle, split)
            add(
                f"overlap_{split}", f"Overlap vs k, {split}", plot_overlap(curves, split, dimension)
            )
            add(
                f"overlap_ratio_{split}",
                f"Overlap relative to chance, {split}",
                plot_overlap_ratio(curves, split),
            )
            add(
                f"spectrum_{split}",
                f"Eigenvalue spectrum, {split}",
                plot_spectra({step: c["eigenvalues"] for step, c in curves.items()}, split),
            )
        eigenspaces = handle.get("crystallization/eigenspaces", {})
        for split in sorted(eigenspaces):
            data = read_crystallization(eigenspaces[split])
            fig = plot_crystallization(
                data,
                f"{split} Hessian: crystallization of the top eigenspaces",
                "k =",
                max(data),
            )
            add(f"eigenspace_crystallization_{split}", f"Eigenspace crystallization, {split}", fig)
        if "crystallization/masks" in handle:
            data = read_crystallization(handle["crystallization/masks"])
            detail = MASK_DETAIL_RATIO if MASK_DETAIL_RATIO in data else max(data)
            fig = plot_crystallization(
                data, "Crystallization of the parameter-magnitude masks", "ratio", detail
            )
            add("mask_crystallization", "Magnitude-mask crystallization", fig)
    return drawn
