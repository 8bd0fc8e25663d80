#!/usr/bin/env bash
# Stop training on every worker of a TPU VM: SIGTERM, then SIGKILL after a
# grace period. See docs/TPU.md.

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN_NAME=${RUN_NAME:-}
GRACE=${STOP_GRACE:-120}

usage() {
  cat <<'EOF'
Usage: stop.sh [options]

On all workers at once: send SIGTERM to every process of the runs started by
launch.sh (each run is its own session, recorded in logs/RUN.pid), so that
train.py can save a checkpoint and exit; processes still alive after
--grace seconds get SIGKILL.

Options:
  --run NAME         stop only this run; default: every run still alive [RUN_NAME]
  --grace SECONDS    time between SIGTERM and SIGKILL; default 120 [STOP_GRACE]

EOF
  common_help
  cat <<'EOF'

Example:
  stop.sh --name my-v5p --zone us-east5-a --project my-proj --grace 300
EOF
}

while (($#)); do
  case $1 in
    --run | --run=*)
      take_value "$@"
      RUN_NAME=$OPTVAL
      ;;
    --grace | --grace=*)
      take_value "$@"
      GRACE=$OPTVAL
      ;;
    *) parse_common_option "$@" ;;
  esac
  shift "$SHIFT_BY"
done

require_target
check_uint --grace "$GRACE"
if [[ -n $RUN_NAME ]]; then
  check_run_name "$RUN_NAME"
  pidfiles="logs/$RUN_NAME.pid"
else
  pidfiles='logs/*.pid'
fi
ticks=$((GRACE * 5)) # the wait loop sleeps 0.2 s a turn

# One shell line for each worker's login shell. alive/sig work on the whole
# session that launch.sh started with setsid (its leader's id is in the pid
# file); zombies do not count as alive.
# shellcheck disable=SC2016  # $-expressions are for the remote shell.
remote=$(
  printf '%s' "cd $(shquote "$REMOTE_DIR") 2>/dev/null || { echo \"[\$(hostname)] nothing to stop\"; exit 0; }"
  printf '%s' '; alive() { ps -o stat= -s "$1" 2>/dev/null | grep -q "^[^Z]"; }'
  printf '%s' '; sig() { pkill "-$1" -s "$2" 2>/dev/null || true; }'
  printf '%s' "; pids=; for f in $pidfiles"
  printf '%s' '; do [ -e "$f" ] || continue; p=$(cat "$f"); case $p in ""|*[!0-9]*) continue;; esac'
  printf '%s' '; if alive "$p"; then pids="$pids $p"; else rm -f "$f"; fi; done'
  printf '%s' '; if [ -z "$pids" ]; then echo "[$(hostname)] no training process running"; exit 0; fi'
  printf '%s' '; echo "[$(hostname)] SIGTERM to session(s)$pids"; for p in $pids; do sig TERM "$p"; done'
  printf '%s' "; i=0; while [ \$i -lt $ticks ]"
  printf '%s' '; do left=; for p in $pids; do if alive "$p"; then left="$left $p"; fi; done; [ -n "$left" ] || break; sleep 0.2; i=$((i+1)); done'
  printf '%s' '; left=; for p in $pids; do if alive "$p"; then left="$left $p"; fi; done'
  printf '%s' "; if [ -n \"\$left\" ]; then echo \"[\$(hostname)] still alive after ${GRACE}s, SIGKILL to\$left\"; for p in \$left; do sig KILL \"\$p\"; done; sleep 0.5; fi"
  printf '%s' "; for f in $pidfiles"
  printf '%s' '; do [ -e "$f" ] || continue; p=$(cat "$f"); case $p in ""|*[!0-9]*) continue;; esac; alive "$p" || rm -f "$f"; done'
  printf '%s' '; echo "[$(hostname)] stopped"'
)

tpu_ssh all "$remote"
