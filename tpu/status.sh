#!/usr/bin/env bash
# Show the TPU's state and, on every worker, whether the run is going (running / exited CODE /
# not launched) with the last lines of its log. Read-only.
#
#   tpu/status.sh --env tpu/examples/v5p-64.env [--lines N] [--dry-run]
#
# --lines N  log lines per worker (default 20; 0 = state only)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
lines=20
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --lines) [[ ${2:-} =~ ^[0-9]+$ ]] || die "--lines needs a number"; lines=$2; shift 2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

state=$(tpu_state)
((DRY_RUN)) || say "$NAME ($MODE, $NUM_SLICES x $ACCELERATOR): ${state:-not found}"
if ((DRY_RUN)) || [[ $state == READY || $state == ACTIVE ]]; then
  on_workers "$(status_payload "$lines")"
fi
