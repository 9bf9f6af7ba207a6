"""Unit tests of the HDF5 measurement storage (``skerch_ext/storage.py``).

The storage is what makes measuring resumable and safe to distribute: a layout fixes the
blocks, each block is one part file written atomically with flags and checksums, a claim
keeps two workers off one block, and a merge refuses missing or corrupt measurements.
Until now it was exercised only through slow CLI runs; these tests check each of those
promises directly on tiny layouts in ``tmp_path`` (D=12, k=3, s=6, blocks of 2, and a set
of outer columns only), comparing what comes back with the numpy arrays written.
"""

import zlib

import h5py
import numpy as np
import pytest

from hessov.skerch_ext.storage import (
    FLAG_MEASURED,
    IncompleteMeasurements,
    MeasurementStore,
    MonolithicArrays,
    SketchLayout,
    check_part_count,
    column_checksums,
    describe_indices,
)

DIM, K, S, BLOCK = 12, 3, 6, 2


def make_layout(num_outer: int = K, num_inner: int = S, block_size: int = BLOCK) -> SketchLayout:
    return SketchLayout(DIM, num_outer, num_inner, block_size, "float64", "gaussian", 0)


def sketch_arrays(layout: SketchLayout, seed: int = 0) -> tuple[np.ndarray | None, np.ndarray]:
    """Random measurements of a whole sketch.

    Args:
        layout: The sketch's shape.
        seed: Seed of the generator.

    Returns:
        ``inner`` ``(s, s)`` (None without inner sketch) and ``outer`` ``(D, k)``.
    """
    rng = np.random.default_rng(seed)
    inner = rng.standard_normal((layout.num_inner, layout.num_inner)) if layout.num_inner else None
    return inner, rng.standard_normal((layout.dim, layout.num_outer))


def write(store: MeasurementStore, block_id: int, inner, outer, **attrs) -> None:
    """Write block ``block_id`` of the whole-sketch arrays ``inner`` and ``outer``."""
    block = store.layout.blocks[block_id]
    part_inner = None if inner is None else inner[:, block.start : block.stop]
    n_outer = max(0, min(block.stop, store.layout.num_outer) - block.start)
    part_outer = outer[:, block.start : block.start + n_outer] if n_outer else None
    store.write_block(block_id, part_inner, part_outer, attrs or None)


@pytest.fixture
def store(tmp_path) -> MeasurementStore:
    created = MeasurementStore(tmp_path / "parts", make_layout())
    created.create()
    return created


# -- SketchLayout ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_outer", "num_inner", "block_size", "message"),
    [
        (6, 6, 2, "must satisfy 0 < k < s"),
        (7, 6, 2, "must satisfy 0 < k < s"),
        (0, 6, 2, "must satisfy 0 < k < s"),
        (0, 0, 2, "must be >= 1"),
        (3, DIM + 1, 2, "exceeds the dimension"),
        (3, 6, 0, "block_size must be >= 1"),
    ],
)
def test_layout_refuses_impossible_shapes(num_outer, num_inner, block_size, message):
    with pytest.raises(ValueError, match=message):
        make_layout(num_outer, num_inner, block_size)


def test_blocks_partition_the_measurements_with_a_short_last_block():
    layout = make_layout(num_outer=3, num_inner=7, block_size=3)
    assert layout.num_measurements == 7
    assert layout.blocks == [range(0, 3), range(3, 6), range(6, 7)]
    outer_only = make_layout(num_outer=5, num_inner=0, block_size=2)
    assert outer_only.num_measurements == 5
    assert outer_only.blocks == [range(0, 2), range(2, 4), range(4, 5)]
    assert make_layout(block_size=100).blocks == [range(0, S)]


def test_layout_json_round_trip():
    layout = make_layout()
    assert SketchLayout.from_json(layout.to_json()) == layout


# -- MeasurementStore -----------------------------------------------------------------------


def test_create_makes_every_part_and_is_idempotent(tmp_path):
    store = MeasurementStore(tmp_path / "parts", make_layout())
    assert store.create() == 3
    assert sorted(p.name for p in store.directory.glob("part_*.h5")) == [
        "part_00000.h5",
        "part_00001.h5",
        "part_00002.h5",
    ]
    assert store.view_path.is_file()
    assert SketchLayout.from_json((store.directory / "layout.json").read_text()) == store.layout
    assert store.create() == 0
    assert store.missing_indices() == list(range(S))


def test_create_keeps_measured_parts_and_refuses_another_layout(store):
    inner, outer = sketch_arrays(store.layout)
    write(store, 0, inner, outer)
    assert store.create() == 0
    assert store.block_measured(0)
    store.part_path(2).unlink()
    assert store.create() == 1
    assert not store.block_measured(2)
    with pytest.raises(ValueError, match="was laid out for"):
        MeasurementStore(store.directory, make_layout(num_inner=8)).create()


def test_missing_indices_follow_the_written_blocks(store):
    inner, outer = sketch_arrays(store.layout)
    assert store.missing_indices() == [0, 1, 2, 3, 4, 5]
    write(store, 1, inner, outer)
    assert store.missing_indices() == [0, 1, 4, 5]
    assert store.block_measured(1) and not store.block_measured(0)
    write(store, 0, inner, outer)
    write(store, 2, inner, outer)
    assert store.missing_indices() == []
    assert all((flags == FLAG_MEASURED).all() for flags in store.block_flags())


def test_a_deleted_part_reads_as_missing(store):
    inner, outer = sketch_arrays(store.layout)
    for block_id in range(3):
        write(store, block_id, inner, outer)
    store.part_path(1).unlink()
    assert store.missing_indices() == [2, 3]
    assert not store.block_measured(1)
    assert store.verify() == {"missing": [2, 3], "corrupt": []}


def test_writing_a_block_again_replaces_it_atomically(store):
    """``write_block`` neither refuses nor skips a measured block: it renames the new part
    over the old one (measure skips measured blocks itself, before measuring).
    """
    first_inner, first_outer = sketch_arrays(store.layout, seed=1)
    second_inner, second_outer = sketch_arrays(store.layout, seed=2)
    write(store, 0, first_inner, first_outer)
    write(store, 0, second_inner, second_outer)
    with h5py.File(store.part_path(0), "r") as handle:
        np.testing.assert_array_equal(handle["inner"][:], second_inner[:, 0:2])
        np.testing.assert_array_equal(handle["outer"][:], second_outer[:, 0:2])
    assert store.verify()["corrupt"] == []
    assert not list(store.directory.glob(".*.tmp"))


def test_write_block_checks_shapes(store):
    inner, outer = sketch_arrays(store.layout)
    with pytest.raises(ValueError, match="inner block must have shape"):
        store.write_block(0, None, outer[:, :2])
    with pytest.raises(ValueError, match="inner block must have shape"):
        store.write_block(0, inner[:, :3], outer[:, :2])
    with pytest.raises(ValueError, match="outer block must have shape"):
        store.write_block(1, inner[:, 2:4], np.zeros((DIM, 2)))  # block 1 holds outer column 2 only
    with pytest.raises(ValueError, match="outer block must have shape"):
        store.write_block(0, inner[:, 0:2], None)
    store.write_block(2, inner[:, 4:6], None)  # indices 4-5 are >= k: no outer columns
    assert store.missing_indices() == [0, 1, 2, 3]


def test_claim_is_exclusive_and_non_blocking(store):
    # flock conflicts between open file descriptions, so a second claim in this process
    # stands for another worker.
    with store.claim(0) as held:
        assert held is True
        with store.claim(0) as again:
            assert again is False
        with store.claim(1) as other:
            assert other is True
    with store.claim(0) as after_release:
        assert after_release is True


def test_verify_finds_a_flipped_byte_and_names_its_index(store):
    inner, outer = sketch_arrays(store.layout)
    for block_id in range(3):
        write(store, block_id, inner, outer)
    assert store.verify() == {"missing": [], "corrupt": []}
    # Flip one byte of outer[0, 1] of part 0 (measurement 1) in the file itself.
    with h5py.File(store.part_path(0), "r") as handle:
        dataset = handle["outer"]
        offset = dataset.id.get_offset() + (0 * dataset.shape[1] + 1) * dataset.dtype.itemsize
    with open(store.part_path(0), "r+b") as raw:
        raw.seek(offset)
        byte = raw.read(1)
        raw.seek(offset)
        raw.write(bytes([byte[0] ^ 0xFF]))
    assert store.verify() == {"missing": [], "corrupt": [1]}
    assert store.missing_indices() == []  # the flags alone do not see it


def test_verify_finds_a_changed_inner_value_and_an_unreadable_part(store):
    inner, outer = sketch_arrays(store.layout)
    for block_id in range(3):
        write(store, block_id, inner, outer)
    with h5py.File(store.part_path(2), "r+") as handle:
        handle["inner"][3, 1] += 1.0  # measurement 5
    assert store.verify() == {"missing": [], "corrupt": [5]}
    store.part_path(1).write_bytes(b"not an HDF5 file")
    assert store.verify() == {"missing": [], "corrupt": [2, 3, 5]}


@pytest.mark.parametrize("row_block", [1, 5, DIM])
def test_verify_in_row_blocks_finds_what_verify_finds(store, row_block):
    inner, outer = sketch_arrays(store.layout)
    for block_id in range(3):
        write(store, block_id, inner, outer)
    assert store.verify_rows(row_block) == {"missing": [], "corrupt": []}
    with h5py.File(store.part_path(0), "r+") as handle:
        handle["outer"][DIM - 1, 1] += 1.0  # the last row of measurement 1: the last piece
    with h5py.File(store.part_path(2), "r+") as handle:
        handle["inner"][3, 1] += 1.0  # measurement 5
    with h5py.File(store.part_path(1), "r+") as handle:
        handle["flags"][0] = 0  # measurement 2 back to initialized
    expected = {"missing": [2], "corrupt": [1, 5]}
    assert store.verify() == store.verify_rows(row_block) == expected
    with store.outer_rows() as read:
        np.testing.assert_array_equal(read(range(3, 7))[:, 2:], outer[3:7, 2:])
    np.testing.assert_array_equal(store.inner_matrix()[:, 2:5], inner[:, 2:5])


def test_verify_hands_only_intact_parts_to_the_sink(store):
    inner, outer = sketch_arrays(store.layout)
    write(store, 0, inner, outer)
    write(store, 1, inner, outer)
    with h5py.File(store.part_path(1), "r+") as handle:
        handle["outer"][0, 0] = 99.0
    received = []
    problems = store.verify(sink=lambda block, i, o: received.append((block, i, o)))
    assert problems == {"missing": [4, 5], "corrupt": [2]}
    assert [block for block, _, _ in received] == [range(0, 2)]
    np.testing.assert_array_equal(received[0][1], inner[:, 0:2])
    np.testing.assert_array_equal(received[0][2], outer[:, 0:2])


def test_part_attrs_hold_what_each_block_was_written_with(store):
    inner, outer = sketch_arrays(store.layout)
    write(store, 1, inner, outer, worker="node-7", kernel_path="default")
    attrs = store.part_attrs()
    assert len(attrs) == 3
    assert list(attrs[1]["indices"]) == [2, 4]
    assert attrs[1]["worker"] == "node-7" and attrs[1]["kernel_path"] == "default"
    assert "worker" not in attrs[0] and list(attrs[0]["indices"]) == [0, 2]


def test_view_reads_nan_for_missing_parts(store):
    inner, outer = sketch_arrays(store.layout)
    write(store, 0, inner, outer)
    with h5py.File(store.view_path, "r") as view:
        assert view["outer"].shape == (DIM, K) and view["inner"].shape == (S, S)
        np.testing.assert_array_equal(view["outer"][:, 0:2], outer[:, 0:2])
        np.testing.assert_array_equal(view["inner"][:, 0:2], inner[:, 0:2])
        assert np.isnan(view["outer"][:, 2]).all()
        assert np.isnan(view["inner"][:, 2:]).all()


@pytest.mark.parametrize(
    ("indices", "text"),
    [
        ([], "none"),
        ([5], "5"),
        ([0, 1, 2, 7], "0-2, 7"),
        ([1, 3, 4, 5, 9, 10], "1, 3-5, 9-10"),
    ],
)
def test_describe_indices(indices, text):
    assert describe_indices(indices) == text


# -- MonolithicArrays -----------------------------------------------------------------------


@pytest.mark.parametrize("num_inner", [S, 0], ids=["with-inner", "outer-only"])
def test_merge_places_every_block_at_its_columns(tmp_path, num_inner):
    layout = make_layout(num_outer=K if num_inner else 5, num_inner=num_inner)
    store = MeasurementStore(tmp_path / "parts", layout)
    store.create()
    inner, outer = sketch_arrays(layout, seed=3)
    for block_id in reversed(range(len(layout.blocks))):
        write(store, block_id, inner, outer)
    arrays = MonolithicArrays(tmp_path / "merged.h5", layout)
    assert arrays.allocate() is True
    assert arrays.allocate() is False
    with arrays.locked():
        merged_outer, merged_inner = arrays.merge(store, "step 3 train")
    np.testing.assert_array_equal(merged_outer, outer)
    with h5py.File(arrays.path, "r") as handle:
        np.testing.assert_array_equal(handle["outer"][:], outer)
        assert handle.attrs["holds"] == "step 3 train"
        if num_inner:
            np.testing.assert_array_equal(handle["inner"][:], inner)
        else:
            assert "inner" not in handle
    if num_inner:
        np.testing.assert_array_equal(merged_inner, inner)
    else:
        assert merged_inner is None


def test_merge_refuses_missing_and_corrupt_measurements_and_leaves_the_arrays(store, tmp_path):
    inner, outer = sketch_arrays(store.layout)
    arrays = MonolithicArrays(tmp_path / "merged.h5", store.layout)
    arrays.allocate()
    for block_id in range(3):
        write(store, block_id, inner, outer)
    arrays.merge(store, "step 0 train")
    store.part_path(2).unlink()
    with h5py.File(store.part_path(0), "r+") as handle:
        handle["inner"][0, 0] = -1.0
    with pytest.raises(IncompleteMeasurements) as err:
        arrays.merge(store, "step 1 train")
    assert err.value.missing == [4, 5] and err.value.corrupt == [0]
    assert "missing: 4-5" in str(err.value) and "corrupt: 0" in str(err.value)
    with h5py.File(arrays.path, "r") as handle:
        assert handle.attrs["holds"] == "step 0 train"
        np.testing.assert_array_equal(handle["outer"][:], outer)


def test_merge_of_a_fresh_layout_names_every_index(store, tmp_path):
    arrays = MonolithicArrays(tmp_path / "merged.h5", store.layout)
    arrays.allocate()
    with pytest.raises(IncompleteMeasurements, match="missing: 0-5; corrupt: none"):
        arrays.merge(store, "step 0 train")


def test_allocate_refuses_arrays_of_another_layout(tmp_path):
    MonolithicArrays(tmp_path / "merged.h5", make_layout()).allocate()
    with pytest.raises(ValueError, match="was allocated for"):
        MonolithicArrays(tmp_path / "merged.h5", make_layout(num_inner=8)).allocate()


# -- check_part_count and column_checksums ---------------------------------------------------


def test_check_part_count_allows_half_the_open_file_limit():
    check_part_count(5, limit=10)
    with pytest.raises(ValueError, match="6 part files exceed half the open-file limit"):
        check_part_count(6, limit=10)
    check_part_count(1)  # the process's own limit


def test_column_checksums_are_crc32_of_each_measurement():
    inner, outer = sketch_arrays(make_layout(), seed=4)
    sums = column_checksums(inner, outer, S)
    assert sums.shape == (S,) and sums.dtype == np.uint32
    expected_1 = zlib.crc32(np.ascontiguousarray(outer[:, 1]), zlib.crc32(inner[:, 1].copy()))
    assert sums[1] == expected_1
    assert sums[4] == zlib.crc32(inner[:, 4].copy())  # index >= k: inner column only
    only_outer = column_checksums(None, outer, K)
    assert only_outer[2] == zlib.crc32(outer[:, 2].copy())


def test_column_checksums_change_only_where_a_value_changes():
    inner, outer = sketch_arrays(make_layout(), seed=5)
    before = column_checksums(inner, outer, S)
    changed_outer = outer.copy()
    changed_outer[7, 1] = np.nextafter(changed_outer[7, 1], np.inf)
    after = column_checksums(inner, changed_outer, S)
    assert list(np.flatnonzero(before != after)) == [1]
    changed_inner = inner.copy()
    changed_inner[0, 4] += 1.0
    after = column_checksums(changed_inner, outer, S)
    assert list(np.flatnonzero(before != after)) == [4]
