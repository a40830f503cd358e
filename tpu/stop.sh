#!/usr/bin/env bash
# Stop the run on every worker: SIGTERM first (the trainer finishes its step, saves a
# checkpoint and exits), SIGKILL after STOP_GRACE_SECONDS, then close the tmux session.
# The TPU keeps running (tpu/delete.sh frees it). Safe to re-run.
#
#   tpu/stop.sh --env tpu/examples/v5p-64.env [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
no_options
stop_workers
