"""hessov: Hessian eigenspaces of neural networks with sketched methods, at scale.

``import hessov`` is the documented way in from Python; the ``hessov`` command runs the same
code as a pipeline of stages on one run directory (README.md). The public names below are
imported on first use, so that ``import hessov.config`` and the command line stay light.

Data flows one way: the run config, then a stage, then files in the run directory
(:mod:`hessov.rundir`), then the next stage. README.md's module map says where each part lives.
"""

from __future__ import annotations

import importlib

#: Public name -> the module that defines it.
_PUBLIC = {
    "Problem": "hessov.problems",
    "ModelLoss": "hessov.batching",
    "Recorder": "hessov.recorder",
    "top_eigenpairs": "hessov.api",
    "Eigenpairs": "hessov.api",
    "load": "hessov.api",
    "RunResults": "hessov.api",
    **{
        name: "hessov.analysis.subspaces"
        for name in (
            "subspace_overlap",
            "principal_angles",
            "grassmannian_distances",
            "grassmannian_similarities",
            "magnitude_mask",
            "mask_overlap",
            "overlap_curve",
        )
    },
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    """Import a public name from its module on first use (PEP 562)."""
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'hessov' has no attribute {name!r}")
