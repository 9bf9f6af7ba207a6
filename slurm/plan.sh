# shellcheck shell=bash disable=SC2034  # tasks, rounds and replays are read by the sourcing script
# Sourced by submit_chain.sh and run_sequential.sh: ask `hessov plan "$@"` which jobs the
# run needs and set RUN_DIR, tasks (array tasks per round), rounds (first [second]) and
# replays (the names of the configured replays);
# export what the sbatch scripts read. The caller's "$@" are the run's KEY=VALUE arguments.
export HESSOV=${HESSOV:-hessov}
plan=$($HESSOV plan "$@")
RUN_DIR=$(awk '$1 == "run_dir" {print $2}' <<<"$plan")
tasks=$(awk '$1 == "tasks" {print $2}' <<<"$plan")
read -r -a rounds <<<"$(awk '$1 == "rounds" {$1 = ""; print}' <<<"$plan")"
read -r -a replays <<<"$(awk '$1 == "replay" {print $2}' <<<"$plan" | xargs)"
export RUN_DIR HESSOV_ARGS="$*"
