#!/usr/bin/env bash
# Copy this working tree (tracked and untracked files git doesn't ignore) to ~/REMOTE_DIR on
# every worker of every slice. Safe to re-run: each worker swaps in the new copy whole.
#
#   tpu/sync.sh --env tpu/examples/v5p-64.env [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
no_options
sync_code
