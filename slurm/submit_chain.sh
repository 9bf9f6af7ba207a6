#!/usr/bin/env bash
# Submit a whole run to Slurm: every job of its stage graph (`hessov plan --jobs`), each with
# its stage's resources (slurm.* and slurm.stages.STAGE.* keys) and --dependency=afterok on
# the jobs it waits for. The same jobs `hessov run backend=slurm` submits through submitit.
# Usage: slurm/submit_chain.sh KEY=VALUE ...   (the same arguments as `hessov run`)
# Extra sbatch options for every job: SBATCH_OPTS (e.g. "--partition=gpu --time=02:00:00").
# Prints one line per submitted job (name and id), then the run directory as the last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=slurm/plan.sh
source "$here/plan.sh"
logs=${HESSOV_SLURM_LOGS:-$PWD/slurm-logs}
mkdir -p "$logs"

declare -A ids
for line in "${jobs[@]}"; do
  IFS=$'\t' read -r -a field <<<"$line"  # job NAME STAGE AFTER TASKS OPTIONS ARG...
  name=${field[1]} stage=${field[2]} after=${field[3]} tasks=${field[4]} options=${field[5]}
  submit=(sbatch --parsable --job-name="hessov-$stage" --output="$logs/%x-%j_%a.out")
  # shellcheck disable=SC2206  # options and SBATCH_OPTS are lists of sbatch options
  [[ $options == - ]] || submit+=($options)
  # shellcheck disable=SC2206
  submit+=(${SBATCH_OPTS:-})
  if [[ $after != - ]]; then
    waited=()
    IFS=, read -r -a before <<<"$after"
    for other in "${before[@]}"; do waited+=("${ids[$other]}"); done
    submit+=(--dependency="afterok:$(IFS=:; echo "${waited[*]}")")
  fi
  [[ $tasks == - ]] || submit+=(--array="$tasks")
  ids[$name]=$("${submit[@]}" "$here/job.sbatch" "${field[@]:6}")
  echo "$name ${ids[$name]}"
done
echo "$RUN_DIR"
