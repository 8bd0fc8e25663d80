#!/usr/bin/env bash
# Request a Cloud TPU VM slice through a queued resource and wait until it is
# ACTIVE. See docs/TPU.md.

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
SPOT=${SPOT:-0}
RESERVED=${RESERVED:-0}
BEST_EFFORT=${BEST_EFFORT:-0}
VALID_UNTIL_DURATION=${VALID_UNTIL_DURATION:-}
CREATE_TIMEOUT=${CREATE_TIMEOUT:-3600}
POLL_INTERVAL=${POLL_INTERVAL:-30}
WAIT=1
DO_CREATE=1
CREATE_ARGS=()

usage() {
  cat <<'EOF'
Usage: create.sh [options]

Request a TPU VM slice as a queued resource (one node, id = the TPU name),
then poll its state until it is ACTIVE, failing after --timeout seconds.

Options:
  --accelerator-type TYPE  e.g. v5p-8 (one host), v5p-64 (8 hosts) [ACCELERATOR_TYPE]
  --runtime-version V      TPU software version [RUNTIME_VERSION]; default by
                           type: v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5,
                           v5e/v5litepod -> v2-alpha-tpuv5-lite,
                           v2/v3/v4 -> tpu-ubuntu2204-base
  --spot                   Spot capacity: cheaper, can be preempted [SPOT=1]
  --reserved               use the project's reservation [RESERVED=1]
  --best-effort            best-effort capacity (uses `gcloud alpha`) [BEST_EFFORT=1]
  --valid-until-duration D give up on the request after D, e.g. 6h
                           [VALID_UNTIL_DURATION]
  --create-arg FLAG        extra flag for `queued-resources create`, repeatable,
                           e.g. --create-arg=--internal-ips
  --timeout SECONDS        how long to wait for ACTIVE; default 3600 [CREATE_TIMEOUT]
  --poll-interval SECONDS  default 30 [POLL_INTERVAL]
  --no-wait                return right after the create request
  --wait-only              do not create; only wait for an existing request

EOF
  common_help
  cat <<'EOF'

Examples:
  create.sh --name my-v5p --zone us-east5-a --project my-proj --accelerator-type v5p-8
  TPU_NAME=pod ZONE=us-east5-a PROJECT=my-proj create.sh --accelerator-type v5p-64 --spot
EOF
}

while (($#)); do
  case $1 in
    --accelerator-type | --accelerator-type=*)
      take_value "$@"
      ACCELERATOR_TYPE=$OPTVAL
      ;;
    --runtime-version | --runtime-version=*)
      take_value "$@"
      RUNTIME_VERSION=$OPTVAL
      ;;
    --spot) SPOT=1 SHIFT_BY=1 ;;
    --no-spot) SPOT=0 SHIFT_BY=1 ;;
    --reserved) RESERVED=1 SHIFT_BY=1 ;;
    --best-effort) BEST_EFFORT=1 SHIFT_BY=1 ;;
    --valid-until-duration | --valid-until-duration=*)
      take_value "$@"
      VALID_UNTIL_DURATION=$OPTVAL
      ;;
    --create-arg | --create-arg=*)
      take_value "$@"
      CREATE_ARGS+=("$OPTVAL")
      ;;
    --timeout | --timeout=*)
      take_value "$@"
      CREATE_TIMEOUT=$OPTVAL
      ;;
    --poll-interval | --poll-interval=*)
      take_value "$@"
      POLL_INTERVAL=$OPTVAL
      ;;
    --no-wait) WAIT=0 SHIFT_BY=1 ;;
    --wait-only) DO_CREATE=0 SHIFT_BY=1 ;;
    *) parse_common_option "$@" ;;
  esac
  shift "$SHIFT_BY"
done

default_runtime_version() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5e-* | v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
  esac
}

require_target
if ((DO_CREATE)); then
  require_settings ACCELERATOR_TYPE:--accelerator-type
  if [[ -z $RUNTIME_VERSION ]]; then
    RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE")
  fi
  require_settings RUNTIME_VERSION:--runtime-version
fi
check_uint --timeout "$CREATE_TIMEOUT"
check_uint --poll-interval "$POLL_INTERVAL"

capacity_flags=()
is_true "$SPOT" && capacity_flags+=(--spot)
is_true "$RESERVED" && capacity_flags+=(--reserved)
is_true "$BEST_EFFORT" && capacity_flags+=(--best-effort)
if ((${#capacity_flags[@]} > 1)); then
  die "choose at most one of --spot, --reserved, --best-effort (got ${capacity_flags[*]})"
fi
# --best-effort exists only in the alpha track of gcloud.
gcloud_track=()
is_true "$BEST_EFFORT" && gcloud_track=(alpha)

qr_flags=(--zone="$ZONE" --project="$PROJECT")

if ((DO_CREATE)); then
  create_cmd=(gcloud ${gcloud_track[@]+"${gcloud_track[@]}"} compute tpus queued-resources create "$QUEUED_RESOURCE"
    --node-id="$TPU_NAME"
    --accelerator-type="$ACCELERATOR_TYPE"
    --runtime-version="$RUNTIME_VERSION"
    "${qr_flags[@]}")
  create_cmd+=(${capacity_flags[@]+"${capacity_flags[@]}"})
  [[ -n $VALID_UNTIL_DURATION ]] && create_cmd+=(--valid-until-duration="$VALID_UNTIL_DURATION")
  create_cmd+=(${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"})
  run "${create_cmd[@]}"
fi

((WAIT)) || exit 0

describe_cmd=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE"
  "${qr_flags[@]}" --format='value(state.state)')

if is_true "$DRY_RUN"; then
  run "${describe_cmd[@]}"
  note "repeated every ${POLL_INTERVAL}s until the state is ACTIVE (at most ${CREATE_TIMEOUT}s)"
  exit 0
fi

printf '+ %s\n' "$(shjoin "${describe_cmd[@]}")" >&2
info "waiting for queued resource '$QUEUED_RESOURCE' to become ACTIVE (timeout ${CREATE_TIMEOUT}s)"
deadline=$((SECONDS + CREATE_TIMEOUT))
last_state=
errors=0
while :; do
  if state=$("${describe_cmd[@]}"); then
    errors=0
    state=${state//[[:space:]]/}
    if [[ $state != "$last_state" ]]; then
      info "state: ${state:-<empty>} (after $((SECONDS))s)"
      last_state=$state
    fi
    case $state in
      ACTIVE)
        info "TPU '$TPU_NAME' is ready; next: tpu_scripts/setup.sh"
        exit 0
        ;;
      FAILED | SUSPENDING | SUSPENDED)
        fail "queued resource '$QUEUED_RESOURCE' is $state; see: gcloud compute tpus queued-resources describe $QUEUED_RESOURCE --zone=$ZONE --project=$PROJECT"
        ;;
    esac
  else
    errors=$((errors + 1))
    ((errors < 5)) || fail "describe failed $errors times in a row; giving up"
  fi
  if ((SECONDS >= deadline)); then
    fail "still ${last_state:-unknown} after ${CREATE_TIMEOUT}s; the request stays queued: wait with 'create.sh --wait-only', check with status.sh, or cancel with delete.sh"
  fi
  sleep "$POLL_INTERVAL"
done
