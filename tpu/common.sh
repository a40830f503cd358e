# shellcheck shell=bash
# Sourced by every tpu/*.sh script: options, the env file, and the gcloud commands they share.
#
# Every gcloud (and local) command goes through `run`, which prints it as one shell-quoted
# line (exactly what is executed) and, unless --dry-run, executes it. With --dry-run nothing
# is executed and nothing is asked of gcloud: the output is a script you could paste.
#
# Two kinds of TPU resources, chosen by NUM_SLICES / MODE in the env file:
#   vm      one slice made with `tpu-vm create`; workers reached with `tpu-vm ssh --worker=all`
#   queued  a queued resource (needed for several slices, handy for spot capacity); nodes
#           NAME-0, NAME-1, ... (or NAME for one slice), reached with
#           `queued-resources ssh --node=all --worker=all`

set -euo pipefail
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "error: tpu/ scripts need bash >= 4.4, this is $BASH_VERSION (macOS: brew install bash)" >&2
  exit 1
fi

TPU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$TPU_DIR/.." && pwd)
DRY_RUN=0
ENV_FILE=${TPU_ENV:-}
ARGS=()        # the script's own options
COMMAND_ARGS=() # words after `--`

die() { echo "error: $*" >&2; exit 1; }
say() {  # a progress message: to stderr, or as a comment in a dry run's command stream
  if ((DRY_RUN)); then echo "# $*" >&3; else echo "$*" >&2; fi
}

usage() {  # the calling script's header comment
  sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"
}

# ----------------------------------------------------------------------------- options and env file
parse_common() {
  while (($#)); do
    case $1 in
      --env) [[ $# -ge 2 ]] || die "--env needs a file"; ENV_FILE=$2; shift 2 ;;
      --env=*) ENV_FILE=${1#*=}; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; COMMAND_ARGS=("$@"); break ;;
      *) ARGS+=("$1"); shift ;;
    esac
  done
  [[ -n $ENV_FILE ]] || die "name the TPU env file with --env FILE (or TPU_ENV=FILE); see tpu/examples/"
  [[ -f $ENV_FILE ]] || die "env file '$ENV_FILE' not found"
  set -a
  # shellcheck disable=SC1090
  source "$ENV_FILE"
  set +a
  apply_defaults
}

default_runtime() {  # TPU VM software image per generation
  case $1 in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default RUNTIME_VERSION for ACCELERATOR=$1; set RUNTIME_VERSION in the env file" ;;
  esac
}

apply_defaults() {
  local var
  for var in PROJECT ZONE NAME ACCELERATOR; do
    [[ -n ${!var:-} ]] || die "$ENV_FILE must set $var"
  done
  NUM_SLICES=${NUM_SLICES:-1}
  [[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES must be a positive integer, got '$NUM_SLICES'"
  if [[ -z ${MODE:-} ]]; then
    if ((NUM_SLICES > 1)); then MODE=queued; else MODE=vm; fi
  fi
  [[ $MODE == vm || $MODE == queued ]] || die "MODE must be vm or queued, got '$MODE'"
  if ((NUM_SLICES > 1)) && [[ $MODE != queued ]]; then
    die "NUM_SLICES=$NUM_SLICES needs MODE=queued (several slices are one queued resource)"
  fi
  RUNTIME_VERSION=${RUNTIME_VERSION:-$(default_runtime "$ACCELERATOR")}
  SPOT=${SPOT:-false}
  JAX_VERSION=${JAX_VERSION:-0.10.2}
  PYTHON=${PYTHON:-python3}
  REMOTE_DIR=${REMOTE_DIR:-instruct_jax}      # code on each worker, relative to $HOME
  VENV=${VENV:-venvs/instruct_jax}           # virtualenv on each worker, relative to $HOME
  LOG_DIR=${LOG_DIR:-instruct_jax_logs}      # logs, pid and exit files on each worker, relative to $HOME
  SESSION=${SESSION:-instruct_jax}           # tmux session name (also the log's name)
  GCS_BUCKET=${GCS_BUCKET:-}                 # mounted with gcsfuse on every worker when set
  GCS_MOUNT=${GCS_MOUNT:-/mnt/gcs/$GCS_BUCKET}
  STOP_GRACE_SECONDS=${STOP_GRACE_SECONDS:-180}
  POLL_SECONDS=${POLL_SECONDS:-120}
  MAX_RESTARTS=${MAX_RESTARTS:-20}
  COMMAND=${COMMAND:-}
  LOCATION=(--zone="$ZONE" --project="$PROJECT")
}

# ----------------------------------------------------------------------------- printing and running
q() {  # one word, quoted for a POSIX shell only when it needs it (--flag='value' for flags)
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--[a-z][a-z-]*=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    q "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

qjoin() {
  local out=() word
  for word in "$@"; do out+=("$(q "$word")"); done
  printf '%s' "${out[*]}"
}

exec 3>&1  # the printed command stream: stdout, even from inside $(...)

run() {  # print the exact command line, then run it (not in a dry run)
  if ((DRY_RUN)); then
    { qjoin "$@"; echo; } >&3
  else
    echo "+ $(qjoin "$@")" >&2
    "$@"
  fi
}

capture() {  # run a query, its stdout is the result; in a dry run only print the command (empty result)
  if ((DRY_RUN)); then
    { qjoin "$@"; echo; } >&3
    return 0
  fi
  echo "+ $(qjoin "$@")" >&2
  "$@" 2>/dev/null
}

# ----------------------------------------------------------------------------- gcloud
tpu_state() {  # READY / ACTIVE / PREEMPTED / SUSPENDED / ...; empty when the resource doesn't exist
  if [[ $MODE == vm ]]; then
    capture gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" "--format=value(state)" || true
  else
    capture gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}" "--format=value(state.state)" || true
  fi
}

create_tpu() {
  local spot=()
  [[ $SPOT == true ]] && spot=(--spot)
  if [[ $MODE == vm ]]; then
    run gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$RUNTIME_VERSION" "${spot[@]}"
  elif ((NUM_SLICES == 1)); then
    run gcloud compute tpus queued-resources create "$NAME" "${LOCATION[@]}" --accelerator-type="$ACCELERATOR" \
      --runtime-version="$RUNTIME_VERSION" --node-id="$NAME" "${spot[@]}"
  else
    run gcloud compute tpus queued-resources create "$NAME" "${LOCATION[@]}" --accelerator-type="$ACCELERATOR" \
      --runtime-version="$RUNTIME_VERSION" --node-count="$NUM_SLICES" --node-prefix="$NAME" "${spot[@]}"
  fi
}

delete_tpu() {
  if [[ $MODE == vm ]]; then
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
  else
    run gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
  fi
}

on_workers() {  # on_workers PAYLOAD [all|0]: a bash command line on every worker of every slice (or worker 0)
  local which=${2:-all}
  if [[ $MODE == vm ]]; then
    run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$which" --command="$1"
  else
    run gcloud compute tpus queued-resources ssh "$NAME" "${LOCATION[@]}" --node="$which" --worker="$which" \
      --command="$1"
  fi
}

copy_to_workers() {  # copy_to_workers LOCAL_FILE REMOTE_PATH (relative to $HOME on each worker)
  if [[ $MODE == vm ]]; then
    run gcloud compute tpus tpu-vm scp "$1" "$NAME:$2" "${LOCATION[@]}" --worker=all
  else
    run gcloud compute tpus queued-resources scp "$1" "$NAME:$2" "${LOCATION[@]}" --node=all --worker=all
  fi
}

# ----------------------------------------------------------------------------- what runs on the workers
# Each payload is one bash command line (steps joined by "; "), run from $HOME on every worker;
# running it twice does no harm.

steps() {  # join shell steps into one command line
  local out=$1
  shift
  for step in "$@"; do out+="; $step"; done
  printf '%s' "$out"
}

sync_code() {  # the working tree (tracked + untracked, not ignored) to $HOME/$REMOTE_DIR on every worker
  local tarball=${TMPDIR:-/tmp}/instruct_jax-$NAME.tar.gz d=$REMOTE_DIR
  run bash -c "cd $(q "$REPO_DIR") && git ls-files -z --cached --others --exclude-standard | tar --null -czf $(q "$tarball") -T -" || return
  copy_to_workers "$tarball" "$d.tar.gz" || return
  # Unpack beside the old copy and swap, so a worker never runs half a tree.
  on_workers "$(steps "set -e" "rm -rf $d.new" "mkdir -p $d.new" "tar -xzf $d.tar.gz -C $d.new" "rm -rf $d.old" \
    "if [ -d $d ]; then mv $d $d.old; fi" "mv $d.new $d" "rm -rf $d.old $d.tar.gz")"
}

setup_workers() {  # virtualenv, jax[tpu] and the requirements (after sync_code), gcsfuse mount
  local pip="$VENV/bin/pip" payload mount gcsfuse_apt
  payload=$(steps "set -e" "mkdir -p $LOG_DIR" \
    "if [ ! -x $VENV/bin/python ]; then $PYTHON -m venv $VENV || { sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && $PYTHON -m venv $VENV; }; fi" \
    "$pip install -q --upgrade pip" \
    "$pip install -q 'jax[tpu]==$JAX_VERSION' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html -r $REMOTE_DIR/requirements.txt")
  if [[ -n $GCS_BUCKET ]]; then
    gcsfuse_apt="echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse"
    mount="sudo mkdir -p $GCS_MOUNT && sudo chown \$USER $GCS_MOUNT && gcsfuse --implicit-dirs $GCS_BUCKET $GCS_MOUNT"
    payload=$(steps "$payload" "if ! mountpoint -q $GCS_MOUNT; then command -v gcsfuse >/dev/null || { $gcsfuse_apt; }; $mount; fi")
  fi
  on_workers "$(steps "$payload" "echo \"\$(hostname): \$($VENV/bin/python -c 'import jax; print(\"jax\", jax.__version__)')\"")"
}

experiment_words() {  # the command to launch, NUL-separated: words after `--`, else COMMAND from the env file
  if ((${#COMMAND_ARGS[@]})); then
    printf '%s\0' "${COMMAND_ARGS[@]}"
  elif [[ -n $COMMAND ]]; then
    eval "set -- $COMMAND"
    printf '%s\0' "$@"
  else
    die "nothing to launch: put the command after -- or set COMMAND in $ENV_FILE"
  fi
}

launch_workers() {  # start the experiment in tmux on every worker, unless it is already running there
  local words=() inner
  mapfile -d '' words < <(experiment_words)
  inner="bash tpu/worker_run.sh $VENV $LOG_DIR $SESSION $(qjoin "${words[@]}")"
  on_workers "cd $REMOTE_DIR && mkdir -p \$HOME/$LOG_DIR && if tmux has-session -t $SESSION 2>/dev/null; then echo \"\$(hostname): $SESSION is already running (tpu/stop.sh first)\"; else tmux new-session -d -s $SESSION $(q "$inner"); fi"
}

stop_workers() {  # SIGTERM (the trainer saves a checkpoint and exits), then SIGKILL after the grace period
  # Once the experiment is gone, worker_run.sh still has to write SESSION.exit and end its tmux
  # session; killing the session before that (a loaded host takes a moment) would lose the exit
  # status. So wait up to 30 s for the session to end by itself, then kill what is left.
  local pidfile="$LOG_DIR/$SESSION.pid"
  on_workers "$(steps \
    "if [ -f $pidfile ] && kill -0 \$(cat $pidfile) 2>/dev/null; then pid=\$(cat $pidfile); kill -TERM \$pid; for i in \$(seq $STOP_GRACE_SECONDS); do kill -0 \$pid 2>/dev/null || break; sleep 1; done; kill -KILL \$pid 2>/dev/null || true; fi" \
    "for i in \$(seq 150); do tmux has-session -t $SESSION 2>/dev/null || break; sleep 0.2; done" \
    "tmux kill-session -t $SESSION 2>/dev/null || true" \
    "echo \"\$(hostname): stopped\"")"
}

status_payload() {  # one line per worker (run_state=running / exited CODE / not launched), then the log's tail
  local lines=$1 base="$LOG_DIR/$SESSION" payload
  payload=$(steps "h=\$(hostname)" \
    "if tmux has-session -t $SESSION 2>/dev/null; then s=running; elif [ -f $base.exit ]; then s=\"exited \$(cat $base.exit)\"; else s='not launched'; fi" \
    "echo \"\$h: run_state=\$s\"")
  ((lines == 0)) || payload=$(steps "$payload" "if [ -f $base.log ]; then tail -n $lines $base.log | sed \"s/^/\$h: /\"; fi")
  echo "$payload"
}

wait_until_ready() {  # poll the resource until READY (vm) / ACTIVE (queued); queued ones can wait for hours
  local state
  while :; do
    state=$(tpu_state)
    if ((DRY_RUN)); then say "dry run: would poll this every ${POLL_SECONDS}s until READY / ACTIVE"; return 0; fi
    case $state in
      READY|ACTIVE) say "$NAME is $state"; return 0 ;;
      ""|FAILED|PREEMPTED|TERMINATED|SUSPENDED) die "$NAME is ${state:-gone}; not waiting" ;;
      *) say "$NAME is $state; checking again in ${POLL_SECONDS}s"; sleep "$POLL_SECONDS" ;;
    esac
  done
}

no_options() {  # for scripts without options of their own
  ((${#ARGS[@]} == 0)) || die "unknown option ${ARGS[0]} (see --help)"
}
