"""The scale benchmark's synthetic problem (bench/scale_operator.py): a loss whose Hessian is
exactly ``U diag(lam) U^T``, with ``U^T`` three rounds of block permutation, signs, one shared
random orthogonal ``b x b`` block ``Q`` and a transposition.

Checked at D = 2,048 = 64 x 32 in float64, densely: the rounds are the documented product
of sparse matrices, ``U`` is orthogonal, the dense Hessian that hessov's own operator gives
(the plug-in loaded and built as a run builds it, ``AutogradHessian`` on the Hessian subset,
``dense_matrix`` as the exhaustive stage computes it) equals ``U diag(lam) U^T``, and its
eigenvalues are the spectrum. Batched products fall back to loops over the columns only for
in-place operations and match the column-by-column ones; at D = 10^7 an eigenvector covers
nearly ``b^3`` coordinates. The plug-in passes hessov's checks and ``hessov plan`` accepts it.

Tolerances are bounds on float64 (and float32) rounding, not fitted to what is observed.
``u`` is the unit roundoff and ``gamma_n = n u / (1 - n u)`` (Higham, Accuracy and Stability
of Numerical Algorithms, 2nd ed., Lemma 3.1 and Section 3.5):

- ``Q`` itself: ``omega = ||Qh^T Qh - I||_F``, computed exactly (in rationals) for the stored
  float64 matrix ``Qh``, bounds the distance from ``Qh`` to its polar factor ``Q0``, an exactly
  orthogonal matrix (the singular values ``s`` of ``Qh`` have ``|s - 1| <= |s^2 - 1|``); the
  exact ``U`` is the one built with ``Q0``. Stored in float32, ``Qh`` moves by at most ``u
  ||Qh||_F <= u sqrt(b) (1 + omega)`` more: ``eps_Q = omega + u sqrt(b) (1 + omega)``.
- one round (signs and permutations are exact; the block product is a length-``b`` dot
  product per entry, ``|error| <= gamma_b |Qh|^T |y|``, so ``gamma_b ||Qh||_F ||y||`` in
  2-norm): relative 2-norm error ``rho = eps_Q + sqrt(b) (1 + eps_Q) gamma_b`` against the
  exact round; ``U^T x`` or ``U y``, three rounds: ``delta = (1 + rho)^3 - 1``;
- a Hessian column from hessov's operator (``U (c lam * (U^T v))``, with ``c`` the mean's
  gradient, ``N`` rounded terms ``1/N`` summed: within ``gamma_{N+1}`` of 1, then the
  products ``lam c`` and ``(lam c) * (U^T v)``): ``eps_col = ((1 + delta)^2 (1 + u)^2 (1 +
  gamma_{N+1}) - 1) max|lam|`` in 2-norm;
- a dense product of length-``D`` rows: ``gamma_D`` times the product of the rows' norms.

For D = 2,048 in float64 (``omega`` = 6.7e-15) that gives ``delta`` = 1.9e-13, so ``U U^T =
I`` within 6.1e-13 per entry, the dense Hessian within 9.9e-11 per entry of ``U diag(lam)
U^T`` (``max|lam|`` = 100), and its eigenvalues within 2.5e-9 of the spectrum (Weyl, with
the lower triangle that ``eigvalsh`` reads: ``||E||_2 <= sqrt(2) ||E||_F <= sqrt(2 D)
eps_col``, plus ``D u max|lam|`` for ``eigvalsh``'s own backward error). Observed here:
4e-15, 2e-14 and 4e-13.
"""

import math
import os
import sys
import warnings
from fractions import Fraction
from types import ModuleType

import numpy as np
import pytest
import torch

from conftest import REPO, run_hessov
from hessov import batching
from hessov.config import load_run_config
from hessov.problems import build_problem, plugins
from hessov.problems.checks import check_eval_deterministic
from hessov.recording import hessian_subsets
from hessov.skerch_ext.operator import AutogradHessian, dense_matrix, operator_checks
from hessov.training import to_device

PLUGIN = REPO / "bench" / "scale_operator.py"
DIM = 2048
HESSIAN_EXAMPLES = 20
U64, U32 = 2.0**-53, 2.0**-24


def gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u)


def orthogonality_defect(block: torch.Tensor) -> float:
    """``omega``: ``||Q^T Q - I||_F`` of the stored block, exactly (rationals), rounded up."""
    columns = [[Fraction(value) for value in column] for column in block.double().T.tolist()]
    total = Fraction(0)
    for i, left in enumerate(columns):
        for j in range(i, len(columns)):
            entry = sum(a * b for a, b in zip(left, columns[j], strict=True)) - (i == j)
            total += entry * entry * (1 if i == j else 2)
    return math.sqrt(total) * (1 + 4 * U64)


def block_error(b: int, u: float, eps_q: float) -> float:
    """``rho``: one round's relative 2-norm error against the exact orthogonal round."""
    return eps_q + math.sqrt(b) * (1 + eps_q) * gamma(b, u)


def transform_bound(b: int, u: float, eps_q: float) -> float:
    """``delta``: relative 2-norm error of ``U^T x`` or ``U y`` (module docstring)."""
    return (1 + block_error(b, u, eps_q)) ** 3 - 1


def column_bound(b: int, u: float, eps_q: float, lam_max: float, examples: int) -> float:
    """``eps_col``: 2-norm error of one Hessian column ``H e_j`` from hessov's operator."""
    delta = transform_bound(b, u, eps_q)
    return ((1 + delta) ** 2 * (1 + u) ** 2 * (1 + gamma(examples + 1, u)) - 1) * lam_max


def plugin(factory: str) -> tuple[ModuleType, object]:
    """The plug-in's module and factory, imported by hessov's plug-in machinery."""
    made = plugins.load_factory(f"{PLUGIN}:{factory}")
    return sys.modules[made.__module__], made


@pytest.fixture(scope="module")
def scale():
    return plugin("make_problem")[0]


@pytest.fixture(scope="module")
def built():
    """The plug-in ``problem_2048`` built and moved to float64 as a Hessian stage does, and
    hessov's operator on its train Hessian subset.
    """
    cfg = load_run_config(
        [
            f"problem={PLUGIN}:problem_{DIM}",
            "dtype=float64",
            f"NUM_HESSIAN_DATAPOINTS={HESSIAN_EXAMPLES}",
        ]
    )
    problem = build_problem(cfg)
    to_device(problem, "cpu", "float64")
    index = hessian_subsets(problem, cfg.NUM_HESSIAN_DATAPOINTS)["train"]
    inputs = batching.take(problem.train.inputs, index)
    targets = batching.take(problem.train.targets, index)
    operator = AutogradHessian(problem.model, problem.loss, inputs, targets)
    operator.check_deterministic(seed=cfg.RANDOM_SEED)
    return problem, operator


@pytest.fixture(scope="module")
def omega(built) -> float:
    return orthogonality_defect(built[0].model._block)


@pytest.fixture(scope="module")
def dense_u(built) -> torch.Tensor:
    """``U`` ``(D, D)``: row ``i`` of ``to_eigenbasis(I)`` is ``U^T e_i``."""
    model = built[0].model
    with torch.no_grad():
        return model.to_eigenbasis(torch.eye(DIM, dtype=torch.float64))


def dense_round(model, r: int) -> torch.Tensor:
    """Round ``r`` as a dense ``(D, D)`` float64 matrix, placed from the masters (no
    arithmetic): ``R[k n + i, p[i] b + j] = Q[j, k] s[i, j]``, i.e. ``T (I_n kron Q^T) S_r
    (P_r kron I_b)``.
    """
    n, b = model.num_blocks, model.block
    i = torch.arange(n)[:, None, None]
    j = torch.arange(b)[None, :, None]
    k = torch.arange(b)[None, None, :]
    signs = model._signs[r].double()
    matrix = torch.zeros(model.dim, model.dim, dtype=torch.float64)
    matrix[(k * n + i), (model._perms[r][i] * b + j)] = model._block[j, k] * signs[i, j]
    return matrix


def test_block_size_is_the_largest_divisor_up_to_64(scale):
    assert scale.block_size(10**7) == 64 and 10**7 // 64 == 156_250
    assert scale.block_size(4096) == scale.block_size(2048) == scale.block_size(64) == 64
    assert scale.block_size(1000) == 50 and scale.block_size(100) == 50
    assert scale.block_size(997) == 1 and scale.block_size(1) == 1  # 997 is prime
    with pytest.raises(ValueError, match="dim"):
        scale.block_size(0)


@pytest.mark.parametrize("dim", [256, 1000])
def test_the_rounds_are_the_documented_product(scale, dim):
    model = scale.StructuredQuadratic(dim, 10, seed=7).double()
    assert model.block == scale.block_size(dim) and model.num_blocks * model.block == dim
    x = torch.randn(dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = x
    for r in range(scale.ROUNDS):
        expected = dense_round(model, r) @ expected
    with torch.no_grad():
        got = model.to_eigenbasis(x.T).T
        back = model.from_eigenbasis(got.T).T
    # Both evaluate the same three rounds with the same stored Q: each is within (1 +
    # sqrt(b) (1 + omega) gamma_b)^3 - 1 of the exact product with it (the dense products
    # add exact zeros, so at most b rounded terms per entry, as in the block products).
    omega = orthogonality_defect(model._block)
    rounding = (1 + math.sqrt(model.block) * (1 + omega) * gamma(model.block, U64)) ** 3 - 1
    error = ((got - expected).norm(dim=0) / x.norm(dim=0)).max()
    assert error <= 2 * rounding
    # U U^T x = x: two transforms, each within delta of an exactly orthogonal one.
    delta = transform_bound(model.block, U64, omega)
    assert ((back - x).norm(dim=0) / x.norm(dim=0)).max() <= (1 + delta) ** 2 - 1


def test_u_is_orthogonal_to_float64_rounding(built, dense_u, omega):
    model = built[0].model
    assert (model.block, model.num_blocks) == (64, 32)
    assert omega <= 64 * gamma(64, U64)  # Householder QR: orthogonal to O(b^2 u)
    identity = torch.eye(DIM, dtype=torch.float64)
    delta = transform_bound(model.block, U64, omega)
    # Rows of dense_u are U's rows, each within delta of the exact one; rows of back are
    # U's columns (U e_i), each within delta too.
    tolerance = 2 * delta + delta**2 + gamma(DIM, U64) * (1 + delta) ** 2
    assert (dense_u @ dense_u.T - identity).abs().max() <= tolerance
    with torch.no_grad():
        back = model.from_eigenbasis(identity)
    assert (back @ back.T - identity).abs().max() <= tolerance
    assert (back - dense_u.T).abs().max() <= 2 * delta
    assert tolerance < 1e-12


def test_hessovs_dense_hessian_is_u_diag_lam_u_t_with_the_spectrum_as_eigenvalues(
    built, dense_u, omega, scale
):
    problem, operator = built
    model = problem.model
    assert operator.dim == problem.num_params == DIM
    hessian = dense_matrix(
        operator.matmat, DIM, block_size=128, dtype=torch.float64, device="cpu", progress=False
    )
    lam = torch.from_numpy(scale.spectrum(DIM))
    lam_max = float(lam.abs().max())
    delta = transform_bound(model.block, U64, omega)
    eps_col = column_bound(model.block, U64, omega, lam_max, HESSIAN_EXAMPLES)
    reference = dense_u @ torch.diag(lam) @ dense_u.T
    entry_tolerance = eps_col + (2 * delta + delta**2 + gamma(DIM + 1, U64) * (1 + delta) ** 2) * (
        lam_max
    )
    assert (hessian - reference).abs().max() <= entry_tolerance
    eigenvalues = torch.linalg.eigvalsh(hessian)
    eig_tolerance = math.sqrt(2 * DIM) * eps_col + DIM * U64 * lam_max
    assert (eigenvalues - lam.sort().values).abs().max() <= eig_tolerance
    assert entry_tolerance < 1.5e-10 and eig_tolerance < 3e-9


def test_the_eigenvectors_and_the_exact_product_agree_with_hessovs_operator(built, omega, scale):
    problem, operator = built
    model = problem.model
    lam = scale.spectrum(DIM)
    indices = [0, 1, 299, 300, 302, DIM - 1]
    vectors = model.eigenvectors(indices)
    assert vectors.shape == (DIM, len(indices))
    residual = operator.matmat(vectors) - vectors * torch.from_numpy(lam[indices])
    # ||H^ v^ - lam v^|| <= eps_col ||v^|| + ||(H - lam)(v^ - v)|| + the rounding of lam v^
    # and of the difference: eps_col (1 + delta) + 2 max|lam| delta + 2 u max|lam| (1 + delta).
    lam_max = float(np.abs(lam).max())
    delta = transform_bound(model.block, U64, omega)
    eps_col = column_bound(model.block, U64, omega, lam_max, HESSIAN_EXAMPLES)
    bound = (eps_col + 2 * U64 * lam_max) * (1 + delta) + 2 * lam_max * delta
    assert residual.norm(dim=0).max() <= bound
    probes = torch.randn(DIM, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    difference = (operator.matmat(probes) - model.hessian_matmat(probes)).norm(dim=0)
    # hessian_matmat is within ((1 + delta)^2 (1 + u) - 1) max|lam| < eps_col, the operator
    # within eps_col.
    assert (difference / probes.norm(dim=0)).max() <= 2 * eps_col


def test_float32_products_are_within_float32_rounding(scale):
    examples = 4
    problem = scale.make_problem(3, dim=DIM, num_large=50)
    inputs, targets = problem.train.inputs[:examples], problem.train.targets[:examples]
    operator = AutogradHessian(problem.model, problem.loss, inputs, targets)
    probes = torch.randn(DIM, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    products = operator.matmat(probes.float()).double()
    omega = orthogonality_defect(problem.model._block)
    exact = problem.model.double().hessian_matmat(probes)
    error = ((products - exact).norm(dim=0) / probes.norm(dim=0)).max()
    # The float32 column bound (the block rounded to float32 moves by u sqrt(b) (1 + omega)),
    # plus rounding the probes to float32 (u relative), plus the float64 reference's own.
    b = problem.model.block
    eps_q32 = omega + U32 * math.sqrt(b) * (1 + omega)
    bound = column_bound(b, U32, eps_q32, 100.0, examples) + U32 * 100.0
    assert error <= bound + column_bound(b, U64, omega, 100.0, examples)
    assert error > 1e-9  # it did run in float32


def test_batched_products_fall_back_only_in_place_and_match_single_columns(scale):
    """Legacy vmap has no batching rule for index operations: the permutations and signs
    run in place, whose fallback loops over the columns without stacking new tensors; the
    block products have a batching rule (bmm).
    """
    problem = scale.make_problem(1, dim=4096, num_large=30)
    data = problem.train
    operator = AutogradHessian(problem.model, problem.loss, data.inputs[:4], data.targets[:4])
    probes = torch.randn(4096, 4, generator=torch.Generator().manual_seed(5))
    enabled = torch._C._debug_only_are_vmap_fallback_warnings_enabled()
    torch._C._debug_only_display_vmap_fallback_warnings(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            block = operator.matmat(probes)
    finally:
        torch._C._debug_only_display_vmap_fallback_warnings(enabled)
    fallbacks = {
        str(w.message).split("batching rule for ")[1].split(".")[0]
        for w in caught
        if "batching rule for " in str(w.message)
    }
    assert fallbacks == {"aten::index_copy_", "aten::mul_"}
    # Each column, alone or in the block, is within eps_col (float32) of the exact product.
    omega = orthogonality_defect(problem.model._block)
    eps_col = column_bound(64, U32, omega + U32 * 8 * (1 + omega), 100.0, 4)
    for j in range(4):
        single = operator.matmat(probes[:, j : j + 1])[:, 0]
        assert (block[:, j] - single).norm() <= 2 * eps_col * probes[:, j].norm()


def test_eigenvectors_at_the_scale_size_cover_nearly_b_cubed_coordinates(scale):
    model = scale.StructuredQuadratic(scale.SCALE_DIM, scale.NUM_LARGE, seed=0)
    assert (model.block, model.num_blocks) == (64, 156_250)
    vectors = model.eigenvectors([0, 5_000_000])
    support = (vectors != 0).sum(dim=0)
    # At most b^3 (three levels of b blocks of b), less where second-round blocks that feed
    # one third-round block share first-round blocks (about 1% at D = 10^7).
    assert (support <= 64**3).all() and (support >= 0.95 * 64**3).all()
    # Unit vectors, to float32 rounding: within delta of an exactly orthogonal U's columns.
    omega = orthogonality_defect(model._block)
    delta = transform_bound(64, U32, omega + U32 * 8 * (1 + omega))
    assert ((vectors.double().norm(dim=0) - 1).abs() <= delta).all()


def test_the_loss_is_the_quadratic_whatever_the_examples(scale):
    problem = scale.make_problem(5, dim=256, num_large=20)
    model = problem.model.double()
    dense = model.to_eigenbasis(torch.eye(256, dtype=torch.float64)).detach()  # U
    theta = model.theta.detach()
    quadratic = 0.5 * float(
        (torch.from_numpy(scale.spectrum(256, 20)) * (dense.T @ theta) ** 2).sum()
    )
    for stop in (1, 7, len(problem.train)):
        inputs = problem.train.inputs[:stop].double()
        loss = batching.batch_loss(model, problem.loss, inputs, problem.train.targets[:stop])
        assert loss.shape == () and loss.item() == pytest.approx(quadratic, rel=1e-12)
    output = model(problem.train.inputs[:5].double())
    assert output.shape == (5,) and output.stride() == (0,)  # no (N, D) tensor


def test_the_spectrum_has_a_large_block_then_an_indefinite_tail(scale):
    lam = scale.spectrum(10_000, 300)
    assert lam.dtype == np.float64 and lam.shape == (10_000,)
    assert lam[0] == 100.0 and lam[299] == pytest.approx(100 * 0.98**299)
    assert np.all(np.diff(lam[:300]) < 0)
    tail = lam[300:]
    assert np.abs(tail).max() == pytest.approx(0.2 * lam[299])
    assert np.all(np.abs(tail) < lam[299] / 4.9)
    assert np.all(tail[2::3] < 0) and np.all(tail[0::3] > 0) and np.all(tail[1::3] > 0)
    assert len(np.unique(np.abs(lam))) == len(lam)  # simple eigenvalues
    # |tail_j| decreases with j: by magnitude the order is the index order.
    np.testing.assert_array_equal(scale.top_eigenvalues(10_000, 310), lam[:310])
    positive_tail = tail[tail > 0][:10]
    np.testing.assert_array_equal(
        scale.top_eigenvalues(10_000, 310, order="value"),
        np.concatenate([lam[:300], positive_tail]),
    )
    assert scale.top_eigenvalues(10_000, 10_000, order="value")[-1] == tail.min()
    assert scale.spectrum(5, 0)[0] == pytest.approx(20.0)
    with pytest.raises(ValueError, match="num_large"):
        scale.spectrum(10, 11)


def test_the_factories_and_their_options(scale):
    module, small = plugin("small_problem")
    small_model = small(0).model
    assert small_model.dim == scale.SMALL_DIM == 4096 and small_model.block == 64
    sized = plugin("problem_1000_7")[1](0)
    assert sized.num_params == 1000 and sized.model.num_large == 7
    assert (sized.model.block, sized.model.num_blocks) == (50, 20)  # 1,000 = 20 x 50
    assert plugin("problem_100")[1](0).model.num_large == 100  # min(300, D)
    assert module.scale_problem.__name__ == "scale_problem" and scale.SCALE_DIM == 10_000_000
    with pytest.raises(AttributeError):
        module.problem_x  # noqa: B018 (the attribute access is the test)
    first, again, other = (scale.make_problem(s, dim=64, num_large=8) for s in (0, 0, 1))
    x = torch.randn(2, 64)
    assert torch.equal(first.model.theta, again.model.theta)
    assert torch.equal(first.model.to_eigenbasis(x), again.model.to_eigenbasis(x))
    assert not torch.equal(first.model.to_eigenbasis(x), other.model.to_eigenbasis(x))
    assert not list(first.model.buffers())  # nothing for hessov to record at every step


def test_the_plugin_passes_hessovs_checks(scale):
    cfg = load_run_config([f"problem={PLUGIN}:small_problem"])  # NUM_HESSIAN_DATAPOINTS=500
    problem = build_problem(cfg)
    assert problem.loss.reduction == "mean" and problem.num_classes == 0
    assert problem.name == f"{PLUGIN}:small_problem"
    check_eval_deterministic(problem.model, problem.train.inputs)
    subsets = hessian_subsets(problem, cfg.NUM_HESSIAN_DATAPOINTS)
    assert all(len(index) == 500 for index in subsets.values())
    data = problem.train
    operator = AutogradHessian(problem.model, problem.loss, data.inputs[:8], data.targets[:8])
    report = operator_checks(operator.matmat, operator.dim, dtype=torch.float32, device="cpu")
    assert report.finite and report.symmetry_rel_diff < 1e-4


@pytest.mark.parametrize(("factory", "dim"), [("small_problem", 4096), ("problem_2048_50", 2048)])
def test_hessov_plan_accepts_the_plugin(factory, dim, tmp_path):
    result = run_hessov(
        "plan", f"problem=bench/scale_operator.py:{factory}", f"OUTPUT_DIR={tmp_path}"
    )
    assert result.returncode == 0
    assert f"dim {dim}" in result.stdout.splitlines()


def test_disk_bandwidth_writes_reads_and_deletes(scale, tmp_path):
    measured = scale.disk_bandwidth(tmp_path, 3 * 2**20 + 5)
    assert measured["size_bytes"] == 3 * 2**20 + 5
    assert measured["write_bytes_per_s"] > 0 and measured["read_bytes_per_s"] > 0
    assert measured["cache_dropped"] is hasattr(os, "posix_fadvise")
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="size_bytes"):
        scale.disk_bandwidth(tmp_path, 0)
