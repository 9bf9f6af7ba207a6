"""Question 12: a layer's block of H, the GGN and the most negative eigenpairs (issue 17).

On the benchmarks' mnist_mini Hessian (step 1000, train subset of 500 points, D = 7,030),
each measured against the exact value from the dense float64 matrix and against a peer:

* per layer (``params=`` the layer's parameters, the default ``k`` of its size, two rounds):
  the block's top eigenvalue against PyHessian 0.1's ``eigenvalues()`` (power iteration,
  ``maxIter=100, tol=1e-3``) on the same block (the other parameters frozen), its HVPs
  counted by wrapping its product;
* the GGN (``curvature=ggn``, k = 355, two rounds): the top 20 against the dense GGN's;
  PyHessian has no GGN;
* the most negative eigenpairs (``which=smallest``, four rounds of k = 60): the five most
  negative against scipy's Lanczos (``eigsh(which="SA")``) on the dense matrix, its products
  counted, to the same accuracy. PyHessian's power iteration finds the largest ``|lambda|``
  only.

Each pipeline row is ``hessov layout`` on a copy of the trained run, then ``hessov resume``.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from bench.common import STEP, WORK, Settings, log, markdown_table, run_cli, trained_run
from bench.estimates import exact_quantities, pyhessian, sketched_run

SKETCH = [f"HESSIAN_STEPS=[{STEP}]", "HESSIAN_SPLITS=[train]"]


def pipeline_run(name: str, settings: list[str]) -> dict:
    """The solve summary of a copy of the trained run laid out with ``settings``."""
    run = WORK / f"variants_{name}"
    summary = run / "summary" / "solve" / str(STEP) / "train.json"
    if not summary.is_file():
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(trained_run(), run)
        run_cli(["layout", str(run), *SKETCH, *settings])
        run_cli(["resume", str(run)])
    return json.loads(summary.read_text())


def _relative(value: float, exact: float) -> str:
    return f"{abs(value - exact) / abs(exact):.2%}"


def layer_rows(dense: torch.Tensor, model_view) -> list:
    """A row per layer: the block's top eigenvalue, exact, ours and PyHessian's."""
    from hessov.paramblock import block_rows, recorded_layout
    from hessov.rundir import RunDir
    from hessov.variants import layers

    layout = recorded_layout(RunDir(trained_run()))
    rows = []
    for module, names in layers(layout).items():
        index = torch.cat([torch.arange(r.start, r.stop) for r in block_rows(layout, names)])
        exact = float(torch.linalg.eigvalsh(dense[index][:, index])[-1])
        ours = pipeline_run(f"layer_{module}", [f"params=[{','.join(names)}]", "k=0"])
        bound = ours["error_bounds"][0] if "error_bounds" in ours else float("inf")
        row = [module, len(index), f"{exact:.4f}", f"{ours['eigenvalues'][0]:.4f}"]
        row += [_relative(ours["eigenvalues"][0], exact), f"{bound:.2g}", ours["hvps"]]
        rows.append(row + list(power_iteration(model_view, names, exact)))
    return rows


def power_iteration(model_view, names: list[str], exact: float) -> tuple:
    """PyHessian's top eigenvalue of the block ``names``: value, error, HVPs."""
    model = model_view.problem.model
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    model.zero_grad(set_to_none=True)
    peer = pyhessian(model_view)
    if peer is None:
        return ("—", "—", "—")
    peer_module = sys.modules["pyhessian.hessian"]  # the package re-exports the class
    count, product = [0], peer_module.hessian_vector_product

    def counted(*args):
        count[0] += 1
        return product(*args)

    peer_module.hessian_vector_product = counted
    torch.manual_seed(0)
    try:
        values, _ = peer.eigenvalues(maxIter=100, tol=1e-3, top_n=1)
    finally:
        peer_module.hessian_vector_product = product
        for param in model.parameters():
            param.requires_grad_(True)
    return (f"{values[0]:.4f}", _relative(values[0], exact), count[0])


def ggn_rows(run: str) -> list:
    """The GGN's top 20 against the dense GGN's."""
    from hessov.config import saved_run_config
    from hessov.hessian import hessian_at_step
    from hessov.rundir import RunDir
    from hessov.skerch_ext.operator import dense_matrix

    cfg = saved_run_config(RunDir(run))
    cfg.dtype, cfg.curvature = "float64", "ggn"
    ggn = hessian_at_step(RunDir(run), cfg, STEP, "train", check_deterministic=False)
    dense = dense_matrix(ggn.matmat, ggn.dim, block_size=256, dtype=torch.float64, device="cpu")
    exact = torch.linalg.eigvalsh(dense).flip(0)[:20].numpy()
    ours = pipeline_run("ggn", ["curvature=ggn"])
    errors = np.abs(np.array(ours["eigenvalues"][:20]) - exact) / exact
    return [
        [
            "top 1",
            f"{exact[0]:.4f}",
            f"{ours['eigenvalues'][0]:.4f}",
            f"{errors[0]:.2%}",
            ours["hvps"],
        ],
        ["top 20, largest error", "—", "—", f"{errors.max():.2%}", ours["hvps"]],
        [
            "smallest exact GGN eigenvalue",
            f"{float(torch.linalg.eigvalsh(dense)[0]):.1e}",
            "—",
            "—",
            "—",
        ],
    ]


def smallest_rows(dense: torch.Tensor, values: torch.Tensor) -> list:
    """The five most negative: ours against Lanczos on the dense matrix."""
    exact = values[:5].numpy()
    ours = pipeline_run("smallest", ["which=smallest", "rounds=4", "k=60"])
    shift = json.loads(
        (WORK / "variants_smallest/summary/shift" / str(STEP) / "train.json").read_text()
    )
    found = np.array(ours["eigenvalues"][:5])
    count = [0]

    def apply(vector):
        count[0] += 1 if vector.ndim == 1 else vector.shape[1]
        return dense.numpy() @ vector

    operator = LinearOperator(dense.shape, matvec=apply, matmat=apply, dtype=np.float64)
    lanczos = np.sort(eigsh(operator, k=5, which="SA", tol=1e-3, v0=np.ones(len(values)))[0])
    return [
        ["hessov which=smallest (4 rounds of k = 60, and the shift)", ours["hvps"] + shift["hvps"],
         f"{found[0]:.4f}", f"{np.max(np.abs(found - exact) / np.abs(exact)):.2%}"],
        ["scipy eigsh(which='SA', k=5, tol=1e-3) on the dense matrix", count[0],
         f"{lanczos[0]:.4f}", f"{np.max(np.abs(lanczos - exact) / np.abs(exact)):.2%}"],
        ["exact", "—", f"{exact[0]:.4f}", "—"],
    ]  # fmt: skip


def section(settings: Settings) -> str:
    log("Q12 exact Hessian")
    run = sketched_run()
    dense, values, model_view = exact_quantities(run)
    values = values.sort().values
    torch.set_num_threads(1)
    log("Q12 layers")
    layers = layer_rows(dense, model_view)
    log("Q12 GGN")
    ggn = ggn_rows(run)
    log("Q12 most negative")
    smallest = smallest_rows(dense, values)
    layer_header = ["layer", "D", "exact top", "hessov", "error", "its bound", "HVPs"]
    layer_header += ["PyHessian", "error", "HVPs"]
    return "\n".join(
        [
            "## 12. Per-layer blocks, the GGN, the most negative eigenpairs (issue 17)",
            "",
            __doc__.split("\n\n", 1)[1].strip(),
            "",
            "### The top eigenvalue of each layer's block",
            "",
            markdown_table(layer_header, layers),
            "",
            "### The GGN (curvature=ggn)",
            "",
            markdown_table(["", "exact", "hessov", "error", "HVPs"], ggn),
            "",
            "### The five most negative eigenvalues (which=smallest)",
            "",
            markdown_table(["method", "HVPs", "most negative", "largest error of the 5"], smallest),
        ]
    )
