"""Appendable, compressed HDF5 store of flattened vectors, one column per training step.

The train stage writes the flattened float32 vector of the trainable parameters (those with
``requires_grad``, in ``model.parameters()`` order: the ``D`` dimensions of every Hessian) at
every recorded step, and optionally the full gradient on each Hessian subset, as in the
paper's ``*_params.h5``: dataset ``data`` of shape ``(D, n)`` with chunks ``(D, 1)`` and gzip
compression, and dataset ``steps`` ``(n,)`` with the step of each column (the paper called
it ``metadata``). Attribute ``parameter_layout`` (JSON) gives the name, shape and offset of
each trainable parameter in a column, ``frozen_parameters`` the name and shape of each
frozen one (not in ``D``).

Next to the parameters, ``params.h5`` records the state outside ``D`` that the Hessian
depends on (:func:`fixed_state`): the model's buffers (BatchNorm's ``running_mean``,
``running_var`` and ``num_batches_tracked``, any ``register_buffer``), then its frozen
parameters (a pretrained backbone keeps the values it was trained or loaded with), of the
same steps: dataset ``buffers`` ``(B, n)`` in float64 (exact for float32, float64 and
integer tensors), column ``j`` of the same step as ``data``'s, with attribute
``buffer_layout`` (name, shape, dtype, offset of each). It exists only for a model with
such state. :func:`load_recorded_state` loads both into a model. Columns are appended
with a resize and flushed, so a killed job leaves every completed column readable.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch


def trainable_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters with ``requires_grad``, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def parameter_layout(model: torch.nn.Module) -> list[dict]:
    """Name, shape and offset of every trainable parameter in the flattened vector."""
    layout, offset = [], 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            layout.append({"name": name, "shape": list(param.shape), "offset": offset})
            offset += param.numel()
    return layout


def frozen_layout(model: torch.nn.Module) -> list[dict]:
    """Name and shape of every parameter without ``requires_grad`` (not in ``D``)."""
    return [
        {"name": name, "shape": list(param.shape)}
        for name, param in model.named_parameters()
        if not param.requires_grad
    ]


def fixed_state(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The state outside ``D`` that the Hessian depends on: every buffer (``named_buffers()``
    order), then every frozen parameter; recorded with the parameters at each step.
    """
    frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
    return [*model.named_buffers(), *frozen]


def buffer_layout(model: torch.nn.Module) -> list[dict]:
    """Name, shape, dtype and offset of every tensor of :func:`fixed_state` in the flattened
    buffer vector.
    """
    layout, offset = [], 0
    for name, buffer in fixed_state(model):
        dtype = str(buffer.dtype).removeprefix("torch.")
        layout.append({"name": name, "shape": list(buffer.shape), "dtype": dtype, "offset": offset})
        offset += buffer.numel()
    return layout


def flatten_parameters(model: torch.nn.Module) -> torch.Tensor:
    """The trainable parameters as one vector ``(D,)`` in ``model.parameters()`` order."""
    return torch.cat([p.detach().reshape(-1) for p in trainable_parameters(model)])


def load_flat_parameters(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Copy a flattened vector ``(D,)`` into the model's trainable parameters, in place."""
    params = trainable_parameters(model)
    torch.nn.utils.vector_to_parameters(flat.to(params[0]), params)


def flatten_buffers(model: torch.nn.Module) -> torch.Tensor:
    """Every tensor of :func:`fixed_state` (buffers, then frozen parameters) as one float64
    vector ``(B,)`` on the CPU.
    """
    buffers = [b.detach().reshape(-1).to("cpu", torch.float64) for _, b in fixed_state(model)]
    return torch.cat(buffers) if buffers else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def load_flat_buffers(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Copy a vector ``(B,)`` of :func:`flatten_buffers` into the model's buffers and frozen
    parameters, in place, each cast back to its own dtype and device.
    """
    offset = 0
    for _, buffer in fixed_state(model):
        count = buffer.numel()
        buffer.copy_(flat[offset : offset + count].view_as(buffer))
        offset += count
    if offset != flat.numel():
        raise ValueError(f"the model has {offset} buffer values, the record {flat.numel()}")


def load_recorded_state(model: torch.nn.Module, store: ColumnStore, step: int) -> None:
    """Load the parameters and buffers recorded at ``step`` in ``store`` into ``model``."""
    load_flat_parameters(model, torch.from_numpy(store.read(step)))
    buffers = store.read_buffers(step)
    if buffers is not None:
        load_flat_buffers(model, torch.from_numpy(buffers))


class ColumnStore:
    """An HDF5 file of ``(D, n)`` float32 columns tagged by step (and, for the parameters
    of a model with buffers, ``(B, n)`` float64 buffer columns of the same steps).
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def create(
        self,
        dim: int,
        layout: list[dict],
        description: str,
        *,
        frozen: list[dict] | None = None,
        buffers: list[dict] | None = None,
    ) -> None:
        """Create the file, empty. Refuses to replace an existing file.

        Args:
            dim: ``D``, the length of every column.
            layout: :func:`parameter_layout` (attribute ``parameter_layout``).
            description: what the columns hold (attribute ``description``).
            frozen: :func:`frozen_layout`, written as attribute ``frozen_parameters``.
            buffers: :func:`buffer_layout`; when it names any buffer, dataset ``buffers``
                ``(B, 0)`` float64 is created next to ``data``.
        """
        with h5py.File(self.path, "x") as handle:
            handle.create_dataset(
                "data",
                shape=(dim, 0),
                maxshape=(dim, None),
                chunks=(dim, 1),
                dtype="float32",
                compression="gzip",
                compression_opts=4,
            )
            handle.create_dataset("steps", shape=(0,), maxshape=(None,), dtype="int64")
            handle.attrs["description"] = description
            handle.attrs["parameter_layout"] = json.dumps(layout)
            if frozen is not None:
                handle.attrs["frozen_parameters"] = json.dumps(frozen)
            size = sum(int(np.prod(entry["shape"])) for entry in buffers or [])
            if size:
                handle.create_dataset(
                    "buffers",
                    shape=(size, 0),
                    maxshape=(size, None),
                    chunks=(size, 1),
                    dtype="float64",
                    compression="gzip",
                    compression_opts=4,
                )
                handle.attrs["buffer_layout"] = json.dumps(buffers)

    def append(self, step: int, vector: torch.Tensor, buffers: torch.Tensor | None = None) -> bool:
        """Append ``vector`` ``(D,)`` (and ``buffers`` ``(B,)`` where the file records buffers)
        as the column of ``step``; False if it is there already.
        """
        with h5py.File(self.path, "a") as handle:
            data, steps = handle["data"], handle["steps"]
            if step in steps[:]:
                return False
            column = data.shape[1]
            if "buffers" in handle:
                if buffers is None:
                    raise ValueError(f"{self.path} records buffers: pass them with step {step}")
                handle["buffers"].resize((handle["buffers"].shape[0], column + 1))
                handle["buffers"][:, column] = buffers.detach().to("cpu", torch.float64).numpy()
            steps.resize((column + 1,))
            data.resize((data.shape[0], column + 1))
            data[:, column] = vector.detach().to("cpu", torch.float32).numpy()
            steps[column] = step
            handle.flush()
        return True

    def steps(self) -> list[int]:
        """The recorded steps, in the order of their columns."""
        with h5py.File(self.path, "r") as handle:
            return [int(s) for s in handle["steps"][:]]

    def read(self, step: int) -> np.ndarray:
        """The column of ``step`` as float32 ``(D,)``; KeyError naming the recorded steps."""
        with h5py.File(self.path, "r") as handle:
            steps = list(handle["steps"][:])
            if step not in steps:
                raise KeyError(f"step {step} was not recorded in {self.path}; recorded: {steps}")
            return handle["data"][:, steps.index(step)]

    def read_buffers(self, step: int) -> np.ndarray | None:
        """The buffers of ``step`` as float64 ``(B,)``; None if the file records none."""
        with h5py.File(self.path, "r") as handle:
            if "buffers" not in handle:
                return None
            steps = list(handle["steps"][:])
            if step not in steps:
                raise KeyError(f"step {step} was not recorded in {self.path}; recorded: {steps}")
            return handle["buffers"][:, steps.index(step)]

    def dim(self) -> int:
        """``D``, the length of every column."""
        with h5py.File(self.path, "r") as handle:
            return int(handle["data"].shape[0])
