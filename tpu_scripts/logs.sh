#!/usr/bin/env bash
# Print (or follow) a run's log on one worker, or on all of them.
# See docs/TPU.md.

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN_NAME=${RUN_NAME:-}
WORKER=${WORKER:-0}
LINES_N=${LOG_LINES:-100}
FOLLOW=0

usage() {
  cat <<'EOF'
Usage: logs.sh [options]

Show the end of a run's log (<remote-dir>/logs/RUN.log) on one worker.
With --worker all, every worker's lines come prefixed with [hostname].

Options:
  --run NAME        which run; default: the latest (logs/latest.log) [RUN_NAME]
  --worker N|all    worker index, 0 is the first; default 0 [WORKER]
  --lines N         how many lines; default 100 [LOG_LINES]
  -f, --follow      keep printing new lines (tail -F) until Ctrl-C

EOF
  common_help
  cat <<'EOF'

Example:
  logs.sh --name my-v5p --zone us-east5-a --project my-proj --run base1 -f
EOF
}

while (($#)); do
  case $1 in
    --run | --run=*)
      take_value "$@"
      RUN_NAME=$OPTVAL
      ;;
    --worker | --worker=*)
      take_value "$@"
      WORKER=$OPTVAL
      ;;
    --lines | --lines=*)
      take_value "$@"
      LINES_N=$OPTVAL
      ;;
    -f | --follow) FOLLOW=1 SHIFT_BY=1 ;;
    *) parse_common_option "$@" ;;
  esac
  shift "$SHIFT_BY"
done

require_target
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker needs a worker index or 'all', got '$WORKER'"
[[ $LINES_N =~ ^[0-9]+$ ]] || die "--lines needs a whole number, got '$LINES_N'"
if [[ -n $RUN_NAME ]]; then
  check_run_name "$RUN_NAME"
  log="logs/$RUN_NAME.log"
else
  log=logs/latest.log
fi

tail_cmd="tail -n $LINES_N"
((FOLLOW)) && tail_cmd+=" -F"
tail_cmd+=" $(shquote "$log")"
ssh_flags=()
if [[ $WORKER == all ]]; then
  # awk flushes each line so that followed output is not held back.
  # shellcheck disable=SC2016  # $-expressions are for the remote shell.
  tail_cmd+=' | awk -v h="$(hostname)" '\''{ print "[" h "] " $0; fflush() }'\'''
elif ((FOLLOW)); then
  # A terminal on the remote side makes Ctrl-C stop the remote tail too.
  ssh_flags=(--ssh-flag=-t)
fi

# shellcheck disable=SC2016  # $-expressions are for the remote shell.
remote="cd $(shquote "$REMOTE_DIR") && if [ -e $(shquote "$log") ]; then $tail_cmd; else echo \"[\$(hostname)] no $log in \$PWD\" >&2; exit 1; fi"

tpu_ssh "$WORKER" "$remote" ${ssh_flags[@]+"${ssh_flags[@]}"}
