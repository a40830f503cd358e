#!/usr/bin/env bash
# Runs on a TPU worker, inside the tmux session tpu/launch.sh opens: one experiment with its
# output appended to ~/LOG_DIR/SESSION.log, its pid in SESSION.pid (for tpu/stop.sh) and, when
# it ends, its exit status in SESSION.exit (for tpu/status.sh and tpu/babysit.sh): a number, or
# "preempted" for a run that saved a checkpoint on SIGTERM and exited 0 (it is not finished).
#
#   bash tpu/worker_run.sh VENV LOG_DIR SESSION COMMAND...   (paths relative to $HOME)
set -uo pipefail
venv=$HOME/$1 log_dir=$HOME/$2 session=$3
shift 3
log=$log_dir/$session.log
mkdir -p "$log_dir"
rm -f "$log_dir/$session.exit"
# shellcheck disable=SC1091
source "$venv/bin/activate"
touch "$log"
start=$(stat -c %s "$log")
echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname): $*" >>"$log"
"$@" > >(tee -a "$log") 2>&1 &
pid=$!  # the experiment itself (a simple command in the background is exec'd, not wrapped)
echo "$pid" >"$log_dir/$session.pid"
wait "$pid"
code=$?
if ((code == 0)) && tail -c +"$((start + 1))" "$log" | grep -q "preemption signal received"; then
  code=preempted
fi
echo "$code" >"$log_dir/$session.exit"
