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
analysed step plus the cross-step metrics, which are cheap ``k x k`` decompositions), the
figures and ``report.md`` from whatever is solved so far, and says which steps are not.
"""

from __future__ import annotations

import functools
import json
import time

import h5py
import numpy as np
import torch

from hessov import summary
from hessov.analysis import figures
from hessov.analysis.report import write_report
from hessov.analysis.subspaces import (
    DISTANCE_NAMES,
    GRASSMANNIAN_MAXIMA,
    best_mask_overlap_curve,
    grassmannian_similarities,
    magnitude_mask,
    mask_grassmannian_similarities,
    overlap_curve,
    random_mask_overlap,
    random_mask_overlap_curve,
    random_mask_similarities,
    random_subspace_similarities,
)
from hessov.config import saved_run_config
from hessov.errors import MissingInputError
from hessov.fileio import atomic_write, exclusive_lock
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


def reported_ks(num_eigenpairs: int) -> list[int]:
    """The sizes of the summary: ``REPORTED_KS`` up to ``K``, and ``K`` itself."""
    return sorted({k for k in REPORTED_KS if k <= num_eigenpairs} | {num_eigenpairs})


def read_eigenpairs(run: RunDir, step: int, split: str) -> tuple[np.ndarray, torch.Tensor]:
    """Eigenvalues ``(K,)``, eigenvectors ``(D, K)`` float64 of a solved step, by ``|lambda|``."""
    with h5py.File(run.require(run.eigen(step, split), "solve"), "r") as handle:
        values = handle["eigenvalues"][:].astype(np.float64)
        vectors = torch.from_numpy(handle["eigenvectors"][:]).double()
    return values, vectors


def overlap_results(eigenvectors: torch.Tensor, params: torch.Tensor) -> dict[str, np.ndarray]:
    """Every overlap curve of one step: arrays of shape ``(K,)`` over ``k = 1..K`` and, for the
    empirical random masks, ``(len(reported_ks(K)),)`` at the reported sizes.

    ``eigenvectors``: ``(D, K)`` sorted by ``|lambda|`` descending; ``params``: ``(D,)``.
    """
    dimension, num_eigenpairs = eigenvectors.shape
    ks = np.arange(1, num_eigenpairs + 1)
    random_mean, random_std = random_mask_overlap_curve(eigenvectors, ks.tolist())
    empirical_ks = reported_ks(num_eigenpairs)
    empirical = [
        random_mask_overlap(eigenvectors, k, NUM_RANDOM_MASKS, BASELINE_SEED + k)
        for k in empirical_ks
    ]
    return {
        "k": ks,
        "overlap": overlap_curve(eigenvectors, params, ks.tolist()).numpy(),
        "baseline": ks / dimension,
        "random_mask_mean": random_mean.numpy(),
        "random_mask_std": random_std.numpy(),
        "best_mask_overlap": best_mask_overlap_curve(eigenvectors, ks.tolist()).numpy(),
        "empirical_k": np.array(empirical_ks),
        "empirical_mean": np.array([mean for mean, _ in empirical]),
        "empirical_std": np.array([std for _, std in empirical]),
    }


def _at(curves: dict[str, np.ndarray], name: str, ks: list[int]) -> dict[str, float]:
    return {str(k): float(curves[name][k - 1]) for k in ks}


def analyze_step(run: RunDir, step: int, split: str) -> dict:
    """Compute and write the overlap curves of one solved step; returns its summary fields."""
    started = time.perf_counter()
    eigenvalues, eigenvectors = read_eigenpairs(run, step, split)
    params = torch.from_numpy(ColumnStore(run.params).read(step)).double()
    curves = overlap_results(eigenvectors, params)
    with atomic_write(run.analysis_step(step, split)) as tmp, h5py.File(tmp, "w") as handle:
        for name, values in curves.items():
            handle.create_dataset(name, data=values)
        handle.create_dataset("eigenvalues", data=eigenvalues)
        handle.attrs.update(step=step, split=split, dimension=eigenvectors.shape[0])
    ks = reported_ks(eigenvectors.shape[1])
    empirical = dict(zip(curves["empirical_k"].tolist(), range(len(ks)), strict=True))
    fields = {
        "dimension": int(eigenvectors.shape[0]),
        "num_eigenpairs": int(eigenvectors.shape[1]),
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


def eigenspace_crystallization(run: RunDir, split: str, steps: list[int]) -> dict:
    """Grassmannian similarities of the top-``m`` eigenspaces between pairs of solved steps:
    ``{m: {reference: {"step_a", "step_b", metric arrays (n_pairs,), "random": {...}}}}``.
    """
    vectors = {step: read_eigenpairs(run, step, split)[1] for step in steps}
    dimension, num_eigenpairs = next(iter(vectors.values())).shape
    result = {}
    for m in crystallization_sizes(dimension, num_eigenpairs):
        random = _random_subspace_baseline(dimension, m)
        result[m] = {}
        for reference, pairs in step_pairs(steps).items():
            similarities = [
                grassmannian_similarities(vectors[a][:, :m], vectors[b][:, :m]) for a, b in pairs
            ]
            result[m][reference] = {
                "step_a": np.array([a for a, _ in pairs]),
                "step_b": np.array([b for _, b in pairs]),
                **_pair_metrics(similarities, GRASSMANNIAN_MAXIMA(m)),
                "random": random,
            }
    return result


def mask_crystallization(params: dict[int, torch.Tensor]) -> dict:
    """Grassmannian similarities of the magnitude masks of size ``ratio * D`` between pairs of
    recorded steps: ``{ratio: {reference: {...}}}`` as in :func:`eigenspace_crystallization`.
    """
    steps = sorted(params)
    dimension = next(iter(params.values())).numel()
    result = {}
    for ratio in SPARSITY_RATIOS:
        m = max(1, round(ratio * dimension))
        masks = {step: magnitude_mask(params[step], m) for step in steps}
        random = random_mask_similarities(dimension, m, NUM_RANDOM_MASK_PAIRS, BASELINE_SEED)
        result[ratio] = {}
        for reference, pairs in step_pairs(steps).items():
            similarities = [mask_grassmannian_similarities(masks[a], masks[b]) for a, b in pairs]
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


def write_results(
    run: RunDir, problem: str, analysed: dict[str, list[int]], unsolved: list
) -> None:
    """Rebuild ``analysis.h5`` from the per-step files and the cross-step metrics.

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
    store = ColumnStore(run.params)
    with atomic_write(run.analysis_results) as tmp, h5py.File(tmp, "w") as out:
        out.attrs.update(problem=problem, dimension=store.dim(), unsolved=json.dumps(unsolved))
        for split, steps in analysed.items():
            for step in steps:
                with h5py.File(run.analysis_step(step, split), "r") as source:
                    source.copy(source["/"], out, name=f"overlap/{split}/step_{step}")
            if len(steps) > 1:
                for m, data in eigenspace_crystallization(run, split, steps).items():
                    group = out.create_group(f"crystallization/eigenspaces/{split}/size_{m}")
                    group.attrs["size"] = m
                    _write_pairs(group, data)
        recorded = store.steps()
        if len(recorded) > 1:
            params = {step: torch.from_numpy(store.read(step)).double() for step in recorded}
            for ratio, data in mask_crystallization(params).items():
                group = out.create_group(f"crystallization/masks/ratio_{ratio}")
                group.attrs.update(ratio=ratio, size=max(1, round(ratio * store.dim())))
                _write_pairs(group, data)


def analyze(run: RunDir, items: list[tuple[int, str]] | None = None, report: bool = True) -> dict:
    """Analyse the solved steps among ``items`` (default: every step and split of the layout)
    that have no analysis yet, then (with ``report``) rebuild ``analysis.h5``, the figures
    and ``report.md``; the local runner defers that to one call after the last solve.

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
                fields = analyze_step(run, step, split)
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
                write_results(run, cfg.problem, analysed, unsolved)
                drawn = figures.draw_all(run.analysis_results, run.figures)
                write_report(run.analysis_results, drawn, run.report)
            events.write("report", path=str(run.report), unsolved=unsolved)
            log.info("analyze: report %s", run.report)
    return result
