"""The run-directory layout: every path a stage reads or writes, in one place.

A run directory holds everything one run produced, so that any stage can run alone, on
any machine that sees the directory, given only its path (a Slurm job does exactly that)::

    RUN/
      config.yaml              the resolved configuration (written by train)
      log.jsonl                JSON-lines event log shared by all stages
      params.h5                flattened parameters, one column per recorded step
      grads_{split}.h5         optional full gradients on the Hessian subsets, likewise
      snapshots/step_T.pt      model, optimizer, schedule and RNG state for replay/resume
      summary/{stage}.json     what each finished stage recorded (merged by `hessov summary`)
      measurements/sketch.json the sketch settings fixed by the layout stage
      measurements/step_T_{split}/first/part_*.h5, view.h5   measurement parts, virtual view
      measurements/merged_{split}.h5   monolithic arrays, allocated once, reused per step
      eigen/step_T_{split}.h5  eigenpairs and provenance (solve)
      exhaustive/              exact-vs-sketch comparisons
      variants/NAME/           a run of its own per variant (per layer, the GGN, the most
                               negative eigenpairs), linking params.h5 and snapshots/
      estimates/step_T_{split}/{trace,diagonal,density}.h5   the estimates that reuse the
                               sketch, from their array tasks' files in .../NAME/task_*.h5;
                               estimates/figures/
      analysis/steps/step_T_{split}.h5   overlap curves of one step and split (analyze)
      analysis/analysis.h5     all analysed steps and the cross-step metrics, figures/, report.md
      replays/NAME/            spectral-filter replays: replay.yaml, log.jsonl, final.pt
      replays/figures/, report.md   their comparison (hessov compare)
      logs/                    per-task logs of the measurement and Slurm jobs (logs/slurm/)
      slurm/jobs.json          job ids and names of every backend=slurm submission
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hessov.errors import MissingInputError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class RunDir:
    """Paths of one run. Creating the object touches nothing on disk."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def config(self) -> Path:
        """The resolved configuration, written by train."""
        return self.root / "config.yaml"

    @property
    def log(self) -> Path:
        """The JSON-lines event log that every stage appends to."""
        return self.root / "log.jsonl"

    @property
    def params(self) -> Path:
        """Flattened parameters ``(D, n)``, one column per recorded step."""
        return self.root / "params.h5"

    def gradients(self, split: str) -> Path:
        """Full gradients of ``split``'s Hessian subset, one column per recorded step."""
        return self.root / f"grads_{split}.h5"

    @property
    def snapshots(self) -> Path:
        """The directory of the training snapshots."""
        return self.root / "snapshots"

    def snapshot(self, step: int) -> Path:
        """Model, optimizer, schedule and RNG state after ``step``, for replay and resume."""
        return self.snapshots / f"step_{step}.pt"

    @property
    def latest_snapshot(self) -> Path:
        """The rolling snapshot training writes every ``SNAPSHOT_EVERY`` steps, for resume."""
        return self.snapshots / "latest.pt"

    @property
    def latest_snapshot_step(self) -> Path:
        """``{"step": T}``: the step of :attr:`latest_snapshot`, read without unpickling it."""
        return self.snapshots / "latest.json"

    def snapshot_steps(self) -> list[int]:
        """Steps that have a snapshot on disk, ascending."""
        if not self.snapshots.is_dir():
            return []
        return sorted(int(p.stem.removeprefix("step_")) for p in self.snapshots.glob("step_*.pt"))

    @property
    def summaries(self) -> Path:
        """The directory of the per-stage summaries."""
        return self.root / "summary"

    def summary(self, stage: str) -> Path:
        """What ``stage`` recorded when it finished."""
        return self.summaries / f"{stage}.json"

    @property
    def measurements(self) -> Path:
        """The directory of the sketch settings, measurement parts and merged arrays."""
        return self.root / "measurements"

    @property
    def sketch_spec(self) -> Path:
        """The layout's resolved sketch settings, shared by every measure and solve."""
        return self.measurements / "sketch.json"

    def measurement_parts(self, step: int, split: str, round_name: str = "first") -> Path:
        """Part files of one step and split and round: ``first`` (H Omega), ``second``
        (H Q), ``round3``... (:mod:`hessov.rounds`) or ``apost``.
        """
        return self.measurements / f"step_{step}_{split}" / round_name

    def monolithic(self, split: str) -> Path:
        """The merge target of one split, allocated once and reused for every step."""
        return self.measurements / f"merged_{split}.h5"

    def two_pass_basis(self, step: int, split: str, round_name: str = "second") -> Path:
        """The block of the Krylov basis that round ``round_name`` multiplies ``H`` onto:
        ``Q`` of the first round for ``second``, the next block for ``round3``...
        """
        name = "basis.h5" if round_name == "second" else f"basis_{round_name}.h5"
        return self.measurements / f"step_{step}_{split}" / name

    def shift(self, step: int, split: str) -> Path:
        """``which=smallest``: the spectral shift of the step and split's sketch."""
        return self.measurements / f"step_{step}_{split}" / "shift.json"

    def krylov_checks(self, step: int, split: str) -> Path:
        """The error bounds after each round, against ``target_rel_err`` (:mod:`hessov.rounds`)."""
        return self.measurements / f"step_{step}_{split}" / "krylov_checks.json"

    def eigen(self, step: int, split: str) -> Path:
        """Eigenpairs of one step and split, with their provenance (solve)."""
        return self.root / "eigen" / f"step_{step}_{split}.h5"

    def row_work(self, step: int, split: str, stage: str, row_block: int) -> Path:
        """The results of the row-block phases of ``stage`` (``basis``, ``solve``) at
        ``row_block``, removed when its outputs are written (:mod:`hessov.rowpass`).
        """
        return self.measurements / f"step_{step}_{split}" / f"{stage}_rows_{row_block}"

    def row_works(self, step: int, split: str, stage: str) -> dict[int, Path]:
        """Every :meth:`row_work` directory of ``stage`` on disk, by its row block."""
        found = (self.measurements / f"step_{step}_{split}").glob(f"{stage}_rows_*")
        return {int(path.name.rpartition("_")[2]): path for path in found if path.is_dir()}

    @property
    def variants(self) -> Path:
        """The directory of the run's variants (:mod:`hessov.variants`)."""
        return self.root / "variants"

    def variant(self, name: str) -> RunDir:
        """The run directory of variant ``name``: a run of its own sharing the training."""
        return RunDir(self.variants / name)

    def variant_names(self) -> list[str]:
        """Variants with a config on disk, sorted."""
        if not self.variants.is_dir():
            return []
        return sorted(p.parent.name for p in self.variants.glob("*/config.yaml"))

    @property
    def estimates(self) -> Path:
        """The directory of the trace, diagonal and density estimates."""
        return self.root / "estimates"

    def estimate(self, step: int, split: str, name: str) -> Path:
        """The finished estimate ``name`` (trace, diagonal, density) of one step and split."""
        return self.estimates / f"step_{step}_{split}" / f"{name}.h5"

    def estimate_task(self, step: int, split: str, name: str, task: int) -> Path:
        """What array task ``task`` of estimate ``name`` computed: its probes' samples."""
        return self.estimates / f"step_{step}_{split}" / name / f"task_{task:05d}.h5"

    def estimate_figure(self, step: int, split: str, name: str) -> Path:
        """The figure of estimate ``name`` (the diagonal per layer, the density)."""
        return self.estimates / "figures" / f"{name}_step_{step}_{split}.png"

    def exhaustive(self, step: int, split: str) -> Path:
        """The exact-vs-sketch comparison of one step and split."""
        return self.root / "exhaustive" / f"step_{step}_{split}.h5"

    @property
    def analysis(self) -> Path:
        """The directory of the analyze stage's results."""
        return self.root / "analysis"

    def analysis_step(self, step: int, split: str) -> Path:
        """Overlap curves of one step and split, written by that step's analyze job."""
        return self.analysis / "steps" / f"step_{step}_{split}.h5"

    @property
    def analysis_results(self) -> Path:
        """Every analysed step and the cross-step metrics in one file (rebuilt each time)."""
        return self.analysis / "analysis.h5"

    @property
    def analysis_lock(self) -> Path:
        """Serialises parallel analyze jobs while they rebuild the shared results."""
        return self.analysis / ".lock"

    @property
    def figures(self) -> Path:
        """The analyze stage's figures."""
        return self.analysis / "figures"

    @property
    def report(self) -> Path:
        """The analyze stage's Markdown report."""
        return self.analysis / "report.md"

    @property
    def replays(self) -> Path:
        """The directory of the spectral-filter replays and their comparison."""
        return self.root / "replays"

    def replay(self, name: str) -> Path:
        """One replay's directory: ``replay.yaml``, ``log.jsonl``, ``final.pt``."""
        return self.replays / name

    def replay_config(self, name: str) -> Path:
        """The replay's resolved settings (its optimizer included), written before step 0."""
        return self.replay(name) / "replay.yaml"

    def replay_log(self, name: str) -> Path:
        """Per-step metrics, evaluations and eigenvalues of one replay (JSON lines)."""
        return self.replay(name) / "log.jsonl"

    def replay_final(self, name: str) -> Path:
        """The model's state dict after the replay's last step."""
        return self.replay(name) / "final.pt"

    def replay_summary(self, name: str) -> Path:
        """A finished replay's summary, ``summary.record(run, "replay", fields, name)``."""
        return self.summaries / "replay" / f"{name}.json"

    def replay_names(self) -> list[str]:
        """Replays that have a directory with settings, sorted."""
        if not self.replays.is_dir():
            return []
        return sorted(p.parent.name for p in self.replays.glob("*/replay.yaml"))

    @property
    def replay_figures(self) -> Path:
        """Loss curves and sharpness flows drawn by ``hessov compare``."""
        return self.replays / "figures"

    @property
    def replay_report(self) -> Path:
        """The comparison of the replays written by ``hessov compare``."""
        return self.replays / "report.md"

    @property
    def task_logs(self) -> Path:
        """Per-task logs of the measurement and Slurm jobs."""
        return self.root / "logs"

    @property
    def slurm_logs(self) -> Path:
        """The job files of submitit and the output of every job ``backend=slurm`` submitted."""
        return self.task_logs / "slurm"

    @property
    def slurm_jobs(self) -> Path:
        """The Slurm job ids ``backend=slurm`` submitted, per submission (``hessov status``)."""
        return self.root / "slurm" / "jobs.json"

    def require(self, path: Path, produced_by: str) -> Path:
        """Return ``path`` if it exists, else raise naming the stage that makes it."""
        if not path.exists():
            raise MissingInputError(f"{path} is missing: run `hessov {produced_by}` first")
        return path
