#!/usr/bin/env bash
# The Slurm chain without Slurm: every job of the run's stage graph (`hessov plan --jobs`),
# one after another on this machine through slurm/job.sbatch, each array task with
# SLURM_ARRAY_TASK_ID set as Slurm would. Same jobs, same commands, same files, same numbers.
# Usage: slurm/run_sequential.sh KEY=VALUE ...   (the same arguments as `hessov run`)
# Prints each job's name as it starts (what the jobs print goes to stderr), then the run
# directory as the last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=slurm/plan.sh
source "$here/plan.sh"

for line in "${jobs[@]}"; do
  IFS=$'\t' read -r -a field <<<"$line"  # job NAME STAGE AFTER TASKS OPTIONS ARG...
  if [[ ${field[4]} == - ]]; then
    echo "${field[1]}"
    bash "$here/job.sbatch" "${field[@]:6}" >&2
  else
    IFS=, read -r -a tasks <<<"${field[4]}"
    for task in "${tasks[@]}"; do
      echo "${field[1]} task=$task"
      SLURM_ARRAY_TASK_ID=$task bash "$here/job.sbatch" "${field[@]:6}" >&2
    done
  fi
done
echo "$RUN_DIR"
