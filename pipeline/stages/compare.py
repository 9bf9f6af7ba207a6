"""Stage compare: draw and rank every finished spectral-filter replay of a run.

``hessov compare RUN`` (README.md, "Spectral-filter replays") reads every finished replay
(:mod:`hessov.replay_logs`), takes the seeds of one replay together
(:func:`hessov.analysis.replay_findings.seed_groups`), and per snapshot draws the loss curves with
the baseline's pre-snapshot history, a zoom on the first steps after the switch, and one
sharpness flow per replay over its seeds (:mod:`hessov.analysis.replay_figures`). It writes
``RUN/replays/report.md`` (:mod:`hessov.analysis.replay_report`): medians and min-max over the
seeds, and an order between replays only where every seed agrees, because at the edge of
stability (Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the
Edge of Stability") a single trajectory follows the last bits of the floating-point
arithmetic. The numbers go to the ``replay_compare`` summary
(:func:`hessov.analysis.replay_findings.snapshot_findings`).
"""

from __future__ import annotations

import json
from pathlib import Path

from hessov import summary
from hessov.analysis import replay_figures, replay_findings, replay_report
from hessov.analysis.replay_figures import ReplayCurves
from hessov.config import saved_run_config
from hessov.errors import MissingInputError
from hessov.replay_logs import baseline_history, load_replay_curves
from hessov.rundir import RunDir
from hessov.runlog import get_logger


def compare(run: RunDir, zoom: int = 0) -> Path:
    """Figures and ``report.md`` of every finished replay of ``run``, the seeds of one replay
    taken together as a group (median and spread, an order only where it holds across
    seeds). The ``replay_compare`` summary holds the numbers. Drawing again replaces the
    previous figures and report.

    Args:
        run: the run directory.
        zoom: steps after the switch in the zoomed loss figure (0 = a tenth of the longest
            replay, at least 10).

    Returns:
        The folder of the figures and the report, ``RUN/replays``.

    Raises:
        MissingInputError: no replay of the run has finished.
    """
    cfg = saved_run_config(run)
    names = [name for name in run.replay_names() if run.replay_summary(name).is_file()]
    if not names:
        raise MissingInputError(
            f"replays: no finished replay in {run.replays}; run `hessov replay {run.root} "
            "name=NAME` (or snapshot=T mode=...) first"
        )
    unfinished = sorted(set(run.replay_names()) - set(names))
    curves = [load_replay_curves(run, name) for name in names]
    lines = replay_report.report_header(run.root.name, cfg, unfinished)
    all_findings = {}
    for snapshot in sorted({c.snapshot for c in curves}):
        replays = [c for c in curves if c.snapshot == snapshot]
        figures = _draw_snapshot(run, snapshot, replays, zoom)
        findings = replay_findings.snapshot_findings(replays)
        lines += replay_report.report_section(
            snapshot, replays, findings, {k: p.relative_to(run.replays) for k, p in figures.items()}
        )
        all_findings[str(snapshot)] = findings
    run.replay_report.write_text("\n".join(lines))
    summary.record(run, "replay_compare", json.loads(json.dumps(all_findings, default=float)))
    get_logger().info("compared %d replays: %s", len(curves), run.replay_report)
    return run.replays


def _draw_snapshot(
    run: RunDir, snapshot: int, replays: list[ReplayCurves], zoom: int
) -> dict[str, Path]:
    """The figures of one snapshot's replays under ``RUN/replays/figures``.

    Args:
        run: the run directory.
        snapshot: the snapshot's global step.
        replays: every finished replay of that snapshot.
        zoom: steps after the switch in the zoomed figure (0: see :func:`compare`).

    Returns:
        Label -> path: the loss curves, their zoom, and a sharpness flow per group.
    """
    history = baseline_history(run, snapshot)
    longest = max(int(c.steps.max(initial=0)) for c in replays)
    figures = {
        "loss curves": replay_figures.draw_loss_comparison(
            run.replay_figures / f"loss_snapshot_{snapshot}.png", replays, *history
        ),
        "zoom after the switch": replay_figures.draw_loss_comparison(
            run.replay_figures / f"loss_snapshot_{snapshot}_zoom.png",
            replays,
            *history,
            zoom=zoom or max(10, longest // 10),
        ),
    }
    for name, members in replay_findings.seed_groups(replays).items():
        figures[f"sharpness flow {name}"] = replay_figures.draw_sharpness_flow(
            run.replay_figures / f"sharpness_flow_{name}.png", members, *history
        )
    return figures
