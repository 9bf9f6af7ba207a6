"""The report's comparison of a run with its variants (:mod:`hessov.variants`).

For every step and split that the run and its variants solved:

* per layer (``per_layer=true``): the spectra of every layer's block ``H[S, S]`` beside the
  whole Hessian's, ``|lambda_i|`` against rank on log-log axes, and a table of each block's
  size and top eigenvalue. By Cauchy interlacing a block's top eigenvalue is at most the
  whole Hessian's largest;
* the GGN (``curvature=both``): both spectra, and the overlap of their top-m eigenspaces,
  ``||U_H[:, :m]^T U_G[:, :m]||_F^2 / m`` (1: the same space, ``m/D``: chance);
* the most negative eigenpairs (``which=both``): the smallest eigenvalues with their error
  bounds, beside the largest.

Built from the eigen files alone; figures go to ``analysis/figures/variants_*.png``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hessov.analysis.figures import save_figure  # noqa: E402
from hessov.analysis.report import table  # noqa: E402
from hessov.paramblock import recorded_layout  # noqa: E402
from hessov.rundir import RunDir  # noqa: E402
from hessov.sketchspec import load_spec  # noqa: E402
from hessov.variants import layers as layers_of  # noqa: E402

#: Eigenspace sizes whose GGN-Hessian overlap is reported.
OVERLAP_SIZES = (1, 5, 10)


def _eigen(run: RunDir, where: tuple[int, str], columns: int = 0) -> dict | None:
    """Eigenvalues, error bounds (inf where none) and the first ``columns`` eigenvectors."""
    path = run.eigen(*where)
    if not path.is_file():
        return None
    with h5py.File(path, "r") as handle:
        values = handle["eigenvalues"][:]
        bounds = (
            handle["error_bounds"][:] if "error_bounds" in handle else np.full_like(values, np.inf)
        )
        vectors = handle["eigenvectors"][:, :columns] if columns else None
        return {
            "values": values,
            "bounds": bounds,
            "vectors": vectors,
            "dim": handle["eigenvectors"].shape[0],
        }


def _spectra_figure(curves: dict[str, np.ndarray], title: str):
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for label, values in curves.items():
        rank = np.arange(1, values.size + 1)
        own = label in ("whole Hessian", "block", "Hessian")
        style = {"color": "black", "lw": 2} if own else {"lw": 1.2}
        ax.plot(rank, np.abs(values), label=label, **style)
    ax.set(xscale="log", yscale="log", xlabel="rank i (by |λ|)", ylabel="|λ_i|", title=title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def _layers(run: RunDir, where, layers: list[str], figures: Path) -> list[str]:
    whole = _eigen(run, where)
    found = {name: _eigen(run.variant(name), where) for name in layers}
    found = {name: data for name, data in found.items() if data is not None}
    if whole is None or not found:
        return []
    step, split = where
    own = "block" if load_spec(run).params else "whole Hessian"
    curves = {own: whole["values"]} | {
        f"layer {name.removeprefix('layer_')}": data["values"] for name, data in found.items()
    }
    figure = save_figure(
        _spectra_figure(curves, f"Per-layer spectra, step {step} {split}"),
        figures / f"variants_layers_step_{step}_{split}.png",
    )
    rows = [[own, str(whole["dim"]), f"{whole['values'][0]:.4g}", "1"]]
    rows += [
        [name.removeprefix("layer_"), str(data["dim"]), f"{data['values'][0]:.4g}",
         f"{data['values'][0] / whole['values'][0]:.3f}"]
        for name, data in found.items()
    ]  # fmt: skip
    header = ["layer", "D", "top eigenvalue", f"over the {own}'s"]
    link = f"![per-layer spectra](figures/{figure.name})"
    return [f"### Per layer, step {step} {split}", "", *table(header, rows), "", link, ""]


def _ggn(run: RunDir, where, figures: Path) -> list[str]:
    size = max(OVERLAP_SIZES)
    hessian, ggn = _eigen(run, where, size), _eigen(run.variant("ggn"), where, size)
    if hessian is None or ggn is None:
        return []
    step, split = where
    curves = {"Hessian": hessian["values"], "GGN": ggn["values"]}
    figure = save_figure(
        _spectra_figure(curves, f"GGN and Hessian, step {step} {split}"),
        figures / f"variants_ggn_step_{step}_{split}.png",
    )
    rows = []
    stored = min(hessian["vectors"].shape[1], ggn["vectors"].shape[1])
    for m in [m for m in OVERLAP_SIZES if m <= stored]:
        overlap = np.linalg.norm(hessian["vectors"][:, :m].T @ ggn["vectors"][:, :m]) ** 2 / m
        rows.append([str(m), f"{hessian['values'][m - 1]:.4g}", f"{ggn['values'][m - 1]:.4g}",
                     f"{overlap:.3f}", f"{m / hessian['dim']:.1e}"])  # fmt: skip
    header = ["m", "Hessian λ_m", "GGN λ_m", "top-m overlap", "chance m/D"]
    link = f"![GGN and Hessian spectra](figures/{figure.name})"
    return [
        f"### GGN against the Hessian, step {step} {split}",
        "",
        *table(header, rows),
        "",
        link,
        "",
    ]


def _smallest(run: RunDir, where) -> list[str]:
    largest, smallest = _eigen(run, where), _eigen(run.variant("smallest"), where)
    if largest is None or smallest is None:
        return []
    count = min(5, len(smallest["values"]))
    rows = [
        [str(i + 1), f"{smallest['values'][i]:.4g}", f"{smallest['bounds'][i]:.2g}",
         f"{largest['values'][i]:.4g}", f"{largest['bounds'][i]:.2g}"]
        for i in range(count)
    ]  # fmt: skip
    header = ["i", "most negative λ", "its bound", "largest λ (by magnitude)", "its bound"]
    step, split = where
    return [f"### Most negative eigenvalues, step {step} {split}", "", *table(header, rows), ""]


def variant_section(run: RunDir, steps: list[int], splits: list[str]) -> list[str]:
    """Markdown lines comparing ``run`` with its variants; none without variants."""
    names = run.variant_names()
    if not names:
        return []
    in_order = [f"layer_{module}" for module in layers_of(recorded_layout(run))]  # D's order
    layer_names = [name for name in in_order if name in names]
    lines = ["## Variants: per-layer blocks, the GGN, the most negative eigenpairs", ""]
    for step in steps:
        for split in splits:
            where = (step, split)
            lines += _layers(run, where, layer_names, run.figures) if layer_names else []
            lines += _ggn(run, where, run.figures) if "ggn" in names else []
            lines += _smallest(run, where) if "smallest" in names else []
    return lines
