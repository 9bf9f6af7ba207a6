# shellcheck shell=bash disable=SC2034  # RUN_DIR and jobs are read by the sourcing script
# Sourced by submit_chain.sh and run_sequential.sh: `hessov plan --prepare --jobs "$@"`
# creates the run directory with its config and lists the stage graph's jobs, one
# tab-separated line each (see `hessov plan --help`). Sets RUN_DIR and the array `jobs`.
# The caller's "$@" are the run's KEY=VALUE arguments.
export HESSOV=${HESSOV:-hessov}
plan=$($HESSOV plan --prepare --jobs "$@")
RUN_DIR=$(awk -F '\t' '$1 == "run_dir" {print $2}' <<<"$plan")
mapfile -t jobs < <(awk -F '\t' '$1 == "job"' <<<"$plan")
export RUN_DIR
