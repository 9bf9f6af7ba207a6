"""The stage graph of a run: every job, its arguments, files and dependencies, built once.

A run's work is a list of jobs in dependency order: train; the replays (one job per seed)
and their comparison; the layout; for every step and split (``which=smallest``: after its
shift job) the first round of measurement tasks, then (two-pass) the basis and the second
round, then the solve, the estimates (``estimates=[...]``: an array of probe tasks and a
finish each, :mod:`hessov.probes`), the exhaustive check (``EXHAUSTIVE=true``) and the
step's analysis; then each variant's jobs (:mod:`hessov.variants`: the job that makes its
directory, and its own layout, sketches and report, named ``NAME: ...``); finally the
figures and report. A basis or solve in row blocks is one job per phase
(:mod:`hessov.rowpass`), a job array for a phase over the row blocks. Each
:class:`Job` carries the ``hessov`` arguments of its stage (:func:`hessov.jobs.run_job`
runs them), the files it reads and writes (named by :class:`~hessov.rundir.RunDir`), the
jobs it waits for and its resources key (``slurm.stages.STAGE``).

:func:`build_graph` makes the list from the config and from what the run's files say is
done (:func:`hessov.launch.status.run_status`): a new run gets every job, a resumed one
only the array tasks with missing indices and the stages whose outputs are missing. Every
launcher walks this one list: ``hessov run`` locally (:mod:`hessov.launch.local`) or
through submitit (:mod:`hessov.launch.slurm`), ``slurm/submit_chain.sh`` and
``slurm/run_sequential.sh`` (through ``hessov plan --jobs``), and ``hessov resume``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from hessov.config import ESTIMATES, RunConfig, replay_jobs, save_config
from hessov.costs import (
    check_budgets,
    format_bytes,
    job_cost,
    problem_facts,
    rechoose_row_block,
)
from hessov.errors import RunExistsError
from hessov.launch.status import SketchStatus, run_status
from hessov.paramblock import recorded_layout
from hessov.paramstore import ColumnStore, parameter_layout
from hessov.probes import check_recorded, missing_tasks, probe_plan
from hessov.recording import refuse_unfinished_record
from hessov.rowpass import RowWork, program_phases, work_name
from hessov.rundir import RunDir
from hessov.sketchspec import (
    SketchSpec,
    check_same_layout,
    load_spec,
    resolve_block_spec,
    save_spec,
)
from hessov.variants import VariantPlan, plan_variants

#: Stages that take ``device=`` and ``threads=`` (the others read files only).
COMPUTE_STAGES = frozenset(
    {"layout", "shift", "measure", "basis", "solve", "exhaustive", "replay", *ESTIMATES}
)


@dataclass(frozen=True)
class Job:
    """One job, or one job array with an element per task.

    Attributes:
        name: unique in the graph, e.g. ``"measure first step=100 split=train"``.
        stage: the entry point in :data:`hessov.jobs.STAGES` (or ``train``) and the
            resources key ``slurm.stages.STAGE``.
        args: the ``hessov`` arguments after the stage: the run directory (``train``: its
            config file) and ``KEY=VALUE`` pairs.
        after: names of the jobs that must succeed first.
        tasks: the array's task ids (each element adds ``task=ID``); ``None``: one job.
        inputs: files and directories the job reads.
        outputs: files and directories the job writes.
        memory_bytes: estimated peak memory of one task (:mod:`hessov.costs`).
        disk_bytes: what the job writes, all tasks together.
        hvps: Hessian-vector products of the job, all tasks together.
    """

    name: str
    stage: str
    args: tuple[str, ...]
    after: tuple[str, ...] = ()
    tasks: tuple[int, ...] | None = None
    inputs: tuple[Path, ...] = ()
    outputs: tuple[Path, ...] = ()
    memory_bytes: int = 0
    disk_bytes: int = 0
    hvps: int = 0

    def elements(self) -> list[tuple[str, list[str]]]:
        """``(name, argv)`` of each job this submission runs: one, or one per task."""
        argv = [self.stage, *self.args]
        if self.tasks is None:
            return [(self.name, argv)]
        return [(f"{self.name} task={task}", [*argv, f"task={task}"]) for task in self.tasks]

    def as_dict(self) -> dict:
        """The job as plain data (``hessov plan --json``)."""
        return {
            "name": self.name,
            "stage": self.stage,
            "argv": [self.stage, *self.args],
            "after": list(self.after),
            "tasks": None if self.tasks is None else list(self.tasks),
            "inputs": [str(path) for path in self.inputs],
            "outputs": [str(path) for path in self.outputs],
            "memory_bytes": self.memory_bytes,
            "disk_bytes": self.disk_bytes,
            "hvps": self.hvps,
        }


@dataclass
class _Builder:
    """The graph under construction: jobs in order, and the last job of each chain. A
    variant's builder (:mod:`hessov.variants`) adds to the same list, its jobs' names
    prefixed with ``NAME: `` and their arguments naming its own run directory.
    """

    run: RunDir
    compute_args: list[str]
    jobs: list[Job] = field(default_factory=list)
    prefix: str = ""

    def add(self, name, stage, args, after, inputs=(), outputs=(), tasks=None) -> tuple[str, ...]:
        """Append a job; returns its name as the dependency of what follows it. The compute
        arguments reach the stages that compute with the model (not analyze or compare).
        """
        name = self.prefix + name
        compute = self.compute_args if stage in COMPUTE_STAGES else []
        args = (str(self.run.root), *args, *compute)
        self.jobs.append(Job(name, stage, args, tuple(after), tasks, tuple(inputs), tuple(outputs)))
        return (name,)


def _rounds(graph: _Builder, spec: SketchSpec, item: SketchStatus | None, where, after):
    """The measurement rounds of one step and split and, before each round after the first,
    the basis job that writes the block it multiplies; returns the dependencies of the
    solve. The a-posteriori probes need only the layout, so their round runs beside the
    sketch's. With ``target_rel_err`` every round up to ``max_rounds`` is here (the plan's
    worst case); those after the target was met have nothing left to do and are left out.
    """
    run, (step, split) = graph.run, where
    label = f"step={step} split={split}"
    if spec.which == "smallest" and not run.shift(step, split).is_file():
        after = graph.add(
            f"shift {label}",
            "shift",
            (f"step={step}", f"split={split}"),
            after,
            [run.params],
            [run.shift(step, split)],
        )
    previous, beside = after, ()
    for round_name in spec.rounds:
        status = item.rounds[round_name] if item else None
        if status and status.not_needed:
            continue
        if round_name not in ("first", "apost") and not (
            item and item.bases_written.get(round_name)
        ):
            previous = _stage_jobs(
                graph,
                spec,
                ("basis", where, round_name),
                previous,
                _basis_inputs(run, spec, where, round_name),
                [run.two_pass_basis(step, split, round_name)],
            )
        tasks = status.tasks_missing if status else list(range(spec.round_tasks(round_name)))
        if not tasks:
            continue
        inputs = [run.sketch_spec]
        if round_name not in ("first", "apost"):
            inputs.append(run.two_pass_basis(step, split, round_name))
        added = graph.add(
            f"measure {round_name} {label}",
            "measure",
            (f"step={step}", f"split={split}", f"round={round_name}"),
            after if round_name == "apost" else previous,
            inputs,
            [run.measurement_parts(step, split, round_name)],
            tuple(tasks),
        )
        if round_name == "apost":
            beside = added
        else:
            previous = added
    return previous + beside


def _basis_inputs(run: RunDir, spec: SketchSpec, where, round_name: str) -> list:
    """What the basis of ``round_name`` reads: the rounds before it and their blocks."""
    before = spec.rounds[: spec.rounds.index(round_name)]
    parts = [run.measurement_parts(*where, name) for name in before]
    return parts + [run.two_pass_basis(*where, name) for name in before if name != "first"]


def _stage_jobs(graph: _Builder, spec, what, after, inputs, outputs) -> tuple[str, ...]:
    """The basis (of a round) or solve (``what``: the stage, the step and split, and the
    round) as one job, or in row blocks one job per phase still to do
    (:mod:`hessov.rowpass`): a job array with a task per row block for a per-block phase.
    Returns the last job's name.
    """
    stage, (step, split), round_name = what
    args = (f"step={step}", f"split={split}")
    label = f"step={step} split={split}"
    if stage == "basis" and round_name != "second":
        args, label = (*args, f"round={round_name}"), f"{round_name} {label}"
    if not spec.row_block:
        return graph.add(f"{stage} {label}", stage, args, after, inputs, outputs)
    work_dir = graph.run.row_work(step, split, work_name(stage, round_name), spec.row_block)
    phases = program_phases(stage, spec.recovery, round_name)
    work = RowWork(work_dir, phases, spec.row_ranges)
    previous, reads = after, inputs
    for phase in work.phases:
        last = phase == work.phases[-1]
        tasks = _missing_tasks(spec, work, phase) if phase.per_block else None
        if (phase.per_block and not tasks) or (
            not last and not phase.per_block and work.done(phase)
        ):
            continue
        previous = graph.add(
            f"{stage} {phase} {label}",
            stage,
            (*args, f"phase={phase}"),
            previous,
            reads,
            outputs if last else [work_dir],
            None if tasks is None else tuple(tasks),
        )
        reads = [work_dir]
    return previous


def _missing_tasks(spec: SketchSpec, work: RowWork, phase) -> list[int]:
    """The array tasks of a per-block phase with a row block still to do."""
    missing = set(work.missing_blocks(phase))
    return [t for t in range(spec.row_tasks) if missing & set(spec.row_task_blocks(t))]


def _estimate_jobs(graph: _Builder, cfg: RunConfig, where, after, name: str) -> tuple[str, ...]:
    """Estimate ``name`` of one step and split (:mod:`hessov.probes`): its probe tasks
    without a file as one array, then the finish; nothing once its file is written.
    """
    run, (step, split) = graph.run, where
    if run.estimate(step, split, name).is_file():
        return ()
    args, label = (f"step={step}", f"split={split}"), f"step={step} split={split}"
    tasks_dir = run.estimate_task(step, split, name, 0).parent
    plan = probe_plan(cfg, name)
    check_recorded(run, plan, where)
    tasks = missing_tasks(run, plan, where)
    if tasks:
        inputs = [run.eigen(step, split), run.measurements / f"step_{step}_{split}"]
        after = graph.add(
            f"{name} probes {label}",
            name,
            (*args, "phase=probes"),
            after,
            inputs,
            [tasks_dir],
            tuple(tasks),
        )
    outputs = [run.estimate(step, split, name)]
    return graph.add(
        f"{name} finish {label}", name, (*args, "phase=finish"), after, [tasks_dir], outputs
    )


def _sketch_jobs(graph: _Builder, cfg: RunConfig, spec, item, where, after) -> tuple[str, ...]:
    """Every job of one step and split still needed; returns the names the report waits for."""
    run, (step, split) = graph.run, where
    args = (f"step={step}", f"split={split}")
    label = f"step={step} split={split}"
    solved = item is not None and item.solved
    previous = after
    if not solved:
        previous = _rounds(graph, spec, item, where, after)
        inputs = [run.measurement_parts(step, split, name) for name in spec.rounds]
        previous = _stage_jobs(
            graph, spec, ("solve", where, ""), previous, inputs, [run.eigen(step, split)]
        )
    estimated: tuple[str, ...] = ()
    for name in cfg.estimates:
        estimated += _estimate_jobs(graph, cfg, where, previous, name)
    waited = estimated
    if cfg.EXHAUSTIVE and not (item and item.exhaustive_done):
        # After the estimates: it compares them with their exact counterparts.
        waited += graph.add(
            f"exhaustive {label}",
            "exhaustive",
            args,
            previous + estimated,
            [run.eigen(step, split)],
            [run.exhaustive(step, split)],
        )
    if not (item and item.analysed):
        waited += graph.add(
            f"analyze {label}",
            "analyze",
            (*args, "report=false"),
            previous,
            [run.eigen(step, split)],
            [run.analysis_step(step, split)],
        )
    return waited


def _replay_jobs(graph: _Builder, cfg: RunConfig, trained: tuple[str, ...]) -> None:
    """One job per configured replay and seed not finished yet, then their comparison."""
    run, replayed = graph.run, ()
    for job in replay_jobs(cfg.replays):
        if not run.replay_summary(job.name).is_file():  # written when it finished
            replayed += graph.add(
                f"replay name={job.name}",
                "replay",
                (f"name={job.name}",),
                trained,
                [run.snapshots],
                [run.replay(job.name)],
            )
    if replayed or (cfg.replays and not run.replay_report.is_file()):
        graph.add("compare", "compare", (), replayed, [run.replays], [run.replay_report])


def build_graph(  # noqa: PLR0913 (the run, its settings, and the variants')
    run: RunDir,
    spec: SketchSpec,
    status: dict | None,
    cfg: RunConfig,
    compute_args=(),
    variants: list[VariantPlan] = (),
) -> list[Job]:
    """The jobs ``run`` still needs, in an order that respects every dependency.

    Args:
        run: the run directory.
        spec: the sketch settings (the layout's on disk, or the config's resolved).
        status: :func:`~hessov.launch.status.run_status` of the run; ``None`` when
            nothing exists yet (every job).
        cfg: the run's config (replays, ``EXHAUSTIVE``).
        compute_args: ``device=``, ``threads=`` passed on to every job after training.
        variants: the run's variants (:func:`hessov.variants.plan_variants`): their jobs
            come after training, and the run's report after theirs.
    """
    done = status or {"train": False, "layout": False, "sketches": []}
    graph = _Builder(run, list(compute_args))
    trained: tuple[str, ...] = ()
    if not done["train"]:
        # resume=true: a job requeued after a node failure continues from its last snapshot.
        graph.jobs.append(
            Job(
                "train",
                "train",
                (str(run.config), f"RUN_DIR={run.root}", "resume=true", *compute_args),
                outputs=(run.params, run.snapshots, run.summary("train")),
            )
        )
        trained = ("train",)
    _replay_jobs(graph, cfg, trained)
    analysed = _sketch_graph(graph, spec, done, cfg, trained)
    for plan in variants:
        analysed += _variant_jobs(graph, plan, trained)
    if analysed or not run.report.is_file():
        graph.add("report", "analyze", (), analysed, [run.analysis], [run.report])
    return graph.jobs


def _sketch_graph(graph: _Builder, spec: SketchSpec, done: dict, cfg, trained) -> tuple[str, ...]:
    """The layout, if needed, and every step and split's jobs after ``trained``; returns
    what the report waits for.
    """
    run = graph.run
    items = {(item.step, item.split): item for item in done["sketches"]}
    laid_out = trained
    # A layout made before the a-posteriori round existed lacks its part files: `hessov
    # layout RUN` completes the layout on disk as it is.
    incomplete = any(not item.stores_laid_out and not item.solved for item in items.values())
    if not done["layout"] or incomplete:
        laid_out = graph.add("layout", "layout", (), trained, [run.params], [run.sketch_spec])
    analysed: tuple[str, ...] = ()
    for step in spec.steps:
        for split in spec.splits:
            item = items.get((step, split))
            analysed += _sketch_jobs(graph, cfg, spec, item, (step, split), laid_out)
    return analysed


def _variant_jobs(graph: _Builder, plan: VariantPlan, trained) -> tuple[str, ...]:
    """A variant's jobs (:mod:`hessov.variants`): the job that makes its directory, then
    its layout, sketches and report, all named ``NAME: ...``; returns its report's name.
    """
    name, variant = plan.variant.name, plan.run
    after = trained
    if not variant.config.is_file():
        # The row block the plan priced, fixed now as the run's own is by prepare_run.
        args = (f"name={name}", f"row_block={plan.spec.row_block or -1}")
        made = [variant.root]
        after = graph.add(f"{name}: variant", "variant", args, trained, [graph.run.params], made)
    sub = _Builder(variant, graph.compute_args, graph.jobs, prefix=f"{name}: ")
    done = run_status(variant) if variant.config.is_file() else None
    done = done or {"train": True, "layout": False, "sketches": []}
    waited = _sketch_graph(sub, plan.spec, done, plan.cfg, after)
    if waited or not variant.report.is_file():
        return sub.add("report", "analyze", (), waited, [variant.analysis], [variant.report])
    return ()


@dataclass
class RunPlan:
    """A run directory, its sketch settings, D and the jobs still needed, each priced."""

    run: RunDir
    spec: SketchSpec
    jobs: list[Job]

    def as_dict(self) -> dict:
        """Everything ``hessov plan --json`` prints."""
        return {
            "run_dir": str(self.run.root),
            "dim": self.spec.layout.dim,
            "k": self.spec.layout.num_outer,
            "s": self.spec.layout.num_inner,
            "row_block": self.spec.row_block,
            "rounds": list(self.spec.rounds),
            "target_rel_err": self.spec.target_rel_err or None,
            "tasks": self.spec.num_tasks,
            "sketches": [[step, split] for step in self.spec.steps for split in self.spec.splits],
            "replays": [job.name.partition("=")[2] for job in self.jobs if job.stage == "replay"],
            "hvps": sum(job.hvps for job in self.jobs),
            "disk_bytes": sum(job.disk_bytes for job in self.jobs),
            "peak_memory_bytes": max((job.memory_bytes for job in self.jobs), default=0),
            "jobs": [job.as_dict() for job in self.jobs],
        }

    def as_lines(self) -> str:
        """A readable summary: ``key value`` lines, then one line per job with its price."""
        spec = self.spec
        solve = f"row blocks of {spec.row_block}" if spec.row_block else "in memory"
        lines = [
            f"run_dir {self.run.root}",
            f"dim {spec.layout.dim}",
            f"k {spec.layout.num_outer}  s {spec.layout.num_inner}  recovery {spec.recovery}",
            f"rounds {' '.join(spec.rounds)}",
            *(
                [
                    f"target_rel_err {spec.target_rel_err:g}: rounds end once it is met; "
                    f"priced here at all {spec.krylov_rounds}"
                ]
                if spec.target_rel_err
                else []
            ),
            f"tasks {spec.num_tasks}",
            f"basis and solve {solve}",
            f"jobs {len(self.jobs)}",
            f"hvps {sum(job.hvps for job in self.jobs)}",
            f"disk {format_bytes(sum(job.disk_bytes for job in self.jobs))}",
        ]
        for job in self.jobs:
            size = f" ({len(job.tasks)} array tasks)" if job.tasks is not None else ""
            after = f"  after: {', '.join(job.after)}" if job.after else ""
            price = (
                f"  [{format_bytes(job.memory_bytes)} per task, {format_bytes(job.disk_bytes)} disk"
            )
            price += f", {job.hvps} HVPs]" if job.hvps else "]"
            lines.append(f"  {job.name}{size}{price}{after}")
        return "\n".join(lines)


def priced(jobs: list[Job], spec: SketchSpec, cfg: RunConfig, facts, variants=()) -> list[Job]:
    """``jobs`` with their prices (:func:`hessov.costs.job_cost`; a variant's jobs by its own
    settings), refused when one exceeds its memory budget (:func:`hessov.costs.check_budgets`).
    """
    settings = {str(plan.run.root): (plan.spec, plan.cfg) for plan in variants}
    result = []
    for job in jobs:
        job_spec, job_cfg = settings.get(job.args[0], (spec, cfg))
        cost = job_cost(job, job_spec, job_cfg, facts)
        result.append(
            replace(job, memory_bytes=cost.memory_bytes, disk_bytes=cost.disk_bytes, hvps=cost.hvps)
        )
    check_budgets(result, cfg)
    return result


def plan_run(cfg: RunConfig) -> RunPlan:
    """The plan of ``cfg``'s run: a new run directory unless ``RUN_DIR`` names an unfinished
    one, whose files then say what is done. A layout on disk that differs from the config's
    is refused (``hessov resume`` finishes a layout made by hand).
    """
    from hessov.hessian import check_curvature
    from hessov.problems import build_problem
    from hessov.problems.checks import check_eval_deterministic
    from hessov.recording import hessian_subsets
    from hessov.stages.train import new_run_dir

    problem = build_problem(cfg)
    # Refused here, before any job is submitted, rather than in the train job.
    hessian_subsets(problem, cfg.NUM_HESSIAN_DATAPOINTS)
    check_eval_deterministic(problem.model, problem.train.inputs)
    check_curvature(cfg, problem)
    facts = problem_facts(problem)
    run = RunDir(cfg.RUN_DIR) if cfg.RUN_DIR else new_run_dir(cfg)
    layout = parameter_layout(problem.model)
    spec = resolve_block_spec(cfg, layout, list(cfg.RECORD_STEPS))
    variants = plan_variants(run, cfg, layout, spec.steps)
    status = run_status(run) if run.config.is_file() else None
    if status and status["layout"]:
        spec = check_same_layout(load_spec(run), spec, run.sketch_spec)
    jobs = build_graph(run, spec, status, cfg, variants=variants)
    return RunPlan(run, spec, priced(jobs, spec, cfg, facts, variants))


def plan_resume(
    run: RunDir, cfg: RunConfig, compute_args=(), row_overrides=(), save: bool = False
) -> RunPlan:
    """What ``run`` is missing, from its files: the sketch its layout holds (or, before the
    layout, the config's), with ``compute_args`` passed on to every job after training.
    ``row_overrides`` (``row_block=``, ``memory_gb=``, applied to ``cfg``) choose the row
    block of a laid-out run again; with ``save``, into its layout for the jobs to read.
    """
    from hessov.problems import build_problem

    refuse_unfinished_record(run)
    status = run_status(run)
    problem = build_problem(cfg)
    facts = problem_facts(problem)
    layout = recorded_layout(run) if status["train"] else parameter_layout(problem.model)
    if status["layout"]:
        spec = load_spec(run)
        if rechoose_row_block(cfg, spec, row_overrides) and save:
            save_spec(run, spec)
    elif status["train"]:  # the steps training recorded: it may have stopped at a target
        spec = resolve_block_spec(cfg, layout, ColumnStore(run.params).steps())
    else:
        spec = resolve_block_spec(cfg, layout, list(cfg.RECORD_STEPS))
    variants = plan_variants(run, cfg, layout, spec.steps)
    jobs = build_graph(run, spec, status, cfg, compute_args, variants)
    return RunPlan(run, spec, priced(jobs, spec, cfg, facts, variants))


def prepare_run(cfg: RunConfig, plan: RunPlan) -> None:
    """Make ``plan``'s run directory ready for its jobs, before any is started: refuse a
    finished run, and save the resolved config the train job reads (its presence marks a run
    whose training is pending; training with ``resume=true`` starts it from scratch).
    """
    from hessov.stages.train import prepare_run_dir

    run = plan.run
    if cfg.RUN_DIR:
        try:
            prepare_run_dir(cfg)  # the refusals the train job would meet
        except RunExistsError as err:
            backend = " backend=slurm" if cfg.backend == "slurm" else ""
            raise RunExistsError(
                f"{err} To finish what it is missing: hessov resume {run.root}{backend}"
            ) from None
    cfg.RUN_DIR, cfg.resume = str(run.root), True
    # The layout job resolves the same row block on whatever node it runs (-1: in memory).
    cfg.row_block = plan.spec.row_block or -1
    if not run.config.is_file():
        run.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config)
