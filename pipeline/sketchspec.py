"""The sketch settings a run's layout fixes, shared by every measure and solve job.

``hessov layout`` resolves the sketch settings of the run config (``k`` defaulting to the
paper's rule of :func:`hessov.costs.default_k`, ``s`` to 2k, the row block of the basis and
solve from the memory budget, the block size, the steps and splits to measure) and writes them to
``measurements/sketch.json``. From then on they are the single source of truth: every
measurement worker and every solve reads them from there, so a worker started with other
overrides cannot silently measure a different sketch, and a layout asked for again with
other settings is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import torch

from hessov.config import RunConfig, own_sketch
from hessov.errors import ConfigError, MissingInputError
from hessov.fileio import atomic_write_json
from hessov.rounds import product_rounds
from hessov.rundir import RunDir
from hessov.skerch_ext.random_matrices import SketchMatrices
from hessov.skerch_ext.rowblocks import row_ranges
from hessov.skerch_ext.seeds import SeedRegistry, sketch_seed_ranges
from hessov.skerch_ext.storage import MeasurementStore, MonolithicArrays, SketchLayout

#: Automatic block sizes, from bench/RESULTS.md (HVP seconds per column against one
#: gradient): on the 7,030-parameter mnist_mini MLP the cost per column keeps falling up to
#: 32-64 columns; on the 895,210-parameter cifar10_3c3d network 4 columns were cheapest
#: and 16 cost more: each column's second backward pass carries a copy of every activation.
SMALL_NETWORK_BLOCK, LARGE_NETWORK_BLOCK, LARGE_NETWORK_DIM = 64, 4, 100_000


@dataclass
class SketchSpec:
    """Resolved sketch settings (see module docstring)."""

    layout: SketchLayout
    recovery: str
    num_apost: int
    steps: list[int]
    splits: list[str]
    meas_per_job: int
    layout_seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    #: Rows per block of the out-of-core basis and solve; 0: in memory (see hessov.costs).
    row_block: int = 0
    #: Two-pass: rounds of ``k`` products in the stage graph (``rounds``, or ``max_rounds``
    #: with a target; :mod:`hessov.rounds`).
    krylov_rounds: int = 2
    #: Two-pass: stop the rounds once every bound is below this relative error (0: off).
    target_rel_err: float = 0.0
    #: The top pairs the target covers (0 without a target).
    target_eigenpairs: int = 0
    #: What every Hessian stage multiplies with: ``hessian`` or ``ggn`` (the generalised
    #: Gauss-Newton matrix, :mod:`hessov.skerch_ext.ggn`).
    curvature: str = "hessian"
    #: The parameters of the block of ``H`` sketched (:mod:`hessov.paramblock`), in ``D``'s
    #: order; empty: all of them.
    params: list[str] = field(default_factory=list)
    #: ``largest`` (by ``|lambda|``) or ``smallest`` (most negative, the sketch of
    #: ``sigma I - H``: :mod:`hessov.spectralshift`).
    which: str = "largest"

    @property
    def checked_eigenpairs(self) -> int:
        """The top pairs each round's check bounds: the target's, or without one all that a
        round's space can bound (``k - 5``, see :data:`hessov.skerch_ext.krylov.OVERSAMPLING`).
        """
        from hessov.skerch_ext.krylov import OVERSAMPLING

        k = self.layout.num_outer
        return self.target_eigenpairs or max(1, k - OVERSAMPLING)

    @property
    def num_tasks(self) -> int:
        """Measurement array tasks of the first round, per step and split (see
        :meth:`round_tasks` for the others).
        """
        return self.round_tasks("first")

    @property
    def row_ranges(self) -> list[range]:
        """The row blocks of the out-of-core basis and solve (at least ``k`` rows each); the
        whole of ``D`` in one block in memory (``row_block`` 0).
        """
        dim = self.layout.dim
        if not self.row_block:
            return [range(dim)]
        return row_ranges(dim, self.row_block, self.layout.num_outer)

    @property
    def row_tasks(self) -> int:
        """Array tasks of each per-block phase of the row-block basis and solve: as many as
        the first round has (the parallelism ``MEAS_PER_JOB`` chose), at most one per row
        block. A task runs its row blocks in turn (:meth:`row_task_blocks`): a block is
        seconds of work, less than a process's start on a busy cluster.
        """
        return min(len(self.row_ranges), self.num_tasks)

    def row_task_blocks(self, task: int) -> range:
        """The row blocks' numbers that array task ``task`` of a per-block phase runs."""
        count, blocks = self.row_tasks, len(self.row_ranges)
        if not 0 <= task < count:
            raise ConfigError(f"task: {task} outside 0..{count - 1} of a row-block phase")
        return range(task * blocks // count, (task + 1) * blocks // count)

    def round_tasks(self, round_name: str) -> int:
        """Array tasks of one round of one step and split."""
        return -(-self.round_layout(round_name).num_measurements // self._per_task(round_name))

    def _per_task(self, round_name: str) -> int:
        """``MEAS_PER_JOB``, rounded up to whole blocks of the round (the a-posteriori round's
        blocks may be smaller), so that no two tasks write one part file.
        """
        block = self.round_layout(round_name).block_size
        return -(-self.meas_per_job // block) * block

    def task_indices(self, task: int, round_name: str = "first") -> range:
        """Measurement indices of array task ``task`` (0-based) of a round."""
        count = self.round_tasks(round_name)
        if not 0 <= task < count:
            raise ConfigError(f"task: {task} outside 0..{count - 1} of the {round_name} round")
        per_task = self._per_task(round_name)
        total = self.round_layout(round_name).num_measurements
        return range(task * per_task, min(total, (task + 1) * per_task))

    def seeds(self) -> SeedRegistry:
        """Omega's and Psi's ranges cover every first-round measurement (s, or k for two-pass,
        as in :func:`hessov.skerch_ext.incore.sketched_eigh`), then the a-posteriori probes.
        """
        return sketch_seed_ranges(self.layout.seed, self.layout.num_measurements, self.num_apost)

    def matrices(self, dtype: torch.dtype, device) -> SketchMatrices:
        """Omega and Psi of the sketch, from :meth:`seeds`, in ``dtype`` on ``device``."""
        return SketchMatrices.from_seeds(
            self.layout.dim,
            self.layout.num_measurements,
            self.seeds(),
            noise=self.layout.noise,
            dtype=dtype,
            device=device,
        )

    @property
    def rounds(self) -> tuple[str, ...]:
        """Measurement rounds: ``first`` (H Omega); two-pass adds ``second`` (H Q) and, with
        more rounds, ``round3``... (:mod:`hessov.rounds`); then ``apost``, the
        a-posteriori probes' products (independent of the others).
        """
        sketch = ["first"]
        if self.recovery == "two_pass":
            sketch += product_rounds(self.krylov_rounds)
        return tuple(sketch) + (("apost",) if self.num_apost else ())

    @property
    def total_hvps(self) -> int:
        """HVPs of the sketch (a-posteriori probes excluded)."""
        rounds = len(self.rounds) - (self.num_apost > 0)
        return self.layout.num_measurements * rounds

    def round_layout(self, round_name: str) -> SketchLayout:
        """The layout of a round: the first pass's, or k products ``H @ Q[:, m]``."""
        if round_name == "first":
            return self.layout
        if round_name == "apost":  # one outer column H g_i per probe
            block = min(self.layout.block_size, self.num_apost)
            return replace(self.layout, num_outer=self.num_apost, num_inner=0, block_size=block)
        # The same sketch's settings, with k outer columns and no inner sketch.
        return replace(self.layout, num_inner=0)

    def store(
        self, run: RunDir, step: int, split: str, round_name: str = "first"
    ) -> MeasurementStore:
        """The part files of one round of one step and split."""
        return MeasurementStore(
            run.measurement_parts(step, split, round_name), self.round_layout(round_name)
        )

    def monolithic(self, run: RunDir, split: str, round_name: str = "first") -> MonolithicArrays:
        """A split's merge target for one round, allocated once and reused for every step."""
        name = split if round_name == "first" else f"{split}_{round_name}"
        return MonolithicArrays(run.monolithic(name), self.round_layout(round_name))

    def to_json(self) -> dict:
        """The spec as plain data, as ``measurements/sketch.json`` holds it."""
        payload = asdict(self)
        payload["layout"] = asdict(self.layout)
        return payload

    @classmethod
    def from_json(cls, payload: dict) -> SketchSpec:
        """The spec :meth:`to_json` wrote."""
        payload = dict(payload)
        payload["layout"] = SketchLayout(**payload["layout"])
        return cls(**payload)


def automatic_block_size(dim: int) -> int:
    """The default block (columns per batched HVP and per part file): 64 up to
    D = 100,000 parameters, 4 above (see the constants' comment for the measurement).
    """
    return SMALL_NETWORK_BLOCK if dim <= LARGE_NETWORK_DIM else LARGE_NETWORK_BLOCK


def resolve_spec(
    cfg: RunConfig, dim: int, recorded_steps: list[int], params: list[str] = ()
) -> SketchSpec:
    """Resolve defaults and validate the sketch settings against D (the block's, for the
    parameters ``params`` that ``cfg.params`` selected) and the records; the row block comes
    from the memory budget (:func:`hessov.costs.choose_row_block`).
    """
    from hessov.costs import choose_row_block, default_k

    k = cfg.k or default_k(dim)
    if cfg.recovery == "two_pass":
        s = 0  # no inner sketch (validated by the config)
    else:
        s = cfg.s or 2 * k
        if k >= s:
            raise ConfigError(f"k: k={k} must be smaller than s={s}")
    if k > dim:
        raise ConfigError(f"k: k={k} exceeds the number of parameters D={dim}")
    if s > dim:
        raise ConfigError(f"s: s={s} exceeds the number of parameters D={dim}")
    block = cfg.block_size or automatic_block_size(dim)
    measurements = s or k
    block = min(block, measurements)
    per_job = cfg.MEAS_PER_JOB or measurements
    if per_job % block and per_job < measurements:
        raise ConfigError(
            f"MEAS_PER_JOB: {per_job} is not a multiple of block_size={block}; every task must "
            "own whole blocks so that no two tasks write one part file"
        )
    steps = cfg.HESSIAN_STEPS or recorded_steps
    missing = [t for t in steps if t not in recorded_steps]
    if missing:
        raise ConfigError(f"HESSIAN_STEPS: {missing} not recorded; recorded: {recorded_steps}")
    try:
        layout = SketchLayout(dim, k, s, block, cfg.dtype, cfg.noise, cfg.SKETCH_SEED)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    spec = SketchSpec(
        layout, cfg.recovery, cfg.NUM_A_POSTERIORI, list(steps), list(cfg.HESSIAN_SPLITS), per_job
    )
    spec.curvature, spec.which = own_sketch(cfg)
    spec.params = list(params)
    if cfg.recovery == "two_pass":
        _resolve_rounds(cfg, spec)
    spec.row_block = choose_row_block(cfg, spec)
    return spec


def resolve_block_spec(cfg: RunConfig, layout: list[dict], steps: list[int]) -> SketchSpec:
    """:func:`resolve_spec` for the block of ``H`` that ``cfg.params`` selects from the
    parameter ``layout`` (:mod:`hessov.paramblock`; all of ``H`` without ``params``).

    Raises:
        ConfigError: a pattern that selects nothing, naming the parameters.
    """
    from hessov.paramblock import block_dim, block_names

    names = block_names(layout, cfg.params)
    return resolve_spec(cfg, block_dim(layout, names), steps, names)


def _resolve_rounds(cfg: RunConfig, spec: SketchSpec) -> None:
    """The rounds of the stage graph and the target: fixed ``rounds`` (default 2), or
    ``max_rounds`` with ``target_rel_err``, whose top ``target_eigenpairs`` (default
    ``k - 5``: the last pairs of the first check's space are never bounded) must be bounded.
    """
    from hessov.skerch_ext.krylov import OVERSAMPLING

    k, dim = spec.layout.num_outer, spec.layout.dim
    spec.target_rel_err = cfg.target_rel_err
    spec.krylov_rounds = (cfg.max_rounds if cfg.target_rel_err else cfg.rounds) or 2
    if spec.target_rel_err:
        spec.target_eigenpairs = cfg.target_eigenpairs or max(1, k - OVERSAMPLING)
        if spec.target_eigenpairs > k - OVERSAMPLING:
            raise ConfigError(
                f"target_eigenpairs: {spec.target_eigenpairs} > k - {OVERSAMPLING} = "
                f"{k - OVERSAMPLING}: the last {OVERSAMPLING} Ritz pairs of a round's space are "
                "never bounded; raise k"
            )
    if spec.krylov_rounds > 2 and spec.krylov_rounds * k > dim:  # noqa: PLR2004
        key = "max_rounds" if spec.target_rel_err else "rounds"
        raise ConfigError(
            f"{key}: {spec.krylov_rounds} rounds of k={k} products exceed D={dim}: the Krylov "
            "space would be all of R^D; use fewer rounds or a smaller k"
        )


def check_same_layout(existing: SketchSpec, wanted: SketchSpec, where) -> SketchSpec:
    """``existing`` (the layout on disk at ``where``) when ``wanted`` asks for the same sketch;
    otherwise a :class:`ConfigError`, since the measurements taken for it would not match.
    """

    def fixed(spec: SketchSpec) -> tuple:
        rounds = (spec.krylov_rounds, spec.target_rel_err, spec.target_eigenpairs)
        chosen = (spec.curvature, spec.params, spec.which)
        return spec.layout, spec.recovery, spec.num_apost, rounds, chosen

    if fixed(existing) != fixed(wanted):
        raise ConfigError(
            f"layout: {where} already fixes {existing.layout} (recovery={existing.recovery}, "
            f"curvature={existing.curvature}, params={existing.params or 'all'}, "
            f"which={existing.which}, "
            f"{existing.krylov_rounds} rounds, target_rel_err={existing.target_rel_err}, "
            f"target_eigenpairs={existing.target_eigenpairs}); the measurements taken for it "
            f"would not match {wanted.layout} (curvature={wanted.curvature}, "
            f"params={wanted.params or 'all'}, which={wanted.which}, "
            f"{wanted.krylov_rounds} rounds, "
            f"target_rel_err={wanted.target_rel_err}, "
            f"target_eigenpairs={wanted.target_eigenpairs}). Use the same settings, or a new run."
        )
    return existing


def save_spec(run: RunDir, spec: SketchSpec) -> None:
    """Write the spec to ``measurements/sketch.json``, atomically."""
    atomic_write_json(run.sketch_spec, spec.to_json())


def load_spec(run: RunDir) -> SketchSpec:
    """The layout's spec; a clear error when the layout stage has not run."""
    if not run.sketch_spec.is_file():
        raise MissingInputError(f"{run.sketch_spec} is missing: run `hessov layout {run.root}`")
    return SketchSpec.from_json(json.loads(run.sketch_spec.read_text()))
