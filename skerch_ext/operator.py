"""The loss Hessian as a matrix-free operator, and checks that it is safe to sketch.

:class:`AutogradHessian` computes ``H @ M`` for an ``(D, b)`` matrix ``M``, the Hessian of
the mean loss over a fixed data subset, by reverse-over-reverse automatic differentiation
batched over the ``b`` columns (``torch.autograd.grad`` with ``is_grads_batched``). When the
data is one batch, the graph of the gradient is built once and every block only runs its
second backward pass: no forward pass and no first backward pass per block, and the fewest
operations per column of the implementations measured in bench/RESULTS.md (question 1),
among them curvlinops' ``HessianLinearOperator`` (Dangel et al., curvlinops 3.0.1), which
the tests check it against (``tests/oracles.py``). It uses plain ``torch.autograd`` only,
so a process that multiplies with it never imports ``torch._dynamo`` (``torch.func``'s
transforms import it on their first call, about 1.7 s per process on 2 cores). Every stage
that multiplies with the Hessian uses it: the sketch stages on the recorded parameters, and
the replay stage on the live model, building a new operator at every recomputation of the
eigenpairs because the optimizer changes the parameters in between.

Its memory grows with ``b``: ``block_size`` bounds it. Sketching assumes ``H`` is a
fixed symmetric matrix: the same product every time it is applied (a random augmentation
or dropout in train mode would break that, and with it every a-posteriori bound) and
finite. :meth:`AutogradHessian.check_deterministic` and :func:`operator_checks` measure
exactly that: two independent passes over the data must agree, ``v^T H w`` must equal
``w^T H v``, products must be finite; the latter also times one Hessian-vector product.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from hessov import batching

#: ``matmat(M) = H M`` for ``M`` of shape ``(D, b)``: how every part of skerch_ext takes an
#: operator (:meth:`AutogradHessian.matmat`, a dense matrix's ``__matmul__``, ...).
MatMat = Callable[[torch.Tensor], torch.Tensor]

#: What makes an eval-mode forward pass random, and the fix: in every determinism error.
RANDOM_IN_EVAL_HINT = (
    "the model's forward pass is random in eval mode. Likely cause: a random operation that "
    "ignores model.eval(), e.g. torch.nn.functional.dropout(x, training=True) or torch.rand "
    "in forward(); use nn.Dropout modules or pass training=self.training"
)


def data_batches(
    inputs: batching.Inputs, targets: torch.Tensor, batch_size: int
) -> list[tuple[batching.Inputs, torch.Tensor]]:
    """Split ``inputs`` (``N`` examples: a tensor, tuple or dict, :mod:`hessov.batching`) and
    ``targets`` ``(N, ...)`` into physical batches of at most ``batch_size`` examples
    (0 = one batch), in order.
    """
    total = batching.num_examples(inputs)
    size = batch_size if 0 < batch_size < total else total
    return list(zip(batching.chunks(inputs, size), batching.chunks(targets, size), strict=True))


def parameter_rows(products, columns: list[torch.Tensor]) -> torch.Tensor:
    """``(b, D)``: per-parameter products ``(b, *shape)`` (``None``: zero, a parameter the
    product does not reach) side by side, in ``D``'s order; ``columns`` give the shapes.
    """
    return torch.cat(
        [
            torch.zeros_like(c).flatten(1) if p is None else p.flatten(1)
            for p, c in zip(products, columns, strict=True)
        ],
        dim=1,
    )


class AutogradHessian:
    """``H @ M`` for the Hessian ``(D, D)`` of the mean of ``loss_fn`` over ``inputs`` w.r.t.
    all of ``model``'s trainable parameters (``requires_grad``, in ``model.parameters()``
    order), by batched reverse-over-reverse differentiation (see the module docstring).

    ``inputs`` are what the model is called with (a tensor, tuple or dict of tensors,
    examples first: :mod:`hessov.batching`). The model is put in eval mode: the Hessian of a
    fixed function (dropout off, BatchNorm with its running statistics). ``batch_size`` bounds
    the examples per forward pass (0 = all at once). With a single batch the gradient's
    graph is kept for the operator's lifetime, holding the activations and the first
    backward pass's intermediates; with several batches each batch's graph is rebuilt for
    every block and freed, so memory stays that of one batch. The parameters must not
    change while the operator lives: autograd refuses a kept graph whose saved tensors
    were modified in place.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        inputs: batching.Inputs,
        targets: torch.Tensor,
        *,
        batch_size: int = 0,
    ):
        model.eval()
        self.model, self.loss_fn = model, loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.dim = sum(self.sizes)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.batches = data_batches(inputs, targets, batch_size)
        # The mean loss over all data is the batch means weighted by the batch shares.
        total = batching.num_examples(inputs)
        self.weights = [batching.num_examples(x) / total for x, _ in self.batches]
        self.kept_graph = self.gradient_graph(*self.batches[0]) if len(self.batches) == 1 else None

    def gradient_graph(
        self, inputs: batching.Inputs, targets: torch.Tensor
    ) -> list[tuple[int, torch.Tensor]]:
        """``(parameter index, gradient)`` of the batch's mean loss for every gradient that
        depends on the parameters (the others have a zero Hessian block), each with its graph
        for the second backward pass.
        """
        with torch.enable_grad():
            loss = batching.batch_loss(self.model, self.loss_fn, inputs, targets)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        return [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def batch_products(
        self, graph: list[tuple[int, torch.Tensor]], columns: list[torch.Tensor], keep: bool
    ) -> torch.Tensor:
        """``(b, D)``: the rows of ``(H_batch M)^T`` from one batch's gradient graph, with
        ``columns`` the rows of ``M^T`` shaped like the parameters, ``(b, *shape)`` each.
        """
        products: list[torch.Tensor | None] = [None] * len(self.params)
        if graph:
            products = torch.autograd.grad(
                [g for _, g in graph],
                self.params,
                grad_outputs=[columns[i] for i, _ in graph],
                retain_graph=keep,
                is_grads_batched=True,
                allow_unused=True,
            )
        return parameter_rows(products, columns)

    def matmat(self, matrix: torch.Tensor, *, fresh: bool = False) -> torch.Tensor:
        """``H @ matrix`` for ``matrix`` of shape ``(D, b)``; ``fresh=True`` rebuilds the
        gradient graph even when one is kept (an independent pass over the data).
        """
        if matrix.ndim != 2 or matrix.shape[0] != self.dim:  # noqa: PLR2004 (a matrix)
            raise ValueError(f"expected a ({self.dim}, b) matrix, got {tuple(matrix.shape)}")
        num = matrix.shape[1]
        columns = [
            chunk.reshape(num, *shape)
            for chunk, shape in zip(matrix.T.split(self.sizes, dim=1), self.shapes, strict=True)
        ]
        result = None
        for (inputs, targets), weight in zip(self.batches, self.weights, strict=True):
            keep = self.kept_graph is not None and not fresh
            graph = self.kept_graph if keep else self.gradient_graph(inputs, targets)
            products = self.batch_products(graph, columns, keep)
            if len(self.batches) > 1:
                products = products.mul_(weight)
            result = products if result is None else result.add_(products)
        return result.T

    def __matmul__(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.matmat(matrix)

    def check_deterministic(self, *, seed: int = 0, rtol: float = 1e-5, atol: float = 1e-8):
        """Raise ``RuntimeError`` unless two independent passes over the data (forward,
        gradient and one Hessian-vector product each) agree with each other and with the
        kept graph, to curvlinops' tolerances: what random augmentation, random operations
        in eval mode (functional dropout with ``training=True``) or a nondeterministic kernel
        would break. The message names the likely cause.
        """
        generator = torch.Generator(device="cpu").manual_seed(seed)
        probe = torch.randn(self.dim, 1, generator=generator, dtype=torch.float64)
        probe = probe.to(self.device, self.dtype)
        first, second = self.matmat(probe, fresh=True), self.matmat(probe, fresh=True)
        if not torch.allclose(first, second, rtol=rtol, atol=atol):
            raise RuntimeError(
                "two passes over the data gave different Hessian-vector products: "
                f"{RANDOM_IN_EVAL_HINT}, and augment the data once, not in forward(); on a GPU "
                "a nondeterministic kernel can also cause it "
                "(torch.use_deterministic_algorithms(True))"
            )
        if not torch.allclose(self.matmat(probe), first, rtol=rtol, atol=atol):
            raise RuntimeError("the kept gradient graph no longer matches a fresh pass")


@dataclass
class OperatorReport:
    """Result of :func:`operator_checks`.

    Attributes:
        dim: D.
        symmetry_rel_diff: ``|v^T H w - w^T H v| / max(|v^T H w|, tiny)``.
        finite: whether ``H @ [v, w]`` held no NaN/inf.
        seconds_per_hvp: wall time of one Hessian-vector product.
        deterministic: the determinism probe passed (the operator was built with it).
    """

    dim: int
    symmetry_rel_diff: float
    finite: bool
    seconds_per_hvp: float
    deterministic: bool = True

    def as_dict(self) -> dict:
        """The fields as a plain dict, for summaries."""
        return dict(self.__dict__)


def operator_checks(
    matmat: MatMat, dim: int, *, dtype: torch.dtype, device, seed: int = 0
) -> OperatorReport:
    """Probe symmetry and finiteness with two Gaussian vectors, and time one HVP."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    probes = torch.randn(dim, 2, generator=generator, dtype=torch.float64).to(device, dtype)
    products = matmat(probes)
    finite = bool(torch.isfinite(products).all())
    v, w = probes[:, 0], probes[:, 1]
    vhw, whv = float(v @ products[:, 1]), float(w @ products[:, 0])
    rel_diff = abs(vhw - whv) / max(abs(vhw), torch.finfo(dtype).tiny)
    start = time.perf_counter()
    matmat(probes[:, :1])
    if probes.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return OperatorReport(dim, rel_diff, finite, seconds)


def dense_matrix(
    matmat: MatMat, dim: int, *, block_size: int, dtype: torch.dtype, device, progress: bool = True
) -> torch.Tensor:
    """The operator as a dense ``(D, D)`` matrix, ``H @ I`` a block of columns at a time
    (identity blocks are made on the fly; only the result is ever D x D), symmetrised.
    """
    result = torch.empty(dim, dim, dtype=dtype, device=device)
    starts = range(0, dim, block_size)
    for start in tqdm(starts, desc="H @ I", unit="block", disable=not progress, mininterval=1.0):
        stop = min(dim, start + block_size)
        identity = torch.zeros(dim, stop - start, dtype=dtype, device=device)
        identity[torch.arange(start, stop), torch.arange(stop - start)] = 1
        result[:, start:stop] = matmat(identity)
    return (result + result.T) / 2
