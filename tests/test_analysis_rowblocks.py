"""Tests of the row-block path of the analysis (``analysis/rowblocks.py`` and the mask and
crystallization metrics of ``analysis/subspaces.py`` read from an HDF5 dataset).

A random orthonormal ``W`` (``D = 2,000``, ``K = 40``, from a QR) is written to HDF5 in float32
and float64 with the solve stage's layout (one chunk per column); every metric read from it in
blocks of ``K``, 137, 1,000 and ``D`` rows must equal the same metric on the tensor in memory
(one block) and a naive numpy computation. Then the whole analyze stage on a real run with a
7-row block must write what the default block wrote.

Tolerance ``ATOL = 1e-12``: each curve value is a sum of nonnegative float64 terms (squares
of entries ``|W_ij| <= 1``) whose total is at most ``k`` (``k`` unit columns), divided by
``k``. Row blocks only change the order of summation, and any order of ``n`` nonnegative terms
lands within ``n 2^-53`` of the exact sum, relative to it: with ``n <= D + K`` (``K`` columns
summed into each row energy, then ``D`` rows) that is ``2,040 * 1.1e-16 ~ 2.3e-13 < 1e-12``.
The angles come from ``K x K`` decompositions of matrices summed the same way (backward stable,
errors ~``K 2^-53``); the stage's distances reach ``pi/2 sqrt(K)``, so they get the same
bound relative to their size. Standard deviations are differences of such sums; they get
``1e-10`` relative on top of ``ATOL``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hessov.analysis.rowblocks import (
    BLOCK_COPIES,
    default_row_block,
    gather_rows,
)
from hessov.analysis.subspaces import (
    best_mask_overlap_curve,
    grassmannian_similarities,
    leading_grassmannian_similarities,
    leading_principal_angles,
    mask_overlap,
    mask_overlap_curves,
    overlap_curve,
    principal_angles,
    random_mask_overlap,
    random_mask_overlap_curve,
    random_mask_overlaps,
    random_masks,
)

D, K = 2000, 40
ROW_BLOCKS = [K, 137, 1000, D]
ATOL = 1e-12
KS = list(range(1, K + 1))
EMPIRICAL_KS = [1, 5, 10, 20, K]


def _orthonormal(seed: int, perturb: np.ndarray | None = None, scale: float = 0.0) -> np.ndarray:
    gaussian = np.random.default_rng(seed).standard_normal((D, K))
    return np.linalg.qr(gaussian if perturb is None else perturb + scale * gaussian)[0]


@pytest.fixture(scope="module", params=[np.float32, np.float64], ids=["float32", "float64"])
def stored(request, tmp_path_factory):
    """``(dataset, W, theta)``: W stored in HDF5 (open dataset), the same W as a float64
    tensor (what the dataset holds, rounded to its dtype), and parameters ``(D,)``.
    """
    frame = _orthonormal(0).astype(request.param)
    path = tmp_path_factory.mktemp("rowblocks") / f"W_{request.param.__name__}.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("eigenvectors", data=frame, chunks=(D, 1))
    theta = torch.from_numpy(np.random.default_rng(1).standard_normal(D))
    with h5py.File(path, "r") as handle:
        yield handle["eigenvectors"], torch.from_numpy(frame).double(), theta


def _naive_energies(W: torch.Tensor, k: int) -> np.ndarray:
    return np.sum(W.numpy()[:, :k] ** 2, axis=1)


@pytest.mark.parametrize("row_block", ROW_BLOCKS)
def test_magnitude_mask_overlap_curve_is_the_in_core_one(stored, row_block):
    dataset, W, theta = stored
    blocked = overlap_curve(dataset, theta, KS, row_block)
    np.testing.assert_allclose(blocked, overlap_curve(W, theta, KS, row_block=D), rtol=0, atol=ATOL)
    ranking = np.argsort(-np.abs(theta.numpy()), kind="stable")
    naive = [np.sum(W.numpy()[ranking[:k], :k] ** 2) / k for k in KS]
    np.testing.assert_allclose(blocked, naive, rtol=0, atol=ATOL)
    mask = torch.from_numpy(ranking[:7])
    assert mask_overlap(dataset, mask, 7, row_block) == pytest.approx(naive[6], abs=ATOL)


@pytest.mark.parametrize("row_block", ROW_BLOCKS)
def test_best_mask_overlap_curve_is_the_in_core_one(stored, row_block):
    dataset, W, _ = stored
    blocked = best_mask_overlap_curve(dataset, KS, row_block)
    np.testing.assert_allclose(blocked, best_mask_overlap_curve(W, KS, D), rtol=0, atol=ATOL)
    naive = [np.sort(_naive_energies(W, k))[-k:].sum() / k for k in KS]
    np.testing.assert_allclose(blocked, naive, rtol=0, atol=ATOL)
    # Unsorted, repeated sizes come back in the order asked.
    np.testing.assert_allclose(
        best_mask_overlap_curve(dataset, [30, 2, 30], row_block), [naive[29], naive[1], naive[29]]
    )


@pytest.mark.parametrize("row_block", ROW_BLOCKS)
def test_exact_random_mask_moments_are_the_in_core_ones(stored, row_block):
    dataset, W, _ = stored
    mean, std = random_mask_overlap_curve(dataset, KS, row_block)
    in_core_mean, in_core_std = random_mask_overlap_curve(W, KS, D)
    np.testing.assert_allclose(mean, in_core_mean, rtol=0, atol=ATOL)
    np.testing.assert_allclose(std, in_core_std, rtol=1e-10, atol=ATOL)
    for k in (1, 17, K):
        energies = _naive_energies(W, k)
        assert mean[k - 1].item() == pytest.approx(energies.mean(), abs=ATOL)
        spread = np.sqrt(k * energies.var() * (D - k) / (D - 1)) / k
        assert std[k - 1].item() == pytest.approx(spread, rel=1e-10, abs=ATOL)


@pytest.mark.parametrize("row_block", ROW_BLOCKS)
def test_empirical_random_masks_are_the_same_draws_and_overlaps(stored, row_block):
    dataset, W, _ = stored
    seeds = [100 + k for k in EMPIRICAL_KS]
    means, stds = random_mask_overlaps(dataset, EMPIRICAL_KS, 32, seeds, row_block)
    for index, (k, seed) in enumerate(zip(EMPIRICAL_KS, seeds, strict=True)):
        in_core = random_mask_overlap(W, k, 32, seed, row_block=D)
        assert (means[index].item(), stds[index].item()) == pytest.approx(in_core, abs=ATOL)
        # The draws: successive randperm(D)[:k] of a CPU generator seeded with the seed.
        generator = torch.Generator().manual_seed(seed)
        draws = [torch.randperm(D, generator=generator)[:k].numpy() for _ in range(32)]
        assert np.array_equal(random_masks(D, k, 32, seed).numpy(), np.stack(draws))
        overlaps = [_naive_energies(W, k)[draw].sum() / k for draw in draws]
        assert means[index].item() == pytest.approx(np.mean(overlaps), abs=ATOL)
        assert stds[index].item() == pytest.approx(np.std(overlaps, ddof=1), abs=ATOL)


@pytest.mark.parametrize("row_block", [137, D])
def test_one_pass_gives_each_curve_of_its_own_pass(stored, row_block):
    dataset, W, theta = stored
    seeds = [7 + k for k in EMPIRICAL_KS]
    curves = mask_overlap_curves(dataset, theta, KS, EMPIRICAL_KS, 32, seeds, row_block)
    expected = {
        "overlap": overlap_curve(W, theta, KS),
        "best_mask_overlap": best_mask_overlap_curve(W, KS),
        "random_mask": torch.stack(random_mask_overlap_curve(W, KS)),
        "empirical": torch.stack(random_mask_overlaps(W, EMPIRICAL_KS, 32, seeds)),
    }
    assert sorted(curves) == sorted(expected)
    for name, values in expected.items():
        got = curves[name] if isinstance(curves[name], torch.Tensor) else torch.stack(curves[name])
        np.testing.assert_allclose(got, values, rtol=1e-10, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("row_block", ROW_BLOCKS)
def test_leading_grassmannian_similarities_are_the_in_core_ones(stored, row_block):
    dataset, W, _ = stored
    # A slightly rotated W (angles ~1e-6: the sines branch) and an unrelated frame (cosines).
    close = _orthonormal(2, W.numpy(), 1e-6)
    far = _orthonormal(3)
    sizes = [5, 17, K]
    for other in (close, far):
        blocked = leading_grassmannian_similarities(dataset, other, sizes, row_block)
        angles = leading_principal_angles(dataset, other, sizes, row_block)
        for m in sizes:
            frame_b = torch.from_numpy(other[:, :m])
            expected = grassmannian_similarities(W[:, :m], frame_b)
            assert blocked[m] == pytest.approx(expected, abs=ATOL)
            theta = principal_angles(W[:, :m], frame_b)
            np.testing.assert_allclose(angles[m], theta, rtol=0, atol=ATOL)
    assert angles[K].max().item() > 1.0  # far: the cosine branch was taken
    close_angles = leading_principal_angles(dataset, close, [K], row_block)[K]
    assert close_angles.max().item() < 1e-3


def test_gather_rows_keeps_the_order_and_repeats_of_the_indices(stored):
    dataset, W, _ = stored
    indices = torch.tensor([1999, 3, 3, 0, 1000, 137, 136])
    for row_block in (1, 7, D):
        np.testing.assert_array_equal(gather_rows(dataset, indices, 9, row_block), W[indices, :9])


def test_default_row_block_fits_the_budget_and_holds_k_rows():
    budget = 256 * 2**20
    for num_columns in (1, 40, 1000, 20_000):
        rows = default_row_block(num_columns, budget)
        assert rows >= num_columns
        if rows > num_columns:
            assert BLOCK_COPIES * 8 * rows * num_columns <= budget
    assert default_row_block(1000, budget) == budget // (BLOCK_COPIES * 8 * 1000)


# --------------------------------------------------------------------------- the stage


def _close(reference, other, where: str) -> None:
    if isinstance(reference, dict):
        assert sorted(reference) == sorted(other), where
        for key in reference:
            if key != "wall_seconds":
                _close(reference[key], other[key], f"{where}.{key}")
    elif isinstance(reference, list):
        assert len(reference) == len(other), where
        for index, (a, b) in enumerate(zip(reference, other, strict=True)):
            _close(a, b, f"{where}[{index}]")
    elif isinstance(reference, float):
        assert other == pytest.approx(reference, rel=1e-12, abs=ATOL), where
    else:
        assert other == reference, where


def _same_results(reference: h5py.Group, other: h5py.Group) -> None:
    assert sorted(reference) == sorted(other), reference.name
    _close(dict(reference.attrs), dict(other.attrs), f"{reference.name} attrs")
    for name, item in reference.items():
        if isinstance(item, h5py.Group):
            _same_results(item, other[name])
        else:
            assert item.dtype == other[name].dtype, item.name
            np.testing.assert_allclose(other[name][()], item[()], rtol=1e-12, atol=ATOL)


def test_analyze_with_seven_row_blocks_writes_what_the_default_wrote(tiny_run, tmp_path):
    from hessov.rundir import RunDir
    from hessov.stages.analyze import analyze

    run = tmp_path / "blocked"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "analysis")
    shutil.rmtree(run / "summary/analyze")
    threads = torch.get_num_threads()
    try:
        # 7 rows: fewer than K = 30, so every merge across blocks is exercised.
        analyze(RunDir(run), row_block=7)
    finally:
        torch.set_num_threads(threads)
    with (
        h5py.File(Path(tiny_run) / "analysis/analysis.h5") as reference,
        h5py.File(run / "analysis/analysis.h5") as blocked,
    ):
        _same_results(reference, blocked)
        assert "crystallization/eigenspaces/train/size_30" in blocked
    summaries = sorted((Path(tiny_run) / "summary/analyze").rglob("*.json"))
    assert len(summaries) == 4
    for path in summaries:
        blocked_path = run / path.relative_to(tiny_run)
        _close(json.loads(path.read_text()), json.loads(blocked_path.read_text()), path.name)
