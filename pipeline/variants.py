"""Variants of a run: more sketches of the same training, each in a run directory of its own.

``per_layer=true`` sketches every layer's block of ``H`` beside the whole Hessian,
``curvature=both`` the generalised Gauss-Newton matrix beside it, ``which=both`` its most
negative eigenpairs beside its largest. Each such sketch is a *variant*: a run directory
``RUN/variants/NAME/`` whose config is the run's with the variant's settings (``params=``
the layer's parameters; ``curvature=ggn``; ``which=smallest``) and which links the run's
training results (``params.h5``, ``snapshots/``, ``summary/train.json``) and copies its
Hessian subsets from ``log.jsonl``. Every stage then works on it as on any run, given only
its directory, so a variant's jobs are the ordinary jobs of the stage graph with the
variant's directory, named ``NAME: ...`` (:func:`hessov.launch.graph.build_graph`). The
``variant`` job that makes the directory runs after training; the run's report, after
every variant's, compares them (:mod:`hessov.analysis.variant_report`).

A layer is a module's own parameters (``name.rpartition(".")[0]``: ``fc1.weight`` and
``fc1.bias`` make layer ``fc1``); with ``params=`` the layers are those of the run's block. A
layer's sketch takes the default ``k`` of its size (the paper's 5% rule) in one measurement
task; variants compute no estimates and no replays.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from hessov.config import RunConfig, config_text, own_sketch, save_config
from hessov.errors import ConfigError
from hessov.paramblock import selected
from hessov.rundir import RunDir
from hessov.sketchspec import SketchSpec, load_spec, resolve_block_spec


@dataclass(frozen=True)
class Variant:
    """One variant: its directory name, the config keys it changes, a label and the key
    that asked for it (named in its errors).
    """

    name: str
    settings: dict
    label: str
    key: str


def layers(layout: list[dict]) -> dict[str, list[str]]:
    """Parameter names by layer (their module), in ``D``'s order."""
    grouped: dict[str, list[str]] = {}
    for entry in layout:
        module = entry["name"].rpartition(".")[0] or entry["name"]
        grouped.setdefault(module, []).append(entry["name"])
    return grouped


def variants_of(cfg: RunConfig, layout: list[dict]) -> list[Variant]:
    """The variants ``cfg`` asks for, given the parameter ``layout``."""
    found = []
    grouped = layers(selected(layout, cfg.params))  # the layers of the run's own block
    if cfg.per_layer and len(grouped) > 1:  # one layer: the run's own sketch is its block
        for module, names in grouped.items():
            settings = {"params": names, "k": 0, "MEAS_PER_JOB": 0}
            found.append(Variant(f"layer_{module}", settings, f"layer {module}", "per_layer"))
    if cfg.curvature == "both":
        found.append(Variant("ggn", {"curvature": "ggn"}, "GGN", "curvature"))
    if cfg.which == "both":
        found.append(Variant("smallest", {"which": "smallest"}, "most negative", "which"))
    return found


def variant_config(cfg: RunConfig, variant: Variant, run: RunDir) -> RunConfig:
    """The config of ``variant`` of the run at ``run``: the run's, its own settings, and
    nothing that makes more variants, estimates or replays.
    """
    curvature, which = own_sketch(cfg)
    base = {
        "per_layer": False,
        "resume": False,
        "curvature": curvature,
        "which": which,
        "estimates": [],
        "replays": [],
        "RUN_DIR": str(run.variant(variant.name).root),
    }
    return replace(cfg, **(base | variant.settings))


@dataclass(frozen=True)
class VariantPlan:
    """A variant as the stage graph needs it: its directory, config and sketch settings
    (the layout's once laid out, else the config's resolved for the variant's block).
    """

    variant: Variant
    run: RunDir
    cfg: RunConfig
    spec: SketchSpec


def plan_variants(run: RunDir, cfg: RunConfig, layout: list[dict], steps: list[int]):
    """:class:`VariantPlan` of every variant of ``cfg``; refused before anything is made
    when a variant's sketch does not fit its block (e.g. ``rounds x k > D``).
    """
    plans = []
    for variant in variants_of(cfg, layout):
        variant_cfg = variant_config(cfg, variant, run)
        directory = run.variant(variant.name)
        if directory.sketch_spec.is_file():
            spec = load_spec(directory)
        else:
            try:
                spec = resolve_block_spec(variant_cfg, layout, steps)
            except ConfigError as err:
                raise ConfigError(f"{err} (in variant {variant.name})") from None
        plans.append(VariantPlan(variant, directory, variant_cfg, spec))
    return plans


def _link(target: Path, link: Path) -> None:
    """A relative symbolic link ``link -> target`` (the run directory may move)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(os.path.relpath(target, link.parent))


def create_variant(run: RunDir, cfg: RunConfig, key: str) -> RunDir:
    """Make the directory of the variant whose config is ``cfg`` (``RUN_DIR`` names it),
    once the run's training finished; an existing one is kept if its config is the same.

    Raises:
        ConfigError: a variant directory with another config, naming ``key``.
    """
    variant = RunDir(cfg.RUN_DIR)
    if variant.config.is_file():
        if variant.config.read_text() != config_text(cfg):
            raise ConfigError(
                f"{key}: {variant.root} holds a variant with other settings; remove it to "
                "sketch the variant again"
            )
        return variant
    run.require(run.summary("train"), "train")
    for target, link in (
        (run.params, variant.params),
        (run.snapshots, variant.snapshots),
        (run.summary("train"), variant.summary("train")),
    ):
        _link(target, link)
    subsets = [
        line
        for line in run.log.read_text().splitlines()
        if line.strip() and json.loads(line).get("event") == "hessian_subsets"
    ]
    variant.log.write_text("\n".join(subsets) + "\n")
    save_config(cfg, variant.config)  # last: its presence marks a finished directory
    return variant
