"""Network definitions: DeepOBS's own PyTorch modules, the paper's 16x16 MLP, ResNet-18 and the
edge-of-stability architectures.

DeepOBS (Schneider et al. 2019) ships its PyTorch networks in
``deepobs/pytorch/testproblems/testproblems_modules.py``, but ``import deepobs`` imports
TensorFlow and its datasets download through torchvision at run time. The network files
need only torch, numpy and scipy, so :func:`deepobs_modules` loads them without running
the package ``__init__``: it registers a private package object whose ``__path__`` is the
testproblems directory (found with ``importlib.util.find_spec``, which does not execute
anything) and imports ``testproblems_modules`` through it.

The edge-of-stability networks follow Cohen et al. 2021, "Gradient Descent on Neural
Networks Typically Occurs at the Edge of Stability" (their ``fc-*`` and ``cnn-*``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from functools import cache
from pathlib import Path

import torch
from torch import nn

_PRIVATE_PACKAGE = "_hessov_deepobs_testproblems"


@cache
def deepobs_modules() -> types.ModuleType:
    """DeepOBS's ``testproblems_modules``, imported without ``deepobs/__init__``."""
    spec = importlib.util.find_spec("deepobs")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("deepobs is not installed (pip install --no-deps deepobs==1.1.2)")
    directory = Path(next(iter(spec.submodule_search_locations))) / "pytorch" / "testproblems"
    package = types.ModuleType(_PRIVATE_PACKAGE)
    package.__path__ = [str(directory)]
    sys.modules[_PRIVATE_PACKAGE] = package
    return importlib.import_module(f"{_PRIVATE_PACKAGE}.testproblems_modules")


class MnistMiniMLP(nn.Sequential):
    """The paper's mnist_mini network: 16x16 inputs, MLP 256-20-20-20-20-20-10 with tanh.

    7,030 parameters. Input ``(N, 1, 16, 16)``, output logits ``(N, 10)``.
    """

    def __init__(self, in_features: int = 256, hidden: int = 20, depth: int = 5, classes: int = 10):
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        layers.append(nn.Linear(width, classes))
        super().__init__(*layers)


_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}


def eos_fully_connected(activation: str, in_shape: tuple[int, ...], classes: int = 10) -> nn.Module:
    """Cohen et al.'s ``fc-<activation>``: flatten, two hidden layers of 200, then ``classes``.

    On 32x32x3 inputs this has 656,810 parameters.
    """
    act = _ACTIVATIONS[activation]
    in_features = int(torch.tensor(in_shape).prod())
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 200),
        act(),
        nn.Linear(200, 200),
        act(),
        nn.Linear(200, classes),
    )


def eos_convolutional(activation: str, in_shape: tuple[int, ...], classes: int = 10) -> nn.Module:
    """Cohen et al.'s ``cnn-<activation>``: two 3x3 convolutions of 32 channels, each followed
    by 2x2 max-pooling, then a linear layer. 30,634 parameters on 32x32x3 inputs.

    ``in_shape``: ``(C, H, W)`` of one input.
    """
    act = _ACTIVATIONS[activation]
    channels, height, width = in_shape
    flat = 32 * (height // 4) * (width // 4)
    return nn.Sequential(
        nn.Conv2d(channels, 32, kernel_size=3, padding=1),
        act(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, kernel_size=3, padding=1),
        act(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, classes),
    )


class ScaledDifference(nn.Module):
    """The trainable noisy quadratic model: output ``sqrt(h) * (x - c)`` for data points ``c``.

    With the half squared loss against zero targets, the per-example loss is
    ``0.5 * sum_i h_i (x_i - c_i)^2``, so the Hessian is exactly ``diag(h)`` and, for
    ``c_i ~ N(0, 1/h_i)``, the per-example gradient noise has variance ``h_i``: a batch
    of B has ``sigma_i^2 = h_i / B`` (Zhang et al. 2019). Parameters ``x``: ``(K,)``,
    initialised ``N(0, I)``; input ``(N, K)``, output ``(N, K)``.
    """

    def __init__(self, curvatures: torch.Tensor):
        super().__init__()
        self.register_buffer("sqrt_curvatures", curvatures.sqrt())
        self.x = nn.Parameter(torch.randn(curvatures.shape[0]))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """``sqrt(h) * (x - c)`` ``(N, K)`` for the data points ``points`` ``(N, K)``."""
        return self.sqrt_curvatures * (self.x - points)


class QuadraticDeep(nn.Module):
    """DeepOBS's ``quadratic_deep`` network with its Hessian given as a tensor.

    Wraps ``net_quadratic_deep`` so that the Hessian is a buffer (moved with the model
    and saved with it) instead of a plain attribute. Output: the per-example loss
    ``0.5 (theta - x)^T Q (theta - x)``, shape ``(N,)``.
    """

    def __init__(self, hessian: torch.Tensor):
        super().__init__()
        net = deepobs_modules().net_quadratic_deep(hessian.shape[0], hessian)
        self.theta = net.theta
        self.register_buffer("hessian", hessian)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """The per-example loss ``(N,)`` for the data points ``points`` ``(N, D)``."""
        diff = self.theta - points
        return 0.5 * ((diff @ self.hessian) * diff).sum(dim=1)


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norm and a shortcut, ReLU after
    the sum. The shortcut is a strided 1x1 convolution with batch norm where the shape changes.

    Input ``(N, in_channels, H, W)``, output ``(N, channels, ceil(H / stride), ceil(W /
    stride))``.
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output ``(N, channels, H', W')``."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016, "Deep Residual Learning for Image Recognition", table 1).

    A 7x7 stride-2 convolution of 64 channels, batch norm, ReLU and 3x3 stride-2 max pooling,
    then four stages of two basic blocks (64, 128, 256, 512 channels; stages 2-4 halve the
    resolution in their first block), global average pooling and a linear layer. Module and
    parameter names are torchvision's (``conv1``, ``layer1.0.bn2.weight``, ``fc.bias``), so its
    ``state_dict`` loads torchvision's weights. 11,689,512 parameters for 1,000 classes.
    Initialised as torchvision does: convolutions He-normal (fan out), batch norm scales 1 and
    shifts 0, the linear layer PyTorch's default.

    Input ``(N, 3, H, W)`` (224x224 on ImageNet; any size of at least 32 works, since the
    pooling is adaptive), output logits ``(N, classes)``.
    """

    STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        width = 64
        for number, (channels, stride) in enumerate(self.STAGES, start=1):
            stage = nn.Sequential(
                BasicBlock(width, channels, stride), BasicBlock(channels, channels)
            )
            setattr(self, f"layer{number}", stage)
            width = channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, classes)`` of images ``(N, 3, H, W)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))
