#!/usr/bin/env bash
# Keep a run going on preemptible TPUs until it finishes. Runs on any machine with gcloud
# (a laptop, a small VM), not on the TPU. Every POLL_SECONDS it looks at the TPU:
#
#   missing                       create it
#   PREEMPTED / SUSPENDED / ...   delete it (the next pass creates it again)
#   READY / ACTIVE                the first time: sync the code and set up every worker; then
#                                 ask worker 0 how the run is doing:
#                                   running     nothing to do
#                                   exited 0    finished: stop babysitting (and --delete-when-done)
#                                   otherwise   stop it on every worker and launch it again
#
# A relaunched run resumes from its newest checkpoint in --workdir (which must be on storage
# every host and every incarnation of the TPU sees: the GCS_BUCKET mount). After MAX_RESTARTS
# failed runs (preemptions don't count) it gives up.
#
#   tpu/babysit.sh --env tpu/examples/v5p-64.env [--delete-when-done] [--dry-run] [-- python -m instruct_jax ...]
#
# --dry-run prints the commands of three passes: TPU missing, TPU ready with no run, TPU preempted.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
delete_when_done=0
for opt in "${ARGS[@]}"; do
  case $opt in
    --delete-when-done) delete_when_done=1 ;;
    *) die "unknown option $opt (see --help)" ;;
  esac
done
experiment_words >/dev/null  # fail now, not after an hour in the queue, when there is nothing to launch

log() {
  if ((DRY_RUN)); then say "babysit: $*"; else say "[babysit $(date -u +%Y-%m-%dT%H:%M:%SZ)] $*"; fi
}

run_state() {  # running / exited:CODE / none, from worker 0 of slice 0
  local out
  out=$(capture_worker0 "$(status_payload 0)") || true
  if [[ $out =~ run_state=running ]]; then echo running
  elif [[ $out =~ run_state=exited\ ([^[:space:]]+) ]]; then echo "exited:${BASH_REMATCH[1]}"
  else echo none
  fi
}

capture_worker0() {
  if [[ $MODE == vm ]]; then
    capture gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=0 --command="$1"
  else
    capture gcloud compute tpus queued-resources ssh "$NAME" "${LOCATION[@]}" --node=0 --worker=0 --command="$1"
  fi
}

prepared=0 failures=0 pass=0
dry_states=("" READY PREEMPTED)
while :; do
  pass=$((pass + 1))
  if ((DRY_RUN)); then
    state=${dry_states[pass - 1]}
    say "pass $pass (dry run assumes the TPU is ${state:-missing})"
    tpu_state >/dev/null
  else
    state=$(tpu_state)
  fi
  case $state in
    "")
      log "$NAME not found: creating it"
      create_tpu || log "create failed (no capacity?); trying again next pass"
      prepared=0 ;;
    READY|ACTIVE)
      if ((!prepared)); then
        log "$NAME is $state: syncing code and setting up every worker"
        if sync_code && setup_workers; then prepared=1; else log "setup failed; trying again next pass"; fi
      fi
      if ((prepared || DRY_RUN)); then
        status=$(run_state)
        ((DRY_RUN)) && status=none
        case $status in
          running) log "run is going" ;;
          exited:0)
            log "run finished"
            ((delete_when_done)) && delete_tpu
            exit 0 ;;
          *)
            if [[ $status != none && $status != exited:preempted ]]; then
              failures=$((failures + 1))
              ((failures <= MAX_RESTARTS)) || die "the run failed $failures times ($status); giving up"
            fi
            log "run is ${status/:/ }: (re)launching it on every worker"
            stop_workers || true
            launch_workers || log "launch failed; trying again next pass" ;;
        esac
      fi ;;
    PREEMPTED|TERMINATED|STOPPED|FAILED|SUSPENDED|SUSPENDING)
      log "$NAME is $state: deleting it to create it again"
      delete_tpu || log "delete failed; trying again next pass"
      prepared=0 ;;
    *) log "$NAME is $state: waiting" ;;
  esac
  if ((DRY_RUN)); then
    ((pass < ${#dry_states[@]})) || break
    continue
  fi
  sleep "$POLL_SECONDS"
done
