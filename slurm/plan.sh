# shellcheck shell=bash disable=SC2034  # tasks and rounds are read by the sourcing script
# Sourced by submit_chain.sh and run_sequential.sh: ask `hessov plan "$@"` which jobs the
# run needs and set RUN_DIR, tasks (array tasks per round) and rounds (first [second]);
# export what the sbatch scripts read. The caller's "$@" are the run's KEY=VALUE arguments.
export HESSOV=${HESSOV:-hessov}
plan=$($HESSOV plan "$@")
RUN_DIR=$(awk '$1 == "run_dir" {print $2}' <<<"$plan")
tasks=$(awk '$1 == "tasks" {print $2}' <<<"$plan")
read -r -a rounds <<<"$(awk '$1 == "rounds" {$1 = ""; print}' <<<"$plan")"
export RUN_DIR HESSOV_ARGS="$*"
