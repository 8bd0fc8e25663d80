#!/usr/bin/env bash
# Show the state of the queued resource and TPU VM, and on each worker which
# runs are alive plus the end of the latest log. See docs/TPU.md.

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN_NAME=${RUN_NAME:-}
LINES_N=${STATUS_LINES:-10}

usage() {
  cat <<'EOF'
Usage: status.sh [options]

Print the queued resource's state and the TPU VM's state and health; when the
TPU is up, also print from every worker the runs that are alive and the
last --lines lines of the run's log, each line prefixed with [hostname].

Options:
  --run NAME       whose log to show; default: the latest run (logs/latest.log) [RUN_NAME]
  --lines N        log lines per worker; default 10 (0: none) [STATUS_LINES]

EOF
  common_help
}

while (($#)); do
  case $1 in
    --run | --run=*)
      take_value "$@"
      RUN_NAME=$OPTVAL
      ;;
    --lines | --lines=*)
      take_value "$@"
      LINES_N=$OPTVAL
      ;;
    *) parse_common_option "$@" ;;
  esac
  shift "$SHIFT_BY"
done

require_target
[[ $LINES_N =~ ^[0-9]+$ ]] || die "--lines needs a whole number, got '$LINES_N'"
if [[ -n $RUN_NAME ]]; then
  check_run_name "$RUN_NAME"
  log="logs/$RUN_NAME.log"
else
  log=logs/latest.log
fi

qr_cmd=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE"
  --zone="$ZONE" --project="$PROJECT" --format='value(state.state)')
tpu_cmd=(gcloud compute tpus tpu-vm describe "$TPU_NAME"
  --zone="$ZONE" --project="$PROJECT" --format='value(state,health,acceleratorType)')

# shellcheck disable=SC2016  # $-expressions are for the remote shell.
remote=$(
  printf '%s' "cd $(shquote "$REMOTE_DIR") 2>/dev/null || { echo \"[\$(hostname)] no $(shquote "$REMOTE_DIR") directory: run setup.sh\"; exit 0; }"
  printf '%s' '; h=$(hostname); alive() { ps -o stat= -s "$1" 2>/dev/null | grep -q "^[^Z]"; }'
  printf '%s' '; n=0; for f in logs/*.pid; do [ -e "$f" ] || continue; p=$(cat "$f"); case $p in ""|*[!0-9]*) continue;; esac'
  printf '%s' '; if alive "$p"; then echo "[$h] running: ${f%.pid}.log (pid $p)"; n=$((n+1)); fi; done'
  printf '%s' '; [ "$n" -gt 0 ] || echo "[$h] no training process running"'
  if ((LINES_N > 0)); then
    printf '%s' "; if [ -e $(shquote "$log") ]; then tail -n $LINES_N $(shquote "$log") | sed \"s/^/[\$h] /\"; fi"
  fi
)

if is_true "$DRY_RUN"; then
  run "${qr_cmd[@]}"
  run "${tpu_cmd[@]}"
  tpu_ssh all "$remote"
  note "the ssh step runs only when the TPU state is READY"
  exit 0
fi

qr_state=$("${qr_cmd[@]}" 2>/dev/null) || qr_state='(not found)'
printf 'queued resource %s: %s\n' "$QUEUED_RESOURCE" "${qr_state:-(unknown)}"
tpu_state=$("${tpu_cmd[@]}" 2>/dev/null) || tpu_state='(not found)'
# `value(a,b,c)` prints tab-separated fields.
printf 'tpu vm %s: %s\n' "$TPU_NAME" "$(tr '\t' ' ' <<<"${tpu_state:-(unknown)}")"
case $tpu_state in
  READY*) tpu_ssh all "$remote" ;;
  *) info "TPU is not READY; skipping the workers" ;;
esac
