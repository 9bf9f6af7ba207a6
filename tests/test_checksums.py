"""Unit tests of combining segment CRCs (``skerch_ext/checksums.py``).

Array tasks that each read one row block can checksum only their segment of every column;
the combined segment CRCs must equal what ``zlib.crc32`` gives on the whole column, which is
what the part files store (:func:`column_checksums`). These tests compare with zlib directly
on random bytes and split points, then over many columns of a float32 block split into uneven
row blocks, with and without an inner-column prefix, and check that one flipped byte changes
exactly its column's combined CRC.
"""

import zlib

import numpy as np
import pytest

from hessov.skerch_ext.checksums import chained_checksums, crc32_combine, segment_checksums
from hessov.skerch_ext.storage import column_checksums

COLUMNS = 200


def uneven_ranges(num_rows: int, rng: np.random.Generator, pieces: int = 5) -> list[range]:
    """``pieces`` consecutive row ranges of random, unequal lengths covering ``num_rows``
    (some possibly empty).
    """
    cuts = np.sort(rng.integers(0, num_rows + 1, size=pieces - 1))
    bounds = [0, *cuts.tolist(), num_rows]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def combined_over_blocks(start: np.ndarray, outer: np.ndarray, ranges: list[range]) -> np.ndarray:
    """The CRCs of ``start``'s prefixes followed by ``outer``'s columns, from one
    :func:`segment_checksums` per row block.
    """
    segments = [
        (segment_checksums(outer[rows.start : rows.stop]), len(rows) * outer.itemsize)
        for rows in ranges
    ]
    return chained_checksums(start, segments)


@pytest.mark.parametrize("length", [0, 1, 3, 4096, 1_000_003])
def test_combine_matches_zlib_on_random_splits(length):
    rng = np.random.default_rng(length)
    data = rng.integers(0, 256, size=length, dtype=np.uint8).tobytes()
    whole = zlib.crc32(data)
    splits = {0, length, *rng.integers(0, length + 1, size=6).tolist()}
    for split in sorted(splits):
        first = np.array([zlib.crc32(data[:split])], dtype=np.uint32)
        second = np.array([zlib.crc32(data[split:])], dtype=np.uint32)
        combined = crc32_combine(first, second, length - split)
        assert combined.dtype == np.uint32
        assert combined.shape == (1,)
        assert int(combined[0]) == whole, f"length {length}, split {split}"


def test_combine_vectorized_entries_differ():
    """Every entry is combined on its own: different prefixes and suffixes of one length."""
    rng = np.random.default_rng(1)
    count, head, tail = 1000, 7, 37
    heads = rng.integers(0, 256, size=(count, head), dtype=np.uint8)
    tails = rng.integers(0, 256, size=(count, tail), dtype=np.uint8)
    first = np.array([zlib.crc32(row) for row in heads], dtype=np.uint32)
    second = np.array([zlib.crc32(row) for row in tails], dtype=np.uint32)
    expected = np.array([zlib.crc32(t, zlib.crc32(h)) for h, t in zip(heads, tails, strict=True)])
    np.testing.assert_array_equal(crc32_combine(first, second, tail), expected.astype(np.uint32))
    assert len(np.unique(expected)) > count // 2


def test_combine_zero_length_returns_first_and_rejects_bad_arguments():
    first = np.array([1, 2**32 - 1, 12345], dtype=np.uint32)
    np.testing.assert_array_equal(crc32_combine(first, np.zeros(3, np.uint32), 0), first)
    with pytest.raises(ValueError, match="shapes"):
        crc32_combine(first, np.zeros(2, np.uint32), 4)
    with pytest.raises(ValueError, match="non-negative"):
        crc32_combine(first, np.zeros(3, np.uint32), -1)


@pytest.mark.parametrize("order", ["C", "F"])
def test_segment_checksums_match_zlib_per_column(order):
    rng = np.random.default_rng(2)
    block = np.asarray(rng.standard_normal((13, 9)), order=order)
    sums = segment_checksums(block)
    assert sums.dtype == np.uint32
    assert sums.shape == (9,)
    expected = [zlib.crc32(block[:, j].copy().tobytes()) for j in range(9)]
    np.testing.assert_array_equal(sums, np.array(expected, dtype=np.uint32))
    np.testing.assert_array_equal(segment_checksums(block[:0]), np.zeros(9, np.uint32))


def test_row_blocks_combine_to_stored_outer_checksums():
    rng = np.random.default_rng(3)
    dim = 1021
    outer = rng.standard_normal((dim, COLUMNS)).astype(np.float32)
    ranges = uneven_ranges(dim, rng)
    assert len({len(r) for r in ranges}) > 1
    combined = combined_over_blocks(np.zeros(COLUMNS, np.uint32), outer, ranges)
    np.testing.assert_array_equal(combined, column_checksums(None, outer, COLUMNS))


def test_row_blocks_chain_onto_inner_prefix():
    rng = np.random.default_rng(4)
    dim, inner_rows = 777, 31
    inner = rng.standard_normal((inner_rows, COLUMNS)).astype(np.float32)
    outer = rng.standard_normal((dim, COLUMNS)).astype(np.float32)
    start = column_checksums(inner, None, COLUMNS)
    combined = combined_over_blocks(start, outer, uneven_ranges(dim, rng))
    np.testing.assert_array_equal(combined, column_checksums(inner, outer, COLUMNS))
    # The prefix matters: without it the combined CRCs are those of the outer columns alone.
    assert not np.array_equal(combined, column_checksums(None, outer, COLUMNS))


def test_one_flipped_byte_changes_only_its_column():
    rng = np.random.default_rng(5)
    dim = 503
    outer = rng.standard_normal((dim, COLUMNS)).astype(np.float32)
    ranges = uneven_ranges(dim, rng)
    clean = combined_over_blocks(np.zeros(COLUMNS, np.uint32), outer, ranges)

    row, column = int(rng.integers(dim)), int(rng.integers(COLUMNS))
    damaged = outer.copy()
    damaged.view(np.uint8)[row, column * damaged.itemsize + 2] ^= 0x10  # (dim, 4 * COLUMNS)
    assert not np.array_equal(damaged, outer)
    corrupt = combined_over_blocks(np.zeros(COLUMNS, np.uint32), damaged, ranges)

    assert np.flatnonzero(corrupt != clean).tolist() == [column]
    np.testing.assert_array_equal(corrupt, column_checksums(None, damaged, COLUMNS))
