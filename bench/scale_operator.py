"""A loss whose Hessian is exactly a known symmetric matrix at D = 10^7 parameters, as a
hessov plug-in problem (README.md, "Your own model"), for the scale benchmark.

What: one parameter vector ``theta`` ``(D,)`` and the loss

    L(theta) = 0.5 * sum_i lam_i (U^T theta)_i^2,

whose Hessian is ``U diag(lam) U^T`` whatever ``theta`` is: the eigenvalues are
:func:`spectrum` and the eigenvectors the columns of ``U``
(:meth:`StructuredQuadratic.eigenvectors`). ``U`` is a random orthogonal matrix that is
never stored: ``U^T x = R_3 R_2 R_1 x``, three rounds of

    R_r = T (I_n kron Q^T) S_r (P_r kron I_b),

on ``x`` seen as ``X = x.view(n, b)``, ``n = D / b`` blocks of ``b`` (:func:`block_size`, 64
at D = 10^7 = 156,250 x 64): ``P_r`` a random permutation of the ``n`` blocks, ``S_r`` random
signs on all D entries, ``Q`` ONE random orthogonal ``b x b`` matrix (the QR factor of a
seeded Gaussian matrix, Haar distributed) applied to every block, and ``T`` the transposition
of the ``(n, b)`` layout to ``(b, n)``: a round maps ``X`` to ``((S_r * X[p_r]) @ Q)^T``,
flattened. ``T`` sends the ``b`` outputs of a block to ``b`` different blocks of the next
round, and ``P_r`` draws which ones, so that the inputs of one coordinate of ``U^T x``
(equivalently, the support of one eigenvector) spread over three levels of ``b`` blocks: at
most ``b^3 = 262,144`` of the 10^7 coordinates, a little fewer where two of the ``b``
second-round blocks that feed a third-round block share first-round blocks (measured at D =
10^7, seed 0, over 40 eigenvectors: 252,416 to 262,144, median 259,328); on its support an
eigenvector's entries are ``+- Q_{j1 k1} Q_{j2 k2} Q_{j3 k3}``, dense and random-looking.
Each factor is orthogonal, so ``U`` is: exactly in exact arithmetic, and to the rounding of
``Q`` in floating point (``||Q^T Q - I||_2`` about 2e-15 in float64). The permutation of
a round is thus a random permutation of blocks followed by a fixed transposition, not a
uniformly random permutation of the D coordinates: at D = 10^7, moving rows of ``b``
contiguous values takes 5 to 13 ms a pass, scattering single coordinates 52 ms, and the
transposition is free (the block product writes its result transposed).

Why: the Hessians of real networks at D = 10^7 have no known spectrum, so a sketch of one
cannot be scored. This one can, and hessov multiplies with it exactly as with a network,
by double backward through autograd (:class:`hessov.skerch_ext.operator.AutogradHessian`):
every Hessian-vector product applies ``U^T`` then ``U``, six block products of ``2 b D``
flops and six block permutations, and a few length-D vectors of memory per column, so the
benchmark measures hessov's own costs (measurement I/O, the solve) at scale against exact
answers. ``U^T`` and ``U`` are one autograd function (:class:`_Rotation`) whose backward is
the other direction, so autograd keeps no intermediate of the rounds. ``is_grads_batched``
runs on torch's legacy vmap, which has a batching rule for ``bmm`` (the block products: one
call for all the columns) but for no index operation: ``index_select``, ``gather``,
``x[perm]``, ``take`` and ``embedding`` each loop over the columns and stack the results
into a new tensor. So the permutations (``index_copy_``) and the signs (``mul_``) work in
place in a buffer, whose fallback loops over the columns writing straight into it: a
length-D float32 tensor is 40 MB, and the page faults of a new one take about 11 ms, twice
a product with the signs. Measured at D = 10^7 in float32 on 2 CPU cores (shared, load
average 3.1), with the operator on 20 examples: 0.41 to 0.50 s per column for blocks of 1, 2
and 4 alike (about 200 ms of block products, 110 ms of block permutations, 45 ms of signs),
peak RSS 0.87, 1.09 and 1.54 GiB for the whole process, products within 3e-8 (relative) of
:meth:`StructuredQuadratic.hessian_matmat`. Uniformly random permutations of the
coordinates would add about 0.25 s per column.

How it fits the Problem contract (:class:`hessov.Problem`): the model's input is a dummy
dataset of ``num_examples`` zeros ``(N, 1)`` that the forward pass ignores; its output is
the quadratic's value repeated for every example ``(N,)`` (a stride-0 view, no ``(N, D)``
tensor), and the loss is the mean of the output (:class:`hessov.problems.losses.MeanOfOutput`,
``reduction='mean'``), so the mean loss over any subset is the quadratic itself. The
targets are int64 zeros and ``num_classes=0`` (unlabelled: the Hessian subsets are the
first examples), the forward pass has no randomness (the eval-mode determinism check
passes), and the data are finite. ``Q``, the signs, the permutations and the spectrum are
plain attributes, not buffers: hessov records every buffer as float64 at every recorded
step, while these are a function of ``(seed, D, num_large)`` that every job rebuilds
identically when it calls the factory. They follow ``model.to(device, dtype)`` (cached per
device and dtype on first use).

The Hessian does not depend on ``theta``: measure it at step 0 (``MAX_STEPS=0
RECORD_STEPS=[0]``). Training is possible but gradient descent diverges along the top
eigenvector unless ``lr < 2 / lam_max = 0.02``, and grows slowly along the negative ones.

Options: hessov calls a factory as ``FACTORY(seed)`` and nothing else
(:func:`hessov.problems.plugins.call_factory`), so the sizes are chosen by the factory's
name (recorded with the run, and hashed with this file):

- ``scale_problem``: D = 10^7 with :data:`NUM_LARGE` large eigenvalues;
- ``small_problem``: D = 4,096 = 64 x 64 (tests);
- ``problem_<D>`` or ``problem_<D>_<NUM_LARGE>``, e.g. ``problem_1000000_300``: any size,
  made on demand by the module's ``__getattr__`` (PEP 562), which hessov's
  ``getattr(module, FACTORY)`` reaches like any other name; a D without a divisor near 64
  gets smaller blocks (:func:`block_size`) and mixes less;
- in Python, :func:`make_problem` takes ``dim``, ``num_large`` and ``num_examples`` as
  keywords.

No environment variable is read: a run records its ``problem`` value and this file's
sha256, and those alone must say which problem it measured.

:func:`disk_bandwidth` measures the machine's sequential write and read bandwidth, the
floor the benchmark compares out-of-core passes against.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hessov
from hessov.problems.losses import MeanOfOutput

#: D of the scale benchmark.
SCALE_DIM = 10_000_000
#: D of the tests' problem.
SMALL_DIM = 4096
#: The number of large eigenvalues, ``LARGE_TOP * LARGE_RATIO**i`` for ``i < NUM_LARGE``.
NUM_LARGE = 300
#: The largest eigenvalue.
LARGE_TOP = 100.0
#: The ratio of consecutive large eigenvalues.
LARGE_RATIO = 0.98
#: The tail's largest magnitude, as a fraction of the smallest large eigenvalue: a gap of 5x.
TAIL_FRACTION = 0.2
#: Every NEGATIVE_EVERY-th tail eigenvalue is negative (tail index ``j % 3 == 2``).
NEGATIVE_EVERY = 3
#: Rounds of permutation, signs, block product and transposition that make ``U^T``.
ROUNDS = 3
#: The largest block, ``b`` wherever D is a multiple of it (:func:`block_size`).
BLOCK = 64
#: Examples in each split of the dummy dataset: hessov's default NUM_HESSIAN_DATAPOINTS
#: (500) fits.
NUM_EXAMPLES = 512
#: Chunk of :func:`disk_bandwidth`'s writes and reads.
IO_CHUNK = 64 * 2**20

_DYNAMIC = re.compile(r"^problem_(\d+)(?:_(\d+))?$")


def spectrum(dim: int, num_large: int = NUM_LARGE) -> np.ndarray:
    """The Hessian's eigenvalues ``lam`` ``(dim,)``, float64, in the order of ``U``'s columns.

    ``lam_i = 100 * 0.98**i`` for ``i < num_large`` (100 down to 0.237 for 300), then a tail
    ``t_j = s_j * tail / (1 + j)`` for ``j = i - num_large``, with ``tail = 0.2 *
    lam_{num_large - 1}`` (``0.2 * 100`` when ``num_large`` is 0) and ``s_j = -1`` when
    ``j % 3 == 2``, else ``+1``. Every magnitude is distinct, and every tail magnitude is at
    most a fifth of the smallest large eigenvalue, so the top ``num_large`` by value and by
    magnitude are the first ``num_large`` entries, in that order; by magnitude the whole
    spectrum is in index order (``|t_j|`` decreases with ``j``).

    Args:
        dim: D.
        num_large: how many large eigenvalues, at most ``dim``.

    Raises:
        ValueError: ``dim < 1`` or ``num_large`` outside ``0..dim``.
    """
    if dim < 1 or not 0 <= num_large <= dim:
        raise ValueError(f"need dim >= 1 and 0 <= num_large <= dim, got {dim}, {num_large}")
    large = LARGE_TOP * LARGE_RATIO ** np.arange(num_large, dtype=np.float64)
    tail_top = TAIL_FRACTION * (large[-1] if num_large else LARGE_TOP)
    j = np.arange(dim - num_large, dtype=np.float64)
    signs = np.where(np.arange(dim - num_large) % NEGATIVE_EVERY == NEGATIVE_EVERY - 1, -1.0, 1.0)
    return np.concatenate([large, signs * tail_top / (1.0 + j)])


def top_eigenvalues(
    dim: int, k: int, num_large: int = NUM_LARGE, order: str = "magnitude"
) -> np.ndarray:
    """The ``k`` largest eigenvalues ``(k,)`` of :func:`spectrum`, float64.

    Args:
        dim: D.
        k: how many.
        num_large: as for :func:`spectrum`.
        order: ``"magnitude"`` (largest ``|lam|`` first, the order of hessov's eigenpairs) or
            ``"value"`` (largest first).
    """
    lam = spectrum(dim, num_large)
    if order == "magnitude":
        return lam[np.argsort(-np.abs(lam), kind="stable")[:k]]
    if order == "value":
        return lam[np.argsort(-lam, kind="stable")[:k]]
    raise ValueError(f"order must be 'magnitude' or 'value', got {order!r}")


def block_size(dim: int) -> int:
    """``b``: the largest divisor of ``dim`` that is at most :data:`BLOCK` (64).

    64 for every multiple of 64 (D = 10^7 = 156,250 x 64, 4,096 = 64 x 64); otherwise smaller,
    e.g. 50 for D = 1,000 and 1 for a prime D (then ``U`` is a signed permutation).
    """
    if dim < 1:
        raise ValueError(f"need dim >= 1, got {dim}")
    return next(b for b in range(min(BLOCK, dim), 0, -1) if dim % b == 0)


def haar_orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-distributed random orthogonal matrix ``(size, size)``, float64: the QR factor of
    a standard Gaussian matrix, its columns' signs fixed by the diagonal of ``R``.
    """
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.where(r.diagonal() < 0, -1.0, 1.0)


class _Rotation(torch.autograd.Function):
    """``U^T x`` (``inverse=False``) or ``U x`` (``inverse=True``) of a
    :class:`StructuredQuadratic`, along the last dimension of ``x``. Its backward is the other
    direction (the transpose of an orthogonal map is its inverse), through this same function,
    so it is differentiable any number of times and autograd saves no intermediate.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, model: StructuredQuadratic, inverse: bool) -> torch.Tensor:
        """Apply the rounds (:meth:`StructuredQuadratic.rotate`)."""
        ctx.model, ctx.inverse = model, inverse
        return model.rotate(x, inverse=inverse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        """The other direction applied to ``grad``."""
        return _Rotation.apply(grad, ctx.model, not ctx.inverse), None, None


class _WeightedSquares(torch.autograd.Function):
    """``0.5 * sum_i lam_i y_i^2`` with backward ``grad * lam * y``, written so that the
    second backward is one product with ``grad * lam`` per column.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """The 0-d value."""
        ctx.save_for_backward(y, lam)
        return 0.5 * torch.dot(lam * y, y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``y * (lam * grad)``, differentiable in ``y``."""
        y, lam = ctx.saved_tensors
        return y * (lam * grad), None


class StructuredQuadratic(nn.Module):
    """``theta -> 0.5 * sum_i lam_i (U^T theta)_i^2``, repeated for every example; its
    Hessian is ``U diag(lam) U^T`` (module docstring).

    Args:
        dim: D.
        num_large: the number of large eigenvalues (:func:`spectrum`).
        seed: draws ``Q``, the signs and the block permutations of ``U``, then ``theta``.

    Attributes:
        theta: the parameters ``(D,)``, initialised ``N(0, I)``.
        dim, num_large, seed: as given.
        block, num_blocks: ``b`` (:func:`block_size`) and ``n = D / b``.
    """

    def __init__(self, dim: int, num_large: int = NUM_LARGE, seed: int = 0):
        super().__init__()
        self.dim, self.num_large, self.seed = dim, num_large, seed
        self.block = block_size(dim)
        self.num_blocks = dim // self.block
        generator = torch.Generator().manual_seed(seed)
        # Masters on the CPU: Q (b, b) float64, signs (ROUNDS, n, b) int8, block permutations
        # (ROUNDS, n) int64.
        self._block = haar_orthogonal(self.block, generator)
        shape = (ROUNDS, self.num_blocks, self.block)
        self._signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
        self._signs.mul_(2).sub_(1)
        self._perms = torch.stack(
            [torch.randperm(self.num_blocks, generator=generator) for _ in range(ROUNDS)]
        )
        self._lam = torch.from_numpy(spectrum(dim, num_large))
        self.theta = nn.Parameter(torch.randn(dim, generator=generator))
        self._cache: dict[tuple, torch.Tensor] = {}

    def _constant(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A master (``block``, ``signs``, ``perms``, ``inverse`` or ``lam``) on ``device`` in
        ``dtype`` (index tensors stay int64), made once per device and dtype.
        """
        key = (name, device, None if name in ("perms", "inverse") else dtype)
        if key not in self._cache:
            if name == "inverse":
                master = torch.argsort(self._perms, dim=1)
            else:
                master = getattr(self, f"_{name}")
            self._cache[key] = master.to(device=device, dtype=key[2] or master.dtype)
        return self._cache[key]

    def lam(self, device=None, dtype=None) -> torch.Tensor:
        """The eigenvalues ``(D,)`` on ``device`` in ``dtype`` (default: ``theta``'s)."""
        return self._constant("lam", device or self.theta.device, dtype or self.theta.dtype)

    def rotate(self, x: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
        """``U^T x`` or (``inverse=True``) ``U x`` along the last dimension of ``x`` ``(..., D)``,
        without autograd.

        Round ``r`` of ``U^T``: ``rows = S_r * X[p_r]`` in ``(n, b)``, then ``mixed = (rows @
        Q)^T`` in ``(b, n)``, whose flat view is the next round's ``X``; ``U`` undoes the
        rounds in reverse order. The permutations and signs work in place in a buffer, the
        block products are one ``bmm`` each (module docstring: legacy vmap).
        """
        n, b = self.num_blocks, self.block
        num = x.numel() // self.dim
        block = self._constant("block", x.device, x.dtype)
        signs = self._constant("signs", x.device, x.dtype)
        block_t = block.T.expand(num, b, b)
        if not inverse:
            # index_copy_ scatters: rows[inverse[j]] = source[j], i.e. rows[i] = source[p[i]].
            scatter = self._constant("inverse", x.device, None)
            rows, source = x.new_empty((num, n, b)), x.reshape(num, n, b)
            for r in range(ROUNDS):
                rows.index_copy_(1, scatter[r], source)
                rows.mul_(signs[r])
                source = torch.bmm(block_t, rows.transpose(1, 2)).view(num, n, b)  # (rows Q)^T
            return source.reshape(x.shape)
        # mixed = Q^T rows^T, so rows = mixed^T Q^T; then X[p[i]] = rows[i].
        perms = self._constant("perms", x.device, None)
        source, spare = x.reshape(num, b, n), x.new_empty((num, n, b))
        for r in reversed(range(ROUNDS)):
            rows = torch.bmm(source.transpose(1, 2), block_t)
            rows.mul_(signs[r])
            spare.index_copy_(1, perms[r], rows)
            source, spare = spare.view(num, b, n), rows
        return source.reshape(x.shape)

    def to_eigenbasis(self, x: torch.Tensor) -> torch.Tensor:
        """``U^T x`` along the last dimension: ``(..., D) -> (..., D)``, differentiable.

        Row ``i`` of ``to_eigenbasis(I)`` is ``U^T e_i``: the dense result is ``U`` itself.
        """
        return _Rotation.apply(x, self, False)

    def from_eigenbasis(self, y: torch.Tensor) -> torch.Tensor:
        """``U y`` along the last dimension: ``(..., D) -> (..., D)``, the inverse of
        :meth:`to_eigenbasis`, differentiable.
        """
        return _Rotation.apply(y, self, True)

    def eigenvectors(self, indices) -> torch.Tensor:
        """``U[:, indices]`` ``(D, m)``, the eigenvectors of ``lam[indices]``, in ``theta``'s
        dtype and on its device (``m * D`` values: chunk the indices at large D).
        """
        index = torch.as_tensor(indices, dtype=torch.int64, device=self.theta.device)
        basis = torch.zeros(index.numel(), self.dim, dtype=self.theta.dtype, device=index.device)
        basis[torch.arange(index.numel(), device=index.device), index] = 1
        with torch.no_grad():
            return self.from_eigenbasis(basis).T

    @torch.no_grad()
    def hessian_matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        """The exact Hessian times ``matrix``: ``U diag(lam) U^T matrix``, ``(D, b) -> (D, b)``,
        without autograd (a reference for hessov's operator).
        """
        lam = self.lam(matrix.device, matrix.dtype)
        return self.from_eigenbasis(lam * self.to_eigenbasis(matrix.T)).T

    def value(self) -> torch.Tensor:
        """The quadratic ``0.5 * sum_i lam_i (U^T theta)_i^2``, a 0-d tensor."""
        return _WeightedSquares.apply(self.to_eigenbasis(self.theta), self.lam())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The quadratic for every example: ``(N, ...)`` ignored ``-> (N,)`` (a stride-0 view)."""
        return self.value().expand(inputs.shape[0])


def make_problem(
    seed: int,
    *,
    dim: int = SCALE_DIM,
    num_large: int = NUM_LARGE,
    num_examples: int = NUM_EXAMPLES,
) -> hessov.Problem:
    """The plug-in problem: :class:`StructuredQuadratic` on a dummy dataset.

    Args:
        seed: hessov's ``RANDOM_SEED``; draws ``U`` and ``theta``.
        dim: D.
        num_large: the number of large eigenvalues (:func:`spectrum`).
        num_examples: examples per split, inputs zeros ``(N, 1)`` and targets int64 zeros
            ``(N,)``.

    Returns:
        A :class:`hessov.Problem` with ``num_classes=0`` and the mean-of-output loss.
    """
    model = StructuredQuadratic(dim, num_large, seed)
    inputs = torch.zeros(num_examples, 1)
    targets = torch.zeros(num_examples, dtype=torch.int64)
    return hessov.Problem(
        model=model,
        loss=MeanOfOutput(),
        train=(inputs, targets),
        test=(inputs.clone(), targets.clone()),
        num_classes=0,
        data_note=(
            f"a synthetic quadratic, D={dim}, Hessian U diag(lam) U^T with {num_large} large "
            "eigenvalues (bench/scale_operator.py); the inputs are ignored"
        ),
    )


def scale_problem(seed: int) -> hessov.Problem:
    """``problem=bench/scale_operator.py:scale_problem``: D = 10^7, 300 large eigenvalues."""
    return make_problem(seed, dim=SCALE_DIM, num_large=NUM_LARGE)


def small_problem(seed: int) -> hessov.Problem:
    """``problem=bench/scale_operator.py:small_problem``: D = 4,096, 300 large eigenvalues."""
    return make_problem(seed, dim=SMALL_DIM, num_large=NUM_LARGE)


def __getattr__(name: str) -> Callable[[int], hessov.Problem]:
    """``problem_<D>`` and ``problem_<D>_<NUM_LARGE>``: the factory of that size (PEP 562)."""
    match = _DYNAMIC.match(name)
    if match is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    dim = int(match.group(1))
    num_large = int(match.group(2)) if match.group(2) is not None else min(NUM_LARGE, dim)

    def factory(seed: int) -> hessov.Problem:
        return make_problem(seed, dim=dim, num_large=num_large)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"D = {dim}, {num_large} large eigenvalues."
    return factory


def disk_bandwidth(directory: str | Path, size_bytes: int) -> dict:
    """Sequential write and read bandwidth of the file system holding ``directory``.

    Writes a file of ``size_bytes`` random bytes in chunks of 64 MiB and fsyncs it (the write
    time includes the fsync), drops it from the page cache
    (``posix_fadvise(POSIX_FADV_DONTNEED)``, after the fsync, when its pages are clean),
    reads it back whole, and deletes it. The chunk's random bytes are made before the clock
    starts and reused, so that neither compression nor the random generator is measured.

    Args:
        directory: where to write (an existing directory).
        size_bytes: the file's size; it must fit in the free space with 1 GiB to spare.

    Returns:
        ``{"directory", "size_bytes", "write_seconds", "read_seconds",
        "write_bytes_per_s", "read_bytes_per_s", "cache_dropped"}``; ``cache_dropped`` is
        False where ``posix_fadvise`` does not exist, and the read may then come from memory.

    Raises:
        ValueError: a non-positive size, or one that does not fit.
    """
    directory = Path(directory)
    free = shutil.disk_usage(directory).free
    if size_bytes <= 0 or size_bytes > free - 2**30:
        raise ValueError(f"size_bytes={size_bytes} must be > 0 and fit in {free} free bytes")
    chunk = memoryview(os.urandom(min(IO_CHUNK, size_bytes)))
    path = directory / f".disk_bandwidth_{os.getpid()}_{time.monotonic_ns()}"
    can_drop = hasattr(os, "posix_fadvise")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            start = time.perf_counter()
            left = size_bytes
            while left:
                left -= os.write(fd, chunk[: min(left, len(chunk))])
            os.fsync(fd)
            write_seconds = time.perf_counter() - start
            if can_drop:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        buffer = bytearray(len(chunk))
        view = memoryview(buffer)
        fd = os.open(path, os.O_RDONLY)
        try:
            if can_drop:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            done = 0
            while count := os.readv(fd, [view]):
                done += count
            read_seconds = time.perf_counter() - start
        finally:
            os.close(fd)
        if done != size_bytes:
            raise OSError(f"read {done} of the {size_bytes} bytes written to {path}")
    finally:
        path.unlink(missing_ok=True)
    return {
        "directory": str(directory),
        "size_bytes": size_bytes,
        "write_seconds": write_seconds,
        "read_seconds": read_seconds,
        "write_bytes_per_s": size_bytes / write_seconds,
        "read_bytes_per_s": size_bytes / read_seconds,
        "cache_dropped": can_drop,
    }
