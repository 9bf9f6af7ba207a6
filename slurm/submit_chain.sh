#!/usr/bin/env bash
# Submit a whole run to Slurm as a chain of jobs linked by --dependency=afterok:
#   train -> layout -> per step and split: measurement array (first round)
#         [-> basis solve -> measurement array (second round)] -> solve -> analyze
#   train -> each configured replay (side by side) -> compare
# Usage: slurm/submit_chain.sh KEY=VALUE ...   (the same arguments as `hessov run`)
# Extra sbatch options for every job: SBATCH_OPTS (e.g. "--partition=gpu --time=02:00:00").
# Prints one line per submitted job, then the run directory as the last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=slurm/plan.sh
source "$here/plan.sh"
logs=${HESSOV_SLURM_LOGS:-$PWD/slurm-logs}
mkdir -p "$logs"

submit() {  # submit [sbatch options...] SCRIPT; prints the job id
  # shellcheck disable=SC2086  # SBATCH_OPTS is a list of options
  sbatch --parsable --kill-on-invalid-dep=yes --output="$logs/%x-%j_%a.out" ${SBATCH_OPTS:-} "$@"
}

train=$(submit "$here/train.sbatch"); echo "train $train"
layout=$(submit --dependency="afterok:$train" "$here/layout.sbatch"); echo "layout $layout"
replayed=()
for name in "${replays[@]}"; do
  replayed+=("$(REPLAY=$name submit --dependency="afterok:$train" "$here/replay.sbatch")")
  echo "replay $name ${replayed[-1]}"
done
if ((${#replayed[@]})); then
  compare=$(submit --dependency="afterok:$(IFS=:; echo "${replayed[*]}")" "$here/compare.sbatch")
  echo "compare $compare"
fi
while read -r _ step split; do
  previous=$layout
  for round in "${rounds[@]}"; do
    if [[ $round == second ]]; then
      previous=$(STEP=$step SPLIT=$split submit --dependency="afterok:$previous" \
        "$here/solve.sbatch")
      echo "basis $step $split $previous"
    fi
    previous=$(STEP=$step SPLIT=$split ROUND=$round submit --array="0-$((tasks - 1))" \
      --dependency="afterok:$previous" "$here/measure.sbatch")
    echo "measure-$round $step $split $previous"
  done
  solve=$(STEP=$step SPLIT=$split submit --dependency="afterok:$previous" "$here/solve.sbatch")
  echo "solve $step $split $solve"
  analyze=$(STEP=$step SPLIT=$split submit --dependency="afterok:$solve" "$here/analyze.sbatch")
  echo "analyze $step $split $analyze"
done < <(awk '$1 == "sketch"' <<<"$plan")
echo "$RUN_DIR"
