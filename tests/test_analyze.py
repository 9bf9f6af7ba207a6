"""`hessov analyze` on a real tiny run: the summary contract, the curves against a direct
computation, partial runs completed by a re-run, the report, and the notebook.
"""

import shutil
from pathlib import Path

import h5py
import matplotlib.image
import numpy as np
import pytest

from conftest import execute_notebook

SKETCHES = [(step, split) for step in (100, 300) for split in ("train", "test")]
K, D = 30, 7030


def test_summary_reports_overlap_baseline_and_best_mask_at_the_reported_sizes(tiny_run, summary_of):
    analyze = summary_of(tiny_run)["analyze"]
    for step, split in SKETCHES:
        fields = analyze[str(step)][split]
        assert fields["dimension"] == D and fields["num_eigenpairs"] == K
        for key in ("overlap", "baseline", "best_mask_overlap", "random_mask_mean"):
            assert sorted(fields[key], key=int) == ["1", "5", "10", "20", "30"], key
        for k, overlap in fields["overlap"].items():
            assert fields["baseline"][k] == pytest.approx(int(k) / D, rel=1e-12)
            assert 0 <= overlap <= fields["best_mask_overlap"][k] + 1e-12 <= 1 + 1e-12
            assert fields["ratio_to_baseline"][k] == pytest.approx(overlap / fields["baseline"][k])
            # 32 random masks: their mean lies within 5 standard errors of chance.
            spread = 5 * fields["random_mask_std"][k] / np.sqrt(32)
            assert abs(fields["random_mask_mean"][k] - int(k) / D) <= spread + 1e-12


def test_overlap_curve_equals_a_direct_computation_from_the_stage_files(tiny_run):
    run = Path(tiny_run)
    with h5py.File(run / "params.h5") as handle:
        steps = list(handle["steps"][:])
        params = {int(t): handle["data"][:, i] for i, t in enumerate(steps)}
    with h5py.File(run / "analysis/analysis.h5") as results:
        for step, split in SKETCHES:
            with h5py.File(run / f"eigen/step_{step}_{split}.h5") as eigen:
                W = eigen["eigenvectors"][:].astype(np.float64)
            curves = results[f"overlap/{split}/step_{step}"]
            ranking = np.argsort(-np.abs(params[step]), kind="stable")
            for k in (1, 7, K):
                direct = np.sum(W[ranking[:k], :k] ** 2) / k
                assert curves["overlap"][k - 1] == pytest.approx(direct, rel=1e-9)
                best = np.sort(np.sum(W[:, :k] ** 2, axis=1))[-k:].sum() / k
                assert curves["best_mask_overlap"][k - 1] == pytest.approx(best, rel=1e-9)
            # sum_i e_i(k) / D = k / D up to the float32 orthonormality of the stored W.
            np.testing.assert_allclose(
                curves["random_mask_mean"][:], np.arange(1, K + 1) / D, rtol=1e-5
            )


def test_crystallization_metrics_are_similarities_with_their_random_baselines(tiny_run):
    with h5py.File(Path(tiny_run) / "analysis/analysis.h5") as results:
        for split in ("train", "test"):
            sizes = results[f"crystallization/eigenspaces/{split}"]
            assert sorted(sizes) == ["size_30"]  # 0.005 D = 35 > K: only K itself
            pairs = sizes["size_30/last"]
            assert list(pairs["step_a"][:]) == [100] and list(pairs["step_b"][:]) == [300]
            for name in ("overlap", "geodesic", "fubini_study", "projection_f"):
                assert 0 <= pairs[name][0] <= 1
            assert pairs.attrs["random_overlap"] == pytest.approx(K / D, rel=0.2)
            # The eigenspace of the train Hessian keeps its direction far above chance.
            assert pairs["overlap"][0] > 3 * pairs.attrs["random_overlap"]
        masks = results["crystallization/masks"]
        assert sorted(float(g.attrs["ratio"]) for g in masks.values()) == [0.005, 0.01, 0.05, 0.2]
        for group in masks.values():
            pairs = group["last"]
            assert pairs.attrs["random_overlap"] == pytest.approx(group.attrs["ratio"], rel=0.2)
            geodesic = (1 - pairs["geodesic"][0]) * np.pi / 2 * np.sqrt(group.attrs["size"])
            assert pairs["distance_geodesic"][0] == pytest.approx(geodesic)


def test_report_links_every_figure_and_tables_each_step(tiny_run):
    run = Path(tiny_run)
    report = (run / "analysis/report.md").read_text()
    assert "Not solved yet" not in report
    assert "| step | k | overlap | chance k/D | overlap / chance |" in report
    for step, _ in SKETCHES:
        assert f"| {step} | 30 |" in report
    links = [line[line.index("(") + 1 : -1] for line in report.splitlines() if line[:2] == "!["]
    names = sorted(Path(link).stem for link in links)
    assert names == sorted(
        [f"{kind}_{split}" for kind in ("overlap", "overlap_ratio", "spectrum",
                                        "eigenspace_crystallization")
         for split in ("train", "test")] + ["mask_crystallization"]
        + [f"{name}_step_{step}_{split}" for name in ("diagonal", "density")
           for step, split in SKETCHES]  # the estimates' section (tests/test_estimates.py)
    )  # fmt: skip
    for link in links:
        assert (run / "analysis" / link).stat().st_size > 10_000


def test_partial_run_names_unsolved_steps_and_a_rerun_adds_only_them(tiny_run, tmp_path, hessov):
    run = tmp_path / "partial"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "analysis")
    shutil.rmtree(run / "summary/analyze")
    held_back = run / "eigen/step_300_test.h5"
    held_back.rename(tmp_path / "held_back.h5")

    first = hessov("analyze", str(run))
    assert "not solved yet" in first.stderr and "step 300 test" in first.stderr
    assert "**Not solved yet**" in (run / "analysis/report.md").read_text()
    with h5py.File(run / "analysis/analysis.h5") as results:
        assert sorted(results["overlap/test"]) == ["step_100"]
        assert sorted(results["overlap/train"]) == ["step_100", "step_300"]
    analysed = sorted((run / "analysis/steps").glob("*.h5"))
    before = {path.name: path.stat().st_mtime_ns for path in analysed}

    (tmp_path / "held_back.h5").rename(held_back)
    hessov("analyze", str(run))
    after = {path.name: path.stat().st_mtime_ns for path in (run / "analysis/steps").glob("*.h5")}
    assert set(after) == set(before) | {"step_300_test.h5"}
    assert all(after[name] == mtime for name, mtime in before.items())  # not recomputed
    assert "Not solved yet" not in (run / "analysis/report.md").read_text()
    with (
        h5py.File(Path(tiny_run) / "analysis/steps/step_300_test.h5") as reference,
        h5py.File(run / "analysis/steps/step_300_test.h5") as added,
    ):
        assert np.array_equal(reference["overlap"][:], added["overlap"][:])


def test_analyze_refuses_runs_without_solved_steps_and_unknown_keys(tiny_run, tmp_path, hessov):
    run = tmp_path / "unsolved"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eigen"))
    result = hessov("analyze", str(run), check=False)
    assert result.returncode == 2 and "no step is solved yet" in result.stderr
    result = hessov("analyze", tiny_run, "k=5", check=False)
    assert result.returncode == 2 and "k: analyze accepts only step= split=" in result.stderr


def test_notebook_reproduces_the_stage_figures(tiny_run, tmp_path):
    env = {"HESSOV_RUN_DIR": tiny_run, "HESSOV_NOTEBOOK_FIGURES": str(tmp_path)}
    execute_notebook("analyze_run.ipynb", env)
    stage_figures = sorted((Path(tiny_run) / "analysis/figures").glob("*.png"))
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [p.name for p in stage_figures]
    for stage_figure in stage_figures:
        drawn = matplotlib.image.imread(tmp_path / stage_figure.name)
        assert np.array_equal(drawn, matplotlib.image.imread(stage_figure)), stage_figure.name
