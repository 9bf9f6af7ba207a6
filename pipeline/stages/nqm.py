"""Stage ``hessov nqm``: the noisy quadratic model's batch-size study, exactly.

For every algorithm (SGD, heavy-ball momentum, a diagonal preconditioner ``h^-p``, optionally
an EMA of the iterates) and every batch size, the fewest steps to a target expected loss at
the best learning rate (and momentum) from log-spaced grids; the same for each
preconditioner power in ``p_values``; optimal piecewise-constant schedules at a few batch
sizes; and each algorithm's critical batch size. Everything comes from the closed-form
dynamics of ``hessov.analysis.nqm`` (no simulation), so the answers are exact up to the grids.

Why: this reproduces the batch-size claims of G. Zhang et al., "Which Algorithmic Choices
Matter at Which Batch Sizes? Insights From a Noisy Quadratic Model" (NeurIPS 2019): perfect
scaling at small batch sizes, saturation at large ones, and a critical batch size that
momentum and preconditioning raise.

Outputs in ``out_dir``: ``nqm.json`` (the object ``run_nqm`` returns: one key per algorithm,
then per batch size ``{"steps", "lr"[, "momentum"]}`` with ``steps`` null when unreachable,
plus ``critical_batch_size``, ``preconditioner_powers``, ``schedules`` and ``settings``),
``critical_batch_size.md`` and the PNG figures of ``hessov.analysis.nqm_figures``.

The critical batch size is the smallest swept ``B`` at which doubling the batch reduces the
fewest steps by less than ``critical_speedup`` (default 1.5): ``steps(B) / steps(2B) < 1.5``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from tqdm import tqdm

from hessov.analysis import nqm_figures
from hessov.analysis.nqm import (
    Optimizer,
    Optimum,
    SearchGrid,
    critical_batch_size,
    fewest_steps_with_schedule,
    nqm_curvatures,
    sweep_batch_sizes,
)
from hessov.config import COMMAND_LINE, CONFIG_DIR, require
from hessov.errors import ConfigError
from hessov.fileio import atomic_write_json, config_errors, merge_config
from hessov.runlog import get_logger

# Name -> (preconditioned, momentum). Sweeps run in this order so that SGD's optimum seeds
# momentum's search (b = 0 is on its grid), and preconditioned SGD's seeds its momentum twin.
ALGORITHMS = {
    "sgd": (False, False),
    "precond": (True, False),
    "momentum": (False, True),
    "precond_momentum": (True, True),
}
SEEDED_BY = {"momentum": "sgd", "precond_momentum": "precond"}
MOMENTUM_FREE = ("sgd", "precond")


@dataclass
class NQMConfig:
    """Settings of ``hessov nqm`` (defaults: the paper's model, ``config/nqm.yaml``).

    Model: ``K`` dimensions, ``h_i = 1/i``, noise variance ``h_i / B``, target expected loss
    ``target``. ``algorithms``: any of sgd, momentum, precond (preconditioner power ``p``),
    precond_momentum. ``p_values``: powers for the preconditioner figure. Grids: learning
    rates log-spaced in ``[lr_min, lr_max]``, momenta log-spaced in ``1 - b`` from 0 to
    ``momentum_max``, then ``refine_rounds`` refinements with ``refine_points`` per axis.
    Schedules: ``schedule_pieces`` equal pieces, for the ``schedule_algorithms`` (momentum-free)
    at the ``schedule_batch_sizes``, each only where it is also swept (``algorithms``,
    ``batch_sizes``). ``ema``: also sweep ``<name>_ema`` for the momentum-free algorithms,
    the loss measured at an EMA (decay ``ema_decay``) of the iterates.
    """

    K: int = 10000
    target: float = 0.01
    algorithms: list[str] = field(default_factory=lambda: ["sgd", "momentum", "precond"])
    p: float = 0.5
    p_values: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])
    batch_sizes: list[int] = field(default_factory=lambda: [2**k for k in range(2, 22)])
    lr_min: float = 1e-6
    lr_max: float = 4.0
    lr_points: int = 34
    momentum_max: float = 0.999
    momentum_points: int = 10
    refine_rounds: int = 4
    refine_points: int = 7
    max_steps: int = 2**40
    schedule_pieces: int = 20
    schedule_algorithms: list[str] = field(default_factory=lambda: ["sgd"])
    schedule_batch_sizes: list[int] = field(default_factory=lambda: [16, 256, 4096, 65536])
    schedule_rel_tol: float = 1e-3
    ema: bool = False
    ema_decay: float = 0.99
    critical_speedup: float = 1.5
    out_dir: str = "output/nqm"


def validate_nqm_config(cfg: NQMConfig) -> None:
    """Refuse impossible values with a ``ConfigError`` (a ``ValueError``) naming the key."""
    require(cfg.K >= 1, "K", f"must be >= 1, got {cfg.K}")
    require(cfg.target > 0, "target", f"must be > 0, got {cfg.target}")
    require(len(cfg.algorithms) > 0, "algorithms", "must name at least one algorithm")
    for name in cfg.algorithms:
        require(
            name in ALGORITHMS,
            "algorithms",
            f"has unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}",
        )
    require(len(set(cfg.algorithms)) == len(cfg.algorithms), "algorithms", "has repeats")
    require(0 <= cfg.p <= 1, "p", f"must be in [0, 1], got {cfg.p}")
    for power in cfg.p_values:
        require(0 <= power <= 1, "p_values", f"must be in [0, 1], got {power}")
    require(len(cfg.batch_sizes) > 0, "batch_sizes", "must hold at least one batch size")
    require(all(b >= 1 for b in cfg.batch_sizes), "batch_sizes", "must all be >= 1")
    require(len(set(cfg.batch_sizes)) == len(cfg.batch_sizes), "batch_sizes", "has repeats")
    require(cfg.lr_min > 0, "lr_min", f"must be > 0, got {cfg.lr_min}")
    require(cfg.lr_max > cfg.lr_min, "lr_max", f"must be > lr_min, got {cfg.lr_max}")
    # The least grid points that make a search, as the messages say.
    require(cfg.lr_points >= 2, "lr_points", f"must be >= 2, got {cfg.lr_points}")  # noqa: PLR2004
    require(0 < cfg.momentum_max < 1, "momentum_max", f"must be in (0, 1), got {cfg.momentum_max}")
    require(cfg.momentum_points >= 2, "momentum_points", "must be >= 2")  # noqa: PLR2004
    require(cfg.refine_rounds >= 0, "refine_rounds", "must be >= 0")
    require(cfg.refine_points >= 3, "refine_points", "must be >= 3")  # noqa: PLR2004
    require(cfg.max_steps >= 1, "max_steps", "must be >= 1")
    require(cfg.schedule_pieces >= 1, "schedule_pieces", "must be >= 1")
    for name in cfg.schedule_algorithms:
        require(
            name in MOMENTUM_FREE,
            "schedule_algorithms",
            f"has {name!r}; schedules are modelled for {', '.join(MOMENTUM_FREE)} only",
        )
    require(
        all(b >= 1 for b in cfg.schedule_batch_sizes), "schedule_batch_sizes", "must all be >= 1"
    )
    require(0 <= cfg.schedule_rel_tol < 1, "schedule_rel_tol", "must be in [0, 1)")
    require(0 < cfg.ema_decay < 1, "ema_decay", f"must be in (0, 1), got {cfg.ema_decay}")
    require(cfg.critical_speedup > 1, "critical_speedup", "must be > 1")
    require(bool(cfg.out_dir), "out_dir", "must not be empty")


def load_nqm_config(overrides: list[str], config_file: str | Path | None = None) -> NQMConfig:
    """Defaults (``NQMConfig``), then ``config/nqm.yaml``, then ``config_file``, then
    ``KEY=VALUE`` overrides (omegaconf dotlist, e.g. ``batch_sizes=[4,8]``); validated.
    """
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"expected KEY=VALUE, got {item!r}")
    layers = [("config/nqm.yaml", OmegaConf.load(CONFIG_DIR / "nqm.yaml"))]
    if config_file is not None:
        with config_errors(str(config_file)):
            layers.append((str(config_file), OmegaConf.load(config_file)))
    with config_errors(COMMAND_LINE):
        layers.append((COMMAND_LINE, OmegaConf.from_dotlist(list(overrides))))
    cfg: NQMConfig = merge_config(
        NQMConfig, *(layer for _, layer in layers), source=[source for source, _ in layers]
    )
    validate_nqm_config(cfg)
    return cfg


def _optimizer(name: str, cfg: NQMConfig) -> Optimizer:
    base = name.removesuffix("_ema")
    preconditioned, momentum = ALGORITHMS[base]
    return Optimizer(
        power=cfg.p if preconditioned else 0.0,
        momentum=momentum,
        ema_decay=cfg.ema_decay if name.endswith("_ema") else None,
    )


def _steps_json(steps: float) -> int | None:
    return None if math.isinf(steps) else int(steps)


def _by_batch(batch_sizes: list[int], optima: list[Optimum], with_momentum: bool) -> dict:
    table = {}
    for batch_size, optimum in zip(batch_sizes, optima, strict=True):
        entry = {"steps": _steps_json(optimum.steps), "lr": optimum.lr}
        if with_momentum:
            entry["momentum"] = optimum.momentum
        table[str(batch_size)] = entry
    return table


def _critical_table(
    batch_sizes: list[int], sweeps: dict[str, list[Optimum]], speedup: float, what: str
) -> tuple[dict, str]:
    """Critical batch size per sweep (``what`` names the sweeps' column), as JSON and as a
    markdown table.
    """
    rows, table = {}, []
    for name, optima in sweeps.items():
        steps = [o.steps for o in optima]
        by_batch = dict(zip(batch_sizes, steps, strict=True))
        b_crit = critical_batch_size(batch_sizes, steps, speedup)
        largest = max(batch_sizes)
        rows[name] = {
            "batch_size": b_crit,
            "steps": _steps_json(by_batch[b_crit]) if b_crit else None,
            "steps_at_double": _steps_json(by_batch[2 * b_crit]) if b_crit else None,
            "steps_at_largest_batch": _steps_json(by_batch[largest]),
        }
        if b_crit:
            cells = [str(b_crit), f"{by_batch[b_crit]:,}", f"{by_batch[2 * b_crit]:,}"]
        else:
            cells = ["not reached", "-", "-"]
        last = by_batch[largest]
        cells.append("unreachable" if math.isinf(last) else f"{last:,}")
        table.append(f"| {name} | " + " | ".join(cells) + " |")
    markdown = "\n".join(
        [
            f"Critical batch size: the smallest B with steps(B) / steps(2B) < {speedup:g}.",
            "",
            f"| {what} | critical B | steps at B | steps at 2B | steps at the largest B |",
            "|---|---|---|---|---|",
            *table,
            "",
        ]
    )
    return rows, markdown


@dataclass
class _Study:
    """What :func:`run_nqm` found, as the figures and ``nqm.json`` need it.

    Attributes:
        cfg: The settings.
        batch_sizes: The swept batch sizes, in the order of every list below.
        sweeps: Per algorithm (``sgd``, ``momentum``, ``<name>_ema``, ...), the optimum at each
            batch size.
        by_power: Per preconditioner power of ``cfg.p_values``, the optimum at each batch size
            (without momentum).
        schedules: Per algorithm, per batch size, the optimal piecewise-constant schedule.
        critical: Per algorithm, its row of the critical-batch-size table.
        critical_by_power: Per power label (``p = 0.5``), its row of that table.
    """

    cfg: NQMConfig
    batch_sizes: list[int]
    sweeps: dict[str, list[Optimum]]
    by_power: dict[float, list[Optimum]]
    schedules: dict[str, dict[int, dict]]
    critical: dict = field(default_factory=dict)
    critical_by_power: dict = field(default_factory=dict)

    def power_label(self, power: float) -> str:
        return f"p = {power:g}"

    def label(self, name: str) -> str:
        """An algorithm's name in the figures: preconditioned ones with their power."""
        return f"{name} (p = {self.cfg.p:g})" if name.startswith("precond") else name


def run_nqm(cfg: NQMConfig, out_dir: Path, progress: bool = True) -> dict:
    """Run the study, write ``nqm.json``, ``critical_batch_size.md`` and the figures to
    ``out_dir``, and return the JSON object (module docstring).
    """
    validate_nqm_config(cfg)
    log = get_logger()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    h = nqm_curvatures(cfg.K)
    grid = SearchGrid(
        lr_min=cfg.lr_min,
        lr_max=cfg.lr_max,
        lr_points=cfg.lr_points,
        momentum_max=cfg.momentum_max,
        momentum_points=cfg.momentum_points,
        refine_rounds=cfg.refine_rounds,
        refine_points=cfg.refine_points,
        max_steps=cfg.max_steps,
    )
    batch_sizes = list(cfg.batch_sizes)

    def sweep(name: str, optimizer: Optimizer, related=None) -> list[Optimum]:
        return sweep_batch_sizes(
            optimizer, h, batch_sizes, cfg.target, grid, related, progress, f"nqm {name}"
        )

    sweeps = _algorithm_sweeps(cfg, sweep)
    study = _Study(
        cfg,
        batch_sizes,
        sweeps,
        _power_sweeps(cfg, sweeps, sweep),
        _optimal_schedules(cfg, h, batch_sizes, sweeps, progress),
    )
    _write_critical_tables(study, out_dir)
    figures = _draw_figures(study, out_dir)
    result = _result(study)
    result["figures"] = [path.name for path in figures]
    result["elapsed_s"] = round(time.perf_counter() - started, 2)
    atomic_write_json(out_dir / "nqm.json", result)
    log.info("nqm: wrote %s in %.1f s", out_dir / "nqm.json", result["elapsed_s"])
    return result


def _algorithm_sweeps(cfg: NQMConfig, sweep) -> dict[str, list[Optimum]]:
    """The optimum of every algorithm (and its EMA twin) at every batch size, each search
    seeded by the algorithm it extends (:data:`SEEDED_BY`).
    """
    names = [name for name in ALGORITHMS if name in cfg.algorithms]
    if cfg.ema:
        names += [f"{name}_ema" for name in MOMENTUM_FREE if name in cfg.algorithms]
    sweeps: dict[str, list[Optimum]] = {}
    for name in names:
        seed = SEEDED_BY.get(name, name.removesuffix("_ema") if name.endswith("_ema") else None)
        sweeps[name] = sweep(name, _optimizer(name, cfg), sweeps.get(seed))
    return sweeps


def _power_sweeps(
    cfg: NQMConfig, sweeps: dict[str, list[Optimum]], sweep
) -> dict[float, list[Optimum]]:
    """The optimum of preconditioned SGD at every power of ``p_values``, reusing the
    algorithm sweeps at ``p = 0`` (sgd) and ``p = cfg.p`` (precond).
    """
    by_power: dict[float, list[Optimum]] = {}
    for power in cfg.p_values:
        if power == 0 and "sgd" in sweeps:
            by_power[power] = sweeps["sgd"]
        elif power == cfg.p and "precond" in sweeps:
            by_power[power] = sweeps["precond"]
        else:
            by_power[power] = sweep(f"p={power:g}", Optimizer(power=power))
    return by_power


def _optimal_schedules(
    cfg: NQMConfig, h, batch_sizes: list[int], sweeps: dict[str, list[Optimum]], progress: bool
) -> dict[str, dict[int, dict]]:
    """The optimal piecewise-constant schedules of the ``schedule_algorithms`` at the
    ``schedule_batch_sizes`` that are also swept, against their best constant rate.
    """
    schedules: dict[str, dict[int, dict]] = {}
    chosen = [b for b in cfg.schedule_batch_sizes if b in batch_sizes]
    skipped = sorted(set(cfg.schedule_batch_sizes) - set(chosen))
    if skipped:
        get_logger().info("nqm: no schedules at batch sizes %s (not in batch_sizes)", skipped)
    for name in (n for n in cfg.schedule_algorithms if n in sweeps):
        power = _optimizer(name, cfg).power
        schedules[name] = {}
        for batch_size in tqdm(chosen, desc=f"nqm schedule {name}", disable=not progress):
            constant = sweeps[name][batch_sizes.index(batch_size)]
            found = fewest_steps_with_schedule(
                h,
                batch_size,
                cfg.target,
                constant,
                cfg.schedule_pieces,
                power,
                cfg.schedule_rel_tol,
            )
            if found is None:
                continue
            schedules[name][batch_size] = {
                "steps": found.steps,
                "steps_lower": found.steps_lower,
                "constant_lr_steps": int(constant.steps),
                "constant_lr": constant.lr,
                "lrs": found.schedule.lrs.tolist(),
                "piece_steps": [int(n) for n in found.schedule.piece_steps],
                "final_loss": found.schedule.loss,
            }
    return schedules


def _write_critical_tables(study: _Study, out_dir: Path) -> None:
    """Fill ``study.critical`` and ``study.critical_by_power``; write both tables to
    ``critical_batch_size.md``.
    """
    cfg = study.cfg
    study.critical, markdown = _critical_table(
        study.batch_sizes, study.sweeps, cfg.critical_speedup, "algorithm"
    )
    study.critical_by_power, power_markdown = _critical_table(
        study.batch_sizes,
        {study.power_label(p): study.by_power[p] for p in cfg.p_values},
        cfg.critical_speedup,
        "preconditioner power (no momentum)",
    )
    (out_dir / "critical_batch_size.md").write_text(markdown + "\n" + power_markdown)


def _draw_figures(study: _Study, out_dir: Path) -> list[Path]:
    """The figures of :mod:`hessov.analysis.nqm_figures`, in ``out_dir``."""
    cfg, batch_sizes, sweeps, by_power = study.cfg, study.batch_sizes, study.sweeps, study.by_power
    label, power_label = study.label, study.power_label
    return [
        nqm_figures.plot_steps_vs_batch_size(
            {label(n): (batch_sizes, [o.steps for o in s]) for n, s in sweeps.items()},
            {label(n): row["batch_size"] for n, row in study.critical.items()},
            cfg.target,
            cfg.K,
            out_dir / "steps_vs_batch_size.png",
        ),
        nqm_figures.plot_steps_by_preconditioner_power(
            {power_label(p): (batch_sizes, [o.steps for o in by_power[p]]) for p in by_power},
            {
                power_label(p): study.critical_by_power[power_label(p)]["batch_size"]
                for p in by_power
            },
            cfg.target,
            cfg.K,
            out_dir / "steps_vs_batch_size_by_power.png",
        ),
        nqm_figures.plot_optimal_hyperparameters(
            {label(n): (batch_sizes, [o.lr for o in s]) for n, s in sweeps.items()},
            {
                label(n): (batch_sizes, [o.momentum for o in s])
                for n, s in sweeps.items()
                if _optimizer(n, cfg).momentum
            },
            cfg.K,
            out_dir / "optimal_hyperparameters.png",
        ),
        nqm_figures.plot_schedules(
            {label(n): s for n, s in study.schedules.items()}, cfg.K, out_dir / "schedules.png"
        ),
    ]


def _result(study: _Study) -> dict:
    """The JSON object of ``nqm.json`` (module docstring), without figures and timing."""
    cfg, batch_sizes = study.cfg, study.batch_sizes
    result: dict = {
        name: _by_batch(batch_sizes, optima, _optimizer(name, cfg).momentum)
        for name, optima in study.sweeps.items()
    }
    result["critical_batch_size"] = {
        name: row["batch_size"] for name, row in study.critical.items()
    }
    result["critical_batch_size_table"] = study.critical
    result["preconditioner_powers"] = {
        f"{p:g}": {
            "critical_batch_size": study.critical_by_power[study.power_label(p)]["batch_size"],
            "by_batch_size": _by_batch(batch_sizes, study.by_power[p], False),
        }
        for p in cfg.p_values
    }
    result["schedules"] = {
        name: {str(b): entry for b, entry in by_batch.items()}
        for name, by_batch in study.schedules.items()
    }
    result["settings"] = asdict(cfg)
    return result
