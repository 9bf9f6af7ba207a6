"""Image-folder datasets (ImageNet's layout) decoded on demand with Pillow.

ImageNet (ILSVRC-2012, Russakovsky et al. 2015) is commonly kept as one folder per class and
split: ``ROOT/train/<wnid>/*.JPEG`` and ``ROOT/val/<wnid>/*.JPEG``. torchvision's
``ImageFolder`` reads that layout, but torchvision cannot be imported with the pinned CPU
build of torch, so this module reads it itself, with the same conventions: the classes are
the subfolder names in sorted order (a class's label is its position), and the examples of a
class are its image files sorted by name.

Every image goes through the standard deterministic evaluation transform (He et al. 2016,
as in torchvision's ImageNet reference): the shorter side resized to ``crop * 256 / 224``
(256 for the usual crop of 224) with Pillow's antialiased bilinear filter, a center crop of
``crop x crop``, values scaled to ``[0, 1]`` and normalised per channel with ImageNet's mean
and standard deviation. Nothing is random, so a Hessian on these images is a fixed operator
and training sees the same pixels (the paper's non-augmented "det" setting).

The 1.28M training images would take 770 GB as float32 tensors, so a split's inputs are an
:class:`ImageFolderRows` (:class:`hessov.batching.LazyRows`): only the examples taken (a
training batch, a chunk of an evaluation, the Hessian subset) are decoded, in a thread pool
(Pillow releases the GIL while it decodes and resizes).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hessov.batching import LazyRows
from hessov.errors import DatasetNotFoundError

#: Files read as images, compared case-insensitively.
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
#: ImageNet's per-channel mean and standard deviation of pixels in ``[0, 1]`` (RGB).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The folders of the two splits under the dataset's root.
SPLIT_FOLDERS = {"train": "train", "test": "val"}
LAYOUT_HINT = (
    "Expected ImageNet in the class-per-folder layout: $OBS_DATASETS/imagenet/train/<wnid>/"
    "*.JPEG and $OBS_DATASETS/imagenet/val/<wnid>/*.JPEG (the validation images sorted into "
    "one folder per class, the same classes as train). Set OBS_DATASETS (or OBS_DATASETS=... "
    "on the command line) to the directory holding imagenet/."
)


def evaluation_transform(image: Image.Image, crop: int) -> torch.Tensor:
    """Resize, center crop and normalise one image: float32 ``(3, crop, crop)``."""
    return normalise(cropped_pixels(image, crop)[None])[0]


def cropped_pixels(image: Image.Image, crop: int) -> torch.Tensor:
    """The resized, center-cropped RGB pixels of one image: uint8 ``(3, crop, crop)``.

    The shorter side becomes ``round(crop * 256 / 224)`` and the longer one keeps the aspect
    ratio (truncated to an integer); the crop's offsets are rounded as torchvision rounds
    them (Python's ``round``, half to even).
    """
    image = image.convert("RGB")
    short = round(crop * 256 / 224)
    width, height = image.size
    if width <= height:
        size = (short, int(short * height / width))
    else:
        size = (int(short * width / height), short)
    image = image.resize(size, Image.Resampling.BILINEAR)
    left = int(round((size[0] - crop) / 2.0))
    top = int(round((size[1] - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels ``(n, 3, H, W)`` as float32 in ``[0, 1]`` normalised per channel with
    ImageNet's mean and std, as torchvision's ``ToTensor`` and ``Normalize`` compute them.
    Elementwise float32 operations, so the same bits on every CPU kernel path.
    """
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return pixels.float().div(255.0).sub(mean).div(std)


class ImageFolderRows(LazyRows):
    """One split of an image folder: examples ``(N, 3, crop, crop)`` decoded when taken.

    Holds only the class names and each example's label and file name (about 20 bytes an
    example as a numpy byte-string array).

    Args:
        directory: the split's folder, holding one folder per class.
        classes: the class folders' names, in label order.
        labels: ``(N,)`` int64, each example's class.
        names: ``(N,)`` the file names inside their class folders.
        crop: the side of the center crop.
    """

    def __init__(
        self, directory: Path, classes: list[str], labels: np.ndarray, names: np.ndarray, crop: int
    ):
        super().__init__(len(names), (3, crop, crop))
        self.directory, self.classes, self.crop = directory, classes, crop
        self.labels, self.names = labels, names

    def path(self, index: int) -> Path:
        """The file of example ``index``."""
        return self.directory / self.classes[self.labels[index]] / self.names[index].decode()

    def _decode_into(self, pixels: torch.Tensor, row: int, index: int) -> None:
        path = self.path(index)
        try:
            with Image.open(path) as image:
                pixels[row] = cropped_pixels(image, self.crop)
        except (OSError, ValueError) as err:
            raise DatasetNotFoundError(f"{path}: not a readable image ({err})") from None

    def read(self, indices: list[int]) -> torch.Tensor:
        """Decode the examples ``indices``: float32 ``(n, 3, crop, crop)``.

        The threads only decode and crop (Pillow, without the GIL) into one uint8 buffer;
        the normalisation runs once on the whole batch, on torch's own threads.
        """
        pixels = torch.empty((len(indices), *self.row_shape), dtype=torch.uint8)
        workers = max(1, min(len(indices), torch.get_num_threads()))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(self._decode_into, [pixels] * len(indices), range(len(indices)), indices))
        return normalise(pixels)


def _image_names(directory: Path) -> list[str]:
    return sorted(
        entry.name
        for entry in os.scandir(directory)
        if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
    )


def scan_split(directory: Path, crop: int) -> tuple[ImageFolderRows, torch.Tensor]:
    """Index one split's folder: its inputs and its int64 labels ``(N,)``.

    Raises:
        DatasetNotFoundError: the folder is missing, has no class folders, or a class folder
            holds no images; the message gives the expected layout.
    """
    if not directory.is_dir():
        raise DatasetNotFoundError(f"ImageNet not found: no folder {directory}.\n{LAYOUT_HINT}")
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"{directory} holds no class folders.\n{LAYOUT_HINT}")
    labels, names = [], []
    for label, name in enumerate(classes):
        files = _image_names(directory / name)
        if not files:
            raise DatasetNotFoundError(
                f"{directory / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}).\n"
                f"{LAYOUT_HINT}"
            )
        labels += [label] * len(files)
        names += files
    label_array = np.asarray(labels, dtype=np.int64)
    rows = ImageFolderRows(directory, classes, label_array, np.asarray(names, dtype=bytes), crop)
    return rows, torch.from_numpy(label_array)


def imagenet_splits(obs_dir: Path | None, crop: int) -> dict[str, tuple]:
    """ImageNet's train and validation (``test``) splits from ``$OBS_DATASETS/imagenet``.

    Returns ``{"train": (rows, labels), "test": (rows, labels)}``.

    Raises:
        DatasetNotFoundError: a missing folder, or splits whose classes differ, with the
            expected layout.
    """
    if obs_dir is None:
        raise DatasetNotFoundError(f"ImageNet not found: OBS_DATASETS is not set.\n{LAYOUT_HINT}")
    root = obs_dir / "imagenet"
    splits = {split: scan_split(root / folder, crop) for split, folder in SPLIT_FOLDERS.items()}
    train_classes, test_classes = (splits[s][0].classes for s in ("train", "test"))
    if train_classes != test_classes:
        differ = sorted(set(train_classes) ^ set(test_classes))[:5]
        raise DatasetNotFoundError(
            f"{root}: train/ and val/ hold different class folders (e.g. {differ}).\n{LAYOUT_HINT}"
        )
    return splits
