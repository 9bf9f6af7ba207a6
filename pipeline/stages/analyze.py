"""The analyze stage: magnitude masks against Hessian eigenspaces, and how both move in training.

Stage 5 of the pipeline (the results of Fernandez et al. 2025, "Connecting Parameter Magnitudes
and Hessian Eigenspaces at Scale using Sketched Methods"). For every solved step
and split it asks whether the parameters of largest magnitude point into the top Hessian
eigenspace:

- ``overlap(k) = ||W[M_k, :k]||_F^2 / k`` of the top-``k`` magnitude mask ``M_k`` with the
  top-``k`` eigenvectors ``W`` (sorted by ``|lambda|``), for every ``k = 1..K``;
- the chance level ``k / D``, the exact mean and spread of a uniformly random mask, and an
  empirical one over ``NUM_RANDOM_MASKS`` drawn masks at the reported sizes;
- the best any ``k``-sparse mask can reach (the ``k`` rows of ``W[:, :k]`` of largest norm).

Across recorded steps ("crystallization") it tracks the Grassmannian metrics of
:mod:`hessov.analysis.subspaces`, raw and as similarities ``1 - d / max``, between the eigenspaces
of consecutive steps and against the last step, at the sizes ``ratio * D`` of the paper's sparsity
ratios that fit in ``K`` and at ``K``; and the same between the magnitude masks of the recorded
parameters at those ratios. Random baselines come from Haar-random subspaces and uniformly random
masks.

Files: each step's curves go to their own ``analysis/steps/step_T_SPLIT.h5``, so the
per-step analyze jobs of a Slurm chain run in parallel and a re-run only computes steps not
analysed yet. Each call then rebuilds, under a file lock, ``analysis/analysis.h5`` (every
analysed step plus the cross-step metrics, ``k x k`` decompositions of cross products), the
figures and ``report.md`` from whatever is solved so far, and says which steps are not.

Memory: the eigenvectors ``W`` (``D x K``, 80 GB in float64 at ``D = 10^7``, ``K = 1,000``)
are never held whole. Every metric reads them from the HDF5 dataset ``row_block`` rows at a
time (:mod:`hessov.analysis.rowblocks`; default :func:`row_block_for`, within
``DEFAULT_BUDGET_BYTES``): one pass per step for all its curves, two per pair of steps for the
crystallization. A step needs ``O(row_block K + K^2)`` memory plus a few ``D``-vectors (the
parameters, their magnitude ranking, a random permutation), and crystallization the same.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import h5py
import numpy as np
import torch

from hessov import summary
from hessov.analysis import figures
from hessov.analysis.estimate_report import estimate_section
from hessov.analysis.report import write_report
from hessov.analysis.rowblocks import RowSource, default_row_block
from hessov.analysis.subspaces import (
    DISTANCE_NAMES,
    GRASSMANNIAN_MAXIMA,
    leading_grassmannian_similarities,
    magnitude_mask,
    mask_grassmannian_similarities,
    mask_overlap_curves,
    random_mask_similarities,
    random_subspace_similarities,
)
from hessov.analysis.variant_report import variant_section
from hessov.config import saved_run_config
from hessov.errors import MissingInputError
from hessov.fileio import atomic_write, exclusive_lock
from hessov.paramblock import block_rows, recorded_layout, restrict
from hessov.paramstore import ColumnStore
from hessov.rundir import RunDir
from hessov.runlog import EventLog, get_logger
from hessov.sketchspec import load_spec
from hessov.training import set_cpu_threads

#: Mask sizes reported in the summary and the tables (plus K, the number of eigenpairs).
REPORTED_KS = (1, 5, 10, 20, 50, 100)
#: The paper's sparsity ratios for crystallization: mask (and eigenspace) sizes ratio * D.
SPARSITY_RATIOS = (0.005, 0.01, 0.05, 0.2)
NUM_RANDOM_MASKS = 32
NUM_RANDOM_SUBSPACES = 8
# Two small random masks rarely share a coordinate: many cheap O(m) draws for a stable mean.
NUM_RANDOM_MASK_PAIRS = 1000
BASELINE_SEED = 0
SIMILARITY_NAMES = ("overlap", *DISTANCE_NAMES)


def row_block_for(num_eigenpairs: int) -> int:
    """Rows of ``W`` read at once: the default of ``K`` columns within ``DEFAULT_BUDGET_BYTES``
    (at least ``K``).
    """
    return default_row_block(num_eigenpairs)


def reported_ks(num_eigenpairs: int) -> list[int]:
    """The sizes of the summary: ``REPORTED_KS`` up to ``K``, and ``K`` itself."""
    return sorted({k for k in REPORTED_KS if k <= num_eigenpairs} | {num_eigenpairs})


@contextmanager
def eigenpairs(run: RunDir, step: int, split: str) -> Iterator[tuple[np.ndarray, h5py.Dataset]]:
    """Eigenvalues ``(K,)`` float64 and the open eigenvector dataset ``(D, K)`` (float32 or
    float64, read in row blocks, never whole) of a solved step, both by ``|lambda|``.
    """
    with h5py.File(run.require(run.eigen(step, split), "solve"), "r") as handle:
        yield handle["eigenvalues"][:].astype(np.float64), handle["eigenvectors"]


def overlap_results(
    eigenvectors: torch.Tensor | RowSource, params: torch.Tensor, row_block: int | None = None
) -> dict[str, np.ndarray]:
    """Every overlap curve of one step: arrays of shape ``(K,)`` over ``k = 1..K`` and, for the
    empirical random masks, ``(len(reported_ks(K)),)`` at the reported sizes.

    ``eigenvectors``: ``(D, K)`` sorted by ``|lambda|`` descending, a tensor or a row source
    (an HDF5 dataset) read ``row_block`` rows at a time (default :func:`row_block_for`);
    ``params``: ``(D,)``.
    """
    dimension, num_eigenpairs = eigenvectors.shape
    row_block = row_block_for(num_eigenpairs) if row_block is None else row_block
    ks = np.arange(1, num_eigenpairs + 1)
    empirical_ks = reported_ks(num_eigenpairs)
    seeds = [BASELINE_SEED + k for k in empirical_ks]
    curves = mask_overlap_curves(
        eigenvectors, params, ks.tolist(), empirical_ks, NUM_RANDOM_MASKS, seeds, row_block
    )
    random_mean, random_std = curves["random_mask"]
    empirical_mean, empirical_std = curves["empirical"]
    return {
        "k": ks,
        "overlap": curves["overlap"].numpy(),
        "baseline": ks / dimension,
        "random_mask_mean": random_mean.numpy(),
        "random_mask_std": random_std.numpy(),
        "best_mask_overlap": curves["best_mask_overlap"].numpy(),
        "empirical_k": np.array(empirical_ks),
        "empirical_mean": empirical_mean.numpy(),
        "empirical_std": empirical_std.numpy(),
    }


def _at(curves: dict[str, np.ndarray], name: str, ks: list[int]) -> dict[str, float]:
    return {str(k): float(curves[name][k - 1]) for k in ks}


def analyze_step(run: RunDir, step: int, split: str, row_block: int | None = None) -> dict:
    """Compute and write the overlap curves of one solved step, reading its eigenvectors
    ``row_block`` rows at a time (default :func:`row_block_for`); returns its summary fields.
    """
    started = time.perf_counter()
    params = _recorded_params(run, step)
    with eigenpairs(run, step, split) as (eigenvalues, eigenvectors):
        dimension, num_eigenpairs = eigenvectors.shape
        curves = overlap_results(eigenvectors, params, row_block)
    with atomic_write(run.analysis_step(step, split)) as tmp, h5py.File(tmp, "w") as handle:
        for name, values in curves.items():
            handle.create_dataset(name, data=values)
        handle.create_dataset("eigenvalues", data=eigenvalues)
        handle.attrs.update(step=step, split=split, dimension=dimension)
    ks = reported_ks(num_eigenpairs)
    empirical = dict(zip(curves["empirical_k"].tolist(), range(len(ks)), strict=True))
    fields = {
        "dimension": int(dimension),
        "num_eigenpairs": int(num_eigenpairs),
        "overlap": _at(curves, "overlap", ks),
        "baseline": _at(curves, "baseline", ks),
        "best_mask_overlap": _at(curves, "best_mask_overlap", ks),
        "ratio_to_baseline": {
            str(k): float(curves["overlap"][k - 1] / curves["baseline"][k - 1]) for k in ks
        },
        "random_mask_mean": {str(k): float(curves["empirical_mean"][empirical[k]]) for k in ks},
        "random_mask_std": {str(k): float(curves["empirical_std"][empirical[k]]) for k in ks},
        "top_eigenvalues": eigenvalues[:5].tolist(),
        "wall_seconds": time.perf_counter() - started,
    }
    summary.record(run, "analyze", fields, step, split)
    return fields


def crystallization_sizes(dimension: int, num_eigenpairs: int) -> list[int]:
    """Eigenspace sizes compared across steps: ``ratio * D`` for the sparsity ratios whose size
    is below ``0.9 K`` (a size next to ``K`` would repeat it), and ``K``.
    """
    sizes = {max(1, round(r * dimension)) for r in SPARSITY_RATIOS}
    return sorted({m for m in sizes if m < 0.9 * num_eigenpairs} | {num_eigenpairs})


@functools.cache
def _random_subspace_baseline(dimension: int, size: int) -> dict[str, float]:
    # The same for every split: computed once per (D, size).
    return random_subspace_similarities(dimension, size, NUM_RANDOM_SUBSPACES, BASELINE_SEED)


def step_pairs(steps: list[int]) -> dict[str, list[tuple[int, int]]]:
    """The pairs compared: each step with the next (``consecutive``) and with the last."""
    return {
        "consecutive": list(zip(steps[:-1], steps[1:], strict=True)),
        "last": [(step, steps[-1]) for step in steps[:-1]],
    }


def _pair_metrics(similarities: list[dict[str, float]], maxima: dict[str, float]) -> dict:
    """Stack per-pair similarities into arrays, with the raw distances ``(1 - s) * max``."""
    columns = {name: np.array([s[name] for s in similarities]) for name in SIMILARITY_NAMES}
    for name in DISTANCE_NAMES:
        columns[f"distance_{name}"] = (1.0 - columns[name]) * maxima[name]
    return columns


def pair_eigenspace_similarities(
    run: RunDir, split: str, pairs: list[tuple[int, int]], sizes: list[int], row_block: int
) -> dict[tuple[int, int], dict[int, dict[str, float]]]:
    """``{(a, b): {m: similarities}}``: the Grassmannian similarities of the top-``m``
    eigenspaces of steps ``a`` and ``b`` for each ``m`` of ``sizes``, each distinct pair read
    once, both files in blocks of ``row_block`` rows (two passes at most).
    """
    similarities = {}
    for a, b in dict.fromkeys(pairs):
        with (
            eigenpairs(run, a, split) as (_, vectors_a),
            eigenpairs(run, b, split) as (_, vectors_b),
        ):
            similarities[a, b] = leading_grassmannian_similarities(
                vectors_a, vectors_b, sizes, row_block
            )
    return similarities


def eigenspace_crystallization(
    run: RunDir, split: str, steps: list[int], row_block: int | None = None
) -> dict:
    """Grassmannian similarities of the top-``m`` eigenspaces between pairs of solved steps:
    ``{m: {reference: {"step_a", "step_b", metric arrays (n_pairs,), "random": {...}}}}``.

    The eigenvectors are read ``row_block`` rows at a time (default :func:`row_block_for`).
    """
    with eigenpairs(run, steps[0], split) as (_, first):
        dimension, num_eigenpairs = first.shape
    row_block = row_block_for(num_eigenpairs) if row_block is None else row_block
    sizes = crystallization_sizes(dimension, num_eigenpairs)
    references = step_pairs(steps)
    every_pair = [pair for pairs in references.values() for pair in pairs]
    pair_metrics = pair_eigenspace_similarities(run, split, every_pair, sizes, row_block)
    result = {}
    for m in sizes:
        random = _random_subspace_baseline(dimension, m)
        result[m] = {}
        for reference, pairs in references.items():
            similarities = [pair_metrics[pair][m] for pair in pairs]
            result[m][reference] = {
                "step_a": np.array([a for a, _ in pairs]),
                "step_b": np.array([b for _, b in pairs]),
                **_pair_metrics(similarities, GRASSMANNIAN_MAXIMA(m)),
                "random": random,
            }
    return result


def pair_mask_similarities(
    steps: list[int], read: Callable[[int], torch.Tensor]
) -> tuple[int, dict[tuple[int, int], dict[float, dict[str, float]]]]:
    """``D`` and ``{(a, b): {ratio: similarities}}`` of the magnitude masks of size
    ``ratio * D`` of the two steps of each pair of :func:`step_pairs` (``steps`` ascending).

    ``read(step)`` gives the parameters ``(D,)``; it is called once per step, the last step
    first, and only the masks of the last, current and previous steps are held: ``O(D)``
    memory for any number of steps.
    """
    pairs = [pair for pairs in step_pairs(steps).values() for pair in pairs]
    kept, similarities = {}, {}
    for step in [steps[-1], *steps[:-1]]:
        params = read(step)
        dimension = params.numel()
        sizes = {ratio: max(1, round(ratio * dimension)) for ratio in SPARSITY_RATIOS}
        kept[step] = {ratio: magnitude_mask(params, m) for ratio, m in sizes.items()}
        for a, b in pairs:
            if step in (a, b) and a in kept and b in kept:
                similarities[a, b] = {
                    ratio: mask_grassmannian_similarities(kept[a][ratio], kept[b][ratio])
                    for ratio in SPARSITY_RATIOS
                }
        kept = {held: masks for held, masks in kept.items() if held in (step, steps[-1])}
    return dimension, similarities


def mask_crystallization(steps: list[int], read: Callable[[int], torch.Tensor]) -> dict:
    """Grassmannian similarities of the magnitude masks of size ``ratio * D`` between pairs of
    recorded ``steps`` (ascending): ``{ratio: {reference: {...}}}`` as in
    :func:`eigenspace_crystallization`. ``read(step)`` gives the parameters ``(D,)``, read
    once per step (:func:`pair_mask_similarities`).
    """
    dimension, pair_metrics = pair_mask_similarities(steps, read)
    result = {}
    for ratio in SPARSITY_RATIOS:
        m = max(1, round(ratio * dimension))
        random = random_mask_similarities(dimension, m, NUM_RANDOM_MASK_PAIRS, BASELINE_SEED)
        result[ratio] = {}
        for reference, pairs in step_pairs(steps).items():
            similarities = [pair_metrics[pair][ratio] for pair in pairs]
            result[ratio][reference] = {
                "step_a": np.array([a for a, _ in pairs]),
                "step_b": np.array([b for _, b in pairs]),
                **_pair_metrics(similarities, GRASSMANNIAN_MAXIMA(m)),
                "random": random,
            }
    return result


def _write_pairs(group: h5py.Group, data: dict) -> None:
    for reference, columns in data.items():
        sub = group.create_group(reference)
        for name, values in columns.items():
            if name == "random":
                sub.attrs.update({f"random_{key}": value for key, value in values.items()})
            else:
                sub.create_dataset(name, data=values)


def _recorded_params(run: RunDir, step: int) -> torch.Tensor:
    """The parameters of a recorded step, ``(D,)`` float64: the sketched block's
    (:mod:`hessov.paramblock`), so that masks and eigenvectors share their rows.
    """
    rows = block_rows(recorded_layout(run), load_spec(run).params)
    return torch.from_numpy(restrict(ColumnStore(run.params).read(step), rows)).double()


def write_results(
    run: RunDir,
    problem: str,
    analysed: dict[str, list[int]],
    unsolved: list,
    row_block: int | None = None,
) -> None:
    """Rebuild ``analysis.h5`` from the per-step files and the cross-step metrics (the
    eigenvectors read ``row_block`` rows at a time, default :func:`row_block_for`).

    Layout::

        attrs: problem, dimension, unsolved (JSON list of [step, split])
        overlap/{split}/step_{T}/   k, overlap, baseline, random_mask_mean, random_mask_std,
                                    best_mask_overlap, empirical_k, empirical_mean,
                                    empirical_std (per k), eigenvalues (K,); attrs step, split
        crystallization/eigenspaces/{split}/size_{m}/{consecutive,last}/
        crystallization/masks/ratio_{r}/{consecutive,last}/
                                    step_a, step_b (pairs), overlap and the six similarities,
                                    distance_* (raw); attrs random_* (chance level); size m
    """
    store, dimension = ColumnStore(run.params), load_spec(run).layout.dim
    with atomic_write(run.analysis_results) as tmp, h5py.File(tmp, "w") as out:
        out.attrs.update(problem=problem, dimension=dimension, unsolved=json.dumps(unsolved))
        for split, steps in analysed.items():
            for step in steps:
                with h5py.File(run.analysis_step(step, split), "r") as source:
                    source.copy(source["/"], out, name=f"overlap/{split}/step_{step}")
            if len(steps) > 1:
                crystallization = eigenspace_crystallization(run, split, steps, row_block)
                for m, data in crystallization.items():
                    group = out.create_group(f"crystallization/eigenspaces/{split}/size_{m}")
                    group.attrs["size"] = m
                    _write_pairs(group, data)
        recorded = sorted(store.steps())
        if len(recorded) > 1:
            read = functools.partial(_recorded_params, run)
            for ratio, data in mask_crystallization(recorded, read).items():
                group = out.create_group(f"crystallization/masks/ratio_{ratio}")
                group.attrs.update(ratio=ratio, size=max(1, round(ratio * dimension)))
                _write_pairs(group, data)


def analyze(
    run: RunDir,
    items: list[tuple[int, str]] | None = None,
    report: bool = True,
    row_block: int | None = None,
) -> dict:
    """Analyse the solved steps among ``items`` (default: every step and split of the layout)
    that have no analysis yet, then (with ``report``) rebuild ``analysis.h5``, the figures
    and ``report.md``; the local runner defers that to one call after the last solve.
    Eigenvectors are read ``row_block`` rows at a time (default :func:`row_block_for`).

    Returns ``{"analysed": [[step, split], ...], "unsolved": [[step, split], ...]}`` for the
    whole run. Raises :class:`MissingInputError` when nothing at all is solved.
    """
    log = get_logger()
    cfg = saved_run_config(run)
    # Small k x k and D x k decompositions: extra threads only add contention on shared cores.
    set_cpu_threads(cfg.threads)
    spec = load_spec(run)
    everything = [(step, split) for step in spec.steps for split in spec.splits]
    unsolved = [[t, s] for t, s in everything if not run.eigen(t, s).is_file()]
    wanted = everything if items is None else items
    missing = [[t, s] for t, s in wanted if not run.eigen(t, s).is_file()]
    if len(unsolved) == len(everything):
        raise MissingInputError(
            f"{run.root}: no step is solved yet; run `hessov solve {run.root}` first"
        )
    if missing:
        log.warning(
            "analyze: not solved yet, left for a later run: %s",
            ", ".join(f"step {t} {s}" for t, s in missing),
        )
    with EventLog(run.log, "analyze") as events:
        for step, split in wanted:
            if run.eigen(step, split).is_file() and not run.analysis_step(step, split).is_file():
                fields = analyze_step(run, step, split, row_block)
                log.info(
                    "analyze step %d %s: overlap/baseline %s",
                    step,
                    split,
                    ", ".join(f"k={k}: {r:.1f}x" for k, r in fields["ratio_to_baseline"].items()),
                )
                events.write("analyzed", step=step, split=split, overlap=fields["overlap"])
        analysed = {
            split: [t for t in spec.steps if run.analysis_step(t, split).is_file()]
            for split in spec.splits
        }
        result = {
            "analysed": [[t, s] for s, steps in analysed.items() for t in steps],
            "unsolved": unsolved,
        }
        if report:
            with exclusive_lock(run.analysis_lock):
                write_results(run, cfg.problem, analysed, unsolved, row_block)
                drawn = figures.draw_all(run.analysis_results, run.figures)
                more = estimate_section(summary.load(run), run.report)
                more += variant_section(run, spec.steps, spec.splits)
                write_report(run.analysis_results, drawn, run.report, more)
            events.write("report", path=str(run.report), unsolved=unsolved)
            log.info("analyze: report %s", run.report)
    return result
