"""CRC-32 of long columns from the CRCs of their row blocks, combined in row order.

A measurement part file stores, per measurement, ``zlib.crc32`` of its column's bytes
(:func:`hessov.skerch_ext.storage.column_checksums`: the inner column, then the outer column
chained onto it). Parallel array tasks each read one row block of the outer columns, so each
can only checksum its own segment of every column; a later single job must turn the segment
CRCs, in row order, into the CRC of the whole column and compare it with the stored one,
without reading the columns again.

Python's :mod:`zlib` has no ``crc32_combine``, so this module implements it as zlib does
(Mark Adler's ``crc32_combine`` in zlib's ``crc32.c``). CRC-32 is linear over GF(2): the
register after feeding ``B`` from a start value ``crc(A)`` is ``crc(A)`` pushed through
``len(B)`` zero bytes, XOR ``crc(B)`` (pre- and post-conditioning cancel out). Feeding one
zero bit is a fixed linear map of the 32-bit register, a ``32 x 32`` matrix over GF(2);
feeding ``n`` zero bytes is its ``8n``-th power, built by repeated squaring in
``O(32 * 32 * log n)`` Python work, once per length (cached). Applying that matrix to a
register is an XOR of the matrix columns where the register's bits are set, which numpy
does for every column's CRC at once: 32 vectorized steps whatever the number of columns.

Shapes: ``c`` columns (measurements), ``rows`` rows of a block; segment lengths are in bytes
(``rows * itemsize`` for a block of ``rows`` rows).
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np

#: The reflected CRC-32 polynomial (IEEE 802.3), as zlib uses it.
CRC32_POLYNOMIAL = 0xEDB88320

_BITS = 32


def segment_checksums(block: np.ndarray) -> np.ndarray:
    """CRC-32 (from 0) of each column of ``block``: the bytes of column ``j`` in row order,
    ``zlib.crc32(np.ascontiguousarray(block.T)[j])``, for any dtype and memory order.

    Args:
        block: ``(rows, c)`` array, a row block of the columns.

    Returns:
        ``(c,)`` uint32 array of the columns' CRCs (0 for columns of no rows).

    Raises:
        ValueError: ``block`` is not two-dimensional.
    """
    block = np.asarray(block)
    if block.ndim != 2:  # noqa: PLR2004 (a matrix)
        raise ValueError(f"block must be 2-D (rows, c), got shape {block.shape}")
    columns = np.ascontiguousarray(block.T)  # one transposed copy: columns become rows
    return np.fromiter(
        (zlib.crc32(column) for column in columns), dtype=np.uint32, count=columns.shape[0]
    )


def _times(matrix: tuple[int, ...], vector: int) -> int:
    """GF(2) matrix times vector: XOR of the columns ``matrix[i]`` where bit ``i`` is set."""
    total = 0
    bit = 0
    while vector:
        if vector & 1:
            total ^= matrix[bit]
        vector >>= 1
        bit += 1
    return total


def _compose(outer: tuple[int, ...], inner: tuple[int, ...]) -> tuple[int, ...]:
    """GF(2) matrix product ``outer @ inner`` (apply ``inner``, then ``outer``)."""
    return tuple(_times(outer, column) for column in inner)


@lru_cache(maxsize=64)
def _zeros_operator(length: int) -> tuple[int, ...]:
    """The ``32 x 32`` GF(2) matrix that feeds ``length`` zero bytes into a CRC-32 register,
    as 32 columns (column ``i`` is the image of register bit ``i``).
    """
    # One zero bit: shift right, XOR the polynomial when the bit shifted out was set.
    power = (CRC32_POLYNOMIAL, *(1 << (i - 1) for i in range(1, _BITS)))
    for _ in range(3):  # one zero byte: 8 = 2^3 zero bits
        power = _compose(power, power)
    result = tuple(1 << i for i in range(_BITS))  # identity
    while True:  # result = power^length, by squaring; powers of one map commute
        if length & 1:
            result = _compose(power, result)
        length >>= 1
        if not length:
            return result
        power = _compose(power, power)


def crc32_combine(first: np.ndarray, second: np.ndarray, second_length: int) -> np.ndarray:
    """``zlib.crc32(B, zlib.crc32(A))`` for every entry, given only ``first = crc32(A)``,
    ``second = crc32(B)`` and ``second_length = len(B)`` in bytes (the same for all entries).

    The zlib algorithm (Mark Adler's ``crc32_combine``): push ``first`` through
    ``second_length`` zero bytes with one ``32 x 32`` GF(2) matrix, applied to all entries
    at once, then XOR ``second``.

    Args:
        first: uint32 array of any shape, the CRCs of the leading segments.
        second: uint32 array of the same shape, the CRCs (from 0) of the following segments.
        second_length: byte length of every following segment, ``>= 0``.

    Returns:
        uint32 array of the shape of ``first``: the CRCs of the concatenations. ``first``
        itself (as a uint32 copy) when ``second_length`` is 0.

    Raises:
        ValueError: the shapes differ or ``second_length`` is negative.
    """
    first = np.asarray(first, dtype=np.uint32)
    second = np.asarray(second, dtype=np.uint32)
    if first.shape != second.shape:
        raise ValueError(f"shapes differ: first {first.shape}, second {second.shape}")
    if second_length < 0:
        raise ValueError(f"second_length={second_length} must be non-negative")
    if second_length == 0:
        return first.copy()
    operator = np.array(_zeros_operator(int(second_length)), dtype=np.uint32)
    combined = second.copy()
    for bit in range(_BITS):
        # Bit is 0 or 1, so the product is either 0 or the whole column: a masked XOR.
        combined ^= ((first >> np.uint32(bit)) & np.uint32(1)) * operator[bit]
    return combined


def chained_checksums(start: np.ndarray, segments: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """The CRCs of ``start``'s bytes followed by every segment, in order:
    :func:`crc32_combine` folded over ``segments`` from ``start``.

    Args:
        start: ``(c,)`` uint32 CRCs of the prefixes (zeros for no prefix, e.g. the inner
            columns' :func:`~hessov.skerch_ext.storage.column_checksums`).
        segments: ``(segment_crcs, segment_length_bytes)`` pairs in row order, each
            ``segment_crcs`` ``(c,)`` uint32 (from :func:`segment_checksums`) and
            ``segment_length_bytes`` its columns' byte length, ``rows * itemsize``.

    Returns:
        ``(c,)`` uint32 CRCs of the whole columns.
    """
    combined = np.asarray(start, dtype=np.uint32).copy()
    for crcs, length in segments:
        combined = crc32_combine(combined, crcs, length)
    return combined
