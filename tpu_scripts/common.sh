# shellcheck shell=bash
#
# Shared helpers for the scalejax Cloud TPU scripts. Every script in this
# folder sources this file; it is not meant to be run on its own.
#
# Settings come from environment variables and may be overridden by flags
# (flags win). `--dry-run` prints each command, one per line, prefixed with
# "+ ", instead of running it. Arguments in printed commands are quoted the
# way Python's shlex.quote does, so `shlex.split(line[2:])` gives back argv.

set -euo pipefail

SCRIPT_NAME=$(basename "$0")
TPU_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2034  # read by the scripts that source this file
REPO_ROOT=$(cd "$TPU_SCRIPTS_DIR/.." && pwd)

# ---------------------------------------------------------------- settings
# Shared settings: environment first, flags parsed later override them.
# ZONE and PROJECT fall back to gcloud's own environment variables.
TPU_NAME=${TPU_NAME:-}
QUEUED_RESOURCE=${QUEUED_RESOURCE:-}
ZONE=${ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}
PROJECT=${PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
# Where the code lives on every worker; a relative path is relative to the
# remote user's home directory (ssh commands start there).
REMOTE_DIR=${REMOTE_DIR:-scalejax}
DRY_RUN=${DRY_RUN:-0}
# Extra gcloud flags for every `tpu-vm ssh` / `tpu-vm scp`, for example
# "--internal-ip" or "--tunnel-through-iap". Whitespace separated.
SSH_ARGS=()
if [[ -n ${TPU_SSH_ARGS:-} ]]; then
  read -r -a SSH_ARGS <<<"$TPU_SSH_ARGS"
fi

# Set by take_value / try_common_option for the caller's argument loop.
OPTVAL=
SHIFT_BY=1

# ---------------------------------------------------------------- messages
die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 2
}

fail() {
  printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 1
}

info() {
  printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
}

is_true() {
  case $1 in
    1 | [Tt]rue | TRUE | [Yy]es | YES | [Oo]n | ON) return 0 ;;
    0 | [Ff]alse | FALSE | [Nn]o | NO | [Oo]ff | OFF | '') return 1 ;;
    *) die "expected a boolean (1/0, true/false, yes/no), got '$1'" ;;
  esac
}

# ---------------------------------------------------------------- quoting
# shquote ARG: ARG quoted for a POSIX shell. Words made only of safe
# characters stay bare; anything else goes in single quotes, with each ' as
# '\''. Same rules as Python's shlex.quote.
shquote() {
  local s=$1 q="'\\''" r
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    r=${s//\'/$q}
    printf "'%s'" "$r"
  fi
}

# shjoin ARGS...: the arguments quoted and joined with single spaces.
shjoin() {
  local out='' a
  for a in "$@"; do
    out+="${out:+ }$(shquote "$a")"
  done
  printf '%s' "$out"
}

# ---------------------------------------------------------------- running
# run CMD ARGS...: print the command; run it unless --dry-run.
# With --dry-run the command goes to stdout as "+ CMD"; otherwise the same
# trace goes to stderr and the command runs.
run() {
  if is_true "$DRY_RUN"; then
    printf '+ %s\n' "$(shjoin "$@")"
  else
    printf '+ %s\n' "$(shjoin "$@")" >&2
    "$@"
  fi
}

# note TEXT: a comment line in --dry-run output (stdout), or info otherwise.
note() {
  if is_true "$DRY_RUN"; then
    printf '# %s\n' "$*"
  else
    info "$*"
  fi
}

# tpu_ssh WORKER REMOTE_COMMAND [GCLOUD_FLAGS...]: run a shell command on
# one worker (0, 1, ...) or on all of them at once (WORKER=all).
tpu_ssh() {
  local worker=$1 command=$2
  shift 2
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" \
    --zone="$ZONE" --project="$PROJECT" --worker="$worker" \
    ${SSH_ARGS[@]+"${SSH_ARGS[@]}"} "$@" --command="$command"
}

# tpu_scp_to_all LOCAL_FILE REMOTE_PATH: copy one file to every worker.
tpu_scp_to_all() {
  run gcloud compute tpus tpu-vm scp "$1" "$TPU_NAME:$2" \
    --zone="$ZONE" --project="$PROJECT" --worker=all \
    ${SSH_ARGS[@]+"${SSH_ARGS[@]}"}
}

# ---------------------------------------------------------------- options
# take_value "$@": the value of an option given as "--opt VALUE" or
# "--opt=VALUE"; sets OPTVAL and SHIFT_BY.
take_value() {
  case $1 in
    --*=*)
      OPTVAL=${1#*=}
      SHIFT_BY=1
      ;;
    *)
      (($# >= 2)) || die "$1 needs a value"
      OPTVAL=$2
      SHIFT_BY=2
      ;;
  esac
}

# try_common_option "$@": parse one shared option at the front of "$@".
# Returns 1 (and consumes nothing) when the option is not a shared one.
# Calls the script's own `usage` function for -h/--help.
try_common_option() {
  # shellcheck disable=SC2034  # read by the caller's argument loop
  SHIFT_BY=1
  case $1 in
    --name | --name=* | --tpu-name | --tpu-name=*)
      take_value "$@"
      TPU_NAME=$OPTVAL
      ;;
    --queued-resource | --queued-resource=*)
      take_value "$@"
      QUEUED_RESOURCE=$OPTVAL
      ;;
    --zone | --zone=*)
      take_value "$@"
      ZONE=$OPTVAL
      ;;
    --project | --project=*)
      take_value "$@"
      PROJECT=$OPTVAL
      ;;
    --remote-dir | --remote-dir=*)
      take_value "$@"
      REMOTE_DIR=$OPTVAL
      ;;
    --ssh-arg | --ssh-arg=*)
      take_value "$@"
      SSH_ARGS+=("$OPTVAL")
      ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) return 1 ;;
  esac
}

# parse_common_option "$@": like try_common_option, but an unknown option
# is an error.
parse_common_option() {
  if ! try_common_option "$@"; then
    case $1 in
      -*) die "unknown option '$1' (see $SCRIPT_NAME --help)" ;;
      *) die "unexpected argument '$1' (see $SCRIPT_NAME --help)" ;;
    esac
  fi
}

# common_help: the shared part of every script's --help.
common_help() {
  cat <<'EOF'
Common options (flags override the environment variable in brackets):
  --name NAME            TPU VM name, also its queued resource's node id [TPU_NAME]
  --zone ZONE            e.g. us-east5-a [ZONE, else CLOUDSDK_COMPUTE_ZONE]
  --project PROJECT      Google Cloud project id [PROJECT, else CLOUDSDK_CORE_PROJECT]
  --queued-resource ID   queued resource id; default: the TPU name [QUEUED_RESOURCE]
  --remote-dir DIR       code directory on each worker, relative to the remote
                         home directory unless absolute; default: scalejax [REMOTE_DIR]
  --ssh-arg FLAG         extra gcloud flag for tpu-vm ssh/scp, repeatable, e.g.
                         --ssh-arg=--internal-ip [TPU_SSH_ARGS, space separated]
  --dry-run              print the commands ("+ ..." lines on stdout), run nothing
  -h, --help             show this help
EOF
}

# ---------------------------------------------------------------- checks
# require_settings VAR:--flag ...: one error line listing every empty one.
require_settings() {
  local spec var flag missing=()
  for spec in "$@"; do
    var=${spec%%:*}
    flag=${spec#*:}
    if [[ -z ${!var:-} ]]; then
      missing+=("$flag (or env $var)")
    fi
  done
  if ((${#missing[@]})); then
    local joined
    joined=$(printf '%s, ' "${missing[@]}")
    die "missing setting: pass ${joined%, }"
  fi
}

# require_target: the settings every gcloud call needs.
require_target() {
  require_settings TPU_NAME:--name ZONE:--zone PROJECT:--project
  QUEUED_RESOURCE=${QUEUED_RESOURCE:-$TPU_NAME}
  [[ -n $REMOTE_DIR ]] || die "--remote-dir (REMOTE_DIR) must not be empty"
}

# check_run_name NAME: run names become file names on the workers.
check_run_name() {
  [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
    die "bad run name '$1': use letters, digits, '.', '_' and '-'"
}

check_uint() {
  [[ $2 =~ ^[0-9]+$ ]] || die "$1 needs a whole number of seconds, got '$2'"
}
