"""``report.md`` of the analyze stage: the tables and figures of one run, readable alone.

Built from ``analysis.h5`` only (see :func:`hessov.stages.analyze.write_results` for its
layout), so a report can be rebuilt anywhere the file is. Ratios are ``overlap / (k / D)``;
a ratio of 1 is chance. The paper's figures for the same problem are quoted next to ours
where the paper (Fernandez et al. 2025) reports them.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from hessov.analysis.figures import read_crystallization, read_overlap_curves
from hessov.analysis.subspaces import DISTANCE_NAMES

#: The overlap/chance ratios of Fernandez et al. 2025: problem -> (split, step, {k: x}).
PAPER_RATIOS = {"mnist_mini": ("test", 100, {10: 6.7, 355: 3.1})}
SIMILARITY_COLUMNS = ("overlap", *DISTANCE_NAMES)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table: the ``header`` cells, then one line per row of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _overlap_section(split: str, curves: dict, dimension: int) -> list[str]:
    lines = [f"### {split} Hessian", ""]
    rows = []
    for step, c in sorted(curves.items()):
        for index, k in enumerate(c["empirical_k"].tolist()):
            overlap, baseline = c["overlap"][k - 1], c["baseline"][k - 1]
            rows.append(
                [
                    str(step),
                    str(k),
                    f"{overlap:.4g}",
                    f"{baseline:.4g}",
                    f"**{overlap / baseline:.2f}x**",
                    f"{c['empirical_mean'][index]:.3g} ± {c['empirical_std'][index]:.2g}",
                    f"{c['best_mask_overlap'][k - 1]:.4g}",
                ]
            )
    header = ["step", "k", "overlap", "chance k/D", "overlap / chance"]
    header += ["random masks (mean ± sd)", "best k-sparse mask"]
    lines += table(header, rows)
    above = [
        step
        for step, c in sorted(curves.items())
        if np.all(c["overlap"][c["empirical_k"] - 1] > c["baseline"][c["empirical_k"] - 1])
    ]
    lines += [
        "",
        f"D = {dimension:,}. The magnitude mask beats chance at every reported k at steps "
        f"{above or 'none'} of {sorted(curves)}.",
        "",
    ]
    return lines


def _paper_comparison(problem: str, curves_by_split: dict) -> list[str]:
    if problem not in PAPER_RATIOS:
        return []
    split, step, ratios = PAPER_RATIOS[problem]
    curves = curves_by_split.get(split, {}).get(step)
    if curves is None:
        return [f"(The paper's reference, {split} Hessian at step {step}, is not analysed here.)"]
    cells = []
    for k, paper in ratios.items():
        if k <= curves["k"].size:
            ours = curves["overlap"][k - 1] / curves["baseline"][k - 1]
            cells.append(f"k={k}: {ours:.1f}x here, {paper}x in the paper")
    return [
        f"**Against the paper** ({split} Hessian, step {step}, overlap / chance): "
        + "; ".join(cells)
        + ".",
        "",
    ]


def _crystallization_table(data: dict, key, label: str) -> list[str]:
    rows = []
    for reference in ("consecutive", "last"):
        pairs = data[key][reference]
        for index, (a, b) in enumerate(zip(pairs["step_a"], pairs["step_b"], strict=True)):
            rows.append(
                [f"{a} → {b}"] + [f"{pairs[name][index]:.3f}" for name in SIMILARITY_COLUMNS]
            )
        rows.append(
            [f"*random ({reference})*"]
            + [f"*{pairs['random'][name]:.3f}*" for name in SIMILARITY_COLUMNS]
        )
    return [f"Similarities 1 − d/max at {label}:", ""] + table(["steps", *SIMILARITY_COLUMNS], rows)


def write_report(results: Path, figures: list[dict], path: Path, more: list[str] = ()) -> Path:
    """Write ``report.md`` for ``results`` (``analysis.h5``) and the drawn ``figures``
    (``[{"name", "title", "path"}]`` from :func:`hessov.analysis.figures.draw_all`), with the
    Markdown lines ``more`` at the end (the estimates' section).
    """
    with h5py.File(results, "r") as handle:
        problem = str(handle.attrs["problem"])
        dimension = int(handle.attrs["dimension"])
        unsolved = json.loads(handle.attrs["unsolved"])
        curves = {split: read_overlap_curves(handle, split) for split in handle.get("overlap", {})}
        eigenspaces = {
            split: read_crystallization(group)
            for split, group in handle.get("crystallization/eigenspaces", {}).items()
        }
        masks = (
            read_crystallization(handle["crystallization/masks"])
            if "crystallization/masks" in handle
            else {}
        )
    lines = [
        f"# Analysis: {problem}",
        "",
        "Overlap of the top-k parameter-magnitude mask with the top-k Hessian eigenspace",
        "(||W[mask, :k]||² / k, eigenvectors by |λ|), against chance k/D, against masks drawn",
        "at random, and against the best any k-sparse mask can do.",
        "",
    ]
    if unsolved:
        lines += [
            "**Not solved yet** (re-run `hessov analyze` once solved to add them): "
            + ", ".join(f"step {t} {s}" for t, s in unsolved),
            "",
        ]
    lines += _paper_comparison(problem, curves)
    lines += ["## Overlap with the magnitude mask", ""]
    for split, split_curves in sorted(curves.items()):
        lines += _overlap_section(split, split_curves, dimension)
    by_name = {figure["name"]: figure for figure in figures}
    lines += ["## Figures", ""]
    for figure in figures:
        lines += [f"![{figure['title']}](figures/{Path(figure['path']).name})", ""]
    lines += ["## Crystallization across training", ""]
    for split, data in sorted(eigenspaces.items()):
        lines += [f"### Top eigenspaces, {split} Hessian", ""]
        lines += _crystallization_table(data, max(data), f"k = {max(data)}")
        lines.append("")
    if masks:
        lines += ["### Parameter-magnitude masks", ""]
        for ratio in sorted(masks):
            lines += _crystallization_table(masks, ratio, f"sparsity ratio {ratio} of D")
            lines.append("")
    if not eigenspaces and "mask_crystallization" not in by_name:
        lines += ["(Fewer than two analysed steps: nothing to compare across training.)", ""]
    lines += more
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
