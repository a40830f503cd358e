#!/usr/bin/env bash
# Delete the TPU VM / queued resource (and its nodes). Checkpoints in the bucket stay.
# Safe to re-run: a TPU that doesn't exist is reported, not an error.
#
#   tpu/delete.sh --env tpu/examples/v5p-64.env [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
no_options
state=$(tpu_state)
if [[ -z $state ]] && ((!DRY_RUN)); then
  say "$NAME does not exist; nothing to delete"
  exit 0
fi
delete_tpu
