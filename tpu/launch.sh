#!/usr/bin/env bash
# Start one experiment on every worker of every slice, in a tmux session (SESSION), logging
# to ~/LOG_DIR/SESSION.log. Every host runs the same command; JAX finds the other hosts
# (and slices) from the TPU metadata. The command comes after `--`, else from COMMAND in the
# env file. Safe to re-run: workers where the session is running are left alone; --restart
# stops it first (SIGTERM: the run saves a checkpoint) and the new run resumes from it.
#
#   tpu/launch.sh --env tpu/examples/v5p-64.env [--restart] [--dry-run] [-- python -m instruct_jax sft ...]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
restart=0
for opt in "${ARGS[@]}"; do
  case $opt in
    --restart) restart=1 ;;
    *) die "unknown option $opt (see --help)" ;;
  esac
done
experiment_words >/dev/null  # fail early when there is nothing to launch
((restart)) && stop_workers
launch_workers
