#!/usr/bin/env bash
# Create the TPU described by an env file: a TPU VM (one slice) or a queued resource
# (NUM_SLICES > 1, or MODE=queued). Safe to re-run: an existing TPU is left alone.
#
#   tpu/create.sh --env tpu/examples/v5p-64.env [--wait] [--dry-run]
#
# --wait     poll until the TPU is READY / ACTIVE (queued resources wait for capacity)
# --dry-run  print the gcloud commands, run nothing
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
wait=0
for opt in "${ARGS[@]}"; do
  case $opt in
    --wait) wait=1 ;;
    *) die "unknown option $opt (see --help)" ;;
  esac
done

state=$(tpu_state)
if [[ -n $state ]]; then
  say "$NAME already exists (state $state); nothing to create"
else
  ((DRY_RUN)) && say "dry run: assuming $NAME does not exist yet"
  create_tpu
fi
((wait)) && wait_until_ready
exit 0
