"""The report's section on the estimates that reuse a sketch: trace, diagonal, density.

Built from the run's summaries (``hessov summary``'s ``trace``, ``diagonal``, ``density`` and,
where the exhaustive check ran, its ``estimates`` fields), as Markdown lines for
``analysis/report.md``; figures are linked relative to the report.
"""

from __future__ import annotations

import os
from pathlib import Path

from hessov.analysis.report import table


def _where(summaries: dict) -> list[tuple[str, str]]:
    found = set()
    for name in ("trace", "diagonal", "density"):
        for step, splits in summaries.get(name, {}).items():
            found |= {(step, split) for split in splits}
    return sorted(found, key=lambda item: (int(item[0]), item[1]))


def _exact(summaries: dict, step: str, split: str, name: str) -> dict:
    return (
        summaries.get("exhaustive", {})
        .get(step, {})
        .get(split, {})
        .get("estimates", {})
        .get(name, {})
    )


def _trace_row(summaries: dict, step: str, split: str) -> list[str] | None:
    fields = summaries.get("trace", {}).get(step, {}).get(split)
    if fields is None:
        return None
    exact = _exact(summaries, step, split, "trace")
    return [
        f"{step} {split}",
        f"{fields['value']:.6g} ± {fields['ci95']:.2g}",
        f"{fields['sketched_trace']:.6g}",
        str(fields["hvps"]),
        f"{exact['exact']:.6g} ({exact['rel_err']:.2%} off)" if exact else "—",
    ]


def estimate_section(summaries: dict, report: Path) -> list[str]:
    """Markdown lines for ``report``; none when no estimate was computed."""
    places = _where(summaries)
    if not places:
        return []
    lines = ["## Trace, diagonal and spectral density", ""]
    rows = [row for step, split in places if (row := _trace_row(summaries, step, split))]
    if rows:
        lines += [
            "Hutch++ on the sketch's basis: the trace over the basis is exact, Hutchinson's",
            "probes estimate the rest (± the 95% half-width of their mean).",
            "",
        ]
        header = ["step split", "trace", "over the basis", "probe HVPs", "exact"]
        lines += table(header, rows) + [""]
    for step, split in places:
        for name in ("diagonal", "density"):
            fields = summaries.get(name, {}).get(step, {}).get(split)
            if fields is None:
                continue
            exact = _exact(summaries, step, split, name)
            if name == "diagonal":
                note = f"relative 95% half-width {fields['relative_ci95']:.2g}"
                note += f", {exact['rel_err']:.2%} from the exact diagonal" if exact else ""
            else:
                note = f"{fields['runs']} Lanczos runs of {fields['lanczos_steps']} steps"
                if exact:
                    note += f", Wasserstein-1 to the exact spectrum {exact['wasserstein1']:.3g}"
            figure = os.path.relpath(fields["figure"], report.parent)
            lines += [f"- {name}, step {step} {split}: {note}", "", f"![{name}]({figure})", ""]
    return lines
