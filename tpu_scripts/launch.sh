#!/usr/bin/env bash
# Start `python train.py ARGS...` on every worker of a TPU VM at once, in the
# background, detached from the ssh session. See docs/TPU.md.

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN_NAME=${RUN_NAME:-}
REMOTE_PYTHON=${REMOTE_PYTHON:-.venv/bin/python}
CHECK_AFTER=${LAUNCH_CHECK_SECONDS:-5}
ENV_ARGS=()
TRAIN_ARGS=()

usage() {
  cat <<'EOF'
Usage: launch.sh [options] [--] TRAIN_ARGS...

Run `python train.py TRAIN_ARGS...` on all workers at once, with the same
arguments everywhere, so that jax.distributed.initialize() in train.py can
form the multi-host job. Each worker starts the process with setsid+nohup
(it survives the ssh session) and writes
  <remote-dir>/logs/RUN.log   stdout+stderr of train.py on that worker
  <remote-dir>/logs/RUN.pid   its process id (stop.sh uses it)
  <remote-dir>/logs/latest.log -> RUN.log
It refuses to start while an earlier run is still alive on a worker, and
fails if train.py has exited after --check-after seconds.

Launcher options go first; the first argument that is not one of them (or
everything after `--`) goes to train.py verbatim.

Options:
  --run NAME            run name (log file name); default run-YYYYmmdd-HHMMSS [RUN_NAME]
  --env KEY=VALUE       environment variable for train.py, repeatable
  --python PATH         Python on the workers, relative to --remote-dir unless
                        absolute; default .venv/bin/python [REMOTE_PYTHON]
  --check-after SECONDS how long to wait before checking that train.py is still
                        alive; default 5 [LAUNCH_CHECK_SECONDS]

EOF
  common_help
  cat <<'EOF'

Example:
  launch.sh --name my-v5p --zone us-east5-a --project my-proj --run base1 -- \
    --config configs/NAME.py --config.model.variant=unified --workdir gs://BUCKET/runs/base1
EOF
}

while (($#)); do
  case $1 in
    --)
      shift
      break
      ;;
    --run | --run=*)
      take_value "$@"
      RUN_NAME=$OPTVAL
      ;;
    --env | --env=*)
      take_value "$@"
      [[ $OPTVAL =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs KEY=VALUE, got '$OPTVAL'"
      ENV_ARGS+=("$OPTVAL")
      ;;
    --python | --python=*)
      take_value "$@"
      REMOTE_PYTHON=$OPTVAL
      ;;
    --check-after | --check-after=*)
      take_value "$@"
      CHECK_AFTER=$OPTVAL
      ;;
    *)
      # The first argument the launcher does not know starts train.py's.
      try_common_option "$@" || break
      ;;
  esac
  shift "$SHIFT_BY"
done
TRAIN_ARGS=("$@")

require_target
((${#TRAIN_ARGS[@]})) || die "no arguments for train.py (e.g. -- --config configs/NAME.py --workdir DIR)"
RUN_NAME=${RUN_NAME:-run-$(date +%Y%m%d-%H%M%S)}
check_run_name "$RUN_NAME"
[[ $CHECK_AFTER =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--check-after needs a number of seconds, got '$CHECK_AFTER'"

log="logs/$RUN_NAME.log"
pidfile="logs/$RUN_NAME.pid"
cmd=(env PYTHONUNBUFFERED=1 ${ENV_ARGS[@]+"${ENV_ARGS[@]}"} "$REMOTE_PYTHON" train.py "${TRAIN_ARGS[@]}")

# One shell line, run by the login shell of each worker (bash on TPU VMs).
# alive PID: is any non-zombie process left in the session PID leads?
# train.py runs as the leader of its own session (setsid), so its process id
# names the session, and stop.sh can signal the whole session.
# `sh -c 'echo $$ > "$0"; exec "$@"' PIDFILE CMD...` records the leader's
# process id and then becomes CMD (same process id).
# shellcheck disable=SC2016  # $-expressions are for the remote shell.
remote=$(
  printf '%s' "cd $(shquote "$REMOTE_DIR") || exit 1; mkdir -p logs || exit 1"
  printf '%s' '; alive() { ps -o stat= -s "$1" 2>/dev/null | grep -q "^[^Z]"; }'
  printf '%s' '; for f in logs/*.pid; do [ -e "$f" ] || continue; p=$(cat "$f"); case $p in ""|*[!0-9]*) continue;; esac'
  printf '%s' '; if alive "$p"; then echo "[$(hostname)] ERROR: a run is still going ($f, pid $p); stop it first with stop.sh" >&2; exit 1; fi; done'
  printf '%s' "; if [ -e $(shquote "$log") ]; then echo \"[\$(hostname)] ERROR: $log exists; choose another --run\" >&2; exit 1; fi"
  printf '%s' "; ln -sfn $(shquote "$RUN_NAME.log") logs/latest.log"
  printf '%s' "; setsid nohup sh -c 'echo \$\$ > \"\$0\"; exec \"\$@\"' $(shquote "$pidfile") $(shjoin "${cmd[@]}")"
  printf '%s' " > $(shquote "$log") 2>&1 < /dev/null &"
  printf '%s' " i=0; while [ ! -s $(shquote "$pidfile") ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i+1)); done"
  printf '%s' "; sleep $CHECK_AFTER; p=\$(cat $(shquote "$pidfile") 2>/dev/null || true)"
  printf '%s' "; if [ -n \"\$p\" ] && alive \"\$p\"; then echo \"[\$(hostname)] started $RUN_NAME (pid \$p), log: \$PWD/$log\""
  printf '%s' "; else echo \"[\$(hostname)] ERROR: train.py is not running; end of \$PWD/$log:\" >&2; tail -n 30 $(shquote "$log") >&2; exit 1; fi"
)

tpu_ssh all "$remote"
note "run '$RUN_NAME' launched; follow it with: tpu_scripts/logs.sh --run $RUN_NAME --follow"
