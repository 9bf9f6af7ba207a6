"""Distributed HDF5 storage of sketch measurements: parts, flags, checksums, merge, view.

Why this shape (Fernandez et al., section "Distributed SEIGH", and what went wrong there):

- **One part file per block of measurements.** A block is the unit of work of the
  measurement stage (one batched ``H @ Omega[:, block]``). Writing a part is the last
  thing a block does: the whole file (inner columns, outer columns, per-measurement
  flags and checksums) goes to a temporary name, is fsynced, and is renamed over the
  part created by the layout. A rename is atomic, so a worker killed at any moment
  leaves every part either as the layout made it (flags ``initialized``) or complete
  (flags ``measured``): nothing measured is ever corrupted, and a re-run redoes only the
  missing blocks. Per-measurement files (the paper's choice) make thousands of files;
  a virtual dataset over more files than the open-file limit reads zeros silently, so
  :func:`check_part_count` refuses layouts with too many parts.
- **A virtual view for notebooks** (``view.h5``): virtual datasets ``outer`` (D, k) and
  ``inner`` (s, s) stitched from the parts, with NaN as fill value so that a missing part
  reads as NaN, never as plausible zeros.
- **Monolithic arrays, allocated once per split and reused for every recorded step**
  (:class:`MonolithicArrays`): solve reads every part once, verifying every flag and
  checksum as it copies it into memory, and writes each contiguous ``outer``/``inner``
  dataset in one write. Allocation happens once at layout time, however many steps are
  solved; a lock file serialises solves of different steps that share the arrays.

Shapes: ``D`` parameters, ``k`` outer measurements, ``s`` inner measurements (``k < s``).
Measurement ``m`` stores inner column ``m`` (``Psi H Omega[:, m]``, length ``s``) and, for
``m < k``, outer column ``m`` (``H Omega[:, m]``, length ``D``). A set without inner sketch
(``s = 0``: each round of two-pass recovery) holds ``k`` measurements, outer columns only.
"""

from __future__ import annotations

import json
import os
import resource
import zlib
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from hessov.fileio import atomic_write, exclusive_lock
from hessov.skerch_ext.checksums import chained_checksums

FLAG_INITIALIZED = 0
FLAG_MEASURED = 2


@dataclass(frozen=True)
class SketchLayout:
    """The shape of one sketch and the settings every worker must share.

    Attributes:
        dim: D, side of the symmetric operator.
        num_outer: k, outer measurements (the rank of the returned eigendecomposition).
        num_inner: s, inner measurements (= number of HVPs of the first pass); 0 for a
            set of outer columns only.
        block_size: measurements per part (and per batched HVP).
        dtype: storage dtype, "float32" or "float64".
        noise: test-matrix type ("ssrft", "gaussian", "rademacher").
        seed: base seed of the sketch's seed registry.
    """

    dim: int
    num_outer: int
    num_inner: int
    block_size: int
    dtype: str
    noise: str
    seed: int

    def __post_init__(self):
        if self.num_inner and not 0 < self.num_outer < self.num_inner:
            raise ValueError(f"k={self.num_outer} must satisfy 0 < k < s={self.num_inner}")
        if self.num_outer < 1:
            raise ValueError(f"k={self.num_outer} must be >= 1")
        # k <= D is the sketch's condition (hessov.sketchspec.resolve_spec); a set of outer
        # columns may hold more, e.g. the a-posteriori probes' products of a small network.
        if self.num_inner > self.dim:
            raise ValueError(f"s={self.num_inner} exceeds the dimension D={self.dim}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    @property
    def num_measurements(self) -> int:
        """Measurements (HVPs) in the set: s, or k for a set of outer columns only."""
        return self.num_inner or self.num_outer

    @property
    def blocks(self) -> list[range]:
        """The partition of the measurements into consecutive blocks of ``block_size``."""
        size, total = self.block_size, self.num_measurements
        return [range(a, min(a + size, total)) for a in range(0, total, size)]

    def to_json(self) -> str:
        """The layout as a JSON object with sorted keys, as the stores' files record it."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SketchLayout:
        """The layout :meth:`to_json` wrote."""
        return cls(**json.loads(text))


def check_part_count(num_parts: int, limit: int | None = None) -> None:
    """Refuse more part files than half the open-file limit (a virtual dataset opens them
    all; past the limit HDF5 returns fill values instead of failing).
    """
    soft = limit if limit is not None else resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if num_parts > soft // 2:
        raise ValueError(
            f"{num_parts} part files exceed half the open-file limit ({soft}); raise "
            "block_size so that s / block_size stays below it"
        )


def column_checksums(inner: np.ndarray | None, outer: np.ndarray | None, count: int) -> np.ndarray:
    """CRC-32 of each of ``count`` measurements: inner column ``j`` (if there is an inner
    sketch) then outer column ``j`` (if any). ``inner`` ``(s, P)``, ``outer`` ``(D, P_outer)``.

    The columns are checksummed as rows of one transposed copy: the same bytes as copying
    each strided column on its own, in one pass over the block.
    """
    inner_rows = None if inner is None else np.ascontiguousarray(inner.T)
    outer_rows = None if outer is None else np.ascontiguousarray(outer.T)
    sums = np.empty(count, dtype=np.uint32)
    for j in range(count):
        crc = 0
        if inner_rows is not None:
            crc = zlib.crc32(inner_rows[j])
        if outer_rows is not None and j < outer_rows.shape[0]:
            crc = zlib.crc32(outer_rows[j], crc)
        sums[j] = crc
    return sums


class IncompleteMeasurements(ValueError):
    """Some measurements are missing (not flagged measured) or corrupt (checksum or file
    damage); ``missing`` and ``corrupt`` name their indices.
    """

    def __init__(self, missing: list[int], corrupt: list[int]):
        super().__init__(
            f"measurements missing: {describe_indices(missing)}; "
            f"corrupt: {describe_indices(corrupt)}"
        )
        self.missing, self.corrupt = missing, corrupt


class MeasurementStore:
    """The part files of one measured operator (one step and split) in ``directory``."""

    def __init__(self, directory: Path, layout: SketchLayout):
        self.directory = Path(directory)
        self.layout = layout

    def part_path(self, block_id: int) -> Path:
        """The part file of block ``block_id`` (see :attr:`SketchLayout.blocks`)."""
        return self.directory / f"part_{block_id:05d}.h5"

    @property
    def view_path(self) -> Path:
        """The virtual dataset over all part files."""
        return self.directory / "view.h5"

    def _outer_count(self, block: range) -> int:
        return max(0, min(block.stop, self.layout.num_outer) - block.start)

    def create(self) -> int:
        """Create every missing part (flags ``initialized``) and the virtual view.

        Existing parts are kept untouched: measured blocks are never reset. Returns the
        number of parts created. Refuses a directory laid out for another shape.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = self.directory / "layout.json"
        if stamp.is_file():
            existing = SketchLayout.from_json(stamp.read_text())
            if existing != self.layout:
                raise ValueError(f"{self.directory} was laid out for {existing}, not {self.layout}")
        else:
            stamp.write_text(self.layout.to_json())
        created = 0
        for block_id in range(len(self.layout.blocks)):
            if not self.part_path(block_id).is_file():
                self._write_part(block_id, None, None, FLAG_INITIALIZED)
                created += 1
        self._write_view()
        return created

    def _write_part(self, block_id: int, inner, outer, flag: int, attrs: dict | None = None):
        block = self.layout.blocks[block_id]
        with atomic_write(self.part_path(block_id)) as tmp:
            self._write_part_file(tmp, block, inner, outer, flag, attrs)
            with open(tmp, "rb+") as raw:
                os.fsync(raw.fileno())

    def _write_part_file(self, tmp: Path, block: range, inner, outer, flag: int, attrs) -> None:
        """Write a whole part to ``tmp``: the block's columns (NaN placeholders when ``flag``
        is initialized), per-measurement flags and checksums, and ``attrs``.
        """
        n_outer = self._outer_count(block)
        dtype, has_inner = self.layout.dtype, self.layout.num_inner > 0
        with h5py.File(tmp, "w") as handle:
            handle.attrs["indices"] = [block.start, block.stop]
            if flag == FLAG_INITIALIZED:
                if has_inner:
                    handle.create_dataset(
                        "inner", (self.layout.num_inner, len(block)), dtype=dtype, fillvalue=np.nan
                    )
                if n_outer:
                    handle.create_dataset(
                        "outer", (self.layout.dim, n_outer), dtype=dtype, fillvalue=np.nan
                    )
                sums = np.zeros(len(block), dtype=np.uint32)
            else:
                if has_inner:
                    handle.create_dataset("inner", data=inner.astype(dtype, copy=False))
                if n_outer:
                    handle.create_dataset("outer", data=outer.astype(dtype, copy=False))
                sums = column_checksums(
                    handle["inner"][:] if has_inner else None,
                    handle["outer"][:] if n_outer else None,
                    len(block),
                )
            handle.create_dataset("flags", data=np.full(len(block), flag, dtype=np.uint8))
            handle.create_dataset("checksums", data=sums)
            for key, value in (attrs or {}).items():
                handle.attrs[key] = value

    def write_block(
        self,
        block_id: int,
        inner: np.ndarray | None,
        outer: np.ndarray | None,
        attrs: dict | None = None,
    ) -> None:
        """Atomically replace part ``block_id`` by its measurements, flagged ``measured``.

        ``inner`` ``(s, P)`` (None for a set without inner sketch); ``outer``
        ``(D, P_outer)`` for the block's indices below k.
        """
        block = self.layout.blocks[block_id]
        expected = (self.layout.num_inner, len(block))
        if self.layout.num_inner and (inner is None or inner.shape != expected):
            raise ValueError(f"inner block must have shape {expected}")
        n_outer = self._outer_count(block)
        if n_outer and (outer is None or outer.shape != (self.layout.dim, n_outer)):
            raise ValueError(f"outer block must have shape {(self.layout.dim, n_outer)}")
        self._write_part(block_id, inner, outer if n_outer else None, FLAG_MEASURED, attrs)

    def claim(self, block_id: int) -> AbstractContextManager[bool]:
        """Try to take block ``block_id`` for measuring; yields False if another live
        process holds it. The claim is an ``flock`` on a lock file, which the kernel
        releases when its holder dies (even by SIGKILL), so a crash never leaves a block
        claimed: two submissions of the same run never measure a block twice at once.
        """
        return exclusive_lock(self.directory / f".part_{block_id:05d}.lock", blocking=False)

    def block_flags(self) -> list[np.ndarray]:
        """Flags ``(P,)`` of every part; a missing part file reads as all initialized."""
        flags = []
        for block_id, block in enumerate(self.layout.blocks):
            path = self.part_path(block_id)
            if not path.is_file():
                flags.append(np.zeros(len(block), dtype=np.uint8))
                continue
            with h5py.File(path, "r") as handle:
                flags.append(handle["flags"][:])
        return flags

    def block_measured(self, block_id: int) -> bool:
        """Whether every measurement of part ``block_id`` is flagged ``measured``."""
        path = self.part_path(block_id)
        if not path.is_file():
            return False
        with h5py.File(path, "r") as handle:
            return bool((handle["flags"][:] == FLAG_MEASURED).all())

    def missing_indices(self) -> list[int]:
        """Measurement indices not flagged ``measured``."""
        missing = []
        for block, flags in zip(self.layout.blocks, self.block_flags(), strict=True):
            missing += [m for m, f in zip(block, flags, strict=True) if f != FLAG_MEASURED]
        return missing

    def verify(self, sink=None) -> dict[str, list[int]]:
        """Indices that are missing (not measured) or corrupt (checksum or file damage).

        Every part is read once; with ``sink``, each part whose measurements are all
        intact is also handed over as ``sink(block, inner, outer)`` (``inner`` ``(s, P)`` or
        None, ``outer`` ``(D, P_outer)`` or None), so that a merge needs no second read.
        """

        def read_whole(handle: h5py.File, block: range):
            inner = handle["inner"][:] if self.layout.num_inner else None
            outer = handle["outer"][:] if "outer" in handle else None
            return column_checksums(inner, outer, len(block)), (inner, outer)

        return self._verified(read_whole, sink)

    def verify_rows(self, row_block: int) -> dict[str, list[int]]:
        """:meth:`verify` reading each part's outer columns ``row_block`` rows at a time
        (checksums chained over the row blocks), for parts too large to hold whole.
        """
        return self._verified(
            lambda handle, block: (_streamed_checksums(handle, len(block), row_block), None)
        )

    def verify_segments(self, segments: np.ndarray, row_counts: list[int]) -> dict[str, list[int]]:
        """:meth:`verify` from the CRC-32 of every row block of the outer columns, computed
        where the blocks were read (:func:`hessov.skerch_ext.checksums.segment_checksums`):
        ``segments`` ``(num_blocks, c)`` for the round's ``c`` outer columns in order, the
        blocks of ``row_counts`` rows. Reads only the parts' flags, checksums and inner
        columns.
        """
        itemsize = np.dtype(self.layout.dtype).itemsize
        lengths = [count * itemsize for count in row_counts]

        def combined(handle: h5py.File, block: range):
            inner = handle["inner"][:] if "inner" in handle else None
            sums = column_checksums(inner, None, len(block))
            columns = slice(block.start, block.start + self._outer_count(block))
            pieces = list(zip(segments[:, columns], lengths, strict=True))
            sums[: columns.stop - columns.start] = chained_checksums(
                sums[: columns.stop - columns.start], pieces
            )
            return sums, None

        return self._verified(combined)

    def _verified(self, read, sink=None) -> dict[str, list[int]]:
        """Check every part's flags and checksums, ``read(handle, block)`` giving the actual
        checksums and what ``sink`` receives of an intact part.
        """
        missing, corrupt = [], []
        for block_id, block in enumerate(self.layout.blocks):
            path = self.part_path(block_id)
            try:
                with h5py.File(path, "r") as handle:
                    flags = handle["flags"][:]
                    stored = handle["checksums"][:]
                    actual, payload = read(handle, block)
            except (OSError, KeyError):
                (corrupt if path.is_file() else missing).extend(block)
                continue
            if _classify(block, flags, stored, actual, missing, corrupt) and sink is not None:
                sink(block, *payload)
        return {"missing": missing, "corrupt": corrupt}

    def inner_matrix(self) -> np.ndarray:
        """The inner sketch ``(s, s)`` from every part. Read only what :meth:`verify_rows`
        has verified.
        """
        inner = np.empty((self.layout.num_inner, self.layout.num_inner), dtype=self.layout.dtype)
        for block_id, block in enumerate(self.layout.blocks):
            with h5py.File(self.part_path(block_id), "r") as handle:
                inner[:, block.start : block.stop] = handle["inner"][:]
        return inner

    @contextmanager
    def outer_rows(self):
        """A reader ``rows -> outer[rows]`` ``(len(rows), k)`` over the parts, which stay
        open while the context lasts. Read only what :meth:`verify_rows` has verified.
        """
        handles = [h5py.File(self.part_path(b), "r") for b in range(len(self.layout.blocks))]
        datasets = [h["outer"] for h in handles if "outer" in h]
        try:
            yield lambda rows: np.concatenate(
                [dataset[rows.start : rows.stop] for dataset in datasets], axis=1
            )
        finally:
            for handle in handles:
                handle.close()

    def part_attrs(self) -> list[dict]:
        """The attributes each measured part was written with (timings, worker)."""
        found = []
        for block_id in range(len(self.layout.blocks)):
            path = self.part_path(block_id)
            if path.is_file():
                with h5py.File(path, "r") as handle:
                    found.append(dict(handle.attrs))
        return found

    def _write_view(self) -> None:
        layout = self.layout
        outer_layout = h5py.VirtualLayout((layout.dim, layout.num_outer), dtype=layout.dtype)
        inner_layout = h5py.VirtualLayout((layout.num_inner, layout.num_inner), dtype=layout.dtype)
        for block_id, block in enumerate(layout.blocks):
            name = self.part_path(block_id).name  # relative: the run directory can move
            if layout.num_inner:
                inner_layout[:, block.start : block.stop] = h5py.VirtualSource(
                    name, "inner", shape=(layout.num_inner, len(block))
                )
            n_outer = self._outer_count(block)
            if n_outer:
                outer_layout[:, block.start : block.start + n_outer] = h5py.VirtualSource(
                    name, "outer", shape=(layout.dim, n_outer)
                )
        with atomic_write(self.view_path) as tmp, h5py.File(tmp, "w") as handle:
            handle.create_virtual_dataset("outer", outer_layout, fillvalue=np.nan)
            if layout.num_inner:
                handle.create_virtual_dataset("inner", inner_layout, fillvalue=np.nan)
            handle.attrs["layout"] = layout.to_json()


def _classify(block: range, flags, stored, actual, missing: list, corrupt: list) -> bool:
    """Sort the block's measurements into ``missing`` (not flagged measured) and ``corrupt``
    (checksum differs); True when every one is intact.
    """
    intact = True
    for j, m in enumerate(block):
        if flags[j] != FLAG_MEASURED:
            missing.append(m)
            intact = False
        elif actual[j] != stored[j]:
            corrupt.append(m)
            intact = False
    return intact


def _streamed_checksums(handle: h5py.File, count: int, row_block: int) -> np.ndarray:
    """:func:`column_checksums` of an open part, its outer columns read ``row_block`` rows at
    a time: CRC-32 chained over the pieces equals the CRC of the whole column.
    """
    inner = handle["inner"][:] if "inner" in handle else None
    sums = column_checksums(inner, None, count).astype(np.int64)
    if "outer" not in handle:
        return sums
    outer = handle["outer"]
    for start in range(0, outer.shape[0], row_block):
        rows = np.ascontiguousarray(outer[start : start + row_block].T)
        for j in range(rows.shape[0]):
            sums[j] = zlib.crc32(rows[j], int(sums[j]))
    return sums


def describe_indices(indices: list[int]) -> str:
    """Compact ranges, e.g. ``[0, 1, 2, 7]`` -> ``"0-2, 7"``."""
    if not indices:
        return "none"
    parts, start, prev = [], indices[0], indices[0]
    for m in indices[1:] + [None]:
        if m is not None and m == prev + 1:
            prev = m
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        if m is not None:
            start = prev = m
    return ", ".join(parts)


class MonolithicArrays:
    """Contiguous ``outer`` (D, k) and ``inner`` (s, s) arrays, allocated once, reused for
    every recorded step. ``attrs['holds']`` names the measurements merged in last.
    """

    def __init__(self, path: Path, layout: SketchLayout):
        self.path = Path(path)
        self.layout = layout

    def allocate(self) -> bool:
        """Create the file with its arrays fully allocated; False if it already exists."""
        if self.path.is_file():
            with h5py.File(self.path, "r") as handle:
                existing = SketchLayout.from_json(handle.attrs["layout"])
            if existing != self.layout:
                raise ValueError(f"{self.path} was allocated for {existing}")
            return False
        layout = self.layout
        shapes = [("outer", (layout.dim, layout.num_outer))]
        if layout.num_inner:
            shapes.append(("inner", (layout.num_inner, layout.num_inner)))
        with atomic_write(self.path) as tmp, h5py.File(tmp, "w") as handle:
            # Early allocation: the space is reserved now, not on every step's merge.
            for name, shape in shapes:
                plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                h5py.h5d.create(
                    handle.id,
                    name.encode(),
                    h5py.h5t.py_create(np.dtype(layout.dtype)),
                    h5py.h5s.create_simple(shape),
                    plist,
                )
            handle.attrs["layout"] = layout.to_json()
            handle.attrs["holds"] = ""
        return True

    @contextmanager
    def locked(self):
        """Exclusive use of the arrays (solves of different steps share them)."""
        with exclusive_lock(self.path.with_suffix(".lock")):
            yield self

    def merge(self, store: MeasurementStore, label: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Verify every part of ``store`` and merge it into the arrays (inside
        :meth:`locked`); returns the merged ``outer`` (D, k) and ``inner`` (s, s) (None
        without inner sketch), which the caller would otherwise read back.

        Each part is read once (checksums and copy in one pass) into arrays in memory, and
        each array is written in one contiguous write: copying ``(D, P)`` parts straight
        into the ``(D, k)`` dataset would write ``D`` short strided runs per part.

        Raises:
            IncompleteMeasurements: naming the missing and corrupt indices; the arrays on
                disk are then left untouched.
        """
        layout = self.layout
        outer = np.empty((layout.dim, layout.num_outer), dtype=layout.dtype)
        inner = (
            np.empty((layout.num_inner, layout.num_inner), dtype=layout.dtype)
            if layout.num_inner
            else None
        )

        def place(block: range, part_inner, part_outer) -> None:
            if part_inner is not None:
                inner[:, block.start : block.stop] = part_inner
            if part_outer is not None:
                outer[:, block.start : block.start + part_outer.shape[1]] = part_outer

        problems = store.verify(sink=place)
        if problems["missing"] or problems["corrupt"]:
            raise IncompleteMeasurements(problems["missing"], problems["corrupt"])
        with h5py.File(self.path, "r+") as target:
            target.attrs["holds"] = ""
            target["outer"][...] = outer
            if inner is not None:
                target["inner"][...] = inner
            target.attrs["holds"] = label
        return outer, inner
