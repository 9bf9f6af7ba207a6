"""The sketch stages' Hessian operator (batched reverse-over-reverse autograd) against
curvlinops' ``HessianLinearOperator`` and against the dense Hessian from ``torch.func``.
"""

import pytest
import torch
from torch import nn

from hessov.batching import ModelLoss
from hessov.skerch_ext.ggn import AutogradGGN
from hessov.skerch_ext.operator import AutogradHessian
from oracles import as_matmat, ggn_operator, hessian_operator


def mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    inputs = torch.randn(40, 6, dtype=torch.float64)
    return model, nn.CrossEntropyLoss(), inputs, torch.randint(0, 3, (40,))


def conv_problem():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)
    ).double()
    inputs = torch.randn(24, 1, 6, 6, dtype=torch.float64)
    return model, nn.MSELoss(), inputs, torch.randn(24, 2, dtype=torch.float64)


def dense_hessian(model, loss_fn, inputs, targets) -> torch.Tensor:
    """``(D, D)`` Hessian of the mean loss, by ``torch.func.hessian`` on the flat parameters."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss_of(vector):
        chunks = vector.split([s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return loss_fn(torch.func.functional_call(model, params, (inputs,)), targets)

    return torch.func.hessian(loss_of)(flat)


@pytest.mark.parametrize("build", [mlp_problem, conv_problem])
@pytest.mark.parametrize("batch_size", [0, 7])  # one kept graph; several rebuilt batches
def test_autograd_products_equal_curvlinops_and_the_dense_hessian(build, batch_size):
    model, loss_fn, inputs, targets = build()
    model.eval()
    ours = AutogradHessian(model, loss_fn, inputs, targets, batch_size=batch_size)
    theirs = as_matmat(hessian_operator(model, loss_fn, inputs, targets, batch_size=batch_size))
    dense = dense_hessian(model, loss_fn, inputs, targets)
    block = torch.randn(
        ours.dim, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    product = ours.matmat(block)
    assert product.shape == (ours.dim, 5)
    torch.testing.assert_close(product, theirs(block), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(product, dense @ block, rtol=1e-10, atol=1e-12)
    # The kept graph gives the same products on every call, and as a fresh pass.
    torch.testing.assert_close(ours.matmat(block), product, rtol=0, atol=0)
    torch.testing.assert_close(ours.matmat(block, fresh=True), product, rtol=1e-12, atol=1e-14)


def test_autograd_operator_refuses_a_wrongly_shaped_block():
    model, loss_fn, inputs, targets = mlp_problem()
    ours = AutogradHessian(model, loss_fn, inputs, targets)
    with pytest.raises(ValueError, match=rf"expected a \({ours.dim}, b\) matrix"):
        ours.matmat(torch.zeros(ours.dim + 1, 2, dtype=torch.float64))


@pytest.mark.parametrize("build", [mlp_problem, conv_problem])
@pytest.mark.parametrize("batch_size", [0, 7])
def test_ggn_products_equal_curvlinops_and_are_positive_semidefinite(build, batch_size):
    """The GGN of cross-entropy and of the squared error, kept graph or rebuilt batches:
    curvlinops' products to float64 rounding, a symmetric PSD matrix, and not the Hessian.
    """
    model, loss_fn, inputs, targets = build()
    ours = AutogradGGN(model, loss_fn, inputs, targets, batch_size=batch_size)
    theirs = as_matmat(ggn_operator(model, loss_fn, inputs, targets, batch_size=batch_size))
    identity = torch.eye(ours.dim, dtype=torch.float64)
    dense = ours.matmat(identity)
    torch.testing.assert_close(dense, theirs(identity), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dense, dense.T, rtol=1e-10, atol=1e-12)
    scale = float(torch.linalg.matrix_norm(dense, 2))
    assert float(torch.linalg.eigvalsh(dense).min()) >= -1e-12 * scale
    hessian = dense_hessian(model, loss_fn, inputs, targets)
    assert torch.linalg.matrix_norm(hessian - dense) > 1e-6 * scale


def test_ggn_refuses_a_loss_of_the_model():
    model, _, inputs, targets = mlp_problem()
    loss = ModelLoss(lambda m, x, y: nn.functional.cross_entropy(m(x), y))
    with pytest.raises(ValueError, match="the GGN needs the loss as a function of the model"):
        AutogradGGN(model, loss, inputs, targets)
