"""Verify one round's measurements, and read them whole or in row blocks.

The basis and solve stages both start here: a single read of each part checks its flags and
checksums and places its columns, so a missing or corrupt measurement stops the stage before
any arithmetic and names the indices to re-measure. In memory (:func:`merged_round`) the
columns go into the split's monolithic arrays; :func:`round_rows` verifies the parts a row
block at a time, then reads them in row blocks (the a-posteriori round, which has no
monolithic arrays). Out of core (the plan's choice when ``D x k`` matrices do not fit the
budget) the row-block tasks read their rows as stored (:func:`round_block`) and checksum
them, and :func:`verify_round` checks the chained checksums. Also the tall datasets those
passes write.
"""

from __future__ import annotations

from contextlib import contextmanager

import h5py
import numpy as np
import torch

from hessov.errors import MissingInputError
from hessov.rundir import RunDir
from hessov.skerch_ext.storage import IncompleteMeasurements
from hessov.sketchspec import SketchSpec

#: Chunks of tall datasets: 4,096 rows (row blocks are multiples of it) by 64 columns, 1 MiB
#: in float32.
CHUNK_ROWS, CHUNK_COLUMNS = 4096, 64


def merged_round(
    run: RunDir, spec: SketchSpec, step: int, split: str, round_name: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """The round's ``outer`` ``(D, k)`` and ``inner`` ``(s, s)`` (``None`` without an inner
    sketch), merged under the arrays' lock.

    Raises:
        MissingInputError: naming every missing or corrupt measurement.
    """
    arrays = spec.monolithic(run, split, round_name)
    with arrays.locked():
        arrays.allocate()  # a layout for row blocks has none: this stage chose memory
        try:
            return arrays.merge(
                spec.store(run, step, split, round_name), f"step_{step}_{split}_{round_name}"
            )
        except IncompleteMeasurements as err:
            raise MissingInputError(
                _incomplete_message(run, step, split, round_name, err)
            ) from None


def _incomplete_message(run: RunDir, step: int, split: str, round_name: str, err) -> str:
    return (
        f"step {step} {split} ({round_name} round): {err}. Re-measure them with "
        f"`hessov resume {run.root}` (or `hessov measure ... indices=a:b`)."
    )


@contextmanager
def round_rows(run: RunDir, spec: SketchSpec, step: int, split: str, round_name: str):
    """A reader ``rows -> outer[rows]`` ``(len(rows), k)`` over the round's parts, typed
    ``torch``, after every part's flags and checksums were verified ``spec.row_block`` rows
    at a time (whole parts in memory without a row block): the out-of-core counterpart of
    :func:`merged_round`.

    Raises:
        MissingInputError: naming every missing or corrupt measurement.
    """
    store = spec.store(run, step, split, round_name)
    problems = store.verify_rows(spec.row_block or spec.layout.dim)
    if problems["missing"] or problems["corrupt"]:
        err = IncompleteMeasurements(problems["missing"], problems["corrupt"])
        raise MissingInputError(_incomplete_message(run, step, split, round_name, err))
    with store.outer_rows() as read:
        yield lambda rows: torch.from_numpy(read(rows))


def round_block(run: RunDir, spec: SketchSpec, step: int, split: str, round_name: str):
    """A reader ``rows -> outer[rows]`` ``(len(rows), k)`` of the round's parts as stored
    (numpy, unverified: a row-block phase checksums what it read, :func:`verify_round`),
    opening the parts for each read.
    """
    store = spec.store(run, step, split, round_name)

    def read(rows: range) -> np.ndarray:
        with store.outer_rows() as outer:
            return outer(rows)

    return read


def verify_round(run: RunDir, spec: SketchSpec, step: int, split: str, round_name: str):
    """A check ``crcs -> None`` of the round from the column CRCs of its row blocks
    ``(num_blocks, k)`` (``spec.row_ranges``), which names every missing or corrupt
    measurement.

    Raises:
        MissingInputError: from the check, naming them.
    """
    store = spec.store(run, step, split, round_name)
    counts = [len(rows) for rows in spec.row_ranges]

    def verify(crcs: torch.Tensor) -> None:
        problems = store.verify_segments(crcs.numpy().astype(np.uint32), counts)
        if problems["missing"] or problems["corrupt"]:
            err = IncompleteMeasurements(problems["missing"], problems["corrupt"])
            raise MissingInputError(_incomplete_message(run, step, split, round_name, err))

    return verify


def read_columns(dataset: h5py.Dataset, columns: range | None = None) -> np.ndarray:
    """Columns ``columns`` (all by default) of a ``(D, c)`` dataset, ``(D, len(columns))``.

    A dataset stored in ``(D, 1)`` chunks (the in-memory basis) is read one whole chunk per
    column into a column-major array, then made row-major once: a multi-column slice of it
    makes HDF5 scatter every value into a strided array, 25x slower at D = 11M (10 s for two
    columns). Any other chunking (the row-block basis, in :func:`tall_dataset`'s chunks) is
    read as one slice, which reads each chunk once.
    """
    chosen = range(dataset.shape[1]) if columns is None else columns
    if dataset.chunks is None or dataset.chunks[1] != 1:
        return dataset[:, chosen.start : chosen.stop]
    by_column = np.empty((len(chosen), dataset.shape[0]), dtype=dataset.dtype)
    for row, column in enumerate(chosen):
        dataset.read_direct(by_column[row], np.s_[:, column])
    return np.ascontiguousarray(by_column.T)


def tall_dataset(handle: h5py.File, name: str, shape: tuple[int, int], dtype) -> h5py.Dataset:
    """A ``(D, c)`` dataset chunked for both ways it is read: row blocks (the out-of-core
    passes, the analysis) and column blocks (the second round's measure tasks, the replay).
    """
    chunks = (min(shape[0], CHUNK_ROWS), min(shape[1], CHUNK_COLUMNS))
    return handle.create_dataset(name, shape, dtype=dtype, chunks=chunks)
