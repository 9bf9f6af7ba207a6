"""`import hessov`: one import name for the user's environment, its public names, top-k
eigenpairs in process against the exact ones, and a run's results as arrays.
"""

import re
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import hessov
from conftest import REPO

#: The repository's package folders and the import names they install as.
FOLDERS = {"pipeline": "hessov", "skerch_ext": "hessov.skerch_ext", "analysis": "hessov.analysis"}


def test_every_package_folder_installs_under_hessov():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    expected = set()
    for folder, name in FOLDERS.items():
        assert config["package-dir"][name] == folder
        for init in (REPO / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / folder).parts
            expected.add(".".join([name, *parts]))
    assert set(config["packages"]) == expected
    assert config["packages"] and not any(
        re.match(r"(pipeline|skerch_ext|analysis)\b", package) for package in config["packages"]
    )


def test_public_names_resolve():
    for name in hessov.__all__:
        assert getattr(hessov, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        hessov.nosuch  # noqa: B018 (the attribute access is the test)


def test_top_eigenpairs_of_a_least_squares_model_match_the_exact_ones():
    """A linear model under mean squared error has the Hessian ``2 X^T X / N``; its features'
    scales decay as 0.8^i, so 2k = 40 HVPs resolve the top 5 eigenvalues to well below 1e-6
    (measured: 8e-9). The sketch's Rayleigh-Ritz values never exceed the exact ones.
    """
    torch.manual_seed(0)
    dim, points = 60, 400
    model = torch.nn.Linear(dim, 1, bias=False).double()
    inputs = torch.randn(points, dim, dtype=torch.float64) * 0.8 ** torch.arange(dim)
    targets = torch.randn(points, 1, dtype=torch.float64)
    exact = torch.linalg.eigh(2 * inputs.T @ inputs / points)
    model.train()
    result = hessov.top_eigenpairs(model, torch.nn.MSELoss(), (inputs, targets), k=20)
    assert model.training  # put back in its mode
    assert result.eigenvectors.shape == (dim, 20) and result.hvps == 40
    top = exact.eigenvalues.flip(0)[:5].numpy()
    assert np.allclose(result.eigenvalues[:5], top, rtol=1e-6, atol=0)
    overlap = abs(result.eigenvectors[:, 0] @ exact.eigenvectors[:, -1].numpy())
    assert overlap > 1 - 1e-6
    assert 0 < result.apost_rel_err < 1e-2
    # The top pairs are resolved, and each bound holds.
    resolved = np.isfinite(result.error_bounds)
    assert resolved[:3].all()
    errors = np.abs(result.eigenvalues - exact.eigenvalues.flip(0)[:20].numpy())
    assert (errors[resolved] <= result.error_bounds[resolved]).all()


def test_more_rounds_tighten_the_bounds_and_the_eigenvalues():
    """Least squares whose Hessian ``2 X^T X / N`` has the eigenvalues ``1/i`` (D = 300, the
    noisy quadratic's spectrum; ``X = sqrt(D / 2) diag(1/sqrt(i)) R^T`` for a random rotation
    ``R``): two rounds of k = 15 leave the top 5 at percent-level error and unresolved; four
    rounds resolve them, every bound holding, with errors 100x smaller.
    """
    torch.manual_seed(0)
    dim = 300
    rotation = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64)).Q
    scales = torch.arange(1, dim + 1, dtype=torch.float64).rsqrt()
    inputs = (dim / 2) ** 0.5 * scales[:, None] * rotation.T
    targets = torch.zeros(dim, 1, dtype=torch.float64)
    model = torch.nn.Linear(dim, 1, bias=False).double()
    exact = 1.0 / np.arange(1, 6)
    errors, bounds = [], []
    for rounds in (2, 4):
        result = hessov.top_eigenpairs(
            model, torch.nn.MSELoss(), (inputs, targets), k=15, rounds=rounds
        )
        assert result.hvps == rounds * 15
        error = np.abs(result.eigenvalues[:5] - exact)
        finite = np.isfinite(result.error_bounds[:5])
        assert (error[finite] <= result.error_bounds[:5][finite]).all()
        errors.append(error.max())
        bounds.append(result.error_bounds[:5].max())
    assert errors[0] > 5e-3 and errors[1] < errors[0] / 100
    assert np.isinf(bounds[0]) and bounds[1] < 1e-3
    with pytest.raises(ValueError, match="rounds"):
        hessov.top_eigenpairs(model, torch.nn.MSELoss(), (inputs, targets), k=5, rounds=1)


def test_load_reads_a_runs_results(tiny_run):
    results = hessov.load(tiny_run)
    assert results.steps == [100, 300]
    assert (300, "train") in results.solved()
    eigen = results.eigen(300, "train")
    with h5py.File(Path(tiny_run) / "eigen" / "step_300_train.h5") as handle:
        assert np.array_equal(eigen.eigenvalues, handle["eigenvalues"][:])
        assert np.array_equal(eigen.eigenvectors, handle["eigenvectors"][:])
    assert eigen.recovery == "two_pass" and eigen.apost_rel_err > 0
    assert eigen.error_bounds.shape == eigen.eigenvalues.shape and np.isfinite(
        eigen.error_bounds[0]
    )
    assert results.params(300).shape == (eigen.eigenvectors.shape[0],)
    assert sum(np.prod(p["shape"]) for p in results.parameter_layout()) == results.params(300).size
    assert "solve" in results.summary()
    overlap = hessov.subspace_overlap(
        torch.from_numpy(eigen.eigenvectors[:, :5]).double(),
        torch.from_numpy(results.eigen(300, "test").eigenvectors[:, :5]).double(),
    )
    assert 0 < overlap <= 1 + 1e-12


def test_load_refuses_what_is_not_a_run(tmp_path):
    from hessov.errors import MissingInputError

    with pytest.raises(MissingInputError, match="not a hessov run"):
        hessov.load(tmp_path)
