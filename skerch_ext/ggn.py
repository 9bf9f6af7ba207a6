"""The generalised Gauss-Newton matrix as a matrix-free operator, batched over columns.

For a loss ``L(f(x; theta), y)`` of the network's outputs ``f`` ``(N, C)``, the generalised
Gauss-Newton (GGN) matrix is ``G = J^T (d^2 L / d f^2) J`` ``(D, D)``, ``J = df/dtheta``
(Schraudolph 2002, "Fast curvature matrix-vector products for second-order gradient
descent"; Martens 2020, "New insights and perspectives on the natural gradient method").
It drops from the Hessian the term of the network's own second derivatives weighted by the
loss gradient, so for a convex loss (cross-entropy, squared error) it is positive
semi-definite: every eigenvalue ``>= 0``.

:class:`AutogradGGN` computes ``G @ M`` for ``M`` ``(D, b)`` with plain ``torch.autograd``, as
:class:`~hessov.skerch_ext.operator.AutogradHessian` does for ``H`` (and with its data
batching, weights, kept graph and checks), in three batched passes over one graph: ``J M`` by
differentiating ``J^T u`` with respect to a dual ``u`` (the double-backward trick, no
forward mode), ``(d^2 L / d f^2) (J M)`` by a second backward pass of the loss through the
outputs only, and ``J^T (...)`` by a backward pass to the parameters. curvlinops'
``GGNLinearOperator`` (Dangel et al., curvlinops 3.0.1) is its reference in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hessov import batching
from hessov.skerch_ext.operator import AutogradHessian, parameter_rows


@dataclass
class OutputGraph:
    """One data batch's graph for GGN products.

    Attributes:
        outputs: the network's outputs ``f`` ``(N, ...)``.
        dual: ``u``, zeros shaped like ``outputs`` with ``requires_grad``.
        transposed: ``J^T u``, one tensor per parameter (``None``: not reached), with graph.
        loss_gradient: ``dL/df`` ``(N, ...)`` with graph.
    """

    outputs: torch.Tensor
    dual: torch.Tensor
    transposed: list[torch.Tensor | None]
    loss_gradient: torch.Tensor


class AutogradGGN(AutogradHessian):
    """``G @ M`` for the GGN ``(D, D)`` of the mean of ``loss_fn(model(inputs), targets)``
    w.r.t. ``model``'s trainable parameters (module docstring). The model must return one
    tensor of outputs, and the loss must be a function of them (not a
    :class:`hessov.batching.ModelLoss`).

    Raises:
        ValueError: a :class:`~hessov.batching.ModelLoss`, or outputs that are not a tensor.
    """

    def __init__(self, model, loss_fn, inputs, targets, *, batch_size: int = 0):
        if isinstance(loss_fn, batching.ModelLoss):
            raise ValueError(
                "the GGN needs the loss as a function of the model's outputs, not a ModelLoss"
            )
        super().__init__(model, loss_fn, inputs, targets, batch_size=batch_size)

    def gradient_graph(self, inputs, targets) -> OutputGraph:
        """The batch's outputs, ``J^T u`` and ``dL/df``, each with its graph."""
        with torch.enable_grad():
            outputs = batching.call_model(self.model, inputs)
            if not isinstance(outputs, torch.Tensor):
                raise ValueError(f"the GGN needs one tensor of outputs, got {type(outputs)}")
            dual = torch.zeros_like(outputs, requires_grad=True)
            transposed = torch.autograd.grad(
                outputs, self.params, grad_outputs=dual, create_graph=True, allow_unused=True
            )
            loss = self.loss_fn(outputs, targets)
            (loss_gradient,) = torch.autograd.grad(loss, outputs, create_graph=True)
        return OutputGraph(outputs, dual, list(transposed), loss_gradient)

    def batch_products(self, graph: OutputGraph, columns: list[torch.Tensor], keep: bool):
        """``(b, D)``: the rows of ``(G_batch M)^T``, ``columns`` the rows of ``M^T`` shaped
        like the parameters, ``(b, *shape)`` each.
        """
        reached = [i for i, t in enumerate(graph.transposed) if t is not None and t.requires_grad]
        (jacobian_products,) = torch.autograd.grad(
            [graph.transposed[i] for i in reached],
            graph.dual,
            grad_outputs=[columns[i] for i in reached],
            retain_graph=True,
            is_grads_batched=True,
        )
        curved = torch.zeros_like(jacobian_products)
        if graph.loss_gradient.requires_grad:  # a loss linear in the outputs has none
            (curved,) = torch.autograd.grad(
                graph.loss_gradient,
                graph.outputs,
                grad_outputs=jacobian_products,
                retain_graph=True,
                is_grads_batched=True,
            )
        products = torch.autograd.grad(
            graph.outputs,
            self.params,
            grad_outputs=curved,
            retain_graph=keep,
            is_grads_batched=True,
            allow_unused=True,
        )
        return parameter_rows(products, columns)
