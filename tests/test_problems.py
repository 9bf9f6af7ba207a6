"""Problem registry: parameter counts, networks from DeepOBS, exact Hessians."""

import sys

import pytest
import torch

from hessov.config import load_run_config
from hessov.problems import build_problem
from hessov.problems.networks import (
    MnistMiniMLP,
    deepobs_modules,
    eos_convolutional,
    eos_fully_connected,
)


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_paper():
    modules = deepobs_modules()
    assert count(MnistMiniMLP()) == 7030
    assert count(modules.net_cifar10_3c3d(10)) == 895_210
    assert count(modules.net_cifar100_allcnnc()) == 1_387_108
    assert count(eos_fully_connected("tanh", (3, 32, 32))) == 656_810
    assert count(eos_convolutional("relu", (3, 32, 32))) == 30_634


def test_deepobs_networks_load_without_tensorflow_or_torchvision():
    deepobs_modules()
    assert "tensorflow" not in sys.modules
    assert "torchvision" not in sys.modules
    assert "deepobs" not in sys.modules  # the package __init__ never ran


@pytest.mark.parametrize(
    "name", ["mnist_mini", "mnist_logreg", "fc-tanh", "cnn-relu", "nqm", "quadratic_deep"]
)
def test_embedded_problems_build_and_run_forward(name):
    cfg = load_run_config([f"problem={name}"])
    problem = build_problem(cfg)
    out = problem.model(problem.train.inputs[:8])
    loss = problem.loss(out, problem.train.targets[:8])
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_same_seed_same_initial_parameters():
    cfg = load_run_config(["problem=mnist_mini"])
    first = torch.cat([p.flatten() for p in build_problem(cfg).model.parameters()])
    second = torch.cat([p.flatten() for p in build_problem(cfg).model.parameters()])
    other = load_run_config(["problem=mnist_mini", "RANDOM_SEED=1"])
    third = torch.cat([p.flatten() for p in build_problem(other).model.parameters()])
    assert torch.equal(first, second) and not torch.equal(first, third)


def test_mnist_mini_uses_16x16_digits():
    problem = build_problem(load_run_config(["problem=mnist_mini"]))
    assert problem.train.inputs.shape == (4000, 1, 16, 16)
    assert "not full MNIST" in problem.data_note


def test_eos_features_are_standardized_on_the_training_split():
    problem = build_problem(load_run_config(["problem=fc-tanh"]))
    flat = problem.train.inputs.flatten(1)
    varying = flat.std(dim=0) > 0
    assert torch.allclose(flat.mean(dim=0), torch.zeros(flat.shape[1]), atol=1e-4)
    assert torch.allclose(flat.std(dim=0)[varying], torch.ones(int(varying.sum())), atol=1e-3)
    assert torch.isfinite(problem.test.inputs).all()


def hessian_of(problem, count_points=64):
    model = problem.model.double()
    x = problem.train.inputs[:count_points].double()
    y = problem.train.targets[:count_points]
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def loss(*flat):
        out = torch.func.functional_call(model, dict(zip(names, flat, strict=True)), (x,))
        return problem.loss(out, y)

    return torch.autograd.functional.hessian(loss, tuple(params))


def test_nqm_problem_has_exact_diagonal_hessian():
    problem = build_problem(load_run_config(["problem=nqm", "nqm_dim=20"]))
    hessian = hessian_of(problem)[0][0]
    expected = torch.diag(1.0 / torch.arange(1, 21, dtype=torch.float64))
    assert torch.allclose(hessian, expected, atol=1e-12)
    assert torch.allclose(problem.exact_hessian.double(), expected, atol=1e-7)


def test_quadratic_deep_hessian_has_the_deepobs_spectrum():
    problem = build_problem(load_run_config(["problem=quadratic_deep"]))
    hessian = hessian_of(problem)[0][0]
    assert torch.allclose(hessian, problem.exact_hessian.double(), atol=1e-4)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert int((eigenvalues > 30).sum()) == 10 and float(eigenvalues.min()) > 0
