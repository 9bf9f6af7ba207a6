"""A block of the Hessian: the parameters ``params=PATTERN`` selects, and their rows in ``D``.

``params`` is a list of glob patterns over ``model.named_parameters()`` names (``fnmatch``:
``*``, ``?``, ``[seq]``), e.g. ``params=[fc2.*]`` or ``params=[conv1.weight,fc.bias]``. With
it every Hessian stage works on the block ``H[S, S]`` of the selected parameters ``S``: the
operator differentiates with respect to them only (the others are frozen at their recorded
values), the layout's ``D`` is the block's size, and the analysis compares the block's
eigenvectors with the magnitudes of the same parameters. The layout records the selected
names (``measurements/sketch.json``), in ``D``'s order, so later stages select the same rows.
A pattern that matches no parameter is refused with the names it could have matched.
"""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from math import prod

import h5py
import numpy as np
import torch

from hessov.errors import ConfigError
from hessov.rundir import RunDir


def selected(layout: list[dict], patterns: list[str]) -> list[dict]:
    """The entries of a parameter layout (``name``, ``shape``, ``offset``, as
    :func:`hessov.paramstore.parameter_layout` gives them) that ``patterns`` select, in
    ``D``'s order; all of them without patterns.

    Raises:
        ConfigError: naming each pattern that matches nothing, with every name.
    """
    if not patterns:
        return list(layout)
    unmatched = [p for p in patterns if not any(fnmatchcase(e["name"], p) for e in layout)]
    if unmatched:
        names = ", ".join(entry["name"] for entry in layout)
        raise ConfigError(f"params: {unmatched} match no trainable parameter; the names: {names}")
    return [e for e in layout if any(fnmatchcase(e["name"], p) for p in patterns)]


def block_names(layout: list[dict], patterns: list[str]) -> list[str]:
    """The selected parameters' names (empty without patterns: the whole Hessian)."""
    return [entry["name"] for entry in selected(layout, patterns)] if patterns else []


def block_rows(layout: list[dict], names: list[str]) -> list[range]:
    """The rows in ``D`` of the parameters ``names`` (all rows without names)."""
    entries = selected(layout, names)
    return [range(e["offset"], e["offset"] + prod(e["shape"])) for e in entries]


def block_layers(layout: list[dict], names: list[str]) -> dict[str, range]:
    """Each selected parameter's rows in the block's own ``D`` (all parameters without
    names), in ``D``'s order.
    """
    rows, start = {}, 0
    for entry in selected(layout, names):
        rows[entry["name"]] = range(start, start + prod(entry["shape"]))
        start += prod(entry["shape"])
    return rows


def block_dim(layout: list[dict], names: list[str]) -> int:
    """``D`` of the block: the selected parameters' total size."""
    return sum(len(rows) for rows in block_rows(layout, names))


def recorded_layout(run: RunDir) -> list[dict]:
    """The parameter layout ``params.h5`` recorded."""
    with h5py.File(run.require(run.params, "train"), "r") as handle:
        return json.loads(handle.attrs["parameter_layout"])


def restrict(vector: np.ndarray | torch.Tensor, rows: list[range]):
    """``vector`` ``(D,)`` restricted to ``rows``, ``(D_block,)``."""
    parts = [vector[r.start : r.stop] for r in rows]
    if isinstance(vector, torch.Tensor):
        return torch.cat(parts)
    return np.concatenate(parts)


def freeze_outside(model: torch.nn.Module, names: list[str]) -> None:
    """Stop differentiating with respect to every trainable parameter not in ``names``
    (nothing without names), so that the Hessian operators see only the block.
    """
    if names:
        chosen = set(names)
        for name, param in model.named_parameters():
            if name not in chosen:
                param.requires_grad_(False)
