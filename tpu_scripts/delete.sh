#!/usr/bin/env bash
# Delete the queued resource and its TPU VM. See docs/TPU.md.

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

YES=${YES:-0}

usage() {
  cat <<'EOF'
Usage: delete.sh [options]

Delete the queued resource together with its TPU VM (--force), after asking
for confirmation on stdin. Everything on the workers' disks is lost: keep
checkpoints in a gs:// --workdir.

Options:
  -y, --yes     do not ask [YES=1]; without it, a closed stdin means no

EOF
  common_help
}

while (($#)); do
  case $1 in
    -y | --yes) YES=1 SHIFT_BY=1 ;;
    *) parse_common_option "$@" ;;
  esac
  shift "$SHIFT_BY"
done

require_target

if ! is_true "$YES" && ! is_true "$DRY_RUN"; then
  printf 'Delete queued resource %s and TPU VM %s (zone %s, project %s)? [y/N] ' \
    "$QUEUED_RESOURCE" "$TPU_NAME" "$ZONE" "$PROJECT" >&2
  answer=
  if ! read -r answer && [[ -z $answer ]]; then
    printf '\n' >&2
    fail "no answer on stdin; nothing deleted (pass --yes to delete without asking)"
  fi
  case $answer in
    [Yy] | [Yy][Ee][Ss]) ;;
    *) fail "not confirmed; nothing deleted" ;;
  esac
fi

# --force deletes the TPU VM first; --quiet because we already asked.
run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" \
  --zone="$ZONE" --project="$PROJECT" --force --quiet
