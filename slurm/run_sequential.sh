#!/usr/bin/env bash
# The Slurm chain without Slurm: run the same sbatch scripts one after another on this
# machine, in the order the dependencies impose, setting SLURM_ARRAY_TASK_ID for each
# array task as Slurm would. Same commands, same files, same numbers.
# Usage: slurm/run_sequential.sh KEY=VALUE ...   (the same arguments as `hessov run`)
# Prints the run directory as the last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=slurm/plan.sh
source "$here/plan.sh"

bash "$here/train.sbatch"
for name in "${replays[@]}"; do REPLAY=$name bash "$here/replay.sbatch"; done
if ((${#replays[@]})); then bash "$here/compare.sbatch"; fi
bash "$here/layout.sbatch"
while read -r _ step split; do
  for round in "${rounds[@]}"; do
    [[ $round == second ]] && STEP=$step SPLIT=$split bash "$here/solve.sbatch"
    for ((task = 0; task < tasks; task++)); do
      STEP=$step SPLIT=$split ROUND=$round SLURM_ARRAY_TASK_ID=$task bash "$here/measure.sbatch"
    done
  done
  STEP=$step SPLIT=$split bash "$here/solve.sbatch"
  STEP=$step SPLIT=$split bash "$here/analyze.sbatch"
done < <(awk '$1 == "sketch"' <<<"$plan")
echo "$RUN_DIR"
