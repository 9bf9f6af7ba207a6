"""Accuracy of sketched top eigenpairs at an equal budget of HVPs, against the exact ones.

What it measures, on the mnist_mini train Hessian of the benchmark run (step 1000, 500
points, float64, one thread), with 710 HVPs for every recovery:

* our single pass (k=355, s=710) and our two-pass (k=355, Rayleigh-Ritz on the block
  Krylov space ``span(Q, HQ)``, the default) through :func:`skerch_ext.incore.sketched_eigh`,
  the same functions the pipeline uses;
* plain two-pass Rayleigh-Ritz on ``span(Q)`` (:func:`skerch_ext.solve.seigh_two_pass`
  with ``krylov_extension=False``) on the same ``Q`` as our two-pass;
* skerch 1.2.0's own ``seigh`` on the same curvlinops operator, SSRFT noise, blocks of 64.
  Its oversampled recovery measures the outer and inner sketches with separate HVPs, so
  it costs k + s: budget-matched are ``recovery_type="oversampled_474"`` with
  ``outer_dims=236`` (236 + 474 = 710) and ``recovery_type="hmt"`` with ``outer_dims=355``
  (355 + a second pass of 355). The paper's setting ``oversampled_710`` with
  ``outer_dims=355`` costs 1,065 HVPs and is shown too, marked as over budget.

against the exact eigendecomposition (dense ``H`` by ``H @ I`` in blocks, ``eigh``, sorted
by ``|lambda|`` descending), cached in ``bench/_work``: relative error of the top-20
eigenvalues (max and mean) and subspace overlap ``||W_k^T V_k||_F^2 / k`` of the top 10,
20 and 100 eigenvectors, over 3 sketch seeds, plus the wall time of each. This is what
backs the accuracy claims in :mod:`skerch_ext.solve` and the choice of recovery.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import time
from pathlib import Path

import torch
from skerch.algorithms import seigh as skerch_seigh

from bench.common import (
    RUN_NAME,
    STEP,
    WORK,
    fmt_spread,
    log,
    markdown_table,
    run_context,
    trained_run,
    write_section,
)
from pipeline.hessian import hessian_at_step, load_run_config
from pipeline.rundir import RunDir
from skerch_ext.incore import sketched_eigh
from skerch_ext.measure import matmat_in_blocks
from skerch_ext.operator import dense_matrix
from skerch_ext.seeds import sketch_seed_ranges
from skerch_ext.solve import orthonormal_basis, seigh_two_pass
from skerch_ext.test_matrices import SketchMatrices

K, S, BUDGET = 355, 710, 710
BLOCK = 64
NUM_APOST = 30
#: Far apart, so that the seed ranges of different sketches (about 1,450 seeds) never meet.
SEEDS = (1, 10_001, 20_001)
TOP_EIGENVALUES = 20
OVERLAP_KS = (10, 20, 100)
#: Exact eigenvectors kept in the cache (the overlaps need 100).
KEPT_VECTORS = 400


class BlockedOperator:
    """``H`` for skerch: ``shape`` and ``@`` in blocks of ``BLOCK`` columns, as ours runs,
    so that skerch's second pass ``H @ Q`` (355 columns at once) is not vmapped in one go."""

    def __init__(self, matmat, dim: int):
        self.matmat, self.shape = matmat, (dim, dim)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            return self.matmat(x[:, None])[:, 0]
        return matmat_in_blocks(self.matmat, x, BLOCK)


def exact_eigenpairs(run: RunDir, hessian) -> tuple[torch.Tensor, torch.Tensor, float]:
    """All eigenvalues ``(D,)`` and the top ``KEPT_VECTORS`` eigenvectors, by ``|lambda|``
    descending; cached per content of ``params.h5``. Also the seconds it took (0 if cached)."""
    digest = hashlib.sha256(Path(run.params).read_bytes()).hexdigest()[:12]
    cache = WORK / f"exact_{RUN_NAME}_step{STEP}_train_{digest}.pt"
    if cache.is_file():
        saved = torch.load(cache)
        return saved["values"], saved["vectors"], 0.0
    log("exact eigendecomposition (1-3 minutes, cached afterwards)")
    start = time.perf_counter()
    # Both cores for the one-off dense work; the sketches below run on one, as configured.
    torch.set_num_threads(2)
    dense = dense_matrix(
        hessian.matmat,
        hessian.dim,
        block_size=BLOCK,
        dtype=torch.float64,
        device="cpu",
        progress=False,
    )
    values, vectors = torch.linalg.eigh(dense)
    order = values.abs().argsort(descending=True)
    values, vectors = values[order], vectors[:, order[:KEPT_VECTORS]].contiguous()
    torch.set_num_threads(1)
    torch.save({"values": values, "vectors": vectors}, cache)
    return values, vectors, time.perf_counter() - start


def compare(values, vectors, exact_values, exact_vectors) -> dict[str, float]:
    """Top-20 relative eigenvalue errors (max, mean) and top-k subspace overlaps."""
    top = TOP_EIGENVALUES
    errors = (values[:top] - exact_values[:top]).abs() / exact_values[:top].abs()
    result = {"max_err": float(errors.max()), "mean_err": float(errors.mean())}
    for k in OVERLAP_KS:
        result[f"overlap_{k}"] = float((vectors[:, :k].T @ exact_vectors[:, :k]).pow(2).sum() / k)
    return result


def run_methods(hessian, seed: int) -> dict[str, dict]:
    """Every recovery with sketch seed ``seed``: ``name -> {values, vectors, seconds, ...}``."""
    matmat, dim, dtype = hessian.matmat, hessian.dim, hessian.dtype
    out = {}
    for name, recovery, inner in (
        ("ours: single pass (k=355, s=710)", "single_pass", S),
        ("ours: two-pass, block Krylov (k=355)", "two_pass", None),
    ):
        result = sketched_eigh(
            matmat,
            dim,
            K,
            inner,
            seed=seed,
            noise="ssrft",
            recovery=recovery,
            block_size=BLOCK,
            dtype=dtype,
            device="cpu",
            num_apost=NUM_APOST,
        )
        out[name] = {
            "values": result.eigenvalues,
            "vectors": result.eigenvectors,
            "seconds": result.seconds["measure"] + result.seconds["solve"],
            "apost_seconds": result.seconds["apost"],
            "hvps": result.hvps["sketch"] + result.hvps.get("second_pass", 0),
        }

    # Plain Rayleigh-Ritz on exactly the Omega (and so the Q) of our two-pass above.
    start = time.perf_counter()
    seeds = sketch_seed_ranges(seed, K, NUM_APOST)
    sketch = SketchMatrices.from_seeds(dim, K, seeds, noise="ssrft", dtype=dtype, device="cpu")
    basis = orthonormal_basis(matmat_in_blocks(matmat, sketch.omega_columns(range(K)), BLOCK))
    h_basis = matmat_in_blocks(matmat, basis, BLOCK)
    values, vectors = seigh_two_pass(basis, h_basis, None, krylov_extension=False)
    out["plain two-pass Rayleigh-Ritz (k=355)"] = {
        "values": values,
        "vectors": vectors,
        "seconds": time.perf_counter() - start,
        "hvps": 2 * K,
    }

    operator = BlockedOperator(matmat, dim)
    for name, outer, recovery, hvps in (
        ("skerch seigh hmt (outer 355)", 355, "hmt", 710),
        ("skerch seigh oversampled_474 (outer 236)", 236, "oversampled_474", 710),
        (
            "skerch seigh oversampled_710 (outer 355), paper, OVER budget",
            355,
            "oversampled_710",
            1065,
        ),
    ):
        start = time.perf_counter()
        values, vectors = skerch_seigh(
            operator,
            "cpu",
            dtype,
            outer,
            seed=seed,
            noise_type="ssrft",
            recovery_type=recovery,
            meas_blocksize=BLOCK,
        )
        out[name] = {
            "values": values,
            "vectors": vectors,
            "seconds": time.perf_counter() - start,
            "hvps": hvps,
        }
    return out


def fmt_sci(values: list[float]) -> str:
    # "to" rather than "-": a dash between exponents would read as a minus sign.
    return f"{statistics.median(values):.1e} ({min(values):.1e} to {max(values):.1e})"


def table(metrics: dict[str, list[dict]]) -> str:
    rows = []
    for name, per_seed in metrics.items():
        column = {key: [m[key] for m in per_seed] for key in per_seed[0]}
        apost = column.get("apost_seconds")
        rows.append(
            [
                name,
                per_seed[0]["hvps"],
                fmt_sci(column["max_err"]),
                fmt_sci(column["mean_err"]),
                *(fmt_spread(column[f"overlap_{k}"], 4) for k in OVERLAP_KS),
                fmt_spread(column["seconds"], 2),
                fmt_spread(apost, 2) if apost else "",
            ]
        )
    return markdown_table(
        [
            "recovery",
            "HVPs",
            "top-20 eigenvalue rel. error, max",
            "mean",
            "overlap top-10",
            "top-20",
            "top-100",
            "seconds (sketch + solve)",
            "+ a-posteriori (30 HVPs)",
        ],
        rows,
    )


def summary_text(metrics: dict[str, list[dict]], exact_values: torch.Tensor) -> str:
    def median(name: str, key: str) -> float:
        return statistics.median(m[key] for m in metrics[name])

    sp = "ours: single pass (k=355, s=710)"
    tp = "ours: two-pass, block Krylov (k=355)"
    rr = "plain two-pass Rayleigh-Ritz (k=355)"
    budget = [n for n in metrics if "OVER" not in n]
    best = min(budget, key=lambda n: median(n, "max_err"))
    ranked = tp == best
    top = ", ".join(f"{v:.4g}" for v in exact_values[:5].tolist())
    # The largest top-20 errors stated in skerch_ext/solve.py's docstring.
    claims = {tp: 1e-4, rr: 5e-3, sp: 1e-2}
    claims_hold = all(
        abs(math.log10(median(name, "max_err") / value)) < math.log10(3)
        for name, value in claims.items()
    )
    hmt = "skerch seigh hmt (outer 355)"
    same_q = all(
        abs(a["max_err"] - b["max_err"]) <= 1e-6 * a["max_err"]
        for a, b in zip(metrics[rr], metrics[hmt], strict=True)
    )
    intro = (
        "Relative error of the top-20 eigenvalues and top-k subspace overlaps against the "
        f"exact eigendecomposition (eigenvalues by |lambda|: {top}, ...), median over "
        f"{len(metrics[tp])} sketch seeds with min-max; every recovery except the last row "
        "spends the same 710 HVPs. Seconds are sketch plus solve; our recoveries also spend "
        "the a-posteriori check's 30 HVPs (last column)."
    )
    if ranked:
        verdict = (
            "Goal 3 (best accuracy per HVP): met: the block-Krylov two-pass has the smallest "
            f"largest top-20 error ({median(tp, 'max_err'):.1e})"
            + (
                " and the best top-100 overlap"
                if tp == max(budget, key=lambda n: median(n, "overlap_100"))
                else ""
            )
        )
    else:
        verdict = (
            f"Goal 3 (best accuracy per HVP): NOT met: {best} is the most accurate "
            f"({median(best, 'max_err'):.1e} against {median(tp, 'max_err'):.1e} for our "
            "two-pass)"
        )
    verdict += (
        f", against {median(rr, 'max_err'):.1e} for plain Rayleigh-Ritz and "
        f"{median(sp, 'max_err'):.1e} for our single pass. `skerch_ext/solve.py` states "
        "about 1e-4, 5e-3 and 1e-2 for these three; the measured values are "
        + ("consistent with that" if claims_hold else "NOT consistent with that")
        + " (each within a factor of 3)."
    )
    skerch_sp = "skerch seigh oversampled_474 (outer 236)"
    if median(sp, "max_err") < median(skerch_sp, "max_err"):
        verdict += (
            " Our single pass beats skerch's own oversampled recovery at the same budget "
            f"({median(sp, 'max_err'):.1e} against {median(skerch_sp, 'max_err'):.1e}): "
            "skerch spends separate HVPs on the outer and inner sketches, ours recycles "
            "the first k inner products as the outer sketch."
        )
    if same_q:
        verdict += (
            " Plain Rayleigh-Ritz and skerch's hmt recovery draw the same SSRFT from the same "
            "seed, hence the same Q, and agree to rounding: the two code paths compute the "
            "same thing."
        )
    return intro + "\n\n" + verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="how many of the seeds")
    parser.add_argument("--write", action="store_true", help="replace the RESULTS.md section")
    args = parser.parse_args()
    run = RunDir(trained_run())
    started = time.perf_counter()
    cfg = load_run_config(run)
    cfg.dtype = "float64"
    hessian = hessian_at_step(run, cfg, STEP, "train")
    exact_values, exact_vectors, exact_seconds = exact_eigenpairs(run, hessian)
    torch.set_num_threads(1)  # the mnist_mini config's setting
    metrics: dict[str, list[dict]] = {}
    for seed in SEEDS[: args.seeds]:
        for name, result in run_methods(hessian, seed).items():
            entry = compare(result["values"], result["vectors"], exact_values, exact_vectors)
            entry.update({key: result[key] for key in ("seconds", "hvps")})
            if "apost_seconds" in result:
                entry["apost_seconds"] = result["apost_seconds"]
            metrics.setdefault(name, []).append(entry)
        log(f"seed {seed} done")
    exact_note = (
        f"the exact decomposition took {exact_seconds:.0f} s on 2 threads and is now cached"
        if exact_seconds
        else "the exact decomposition came from the cache in bench/_work"
    )
    body = "\n".join(
        [
            "## 3. Accuracy at an equal budget of 710 HVPs (`bench/accuracy.py`)",
            "",
            summary_text(metrics, exact_values),
            "",
            table(metrics),
            "",
            f"Sketch seeds {', '.join(map(str, SEEDS[: args.seeds]))}; SSRFT noise, blocks of "
            f"{BLOCK}, float64, 1 thread; {exact_note}. {run_context()} Script wall time "
            f"{time.perf_counter() - started:.0f} s.",
        ]
    )
    print(body)
    if args.write:
        write_section("accuracy", body)


if __name__ == "__main__":
    main()
