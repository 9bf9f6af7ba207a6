"""Verify one round's measurements and merge them into the split's monolithic arrays.

The basis and solve stages both start here: a single read of each part checks its flags and
checksums and places its columns, so a missing or corrupt measurement stops the stage before
any arithmetic and names the indices to re-measure.
"""

from __future__ import annotations

import numpy as np

from hessov.errors import MissingInputError
from hessov.rundir import RunDir
from hessov.skerch_ext.storage import IncompleteMeasurements
from hessov.sketchspec import SketchSpec


def merged_round(
    run: RunDir, spec: SketchSpec, step: int, split: str, round_name: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """The round's ``outer`` ``(D, k)`` and ``inner`` ``(s, s)`` (``None`` without an inner
    sketch), merged under the arrays' lock.

    Raises:
        MissingInputError: naming every missing or corrupt measurement.
    """
    arrays = spec.monolithic(run, split, round_name)
    with arrays.locked():
        try:
            return arrays.merge(
                spec.store(run, step, split, round_name), f"step_{step}_{split}_{round_name}"
            )
        except IncompleteMeasurements as err:
            raise MissingInputError(
                f"step {step} {split} ({round_name} round): {err}. Re-measure them with "
                f"`hessov resume {run.root}` (or `hessov measure ... indices=a:b`)."
            ) from None
