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
