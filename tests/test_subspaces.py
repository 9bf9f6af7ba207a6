"""Tests of the overlap and subspace metrics (``analysis/subspaces.py``).

Subspaces are built with known principal angles (rotations by ``phi`` in known planes, hidden
behind a random rotation of ``R^D`` and a random change of basis inside each subspace), so every
Grassmannian distance has a closed form to compare with, in float32 and float64. The mask
curves are checked against naive per-``k`` computations, the random baselines against
Monte-Carlo sampling, and the principal angles against scipy's independent implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from hessov.analysis.subspaces import (
    DISTANCE_NAMES,
    GRASSMANNIAN_MAXIMA,
    best_mask_overlap,
    best_mask_overlap_curve,
    boolean_mask,
    grassmannian_distances,
    grassmannian_similarities,
    magnitude_mask,
    mask_grassmannian_similarities,
    mask_iou,
    mask_overlap,
    mask_similarity,
    overlap_curve,
    principal_angles,
    random_baseline,
    random_mask_overlap,
    random_mask_overlap_curve,
    random_mask_similarities,
    random_subspace_similarities,
    sign_invariant_residuals,
    subspace_overlap,
    top_magnitude_eigenpairs,
)

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run on one thread: these tests decompose thousands of tiny matrices, and on a shared
    2-core machine a second thread makes each decomposition tens of times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random ``n x n`` orthogonal matrix (float64)."""
    return torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64)).Q


def _frames_with_angles(dimension: int, angles, dtype, seed: int = 0):
    """Orthonormal ``(D, k)`` frames whose principal angles are ``angles`` (``k`` of them).

    Column ``i`` of the second frame is ``cos(phi_i) q_i + sin(phi_i) q_(k+i)`` for the columns
    ``q`` of a random orthogonal matrix; each frame then gets a random ``k x k`` change of basis,
    which leaves its span (and so every metric) unchanged.
    """
    generator = torch.Generator().manual_seed(seed)
    angles = torch.as_tensor(angles, dtype=torch.float64)
    k = angles.numel()
    rotation = _orthogonal(dimension, generator)
    first = rotation[:, :k]
    second = first * torch.cos(angles) + rotation[:, k : 2 * k] * torch.sin(angles)
    first = first @ _orthogonal(k, generator)
    second = second @ _orthogonal(k, generator)
    return first.to(dtype), second.to(dtype)


def _coordinate_frame(mask_indices: torch.Tensor, dimension: int) -> torch.Tensor:
    """The one-hot ``(D, k)`` frame spanning the coordinates of a mask."""
    frame = torch.zeros(dimension, mask_indices.numel(), dtype=torch.float64)
    frame[mask_indices, torch.arange(mask_indices.numel())] = 1.0
    return frame


def _random_orthonormal(dimension: int, k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(dimension, k, generator=generator, dtype=torch.float64)
    return torch.linalg.qr(gaussian).Q


# --------------------------------------------------------------------------- masks


def test_magnitude_mask_ranks_by_magnitude_and_breaks_ties_by_lower_index():
    params = torch.tensor([1.0, -3.0, 3.0, 2.0, 3.0, -0.5])
    assert magnitude_mask(params, 3).tolist() == [1, 2, 4]
    assert magnitude_mask(params, 4).tolist() == [1, 2, 4, 3]
    assert magnitude_mask(torch.zeros(5), 2).tolist() == [0, 1]
    generator = torch.Generator().manual_seed(1)
    distinct = torch.randn(1000, generator=generator, dtype=torch.float32)
    expected = np.argsort(-np.abs(distinct.numpy()), kind="stable")[:37]
    assert magnitude_mask(distinct, 37).tolist() == expected.tolist()
    with pytest.raises(ValueError, match="NaN"):
        magnitude_mask(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="k must lie"):
        magnitude_mask(params, 7)


def test_boolean_mask_marks_exactly_the_indices():
    mask = boolean_mask(torch.tensor([4, 0, 2]), 6)
    assert mask.tolist() == [True, False, True, False, True, False]


def test_mask_overlap_equals_intersection_over_k_and_relates_to_iou():
    dimension, k = 40, 8
    generator = torch.Generator().manual_seed(2)
    for _ in range(20):
        mask_a = torch.randperm(dimension, generator=generator)[:k]
        mask_b = torch.randperm(dimension, generator=generator)[:k]
        shared = len(set(mask_a.tolist()) & set(mask_b.tolist()))
        frame_a = _coordinate_frame(mask_a, dimension)
        frame_b = _coordinate_frame(mask_b, dimension)
        overlap = mask_similarity(mask_a, mask_b)
        assert overlap == shared / k
        assert subspace_overlap(frame_a, frame_b) == pytest.approx(shared / k, abs=1e-15)
        # The mask overlap of the paper, with the "eigenvectors" being mask B's frame.
        assert mask_overlap(frame_b, mask_a) == pytest.approx(shared / k, abs=1e-15)
        union = len(set(mask_a.tolist()) | set(mask_b.tolist()))
        assert mask_iou(mask_a, mask_b) == pytest.approx(shared / union)
        assert mask_iou(mask_a, mask_b) == pytest.approx(overlap / (2.0 - overlap))
        # Coordinate subspaces meet at right angles or coincide: `shared` zero angles.
        theta = principal_angles(frame_a, frame_b)
        assert torch.sum(theta < 1e-12).item() == shared
        assert torch.sum(torch.abs(theta - math.pi / 2) < 1e-12).item() == k - shared
    with pytest.raises(ValueError, match="repeated"):
        mask_similarity(torch.tensor([1, 1]), torch.tensor([1, 2]))


def test_mask_similarity_of_unequal_masks_is_the_subspace_overlap():
    dimension = 12
    mask_a, mask_b = torch.tensor([0, 3, 5, 7, 9]), torch.tensor([3, 4, 9])
    expected = subspace_overlap(
        _coordinate_frame(mask_a, dimension), _coordinate_frame(mask_b, dimension)
    )
    assert mask_similarity(mask_a, mask_b) == pytest.approx(expected) == 2 / 3


# --------------------------------------------------------------------------- mask curves


@pytest.fixture(scope="module")
def eigenproblem():
    """A random orthonormal ``W`` (``D x K``) and parameters with ties, ``(D,)``."""
    dimension, num_eigenvectors = 400, 50
    generator = torch.Generator().manual_seed(3)
    eigenvectors = _random_orthonormal(dimension, num_eigenvectors, seed=3)
    # Parameters correlated with the first eigenvectors make the magnitude mask beat chance,
    # and rounding creates ties for the deterministic tie-break to resolve.
    params = eigenvectors[:, :5].sum(dim=1) + 0.05 * torch.randn(
        dimension, generator=generator, dtype=torch.float64
    )
    return eigenvectors, torch.round(params * 50) / 50


def test_overlap_curve_equals_naive_per_k_overlap(eigenproblem):
    eigenvectors, params = eigenproblem
    ks = list(range(1, eigenvectors.shape[1] + 1))
    curve = overlap_curve(eigenvectors, params, ks)
    naive = [mask_overlap(eigenvectors, magnitude_mask(params, k), k) for k in ks]
    np.testing.assert_allclose(curve.numpy(), naive, rtol=1e-12, atol=1e-15)
    # Unsorted, repeated sizes come back in the order asked.
    np.testing.assert_allclose(
        overlap_curve(eigenvectors, params, [30, 2, 30]).numpy(), [naive[29], naive[1], naive[29]]
    )
    assert curve[4].item() > 1.5 * random_baseline(5, eigenvectors.shape[0])


def test_mask_overlap_of_any_size_is_the_coordinate_subspace_overlap(eigenproblem):
    eigenvectors, params = eigenproblem
    dimension = eigenvectors.shape[0]
    for mask_size, k in [(10, 10), (4, 12), (12, 4)]:
        mask = magnitude_mask(params, mask_size)
        expected = subspace_overlap(_coordinate_frame(mask, dimension), eigenvectors[:, :k])
        assert mask_overlap(eigenvectors, mask, k) == pytest.approx(expected, rel=1e-12)
    assert mask_overlap(eigenvectors, mask) == mask_overlap(eigenvectors, mask, 12)


def test_best_mask_bounds_the_magnitude_mask_and_the_random_baseline(eigenproblem):
    eigenvectors, params = eigenproblem
    dimension = eigenvectors.shape[0]
    ks = list(range(1, eigenvectors.shape[1] + 1))
    best = best_mask_overlap_curve(eigenvectors, ks)
    magnitude = overlap_curve(eigenvectors, params, ks)
    for index, k in enumerate(ks):
        energies = (eigenvectors[:, :k] ** 2).sum(dim=1).numpy()
        naive_best = np.sort(energies)[::-1][:k].sum() / k
        assert best[index].item() == pytest.approx(naive_best, rel=1e-12)
        assert best[index].item() >= magnitude[index].item() - 1e-15
        assert best[index].item() >= random_baseline(k, dimension)
    assert best_mask_overlap(eigenvectors, 7) == pytest.approx(best[6].item(), rel=1e-15)


def test_random_mask_overlap_matches_k_over_d_and_the_exact_moments(eigenproblem):
    eigenvectors, _ = eigenproblem
    dimension = eigenvectors.shape[0]
    ks = [1, 10, 40]
    exact_mean, exact_std = random_mask_overlap_curve(eigenvectors, ks)
    np.testing.assert_allclose(exact_mean.numpy(), np.array(ks) / dimension, rtol=1e-12)
    num_masks = 3000
    for index, k in enumerate(ks):
        mean, std = random_mask_overlap(eigenvectors, k, num_masks=num_masks, seed=k)
        standard_error = exact_std[index].item() / math.sqrt(num_masks)
        assert abs(mean - k / dimension) < 5 * standard_error
        assert std == pytest.approx(exact_std[index].item(), rel=0.1)
    # A mask covering half of the rows: the finite-population correction shrinks the spread.
    half = _random_orthonormal(60, 30, seed=14)
    mean, std = random_mask_overlap(half, 30, num_masks=num_masks, seed=15)
    exact_mean, exact_std = random_mask_overlap_curve(half, [30])
    assert exact_mean.item() == pytest.approx(0.5, rel=1e-12)
    assert abs(mean - 0.5) < 5 * exact_std.item() / math.sqrt(num_masks)
    assert std == pytest.approx(exact_std.item(), rel=0.05)
    assert random_mask_overlap(eigenvectors, 10, 50, seed=9) == random_mask_overlap(
        eigenvectors, 10, 50, seed=9
    )


def test_curves_accept_float32_and_reject_sizes_beyond_k(eigenproblem):
    eigenvectors, params = eigenproblem
    single = overlap_curve(eigenvectors.float(), params.float(), [20])
    double = overlap_curve(eigenvectors, params, [20])
    assert single.dtype == torch.float64
    assert single.item() == pytest.approx(double.item(), rel=1e-5)
    with pytest.raises(ValueError, match="every k"):
        best_mask_overlap_curve(eigenvectors, [0, 51])


# --------------------------------------------------------------------------- Grassmannian


def _closed_forms(phi: float, k: int) -> dict[str, float]:
    """Every distance for ``k`` principal angles all equal to ``phi``."""
    return {
        "geodesic": phi * math.sqrt(k),
        "chordal_2": 2 * math.sin(phi / 2),
        "chordal_f": 2 * math.sin(phi / 2) * math.sqrt(k),
        "projection_2": math.sin(phi),
        "projection_f": math.sin(phi) * math.sqrt(k),
        "fubini_study": math.acos(math.cos(phi) ** k),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_subspaces_are_at_distance_zero(dtype):
    first, _ = _frames_with_angles(30, [0.0] * 4, dtype)
    other_basis = first @ _orthogonal(4, torch.Generator().manual_seed(5)).to(dtype)
    tolerance = TOLERANCE[dtype]
    theta = principal_angles(first, other_basis)
    assert theta.dtype == dtype and theta.shape == (4,)
    assert theta.abs().max().item() < tolerance
    for name, distance in grassmannian_distances(first, other_basis).items():
        assert abs(distance) < tolerance, name
    for name, similarity in grassmannian_similarities(first, other_basis).items():
        assert similarity == pytest.approx(1.0, abs=tolerance), name
    assert subspace_overlap(first, other_basis) == pytest.approx(1.0, abs=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonal_subspaces_are_at_the_maxima(dtype):
    k = 5
    first, second = _frames_with_angles(20, [math.pi / 2] * k, dtype)
    tolerance = TOLERANCE[dtype]
    maxima = GRASSMANNIAN_MAXIMA(k)
    distances = grassmannian_distances(first, second)
    assert set(distances) == set(DISTANCE_NAMES) == set(maxima)
    for name, distance in distances.items():
        assert distance == pytest.approx(maxima[name], abs=tolerance), name
    for name, similarity in grassmannian_similarities(first, second).items():
        assert 0.0 <= similarity < tolerance, name
    assert subspace_overlap(first, second) == pytest.approx(0.0, abs=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("phi", [1e-3, 0.3, 0.9, 1.4])
def test_subspaces_rotated_by_phi_match_the_closed_forms(dtype, phi):
    k = 3
    first, second = _frames_with_angles(25, [phi] * k, dtype, seed=7)
    tolerance = TOLERANCE[dtype]
    theta = principal_angles(first, second)
    np.testing.assert_allclose(theta.double().numpy(), [phi] * k, rtol=0, atol=tolerance)
    expected = _closed_forms(phi, k)
    distances = grassmannian_distances(first, second)
    for name in DISTANCE_NAMES:
        assert distances[name] == pytest.approx(expected[name], abs=tolerance), name
    similarities = grassmannian_similarities(first, second)
    maxima = GRASSMANNIAN_MAXIMA(k)
    for name in DISTANCE_NAMES:
        assert similarities[name] == pytest.approx(
            1 - expected[name] / maxima[name], abs=tolerance
        ), name
    assert similarities["overlap"] == pytest.approx(math.cos(phi) ** 2, abs=tolerance)
    assert subspace_overlap(first, second) == pytest.approx(math.cos(phi) ** 2, abs=tolerance)


def test_tiny_angles_keep_their_relative_accuracy():
    # arccos of the cosines alone would return about 1.5e-8 (or 0) here.
    angles = [1e-9, 2e-9, 0.5]
    first, second = _frames_with_angles(12, angles, torch.float64, seed=8)
    np.testing.assert_allclose(principal_angles(first, second).numpy(), angles, rtol=1e-6)
    fubini_study = grassmannian_distances(first, second)["fubini_study"]
    expected = math.acos(math.cos(0.5))  # the tiny angles change prod cos by ~1e-18
    assert fubini_study == pytest.approx(expected, rel=1e-12)
    tiny_first, tiny_second = _frames_with_angles(12, [1e-9, 1e-9], torch.float64, seed=8)
    assert grassmannian_distances(tiny_first, tiny_second)["fubini_study"] == pytest.approx(
        math.sqrt(2) * 1e-9, rel=1e-6
    )


def test_principal_angles_agree_with_scipy_for_unequal_dimensions():
    generator = torch.Generator().manual_seed(11)
    for k1, k2 in [(3, 7), (7, 3), (5, 5), (6, 10)]:
        first = torch.randn(15, k1, generator=generator, dtype=torch.float64)
        second = torch.randn(15, k2, generator=generator, dtype=torch.float64)
        theta = principal_angles(first, second, orthonormalize=True)
        expected = np.sort(scipy.linalg.subspace_angles(first.numpy(), second.numpy()))
        assert theta.shape == (min(k1, k2),)
        np.testing.assert_allclose(theta.numpy(), expected, atol=1e-12)
        orthonormal_first = torch.linalg.qr(first).Q
        orthonormal_second = torch.linalg.qr(second).Q
        overlap = subspace_overlap(orthonormal_first, orthonormal_second)
        assert overlap == pytest.approx(np.mean(np.cos(expected) ** 2), rel=1e-12)
        assert grassmannian_similarities(first, second, orthonormalize=True)[
            "overlap"
        ] == pytest.approx(overlap, rel=1e-12)
        # A non-orthonormal basis gives wrong angles unless orthonormalised first.
        assert subspace_overlap(first, second) != pytest.approx(overlap)


def test_mixed_precision_and_mismatched_shapes():
    first, second = _frames_with_angles(10, [0.2, 0.4], torch.float64)
    theta = principal_angles(first.float(), second)
    assert theta.dtype == torch.float64
    np.testing.assert_allclose(theta.numpy(), [0.2, 0.4], atol=1e-6)
    with pytest.raises(ValueError, match="rows"):
        principal_angles(first, second[:9])


# --------------------------------------------------------------------------- random subspaces


def _sampled_similarities(dimension: int, k: int, num_samples: int, seed: int):
    """Similarities between explicitly sampled random orthonormal frames, ``(n, metrics)``."""
    rows = []
    for sample in range(num_samples):
        first = _random_orthonormal(dimension, k, seed=2 * sample + seed)
        second = _random_orthonormal(dimension, k, seed=2 * sample + seed + 1)
        rows.append(grassmannian_similarities(first, second))
    return {name: np.array([row[name] for row in rows]) for name in rows[0]}


@pytest.mark.parametrize(("dimension", "k"), [(30, 4), (7, 5)])
def test_random_subspace_similarities_match_explicit_sampling(dimension, k):
    num_samples = 1000
    sampled = _sampled_similarities(dimension, k, num_samples, seed=100)
    means = random_subspace_similarities(dimension, k, num_samples, seed=4)
    assert set(means) == set(sampled)
    for name, values in sampled.items():
        standard_error = values.std() * math.sqrt(2.0 / num_samples)
        assert abs(means[name] - values.mean()) < 5 * standard_error + 1e-9, name
    if 2 * k <= dimension:
        assert means["overlap"] == pytest.approx(k / dimension, rel=0.05)


def test_random_subspace_overlap_is_k_over_d_at_scale():
    dimension, k = 10**7, 20
    means = random_subspace_similarities(dimension, k, num_samples=50, seed=6)
    assert means["overlap"] == pytest.approx(random_baseline(k, dimension), rel=0.05)
    # Random subspaces of R^(10^7) are nearly orthogonal.
    for name in DISTANCE_NAMES:
        assert 0.0 <= means[name] < 1e-3, name


# --------------------------------------------------------------------------- eigenvectors


def test_sign_invariant_residuals_ignore_column_signs():
    generator = torch.Generator().manual_seed(12)
    eigenvectors = _random_orthonormal(50, 6, seed=12)
    noise = 1e-3 * torch.randn(50, 6, generator=generator, dtype=torch.float64)
    perturbed = eigenvectors + noise
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    residuals = sign_invariant_residuals(eigenvectors, perturbed)
    np.testing.assert_allclose(residuals.numpy(), noise.norm(dim=0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(
        sign_invariant_residuals(eigenvectors * signs, perturbed).numpy(), residuals.numpy()
    )
    np.testing.assert_allclose(
        sign_invariant_residuals(eigenvectors, perturbed * signs).numpy(), residuals.numpy()
    )
    # A sign-sensitive residual of a flipped eigenvector is about 2, never small.
    assert (eigenvectors - eigenvectors * signs).norm(dim=0)[1].item() == pytest.approx(2.0)
    assert sign_invariant_residuals(eigenvectors, -eigenvectors).max().item() == 0.0


def test_top_magnitude_eigenpairs_of_an_indefinite_matrix():
    generator = torch.Generator().manual_seed(13)
    basis = _orthogonal(6, generator)
    spectrum = torch.tensor([-5.0, 1.0, 3.0, -0.5, 0.1, -2.0], dtype=torch.float64)
    matrix = basis @ torch.diag(spectrum) @ basis.T
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    top_values, top_vectors = top_magnitude_eigenpairs(eigenvalues, eigenvectors, 3)
    np.testing.assert_allclose(top_values.numpy(), [-5.0, 3.0, -2.0], atol=1e-12)
    expected = basis[:, [0, 2, 5]]
    assert sign_invariant_residuals(top_vectors, expected).max().item() < 1e-10
    # The last three columns of eigh (the paper's comparison) are a different subspace.
    assert grassmannian_similarities(eigenvectors[:, -3:], expected)["overlap"] < 0.9


def test_mask_similarities_equal_those_of_the_one_hot_frames():
    dimension = 50
    mask_a = torch.tensor([0, 3, 7, 9, 20, 33])
    mask_b = torch.tensor([3, 9, 21, 33, 40, 49])
    one_hot = torch.eye(dimension, dtype=torch.float64)
    expected = grassmannian_similarities(one_hot[:, mask_a], one_hot[:, mask_b])
    got = mask_grassmannian_similarities(mask_a, mask_b)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    assert got["overlap"] == pytest.approx(mask_similarity(mask_a, mask_b))


def test_random_mask_similarities_average_to_chance():
    chance = random_mask_similarities(1000, 100, num_samples=400, seed=3)
    assert chance["overlap"] == pytest.approx(100 / 1000, rel=0.05)
    identical = random_mask_similarities(100, 100, num_samples=3, seed=0)  # m = D: one mask
    assert all(value == pytest.approx(1.0) for value in identical.values())
