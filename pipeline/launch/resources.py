"""Slurm resources of each stage's jobs: the ``slurm`` section with ``slurm.stages.STAGE`` on top.

One mapping serves both ways of submitting: submitit's ``SlurmExecutor`` parameters
(:func:`stage_resources`) and the same values as sbatch options (:func:`sbatch_options`),
which ``hessov plan --jobs`` prints for ``slurm/submit_chain.sh``.
"""

from __future__ import annotations

from hessov.config import SlurmConfig


def stage_section(slurm: SlurmConfig, stage: str) -> str:
    """The config key that sets ``stage``'s resources, for error messages."""
    override = getattr(slurm.stages, stage)
    overridden = any(getattr(override, key) is not None for key in override.__dataclass_fields__)
    return f"slurm.stages.{stage}" if overridden else "slurm"


def stage_resources(slurm: SlurmConfig, stage: str) -> dict:
    """The submitit ``SlurmExecutor`` parameters of one stage: the section's values with the
    stage's overrides on top.
    """
    override = getattr(slurm.stages, stage)

    def pick(key: str):
        value = getattr(override, key)
        return getattr(slurm, key) if value is None else value

    extra = {**slurm.additional_parameters, **(override.additional_parameters or {})}
    # A job whose dependency failed is cancelled instead of pending forever.
    resources: dict = {"additional_parameters": {"kill_on_invalid_dep": "yes", **extra}}
    resources["cpus_per_task"] = pick("cpus_per_task")
    if pick("partition"):
        resources["partition"] = pick("partition")
    if pick("time_minutes"):
        resources["time"] = pick("time_minutes")
    if pick("mem_gb"):
        resources["mem"] = f"{pick('mem_gb')}G"
    if pick("gpus_per_node"):
        resources["gpus_per_node"] = pick("gpus_per_node")
    return resources


def sbatch_options(resources: dict) -> list[str]:
    """The resources as sbatch command-line options (as submitit writes them as #SBATCH)."""
    options = {key: value for key, value in resources.items() if key != "additional_parameters"}
    options.update(resources["additional_parameters"])
    flags = []
    for key, value in options.items():
        name = "--" + key.replace("_", "-")
        flags.append(name if value is True else f"{name}={value}")
    return flags


def sbatch_lines(plan, slurm: SlurmConfig) -> str:
    """``hessov plan --jobs``: the plan for shell scripts, one tab-separated line per entry.

    ``run_dir PATH`` first, then per job ``job NAME STAGE AFTER TASKS OPTIONS ARG...``, where
    AFTER is the comma-separated names of the jobs it waits for, TASKS the comma-separated
    array task ids, OPTIONS the space-separated sbatch options of its stage (each ``-`` when
    empty), and the ARGs the ``hessov`` arguments of the job (each array task adds
    ``task=ID``).
    """
    lines = [f"run_dir\t{plan.run.root}"]
    for job in plan.jobs:
        options = " ".join(sbatch_options(stage_resources(slurm, job.stage)))
        tasks = "-" if job.tasks is None else ",".join(map(str, job.tasks))
        fields = [job.name, job.stage, ",".join(job.after) or "-", tasks, options or "-"]
        lines.append("\t".join(["job", *fields, job.stage, *job.args]))
    return "\n".join(lines)
