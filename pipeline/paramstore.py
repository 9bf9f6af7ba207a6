"""Appendable, compressed HDF5 store of flattened vectors, one column per training step.

The train stage writes the flattened float32 parameter vector (in ``model.parameters()``
order) at every recorded step, and optionally the full gradient on each Hessian subset,
as in the paper's ``*_params.h5``: dataset ``data`` of shape ``(D, n)`` with chunks
``(D, 1)`` and gzip compression, and dataset ``steps`` ``(n,)`` with the step of each
column (the paper called it ``metadata``). Columns are appended with a resize and flushed,
so a killed job leaves every completed column readable.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch


def parameter_layout(model: torch.nn.Module) -> list[dict]:
    """Name, shape and offset of every parameter in the flattened vector."""
    layout, offset = [], 0
    for name, param in model.named_parameters():
        layout.append({"name": name, "shape": list(param.shape), "offset": offset})
        offset += param.numel()
    return layout


def flatten_parameters(model: torch.nn.Module) -> torch.Tensor:
    """All parameters as one vector ``(D,)`` in ``model.parameters()`` order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def load_flat_parameters(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Copy a flattened vector ``(D,)`` into the model's parameters, in place."""
    torch.nn.utils.vector_to_parameters(flat.to(next(model.parameters())), model.parameters())


class ColumnStore:
    """An HDF5 file of ``(D, n)`` float32 columns tagged by step."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def create(self, dim: int, layout: list[dict], description: str) -> None:
        """Create the file, empty. Refuses to replace an existing file."""
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

    def append(self, step: int, vector: torch.Tensor) -> bool:
        """Append ``vector`` ``(D,)`` as the column of ``step``; False if it is there already."""
        with h5py.File(self.path, "a") as handle:
            data, steps = handle["data"], handle["steps"]
            if step in steps[:]:
                return False
            column = data.shape[1]
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

    def dim(self) -> int:
        """``D``, the length of every column."""
        with h5py.File(self.path, "r") as handle:
            return int(handle["data"].shape[0])
