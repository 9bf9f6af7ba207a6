"""Random test matrices Omega (D x s) and Psi (s x D), independent of how work is partitioned.

The sketches of SEIGH (Fernandez et al., "Connecting Parameter Magnitudes and Hessian
Eigenspaces at Scale using Sketched Methods"; Tropp et al. 2017, "Practical sketching
algorithms for low-rank matrix approximation", section 3) are ``H Omega`` and
``Psi H Omega``. At scale, the ``s`` columns of Omega are spread over many workers, each
working through its indices in blocks, so column ``m`` of Omega and row ``m`` of Psi must
depend only on ``(seed range, m, D, noise)``, never on the block or worker that computes
them. skerch 1.2.0 seeds an i.i.d. noise block with ``seed + block start`` and draws the
whole ``(D, block)`` block from that one stream, so its Omega changes with the block size
(see ``tests/test_skerch_bugs.py``). Here:

* ``"ssrft"`` (default): the scrambled subsampled real trigonometric transform of Tropp et
  al. 2019 ("Streaming low-rank matrix approximation with an application to scientific
  simulation", section 3.2). skerch's :class:`skerch.measurements.SSRFT` is correct and
  reused: ``SSRFT.ssrft`` maps ``R^D -> R^s`` with orthonormal rows, so Omega is its adjoint
  (``Omega[:, m] = issrft(e_m)``) and ``Omega^T X = ssrft(X)``; Psi is another SSRFT with its
  own seeds. Both are applied to whole blocks at ``O(D log D)`` per column.
* ``"gaussian"``, ``"rademacher"``: column ``m`` is drawn alone from seed ``start + m``, in
  float64 on the CPU and then cast, so it is also identical across devices and dtypes up to
  that rounding.

The columns themselves are the same bits on every machine and device (up to the cast to
``dtype``). Every product is computed column by column of its input (the SSRFT's DCTs act
per column; the i.i.d. products are matrix-vector products on a contiguous copy of each
column, because BLAS matrix-matrix products round a column differently depending on how
many columns travel with it). So on one machine and kernel path each output column is a
function of its own input column only, and results merged from any partition are
bit-identical. Across kernel paths (CPU instruction sets, devices, thread counts) products
agree only within rounding: :mod:`hessov.skerch_ext.tolerances`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from skerch.measurements import SSRFT
from skerch.utils import gaussian_noise, rademacher_noise

from hessov.skerch_ext.options import NOISE_TYPES
from hessov.skerch_ext.seeds import MIN_OPERATOR_SEEDS, SeedRange, SeedRegistry

#: i.i.d. columns are generated at most this many entries at a time (256 MiB in float64).
_IID_CHUNK_ENTRIES = 2**25

Indices = Sequence[int] | torch.Tensor


class RandomMatrix:
    """A random ``(dim, num_columns)`` matrix addressed by column, never stored whole.

    Omega is one; Psi is the transpose of another. For ``"ssrft"`` the columns are
    orthonormal (``num_columns <= dim`` required); for ``"gaussian"`` the entries are standard
    normal and for ``"rademacher"`` they are +-1. The recovery is invariant to a scaling of
    the test matrices, so no normalisation is applied.

    Args:
        dim: ``D``, the height.
        num_columns: ``n``, the width.
        seed_range: Seeds this matrix may use: ``n`` of them for i.i.d. noise,
            ``MIN_OPERATOR_SEEDS`` for SSRFT.
        noise: One of ``NOISE_TYPES``.
    """

    def __init__(self, dim: int, num_columns: int, seed_range: SeedRange, noise: str = "ssrft"):
        if noise not in NOISE_TYPES:
            raise ValueError(f"unknown noise '{noise}', expected one of {NOISE_TYPES}")
        if not 1 <= num_columns <= dim:
            raise ValueError(f"need 1 <= num_columns <= dim, got {num_columns} and {dim}")
        seeds_needed = MIN_OPERATOR_SEEDS if noise == "ssrft" else num_columns
        if seed_range.size < seeds_needed:
            raise ValueError(
                f"{noise} matrix with {num_columns} columns needs {seeds_needed} "
                f"seeds, but seed range {seed_range} has {seed_range.size}"
            )
        self.dim = dim
        self.num_columns = num_columns
        self.seed_range = seed_range
        self.noise = noise

    @property
    def shape(self) -> tuple[int, int]:
        """``(dim, num_columns)``."""
        return (self.dim, self.num_columns)

    def columns(
        self, indices: Indices, *, dtype: torch.dtype, device: torch.device | str
    ) -> torch.Tensor:
        """The columns ``M[:, indices]``, shape ``(dim, len(indices))``, contiguous."""
        index_list = self._checked_indices(indices)
        if self.noise == "ssrft":
            one_hot = torch.zeros(len(index_list), self.num_columns, dtype=dtype, device=device)
            one_hot[torch.arange(len(index_list)), index_list] = 1
            rows = SSRFT.issrft(one_hot, self.dim, seed=self.seed_range.start)
            return rows.T.contiguous()
        block = torch.stack([self._iid_column(m) for m in index_list], dim=1)
        return block.to(device=device, dtype=dtype)

    def t_apply(self, x: torch.Tensor) -> torch.Tensor:
        """``M^T x`` for ``x`` of shape ``(dim, b)``: shape ``(num_columns, b)``.

        Computed in ``x``'s dtype and on its device.
        """
        if x.ndim != 2 or x.shape[0] != self.dim:  # noqa: PLR2004 (a matrix)
            raise ValueError(f"expected x of shape ({self.dim}, b), got {tuple(x.shape)}")
        if self.noise == "ssrft":
            return SSRFT.ssrft(x.T, self.num_columns, seed=self.seed_range.start).T.contiguous()
        result = torch.empty(self.num_columns, x.shape[1], dtype=x.dtype, device=x.device)
        chunk = max(1, _IID_CHUNK_ENTRIES // self.dim)
        for start in range(0, self.num_columns, chunk):
            stop = min(start + chunk, self.num_columns)
            block_t = self.columns(range(start, stop), dtype=x.dtype, device=x.device).T
            # One matrix-vector product per column of x, on a contiguous copy of it: a
            # matrix-matrix product, or a strided vector, takes other BLAS kernels whose
            # rounding depends on the other columns of x.
            for j in range(x.shape[1]):
                result[start:stop, j] = block_t @ x[:, j].contiguous()
        return result

    def _iid_column(self, index: int) -> torch.Tensor:
        seed = self.seed_range.seed(index)
        if self.noise == "gaussian":
            return gaussian_noise(self.dim, seed=seed, dtype=torch.float64, device="cpu")
        return rademacher_noise(self.dim, seed=seed, device="cpu").to(torch.float64)

    def _checked_indices(self, indices: Indices) -> list[int]:
        index_list = [int(i) for i in indices]
        if any(not 0 <= i < self.num_columns for i in index_list):
            raise IndexError(f"column indices must lie in [0, {self.num_columns})")
        return index_list


@dataclass(frozen=True)
class SketchMatrices:
    """The pair of test matrices of one sketch: Omega ``(D, s)`` and Psi ``(s, D)``.

    Columns are produced in ``dtype`` on ``device``; products run in their input's dtype
    and on its device.
    """

    omega: RandomMatrix
    psi_transposed: RandomMatrix
    dtype: torch.dtype
    device: torch.device | str

    @classmethod
    def from_seeds(
        cls,
        dim: int,
        num_inner: int,
        seeds: SeedRegistry,
        *,
        noise: str = "ssrft",
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> SketchMatrices:
        """Omega from ``seeds["omega"]`` and Psi from ``seeds["psi"]``, both with ``s`` vectors.

        Args:
            dim: ``D``.
            num_inner: ``s``.
            seeds: A registry holding ``"omega"`` and ``"psi"`` ranges, e.g. from
                :func:`hessov.skerch_ext.seeds.sketch_seed_ranges`.
            noise: One of ``NOISE_TYPES``, for both.
            dtype: The dtype of the columns both produce (products run in their input's).
            device: Where both produce their columns.
        """
        return cls(
            omega=RandomMatrix(dim, num_inner, seeds["omega"], noise),
            psi_transposed=RandomMatrix(dim, num_inner, seeds["psi"], noise),
            dtype=dtype,
            device=device,
        )

    @property
    def dim(self) -> int:
        """``D``."""
        return self.omega.dim

    @property
    def num_inner(self) -> int:
        """``s``."""
        return self.omega.num_columns

    def omega_columns(self, indices: Indices) -> torch.Tensor:
        """``Omega[:, indices]``: shape ``(D, len(indices))``."""
        return self.omega.columns(indices, dtype=self.dtype, device=self.device)

    def omega_t_apply(self, x: torch.Tensor) -> torch.Tensor:
        """``Omega^T x`` for ``x`` of shape ``(D, b)``: shape ``(s, b)``."""
        return self.omega.t_apply(x)

    def psi_apply(self, x: torch.Tensor) -> torch.Tensor:
        """``Psi x`` for ``x`` of shape ``(D, b)``: shape ``(s, b)``."""
        return self.psi_transposed.t_apply(x)
