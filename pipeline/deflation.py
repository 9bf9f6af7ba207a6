"""A sketch's space as a deflation: what the trace, diagonal and density stages reuse.

Two spaces of a solved two-pass sketch of one step and split, each read from the run's files
a row block at a time (the layout's row blocks, or all rows at once in memory), so that a
probe task holds ``O(rows x n)`` of them besides its probes:

* :func:`sketch_space`: the exactly projected Krylov basis ``V = [Q_0, ...]`` ``(D, n)``
  of the rounds taken (the basis stage's files) and its measured products ``H V`` ``(D, n)``
  (:mod:`hessov.krylovspace`), every measured part's flags and checksums verified first:
  with them
  ``V^T H V`` and the part of ``diag(H)`` that ``V`` carries are exact, at no new HVP
  (:mod:`hessov.skerch_ext.hutchinson`);
* :func:`sketch_eigenpairs`: the solve's eigenvectors ``U`` ``(D, n)`` and eigenvalues, whose
  complement the density's Lanczos runs resolve (:mod:`hessov.skerch_ext.slq`).

Both give the projection ``G -> (I - V V^T) G`` (:meth:`Deflation.project`), computed in
float64 and returned in the probes' dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import h5py
import torch

from hessov.errors import ConfigError
from hessov.krylovspace import joined, require_basis
from hessov.merge import read_columns, round_rows
from hessov.rounds import product_rounds, rounds_taken
from hessov.rundir import RunDir
from hessov.skerch_ext.hutchinson import sketched_diagonal
from hessov.sketchspec import SketchSpec
from hessov.spectralshift import shift_of

#: ``rows -> M[rows]`` ``(len(rows), n)`` of a tall matrix.
RowReader = Callable[[range], torch.Tensor]


class Deflation:
    """``P = I - V V^T`` for an orthonormal ``V`` ``(D, n)`` read by row blocks, with ``H V``
    when the sketch measured it. One row block (in memory) is read once and kept.
    """

    def __init__(
        self, row_ranges: list[range], basis: RowReader, products: RowReader | None = None
    ):
        self.row_ranges, self._readers = row_ranges, {"basis": basis, "products": products}
        self._kept: dict[str, torch.Tensor] = {}
        self.dim = row_ranges[-1].stop
        self.width = self.basis(row_ranges[0]).shape[1]

    def _read(self, which: str, rows: range) -> torch.Tensor:
        if len(self.row_ranges) > 1:
            return self._readers[which](rows).double()
        if which not in self._kept:
            self._kept[which] = self._readers[which](rows).double()
        return self._kept[which]

    def basis(self, rows: range) -> torch.Tensor:
        """``V[rows]`` ``(len(rows), n)``, float64."""
        return self._read("basis", rows)

    def products(self, rows: range) -> torch.Tensor:
        """``(H V)[rows]`` ``(len(rows), n)``, float64."""
        if self._readers["products"] is None:
            raise ValueError("this deflation has no products H V")
        return self._read("products", rows)

    def coefficients(self, columns: torch.Tensor) -> torch.Tensor:
        """``V^T G`` ``(n, b)`` float64 for ``G`` ``(D, b)``."""
        total = torch.zeros(self.width, columns.shape[1], dtype=torch.float64)
        for rows in self.row_ranges:
            total += self.basis(rows).T @ columns[rows.start : rows.stop].double()
        return total

    def project(self, columns: torch.Tensor) -> torch.Tensor:
        """``P G`` ``(D, b)`` in ``G``'s dtype."""
        coefficients = self.coefficients(columns)
        result = torch.empty_like(columns)
        for rows in self.row_ranges:
            block = columns[rows.start : rows.stop].double()
            result[rows.start : rows.stop] = block - self.basis(rows) @ coefficients
        return result

    def core(self) -> torch.Tensor:
        """``C = V^T H V`` ``(n, n)`` float64, symmetrised (measured in the sketch's dtype)."""
        total = torch.zeros(self.width, self.width, dtype=torch.float64)
        for rows in self.row_ranges:
            total += self.basis(rows).T @ self.products(rows)
        return (total + total.T) / 2

    def sketched_diagonal(self, core: torch.Tensor) -> torch.Tensor:
        """``(D,)`` float64: the part of ``diag(H)`` that ``V`` carries exactly."""
        return torch.cat(
            [sketched_diagonal(self.basis(r), self.products(r), core) for r in self.row_ranges]
        )


def _row_ranges(spec: SketchSpec) -> list[range]:
    return spec.row_ranges if spec.row_block else [range(spec.layout.dim)]


def _file_rows(path, name: str, dim: int) -> RowReader:
    """A reader of rows of the tall dataset ``name`` in ``path``; all rows by whole columns."""

    def read(rows: range) -> torch.Tensor:
        with h5py.File(path, "r") as handle:
            if len(rows) == dim:
                return torch.from_numpy(read_columns(handle[name]))
            return torch.from_numpy(handle[name][rows.start : rows.stop])

    return read


def require_two_pass(spec: SketchSpec, stage: str) -> None:
    """The estimates reuse the second round's products: refuse a single-pass layout."""
    if spec.recovery != "two_pass":
        raise ConfigError(
            f"recovery: {stage} reuses the two-pass sketch's basis and its products H Q; "
            f"the layout is {spec.recovery} (lay out again with recovery=two_pass)"
        )


@contextmanager
def sketch_space(run: RunDir, spec: SketchSpec, step: int, split: str) -> Iterator[Deflation]:
    """The exactly projected Krylov basis of ``step`` and ``split`` and its products, after
    every part of the rounds taken was verified.

    Raises:
        ConfigError: a single-pass layout.
        MissingInputError: a basis file or a measurement missing or corrupt, naming it.
    """
    require_two_pass(spec, "the estimate")
    names = product_rounds(rounds_taken(run, spec, step, split))
    paths = [require_basis(run, step, split, name) for name in names]
    dim = spec.layout.dim
    bases = [_file_rows(path, "basis", dim) for path in paths]
    sigma = shift_of(run, spec, step, split)

    def basis(rows: range) -> torch.Tensor:
        return joined([read(rows) for read in bases])

    def products(rows: range) -> torch.Tensor:
        measured = joined([read(rows) for read in readers])
        # which=smallest measured (sigma I - H) V: H V is sigma V minus it.
        return measured if sigma is None else sigma * basis(rows).to(measured) - measured

    with ExitStack() as stack:
        readers = [stack.enter_context(round_rows(run, spec, step, split, n)) for n in names]
        yield Deflation(_row_ranges(spec), basis, products)


def sketch_eigenpairs(run: RunDir, spec: SketchSpec, step: int, split: str):
    """The solve's eigenvalues ``(n,)`` float64 and its eigenvectors as a :class:`Deflation`.

    Raises:
        MissingInputError: no eigen file (`hessov solve` first).
    """
    path = run.require(run.eigen(step, split), "solve")
    with h5py.File(path, "r") as handle:
        eigenvalues = torch.from_numpy(handle["eigenvalues"][:]).double()
    reader = _file_rows(path, "eigenvectors", spec.layout.dim)
    return eigenvalues, Deflation(_row_ranges(spec), reader)
