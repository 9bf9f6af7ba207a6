"""The stage graph (pipeline/launch/graph.py): the jobs of a new run and of a partly done one,
and every launcher running exactly its jobs: the local backend, the sequential sbatch
emulation (slurm/run_sequential.sh, through `hessov plan --jobs`) and, in
tests/test_slurm_submitit.py, submitit.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, last_line, run_hessov
from equivalence import assert_equivalent_runs
from hessov.config import load_run_config
from hessov.launch.graph import build_graph, plan_run
from hessov.launch.status import RoundStatus, SketchStatus
from kernel_paths import current
from slurm_cluster import slurm_cluster

TINY = ["problem=mnist_mini", "preset=tiny", "HESSIAN_SPLITS=[train]"]
HESSOV = str(Path(sys.executable).parent / "hessov")


def by_name(jobs) -> dict:
    return {job.name: job for job in jobs}


def test_graph_of_a_new_run():
    cfg = load_run_config(TINY)
    plan = plan_run(cfg)
    jobs, root = by_name(plan.jobs), str(plan.run.root)
    assert jobs["train"].elements() == [
        ("train", ["train", str(plan.run.config), f"RUN_DIR={root}", "resume=true"])
    ]
    assert jobs["layout"].after == ("train",)
    for step in (100, 300):
        where = f"step={step} split=train"
        first, second = jobs[f"measure first {where}"], jobs[f"measure second {where}"]
        # ceil(k / MEAS_PER_JOB) = ceil(30 / 10) array tasks per round, task=i explicit.
        assert [argv[-1] for _, argv in first.elements()] == ["task=0", "task=1", "task=2"]
        assert first.elements()[0][1][:5] == [
            "measure",
            root,
            f"step={step}",
            "split=train",
            "round=first",
        ]
        assert first.after == ("layout",)
        assert jobs[f"basis {where}"].after == (f"measure first {where}",)
        assert jobs[f"basis {where}"].outputs == (plan.run.two_pass_basis(step, "train"),)
        assert second.after == (f"basis {where}",) and second.tasks == (0, 1, 2)
        # The a-posteriori probes need only the layout: their round runs beside the sketch's.
        assert jobs[f"measure apost {where}"].after == ("layout",)
        assert jobs[f"measure apost {where}"].hvps == cfg.NUM_A_POSTERIORI
        assert jobs[f"solve {where}"].after == (f"measure second {where}", f"measure apost {where}")
        assert jobs[f"analyze {where}"].elements() == [
            (f"analyze {where}", ["analyze", root, f"step={step}", "split=train", "report=false"])
        ]
        assert jobs[f"analyze {where}"].after == (f"solve {where}",)
    assert jobs["report"].after == ("analyze step=100 split=train", "analyze step=300 split=train")
    assert list(jobs) == [job.name for job in plan.jobs]  # unique names
    position = {job.name: number for number, job in enumerate(plan.jobs)}
    assert all(position[other] < position[job.name] for job in plan.jobs for other in job.after)


def test_graph_with_replays_exhaustive_and_single_pass():
    replays = "replays=[{name: plain, MAX_STEPS: 10}, {name: scaled, mode: global_scaling}]"
    cfg = load_run_config([*TINY, replays, "EXHAUSTIVE=true"])
    plan = plan_run(cfg)
    jobs = by_name(plan.jobs)
    assert jobs["replay name=plain"].args == (str(plan.run.root), "name=plain")
    assert jobs["replay name=scaled"].after == ("train",)
    assert jobs["compare"].after == ("replay name=plain", "replay name=scaled")
    assert jobs["exhaustive step=300 split=train"].after == ("solve step=300 split=train",)
    assert "exhaustive step=300 split=train" in jobs["report"].after

    single = load_run_config([*TINY, "recovery=single_pass", "k=20", "s=50"])
    jobs = by_name(plan_run(single).jobs)
    assert jobs["measure first step=300 split=train"].tasks == (0, 1, 2, 3, 4)  # ceil(50 / 10)
    assert not any(name.startswith(("basis", "measure second")) for name in jobs)


def sketch_status(step: int, missing_tasks: dict[str, list[int]], **done) -> SketchStatus:
    rounds = {
        name: RoundStatus(30, [10 * task for task in tasks], tasks)
        for name, tasks in missing_tasks.items()
    }
    return SketchStatus(step, "train", rounds, **done)


def test_graph_of_a_partly_done_run_holds_only_what_is_missing(tmp_path):
    cfg = load_run_config([*TINY, f"RUN_DIR={tmp_path}"])
    plan = plan_run(cfg)
    status = {
        "train": True,
        "layout": True,
        "sketches": [
            # step 100: solved and analysed; step 300: task 1 of the first round missing.
            sketch_status(
                100,
                {"first": [], "second": [], "apost": []},
                bases_written={"second": True},
                solved=True,
            ),
            sketch_status(300, {"first": [1], "second": [0, 1, 2], "apost": []}),
        ],
    }
    status["sketches"][0].analysed = True
    jobs = build_graph(plan.run, plan.spec, status, cfg, ["threads=2"])
    assert [job.name for job in jobs] == [
        "measure first step=300 split=train",
        "basis step=300 split=train",
        "measure second step=300 split=train",
        "solve step=300 split=train",
        "analyze step=300 split=train",
        "report",
    ]
    assert jobs[0].tasks == (1,) and jobs[0].after == ()
    assert jobs[0].elements()[0][1][-2:] == ["threads=2", "task=1"]
    # The stages that only read files take no compute arguments (they would refuse them).
    assert all("threads=2" not in job.args for job in jobs if job.stage == "analyze")

    status["sketches"][1] = sketch_status(
        300, {"first": [], "second": [2], "apost": []}, bases_written={"second": True}, solved=False
    )
    jobs = build_graph(plan.run, plan.spec, status, cfg)
    assert [job.name for job in jobs][:2] == [
        "measure second step=300 split=train",
        "solve step=300 split=train",
    ]
    assert jobs[0].tasks == (2,)

    for item in status["sketches"]:
        item.solved = item.analysed = True
    plan.run.report.parent.mkdir(parents=True)
    plan.run.report.write_text("report")
    assert build_graph(plan.run, plan.spec, status, cfg) == []


def test_row_block_phases_are_job_arrays_and_a_resume_holds_what_is_missing(tmp_path):
    # D = 7,030 in 4 row blocks of 1,760 (+ 1,750): each per-block phase is an array of 3
    # tasks (as many as the first round's), task 2 taking blocks 2 and 3.
    cfg = load_run_config([*TINY, "HESSIAN_STEPS=[300]", "row_block=1760", f"RUN_DIR={tmp_path}"])
    plan = plan_run(cfg)
    jobs, where = by_name(plan.jobs), "step=300 split=train"
    assert plan.spec.row_tasks == 3 and list(plan.spec.row_task_blocks(2)) == [2, 3]
    names = [job.name for job in plan.jobs]
    basis = [f"basis {phase} {where}" for phase in ("local", "tree", "apply", "finish")]
    assert names[names.index(basis[0]) : names.index(basis[-1]) + 1] == basis
    assert jobs[basis[0]].after == (f"measure first {where}",)
    assert jobs[basis[0]].tasks == jobs[basis[2]].tasks == (0, 1, 2)
    assert jobs[basis[1]].tasks is None and jobs[basis[1]].after == (basis[0],)
    assert jobs[basis[-1]].outputs == (plan.run.two_pass_basis(300, "train"),)
    assert jobs[f"measure second {where}"].after == (basis[-1],)
    assert jobs[f"solve project {where}"].after == (
        f"measure second {where}",
        f"measure apost {where}",
    )
    assert jobs[f"solve finish {where}"].outputs == (plan.run.eigen(300, "train"),)
    assert jobs[f"analyze {where}"].after == (f"solve finish {where}",)
    assert jobs[f"solve extend_local {where}"].elements()[2][1][-2:] == [
        "phase=extend_local",
        "task=2",
    ]
    # Priced per phase: a per-block phase holds row blocks, a combined one only k x k pieces.
    assert (
        jobs[f"solve extend_tree {where}"].memory_bytes
        < jobs[f"solve extend_local {where}"].memory_bytes
    )

    # A solve killed in its reorth_local phase after block 1: the tasks of blocks 0 and 1 (and
    # every phase before) are done; task 2 holds blocks 2-3, so it runs again.
    status = {
        "train": True,
        "layout": True,
        "sketches": [
            sketch_status(
                300, {"first": [], "second": [], "apost": []}, bases_written={"second": True}
            )
        ],
    }
    work = plan.run.row_work(300, "train", "solve", 1760)
    work.mkdir(parents=True)
    for name in ("project_sum", "extend_tree", "overlap_sum"):
        (work / f"{name}.h5").touch()
    for number in (0, 1):
        (work / f"reorth_local.block{number:05d}.h5").touch()
    for number in (2, 3):
        (work / f"extend_apply.block{number:05d}.h5").touch()
    jobs = build_graph(plan.run, plan.spec, status, cfg)
    assert [job.name for job in jobs][:3] == [
        f"solve reorth_local {where}",
        f"solve reorth_tree {where}",
        f"solve reorth_apply {where}",
    ]
    assert jobs[0].tasks == (2,) and jobs[2].tasks == (0, 1, 2)


def local_job_names(stderr: str) -> list[str]:
    """The jobs the local launcher ran, from its "[job i/N] NAME" log lines."""
    return re.findall(r"\[job \d+/\d+\] (.+)", stderr)


#: Exhaustive checks and replays on the 100-parameter quadratic, whose exact Hessian is cheap.
QUADRATIC = [
    "problem=quadratic_deep",
    "preset=tiny",
    "HESSIAN_SPLITS=[train]",
    "HESSIAN_STEPS=[300]",
    "EXHAUSTIVE=true",
    "replays=[{name: plain, MAX_STEPS: 5, seeds: [0, 1]}]",
]


def element_names(plan: dict) -> list[str]:
    """The name of every job a plan's jobs run: one per job, or one per array task."""
    return [
        job["name"] if task is None else f"{job['name']} task={task}"
        for job in plan["jobs"]
        for task in job["tasks"] or [None]
    ]


def test_local_backend_and_sbatch_emulation_run_the_plans_jobs(tmp_path):
    """`hessov plan --json` lists the jobs; the local backend runs exactly those, in that
    order, and slurm/run_sequential.sh too (in a bare environment: the scripts rely on
    nothing of the caller's but HESSOV and the kernel path), to the same eigenpairs within the
    tolerances of tests/equivalence.py.
    """
    plan = json.loads(run_hessov("plan", "--json", *QUADRATIC, f"OUTPUT_DIR={tmp_path}").stdout)
    planned = element_names(plan)
    assert {"replay name=plain.seed1", "compare", "exhaustive step=300 split=train"} <= set(planned)
    local = run_hessov("run", *QUADRATIC, f"OUTPUT_DIR={tmp_path / 'local'}")
    assert local_job_names(local.stderr) == planned
    sequential = subprocess.run(
        ["bash", "slurm/run_sequential.sh", *QUADRATIC, f"OUTPUT_DIR={tmp_path / 'sbatch'}"],
        cwd=REPO,
        env={"HESSOV": HESSOV, "PATH": "/usr/bin:/bin", **current()},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert sequential.stdout.splitlines()[:-1] == planned
    runs = [Path(last_line(local.stdout)), Path(last_line(sequential.stdout))]
    assert_equivalent_runs(*runs, [(300, "train")])
    for run in runs:
        assert (run / "exhaustive" / "step_300_train.h5").is_file()
        assert (run / "replays" / "report.md").is_file()


@pytest.mark.slurm
def test_submitit_and_sbatch_chain_submit_the_plans_jobs(slurm_cluster, tmp_path):
    """On the real cluster, for the config above: `hessov run backend=slurm` (submitit) and
    slurm/submit_chain.sh submit exactly the jobs `hessov plan` lists, with the same
    dependencies. Training is held back an hour (an sbatch option of the train stage, which
    both launchers take from the config), so nothing runs; the jobs are then cancelled.
    tests/test_slurm_*.py run these launchers to the end.
    """
    held = [*QUADRATIC, "slurm.stages.train.additional_parameters={begin: now+3600}"]
    plan = json.loads(run_hessov("plan", "--json", *held, f"OUTPUT_DIR={tmp_path}").stdout)
    submitted = run_hessov("run", *held, "backend=slurm", f"OUTPUT_DIR={tmp_path / 'submitit'}")
    store = Path(last_line(submitted.stdout)) / "slurm" / "jobs.json"
    records = json.loads(store.read_text())["submissions"][0]["jobs"]
    chain = subprocess.run(
        ["bash", "slurm/submit_chain.sh", *held, f"OUTPUT_DIR={tmp_path / 'chain'}"],
        cwd=REPO,
        env={**slurm_cluster, "HESSOV": HESSOV, "HESSOV_SLURM_LOGS": str(tmp_path / "logs")},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    chained = dict(line.rsplit(" ", 1) for line in chain.stdout.splitlines()[:-1])
    dependency = slurm_dependency(slurm_cluster, chained["compare"])
    ids = [record["job_id"] for record in records] + list(chained.values())
    subprocess.run(["scancel", *ids], env=slurm_cluster, check=True, timeout=30)
    assert [record["name"] for record in records] == element_names(plan)
    assert list(chained) == [job["name"] for job in plan["jobs"]]
    # The same dependencies: each job waits for the jobs the plan names.
    by_name = {record["name"]: record for record in records}
    compare = by_name["compare"]["after"]
    assert sorted(compare) == sorted(
        by_name[f"replay name=plain.seed{seed}"]["job_id"] for seed in (0, 1)
    )
    assert all(chained[f"replay name=plain.seed{seed}"] in dependency for seed in (0, 1))


def slurm_dependency(env: dict, job_id: str) -> str:
    """The dependency Slurm holds for a job (``scontrol show job``)."""
    shown = subprocess.run(
        ["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True, timeout=30
    ).stdout
    match = re.search(r"Dependency=(\S+)", shown)
    return match.group(1) if match else ""


#: Every command with its required positional arguments and the flags it takes.
COMMANDS = {
    "train": ([], []),
    "layout": (["RUN"], []),
    "measure": (["RUN"], []),
    "basis": (["RUN"], []),
    "solve": (["RUN"], []),
    "exhaustive": (["RUN"], []),
    "analyze": (["RUN"], []),
    "check-operator": (["RUN"], []),
    "replay": (["RUN"], ["--list"]),
    "compare": (["RUN"], []),
    "run": ([], ["--wait"]),
    "plan": ([], ["--json", "--jobs", "--prepare"]),
    "resume": (["RUN"], ["--wait"]),
    "nqm": ([], ["--json"]),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_flags_and_overrides_in_any_order(command):
    from hessov.cli import parse_arguments

    positional, flags = COMMANDS[command]
    argv = [command, *positional, "A=1", "--log-level", "DEBUG"]
    for flag in flags:
        argv += [flag, f"B{len(argv)}=2"]
    args = parse_arguments([*argv, "C=3"])
    assert args.command == command and args.log_level == "DEBUG"
    expected = [item for item in argv[1:] if "=" in item] + ["C=3"]
    assert args.overrides == expected
    assert all(getattr(args, flag[2:]) for flag in flags)


@pytest.mark.parametrize("command", ["status", "summary"])
def test_run_directory_commands_take_the_log_level_after_the_directory(command):
    from hessov.cli import parse_arguments

    args = parse_arguments([command, "RUN", "--log-level", "DEBUG"])
    assert (args.run_dir, args.log_level) == ("RUN", "DEBUG")


def test_a_flag_between_overrides_no_longer_ends_them(tmp_path):
    """The order that failed with "unrecognized arguments: OUTPUT_DIR=..." before."""
    result = run_hessov(
        "plan", "problem=mnist_mini", "preset=tiny", "--json", f"OUTPUT_DIR={tmp_path}"
    )
    assert json.loads(result.stdout)["run_dir"].startswith(str(tmp_path))


def test_every_stage_of_the_graph_has_its_resources_key():
    """A job's resources come from ``slurm.stages.STAGE``: a new stage needs its key."""
    from dataclasses import fields

    from hessov.config import SlurmStagesConfig
    from hessov.jobs import STAGES

    keys = {field.name for field in fields(SlurmStagesConfig)}
    replays = "replays=[{name: plain}]"
    cfg = load_run_config([*TINY, replays, "EXHAUSTIVE=true", "recovery=two_pass"])
    assert {job.stage for job in plan_run(cfg).jobs} <= keys
    assert set(STAGES) - {"check-operator"} <= keys


def test_a_trained_run_is_planned_for_the_steps_training_recorded(tmp_path):
    """Training may stop early at a target: the jobs are those of the recorded steps, not of
    RECORD_STEPS.
    """
    import torch

    from hessov.config import save_config
    from hessov.launch.graph import plan_resume
    from hessov.paramstore import ColumnStore
    from hessov.rundir import RunDir

    cfg = load_run_config([*TINY, f"RUN_DIR={tmp_path}"])  # RECORD_STEPS [0, 100, 300]
    run = RunDir(tmp_path)
    save_config(cfg, run.config)
    store = ColumnStore(run.params)
    store.create(50, [{"name": "w", "shape": [50], "offset": 0}], "test")
    store.append(0, torch.zeros(50))
    store.append(100, torch.ones(50))
    run.summary("train").parent.mkdir(parents=True)
    run.summary("train").write_text("{}")
    names = [job.name for job in plan_resume(run, cfg).jobs]
    assert "solve step=100 split=train" in names
    assert not any("step=300" in name for name in names)


def test_a_config_path_may_hold_an_equals_sign(tmp_path):
    from hessov.cli import parse_arguments
    from hessov.jobs import is_config_file

    config = tmp_path / "lr=0.1" / "config.yaml"
    config.parent.mkdir()
    config.write_text("problem: mnist_mini\n")
    assert is_config_file(str(config)) and not is_config_file("k=3")
    args = parse_arguments(["run", str(config), "k=3"])
    assert (args.config, args.overrides) == (str(config), ["k=3"])


def test_plan_of_a_run_directory_lists_what_it_is_missing(tiny_trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_trained, run)
    plan = json.loads(run_hessov("plan", str(run), "--json").stdout)
    names = [job["name"] for job in plan["jobs"]]
    assert names[0] == "layout" and "train" not in names and names[-1] == "report"
    # A local run with jobs of an unreachable Slurm submission on record goes on, warned.
    (run / "slurm").mkdir()
    submission = {"command": "run", "submitted": "", "logs": "", "jobs": []}
    submission["jobs"].append({"name": "train", "stage": "train", "job_id": "1", "after": []})
    (run / "slurm" / "jobs.json").write_text(json.dumps({"submissions": [submission]}))
    resumed = run_hessov("resume", str(run), env={"PATH": str(tmp_path)})
    assert "cannot ask Slurm whether" in resumed.stderr
    assert (run / "eigen" / "step_300_train.h5").is_file()
