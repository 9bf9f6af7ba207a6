"""Non-overlapping seed ranges for every random operator of a sketch.

A sketched eigendecomposition (SEIGH: Fernandez et al., "Connecting Parameter Magnitudes
and Hessian Eigenspaces at Scale using Sketched Methods"; Tropp et al. 2017, "Practical
sketching algorithms for low-rank matrix approximation") draws several random operators:
the right test matrix Omega, the left test matrix Psi and the Gaussian probes of the
a-posteriori error estimate (Tropp et al. 2019, "Streaming low-rank matrix approximation
with an application to scientific simulation", section 6). Each draws from a *range* of
integer seeds: an i.i.d. operator seeds column ``m`` with ``start + m``, skerch's SSRFT uses
``start, ..., start + 4``. The paper's pipeline seeded Omega with ``seed + 1`` and Psi with
``seed + 2``, so their ranges overlapped and the two "independent" operators shared random
streams. Here every operator registers its range ``[start, start + size)`` in a
:class:`SeedRegistry`, which refuses any overlap, so that mistake cannot be made.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

#: skerch's SSRFT draws its signs, permutations and row selection from ``seed, ..., seed + 4``:
#: a range for a test matrix must hold at least these, however few columns it has.
MIN_OPERATOR_SEEDS = 5


@dataclass(frozen=True)
class SeedRange:
    """The integer seeds ``[start, start + size)`` owned by one named random operator."""

    name: str
    start: int
    size: int

    @property
    def stop(self) -> int:
        """One past the last seed of the range."""
        return self.start + self.size

    def seed(self, offset: int) -> int:
        """The seed ``start + offset``; raises ``IndexError`` outside ``[0, size)``."""
        if not 0 <= offset < self.size:
            raise IndexError(f"seed offset {offset} outside range {self}")
        return self.start + offset

    def overlaps(self, other: SeedRange) -> bool:
        """Whether the two ranges share at least one seed."""
        return self.start < other.stop and other.start < self.stop

    def __str__(self) -> str:
        return f"'{self.name}' [{self.start}, {self.stop})"


class SeedRegistry:
    """Named seed ranges, guaranteed pairwise disjoint.

    Usage::

        seeds = SeedRegistry()
        seeds.register("omega", 1000, 710)
        seeds.register("psi", 1500, 710)  # ValueError: overlaps 'omega' [1000, 1710)
    """

    def __init__(self) -> None:
        self._ranges: dict[str, SeedRange] = {}

    def register(self, name: str, start: int, size: int) -> SeedRange:
        """Reserve ``[start, start + size)`` under ``name`` and return it.

        Raises ``ValueError`` if the name is taken, the range is empty or negative, or it
        overlaps a registered range (the message names both ranges).
        """
        if name in self._ranges:
            raise ValueError(f"seed range name '{name}' is already registered")
        if size < 1 or start < 0:
            raise ValueError(f"seed range '{name}' needs start >= 0 and size >= 1")
        new = SeedRange(name, start, size)
        for existing in self._ranges.values():
            if new.overlaps(existing):
                raise ValueError(f"seed range {new} overlaps seed range {existing}")
        self._ranges[name] = new
        return new

    def register_next(self, name: str, size: int) -> SeedRange:
        """Reserve ``size`` seeds right after the highest registered seed (0 if empty)."""
        start = max((r.stop for r in self._ranges.values()), default=0)
        return self.register(name, start, size)

    def __getitem__(self, name: str) -> SeedRange:
        return self._ranges[name]

    def __contains__(self, name: str) -> bool:
        return name in self._ranges

    def __iter__(self) -> Iterator[SeedRange]:
        return iter(sorted(self._ranges.values(), key=lambda r: r.start))

    def __repr__(self) -> str:
        return "SeedRegistry(" + ", ".join(str(r) for r in self) + ")"


def sketch_seed_ranges(base_seed: int, num_inner: int, num_apost: int) -> SeedRegistry:
    """The standard seed layout of one sketch, contiguous from ``base_seed``.

    Ranges, in order: ``"omega"`` (Omega, D x s) and ``"psi"`` (Psi, s x D), each
    ``max(num_inner, MIN_OPERATOR_SEEDS)`` seeds, so one seed per column suffices for
    i.i.d. noise and SSRFT's five internal seeds fit; then ``"apost"`` with one seed per
    a-posteriori probe (``num_apost``). A second sketch that must be independent of this one
    needs a ``base_seed`` at or beyond ``registry["apost"].stop``. Two-pass recovery uses
    only ``"omega"`` (its first ``k`` columns) and ``"apost"``.
    """
    operator_size = max(num_inner, MIN_OPERATOR_SEEDS)
    registry = SeedRegistry()
    registry.register("omega", base_seed, operator_size)
    registry.register_next("psi", operator_size)
    registry.register_next("apost", num_apost)
    return registry
