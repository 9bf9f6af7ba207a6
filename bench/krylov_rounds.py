"""Question 10: the three goals of issue 15, block Krylov rounds against Lanczos.

:func:`hessov.skerch_ext.krylov.block_krylov` spends ``q`` rounds of ``k`` HVPs from a
Gaussian start block ``(D, k)``: the ``k`` products of a round are independent of each
other (array tasks of one job), and each round needs the one before. So a sketch's
sequential depth is its number of rounds, while Lanczos' is its number of HVPs. Measured
here, each against its reference in the same run:

1. the top 355 eigenvalues (by ``|lambda|``) of the mnist_mini train Hessian of question 2
   (D = 7,030, float64, one thread) within 1% relative error, in at most 3 rounds with at
   most 1.5x the HVPs Lanczos needs for the same accuracy;
2. the top 20 within 1% with fewer HVPs than Lanczos, in at most 3 rounds;
3. on a synthetic symmetric matrix with eigenvalues ``1/i`` (D = 1,000, random orthogonal
   eigenvectors), the top 10 within 1e-3 relative at the default ``k`` (5% of D); and the whole
   pipeline, ``hessov run problem=nqm`` (Hessian ``diag(1/i)``, D = 1,000) at that problem's
   defaults (``rounds: 3``) and with ``rounds=2``, read back from ``hessov summary``.

For goals 1 and 2 every number of rounds gets the smallest ``k`` that reaches 1%: a coarse
grid upwards from the smallest ``k`` whose exactly projected space holds the top ``r``, then
bisection, where a ``k`` reaches 1% when each of 2 (top 355) or 3 (top 20) start blocks
does. The errors are question 2's metric
(:func:`bench.eigensolvers.max_relative_error`), Lanczos is question 2's (scipy's ``eigsh``
on curvlinops' operator, at the tolerances it sweeps, from 1e-1 down until every start vector
reaches 1%). Every finite error bound the sketch
reports is checked against the exact eigenvalue of its rank.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from bench.common import (
    ROOT,
    WORK,
    Settings,
    fmt_seconds,
    log,
    markdown_table,
    met,
    run_cli,
)
from bench.eigensolvers import (
    BLOCK,
    LANCZOS_TOLS,
    SEEDS,
    TOLERANCE,
    Attempt,
    fmt_error,
    lanczos_attempt,
    max_relative_error,
    question_hessian,
)
from hessov.costs import default_k
from hessov.skerch_ext.krylov import block_krylov
from hessov.skerch_ext.measure import matmat_in_blocks

#: The goals' rounds, and the rounds measured for information.
MAX_ROUNDS = 3
ROUNDS = (2, 3, 4)
#: Goal 1's HVP budget, a multiple of Lanczos' HVPs.
HVP_RATIO = 1.5
#: Goal 3: the synthetic spectrum's size, its top r and their tolerance, and its seed.
SYNTH_DIM, SYNTH_TOP, SYNTH_TOLERANCE, SYNTH_SEED = 1000, 10, 1e-3, 15
#: Goal 3's pipeline rows: ``hessov run`` on the nqm problem at its defaults, then with
#: ``rounds=2`` (the global default, today's two-pass), each into its own folder.
NQM_ARGS = ["problem=nqm", "MAX_STEPS=0", "RECORD_STEPS=[0]", "HESSIAN_SPLITS=[train]"]
NQM_RUNS = (("defaults", []), ("rounds2", ["rounds=2"]))
NQM_WORK = WORK / "krylov_rounds_nqm"
#: Coarse grid factor, and the bisection's resolution relative to k.
GRID_FACTOR, RESOLUTION = 1.25, 0.02

#: The section's first paragraph (one line once its whitespace is joined).
INTRO = """
Block Krylov Rayleigh-Ritz (`hessov.skerch_ext.krylov.block_krylov`) from a Gaussian start
block of k columns, q rounds of k HVPs each (q = 2 is today's two-pass recovery), against
question 2's Lanczos (scipy `eigsh`, one HVP per call, at tolerances from 1e-1 down until each
of its start vectors reaches the goal's error; HVPs the median over them) in the same run.
**Sequential HVPs** is the number of products that must run one after another: the k products
of a round are independent (array tasks of one job), so a sketch's is its number of rounds;
each Lanczos step needs the previous product, so Lanczos' is its number of HVPs. Errors are
question 2's metric (largest relative error over the exact top r by |lambda|, matched by rank
within each sign; worst over the repetitions with different start blocks). For goals 1 and 2,
per number of rounds, the table shows the smallest k reaching 1% (grid upwards from the
smallest k whose exactly projected space holds the top r, then bisection to {resolution} of k;
a k reaches 1% when each of its start blocks does, 2 for the top 355 and 3 for the top 20,
tried until one misses) and the largest k tried below it; goal 3 runs 3 start blocks at the
default k. Every finite error bound the sketch reports, in the top r and beyond, is checked
against the exact eigenvalue of its rank: |reported - exact| <= bound. Wall times: the
sketch's products (in blocks of 64) and solve, and Lanczos' whole `eigsh` call, one thread,
median over repetitions; none is a goal.
"""


@dataclass
class Row:
    """One method at one setting over its repetitions (one start block each)."""

    method: str
    setting: str
    rounds: int | None
    hvps: int
    sequential: int
    errors: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    #: Finite bounds among the top r, and bounds checked (every finite one), per repetition.
    finite: list[int] = field(default_factory=list)
    checked: list[int] = field(default_factory=list)
    #: Largest ``|reported - exact| / bound`` over the checked bounds (at most 1 when they hold).
    worst_ratio: float = 0.0
    failures: list[str] = field(default_factory=list)
    #: Lanczos' HVPs over its start vectors, when they differ.
    hvps_spread: str = ""
    #: After the wall time: what it covers, when not the products and solve.
    wall_note: str = ""

    @property
    def error(self) -> float:
        return max(self.errors)

    @classmethod
    def from_attempt(cls, attempt: Attempt) -> Row:
        """A Lanczos :class:`~bench.eigensolvers.Attempt`: one HVP after another."""
        row = cls(attempt.method, attempt.setting, None, attempt.hvps, attempt.hvps)
        row.errors, row.seconds = list(attempt.errors), list(attempt.seconds)
        return row


class Problem:
    """A symmetric operator, its exact eigenvalues by ``|lambda|`` descending, and a name."""

    def __init__(self, name: str, matmat, dim: int, exact: torch.Tensor):
        self.name, self.matmat, self.dim, self.exact = name, matmat, dim, exact

    def apply(self, block: torch.Tensor) -> torch.Tensor:
        return matmat_in_blocks(self.matmat, block, BLOCK)

    def krylov(self, top: int, rounds: int, k: int, rep: int, row: Row | None = None) -> Row:
        """One start block (seed ``SEEDS[rep]``) through ``rounds`` rounds of ``k`` HVPs,
        recorded as a repetition of ``row`` (a new row if None).
        """
        generator = torch.Generator().manual_seed(SEEDS[rep])
        start_block = torch.randn(self.dim, k, generator=generator, dtype=torch.float64)
        # Enough values past the top r that an opposite-sign near-tie at rank r is matched.
        count = min((rounds - 1) * k, max(k, 2 * top))
        started = time.perf_counter()
        result = block_krylov(self.apply, start_block, rounds, count)
        seconds = time.perf_counter() - started
        if row is None:
            method = f"block Krylov, {rounds} rounds"
            row = Row(method, f"k={k}", rounds, result.hvps, rounds)
        row.errors.append(max_relative_error(result.eigenvalues, self.exact, top))
        log(f"Q10 {self.name} top {top}, {rounds} rounds, k={k}, rep {rep}: {row.errors[-1]:.2e}")
        row.seconds.append(seconds)
        check_bounds(
            row, result, self.exact, top, f"{self.name}, {rounds} rounds, k={k}, rep {rep}"
        )
        return row


def check_bounds(row: Row, result, exact: torch.Tensor, top: int, where: str) -> None:
    """Count ``result``'s finite bounds in the top ``top`` and check every finite one:
    ``|mu_i - lambda_i| <= b_i`` with ``lambda_i`` the exact eigenvalue of rank ``i``.
    """
    bounds = result.error_bounds
    finite = bounds.isfinite()
    row.finite.append(int(finite[:top].sum()))
    row.checked.append(int(finite.sum()))
    if not finite.any():
        return
    values = result.eigenvalues.double().cpu()
    errors = (values - exact[: values.numel()]).abs()
    ratios = errors[finite] / bounds[finite]
    row.worst_ratio = max(row.worst_ratio, float(ratios.max()))
    for rank in torch.nonzero(finite & (errors > bounds)).flatten().tolist():
        failure = (
            f"{where}: rank {rank + 1}, reported {float(values[rank]):.10g}, exact "
            f"{float(exact[rank]):.10g}, error {float(errors[rank]):.3e} > bound "
            f"{float(bounds[rank]):.3e}"
        )
        row.failures.append(failure)
        log(f"Q10 BOUND FAILED: {failure}")


def smallest_k(problem: Problem, top: int, rounds: int, tolerance: float, reps: int) -> list:
    """The smallest ``k`` whose ``rounds`` rounds reach ``tolerance`` on the top ``top`` with
    each of the start blocks ``0..reps-1``: ``[row just below it (or None), its row]``;
    ``[last row tried, None]`` when no ``k`` up to ``D / rounds`` does.
    """
    k_max = problem.dim // rounds
    below, above, k = None, None, math.ceil(top / (rounds - 1))
    while above is None and k <= k_max:  # coarse grid upwards
        row = attempt(problem, top, rounds, k, tolerance, reps)
        below, above = (below, row) if row.error <= tolerance else (row, None)
        k = min(k_max, math.ceil(k * GRID_FACTOR)) if k < k_max else k_max + 1
    if above is None:
        return [below, None]
    while below is not None and row_k(above) - row_k(below) > resolution(row_k(above)):
        middle = attempt(problem, top, rounds, (row_k(above) + row_k(below)) // 2, tolerance, reps)
        below, above = (below, middle) if middle.error <= tolerance else (middle, above)
    return [below, above]


def attempt(problem: Problem, top: int, rounds: int, k: int, tolerance: float, reps: int) -> Row:
    """``k`` at start blocks ``0, 1, ...`` until one misses ``tolerance`` or ``reps`` ran."""
    row = problem.krylov(top, rounds, k, 0)
    for rep in range(1, reps):
        if row.error > tolerance:
            break
        problem.krylov(top, rounds, k, rep, row)
    return row


def row_k(row: Row) -> int:
    return int(row.setting.split("=")[1])


def resolution(k: int) -> int:
    return max(1, math.ceil(RESOLUTION * k))


def mnist_problem() -> tuple[Problem, object]:
    """Question 2's Hessian with its exact eigenvalues, and curvlinops' product on it for
    Lanczos.
    """
    hessian, exact, _, curvlinops_matmat = question_hessian()
    return Problem("mnist_mini", hessian.matmat, hessian.dim, exact), curvlinops_matmat


def synthetic_problem(dim: int) -> Problem:
    """``Q diag(1/i) Q^T``, ``Q`` orthogonal from the QR of a seeded Gaussian, float64; its
    exact eigenvalues by ``eigvalsh`` (within rounding of ``1/i``).
    """
    generator = torch.Generator().manual_seed(SYNTH_SEED)
    gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian)
    spectrum = 1.0 / torch.arange(1, dim + 1, dtype=torch.float64)
    matrix = (q * spectrum) @ q.T
    matrix = (matrix + matrix.T) / 2
    values = torch.linalg.eigvalsh(matrix)
    exact = values[values.abs().argsort(descending=True)]
    return Problem(f"1/i, D = {dim}", lambda block: matrix @ block, dim, exact)


def lanczos_rows(problem: Problem, matmat, top: int, tolerance: float, reps: int) -> list[Row]:
    """Question 2's Lanczos at its tolerances from 1e-1 down, each with start vectors
    ``0, 1, ...`` until one misses ``tolerance`` or ``reps`` ran; up to the first tolerance
    where every start vector reaches it (question 2's :func:`~bench.eigensolvers.sweep`
    stops at the first start vector that does).
    """
    attempt = lanczos_attempt(
        SimpleNamespace(dim=problem.dim, dtype=torch.float64), matmat, problem.exact, top
    )
    rows = []
    for tol in LANCZOS_TOLS:
        found = attempt(tol, 0)
        hvps = [found.hvps]
        for rep in range(1, reps):
            if found.error > tolerance:
                break
            again = attempt(tol, rep)
            found.errors += again.errors
            found.seconds += again.seconds
            hvps.append(again.hvps)
        row = Row.from_attempt(found)
        row.hvps = row.sequential = round(statistics.median(hvps))
        if min(hvps) != max(hvps):
            row.hvps_spread = f" ({min(hvps)}-{max(hvps)})"
        rows.append(row)
        log(f"Q10 {problem.name} top {top}, Lanczos tol={tol:g}: error {found.error:.2e}")
        if found.error <= tolerance:
            break
    return rows


@dataclass
class Goal:
    """One goal's rows: Lanczos' tried settings, and per number of rounds the row just below
    the smallest ``k`` reaching the tolerance and that ``k``'s row (or fixed-``k`` rows).
    """

    lanczos: list[Row]
    krylov: dict[int, list[Row | None]]
    tolerance: float
    #: Whole-pipeline rows (goal 3: ``hessov run problem=nqm``), after the others.
    pipeline: list[Row] = field(default_factory=list)

    def reference(self) -> Row | None:
        """Lanczos' setting that reached the tolerance."""
        last = self.lanczos[-1] if self.lanczos else None
        return last if last is not None and last.error <= self.tolerance else None

    def found(self, rounds: int) -> Row | None:
        rows = self.krylov.get(rounds, [None])
        last = rows[-1]
        return last if last is not None and last.error <= self.tolerance else None

    def rows(self) -> list[Row]:
        krylov = (r for rows in self.krylov.values() for r in rows if r)
        return [*self.lanczos, *krylov, *self.pipeline]


def fmt_bounds(row: Row) -> tuple[str, str]:
    """The finite bounds in the top r (min-max over repetitions), and whether they hold."""
    if row.rounds is None:
        return "-", "-"
    low, high = min(row.finite), max(row.finite)
    finite = f"{low}" if low == high else f"{low}-{high}"
    checked = sum(row.checked)
    if row.failures:
        return finite, f"**NO: {len(row.failures)} of {checked} FAILED**"
    if not checked:
        return finite, "none finite"
    return finite, f"yes ({checked} checked, largest error/bound {row.worst_ratio:.1e})"


def goal_table(goal: Goal, top: int) -> str:
    reference = goal.reference()
    body = []
    for row in goal.rows():
        ratio = f"{row.hvps / reference.hvps:.2f}" if reference else "-"
        reached = " (reached)" if row.error <= goal.tolerance else ""
        body.append(
            [
                row.method,
                row.setting,
                f"{row.hvps}{row.hvps_spread}",
                row.sequential,
                ratio,
                fmt_seconds(row.seconds) + row.wall_note,
                fmt_error(row.error) + reached,
                *fmt_bounds(row),
            ]
        )
    headers = [
        "method",
        "setting",
        "HVPs",
        "sequential HVPs",
        "HVPs / Lanczos'",
        "wall time",
        f"max rel. error, top {top} (worst repetition)",
        f"finite bounds in top {top}",
        "finite bounds hold",
    ]
    return markdown_table(headers, body)


def sweep_goal(problem, matmat, top: int, reps: int, rounds_list) -> Goal:
    """Lanczos to 1%, and for each number of rounds the smallest k reaching 1%."""
    log(f"Q10 {problem.name} top {top}: Lanczos")
    lanczos = lanczos_rows(problem, matmat, top, TOLERANCE, reps)
    krylov = {}
    for rounds in rounds_list:
        krylov[rounds] = smallest_k(problem, top, rounds, TOLERANCE, reps)
    return Goal(lanczos, krylov, TOLERANCE)


def budget_verdict(goal: Goal, top: int, budget: float, strict: bool) -> str:
    """Goals 1 and 2: the smallest HVPs over at most 3 rounds against Lanczos' times
    ``budget`` (``strict``: fewer than, else at most).
    """
    reference = goal.reference()
    candidates = [goal.found(r) for r in goal.krylov if r <= MAX_ROUNDS]
    candidates = [c for c in candidates if c is not None]
    if reference is None or not candidates:
        missing = "Lanczos" if reference is None else f"no setting within {MAX_ROUNDS} rounds"
        return f"{met(False)}: {missing} reached 1% (see the table)"
    best = min(candidates, key=lambda row: row.hvps)
    limit = budget * reference.hvps
    ok = best.hvps < limit if strict else best.hvps <= limit
    others = ", ".join(
        f"{r} rounds need {row.setting} ({row.hvps} HVPs, {row.hvps / reference.hvps:.2f}x)"
        if (row := goal.found(r))
        else f"{r} rounds do not reach it"
        for r in goal.krylov
    )
    return (
        f"{met(ok)}: the fewest HVPs within {MAX_ROUNDS} rounds are {best.hvps} "
        f"({best.rounds} rounds, {best.setting}), {best.hvps / reference.hvps:.2f}x Lanczos' "
        f"{reference.hvps} ({reference.setting}); the goal allows "
        f"{'fewer than' if strict else 'at most'} {limit:g}. Top {top}: {others}."
    )


def synthetic_goal(dim: int, reps: int, rounds_list) -> tuple[Goal, int]:
    """Goal 3: the default k on ``1/i`` at each number of rounds; Lanczos to 1e-3."""
    problem = synthetic_problem(dim)
    k = default_k(dim)
    krylov = {}
    for rounds in rounds_list:
        row = None
        for rep in range(reps):
            row = problem.krylov(SYNTH_TOP, rounds, k, rep, row)
        krylov[rounds] = [row]
    lanczos = lanczos_rows(problem, problem.matmat, SYNTH_TOP, SYNTH_TOLERANCE, reps)
    for row in lanczos:
        row.method = "Lanczos `eigsh` on the dense matrix"
    return Goal(lanczos, krylov, SYNTH_TOLERANCE), k


def nqm_row(name: str, overrides: list[str]) -> tuple[Row, dict]:
    """One ``hessov run`` of the nqm problem (``overrides`` on its defaults), its top
    ``SYNTH_TOP`` against the exact ``1/i``, its wall time the whole command's; and its
    summary's solve fields.
    """
    out = NQM_WORK / name
    shutil.rmtree(out, ignore_errors=True)
    child = run_cli(["run", *NQM_ARGS, f"OUTPUT_DIR={out}", *overrides])
    summary = json.loads(run_cli(["summary", child.stdout.strip().splitlines()[-1]]).stdout)
    solve = summary["solve"]["0"]["train"]
    rounds = solve["rounds"]
    method = " ".join(["problem=nqm", *overrides])
    method = f"pipeline, `{method}`" + ("" if overrides else f" defaults (rounds = {rounds})")
    row = Row(method, f"k={solve['k']}", rounds, solve["hvps"], rounds, wall_note=" (command)")
    exact = 1.0 / torch.arange(1, summary["layout"]["D"] + 1, dtype=torch.float64)
    bounds = [math.inf if b is None else b for b in solve["eigenvalue_error_bounds"]]
    result = SimpleNamespace(
        eigenvalues=torch.tensor(solve["eigenvalues"], dtype=torch.float64),
        error_bounds=torch.tensor(bounds, dtype=torch.float64),
    )
    row.errors.append(max_relative_error(result.eigenvalues, exact, SYNTH_TOP))
    row.seconds.append(child.seconds)
    log(f"Q10 nqm pipeline, {rounds} rounds: {row.errors[-1]:.2e} in {child.seconds:.1f} s")
    check_bounds(row, result, exact, SYNTH_TOP, f"nqm pipeline, {rounds} rounds")
    return row, solve


def pipeline_verdict(goal: Goal) -> str:
    """Goal 3 through the pipeline: the nqm problem's defaults against the tolerance."""
    default, *others = goal.pipeline
    contrast = "".join(
        f"; with `rounds={row.rounds}` ({row.hvps} HVPs) {fmt_error(row.error)}" for row in others
    )
    return (
        f"{met(default.error <= goal.tolerance)} by the whole pipeline at the nqm problem's "
        f"defaults (`hessov run problem=nqm`: rounds = {default.rounds}, {default.setting}, "
        f"{default.hvps} HVPs): top-{SYNTH_TOP} error {fmt_error(default.error)} against the "
        f"exact 1/i{contrast}."
    )


def nqm_text(solves: list[dict]) -> str:
    """What the pipeline rows ran, what their HVPs count and what their wall time holds."""
    products = " and ".join(f"{s['seconds_by_phase']['products']:.2f} s" for s in solves)
    probes = " or ".join(sorted({str(s["num_a_posteriori"]) for s in solves}))
    return (
        f"Pipeline rows: `hessov run {' '.join(NQM_ARGS)} "
        f"OUTPUT_DIR={NQM_WORK.relative_to(ROOT)}/defaults` (then with `rounds=2`), "
        "one run each at the config's seed: the nqm problem's Hessian is "
        "diag(1, 1/2, ..., 1/1000) (float32). Eigenvalues, HVPs, rounds and error bounds from "
        '`hessov summary RUN_DIR` (`["solve"]["0"]["train"]`), against the exact 1/i. HVPs '
        f"are the summary's `hvps`, the sketch's; each run also spends {probes} a-posteriori "
        "probe products (`num_a_posteriori`) on its overall error estimate, which the "
        "eigenvalues and their bounds do not use. The rows' wall time is the whole command's: "
        "process start, the 0-step training, layout, "
        f"products, solve, analysis and report; the products themselves took {products} "
        "(`seconds_by_phase.products`)."
    )


def synthetic_verdict(goal: Goal, k: int) -> str:
    parts = [
        f"{r} rounds ({r * k} HVPs) {fmt_error(rows[-1].error)}" for r, rows in goal.krylov.items()
    ]
    default = goal.found(2)
    reached = [r for r in goal.krylov if goal.found(r)]
    if default:
        verdict = f"{met(True)} at the global default (2 rounds)"
    elif reached:
        verdict = (
            f"{met(False)} at the global default (2 rounds); met from {min(reached)} rounds on "
            f"at the default k"
        )
    else:
        verdict = f"{met(False)}: no number of rounds reaches it at the default k"
    reference = goal.reference()
    lanczos = (
        f"Lanczos reaches 1e-3 with {reference.hvps} HVPs ({reference.setting})"
        if reference
        else "Lanczos does not reach it at the tolerances tried"
    )
    return f"{verdict}: top-{SYNTH_TOP} error at k = {k}: {'; '.join(parts)}. {lanczos}."


def failures_text(goals: list[Goal]) -> str:
    failures = [f for goal in goals for row in goal.rows() for f in row.failures]
    if not failures:
        return ""
    return (
        f"**ERROR BOUNDS FAILED ({len(failures)}): a finite bound the sketch reported does "
        "not hold against the exact eigenvalue:**\n\n"
        + "\n".join(f"- {f}" for f in failures)
        + "\n\n"
    )


def section(settings: Settings) -> str:
    started = time.perf_counter()
    torch.set_num_threads(1)
    quick = settings.quick
    # --quick: a smaller top r and synthetic matrix, to check the script.
    top1, synth_dim = (40, 200) if quick else (355, SYNTH_DIM)
    rounds_list = ROUNDS[:2] if quick else ROUNDS
    problem, curvlinops_matmat = mnist_problem()
    goal1 = sweep_goal(problem, curvlinops_matmat, top1, min(settings.reps, 2), rounds_list)
    goal2 = sweep_goal(problem, curvlinops_matmat, 20, min(settings.reps, 3), rounds_list)
    goal3, k3 = synthetic_goal(synth_dim, min(settings.reps, 3), rounds_list)
    nqm = [nqm_row(name, overrides) for name, overrides in NQM_RUNS]
    goal3.pipeline = [row for row, _ in nqm]
    wall = time.perf_counter() - started
    return "\n".join(
        [
            "## 10. Krylov rounds: the three goals of issue 15",
            "",
            failures_text([goal1, goal2, goal3])
            + " ".join(INTRO.format(resolution=f"{RESOLUTION:.0%}").split()),
            "",
            f"### Goal 1: top {top1} of the mnist_mini Hessian (D = {problem.dim:,}) within "
            f"1%, at most {MAX_ROUNDS} rounds and {HVP_RATIO}x Lanczos' HVPs",
            "",
            f"**Goal 1:** {budget_verdict(goal1, top1, HVP_RATIO, strict=False)}",
            "",
            goal_table(goal1, top1),
            "",
            "### Goal 2: top 20 of the same Hessian within 1%, at most "
            f"{MAX_ROUNDS} rounds and fewer HVPs than Lanczos",
            "",
            f"**Goal 2:** {budget_verdict(goal2, 20, 1.0, strict=True)}",
            "",
            goal_table(goal2, 20),
            "",
            f"### Goal 3: top {SYNTH_TOP} of 1/i (D = {synth_dim:,}) within "
            f"{SYNTH_TOLERANCE:g}, at the default k = {k3}",
            "",
            f"Q diag(1/i) Q^T, Q orthogonal from the QR of a Gaussian (seed {SYNTH_SEED}), "
            f"float64; k = `hessov.costs.default_k({synth_dim})` = {k3} (5% of D).",
            "",
            f"**Goal 3:** {pipeline_verdict(goal3)} Synthetic matrix: "
            f"{synthetic_verdict(goal3, k3)}",
            "",
            goal_table(goal3, SYNTH_TOP),
            "",
            nqm_text([solve for _, solve in nqm]),
            "",
            f"Section wall time {wall:.0f} s.",
        ]
    )
