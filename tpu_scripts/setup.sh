#!/usr/bin/env bash
# Copy this checkout to every worker of a TPU VM and install its Python
# dependencies there. See docs/TPU.md.

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SOURCE_DIR=${SOURCE_DIR:-$REPO_ROOT}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
JAX_VERSION=${JAX_VERSION:-}
DO_COPY=1
DO_INSTALL=1
BUNDLE_NAME=scalejax-bundle.tar.gz

usage() {
  cat <<'EOF'
Usage: setup.sh [options]

On every worker of the TPU VM at once:
  1. copy the local checkout: the files git tracks plus untracked files that
     .gitignore does not exclude (uncommitted edits included; .git, .venv,
     workdirs and other ignored paths left out), packed in one tarball,
     sent with `gcloud compute tpus tpu-vm scp --worker=all` and unpacked
     over --remote-dir (files deleted locally are not deleted there);
  2. make a virtualenv <remote-dir>/.venv with Python --python-version
     (through uv, installed with pip if missing) and install
     `-r requirements.txt` plus `jax[tpu]==X`, X being the `jax==X` pin of
     requirements.txt, so that the TPU build matches the pinned jax.

Run it again after changing code (--copy-only is enough when the
requirements did not change).

Options:
  --source DIR            checkout to copy; default: this repository [SOURCE_DIR]
  --python-version V      Python for the remote virtualenv; default 3.11 [PYTHON_VERSION]
  --jax-version X         override the version read from requirements.txt [JAX_VERSION]
  --copy-only             copy the code, install nothing
  --install-only          install only, do not copy the code

EOF
  common_help
  cat <<'EOF'

Example:
  setup.sh --name my-v5p --zone us-east5-a --project my-proj
EOF
}

while (($#)); do
  case $1 in
    --source | --source=*)
      take_value "$@"
      SOURCE_DIR=$OPTVAL
      ;;
    --python-version | --python-version=*)
      take_value "$@"
      PYTHON_VERSION=$OPTVAL
      ;;
    --jax-version | --jax-version=*)
      take_value "$@"
      JAX_VERSION=$OPTVAL
      ;;
    --copy-only) DO_INSTALL=0 SHIFT_BY=1 ;;
    --install-only) DO_COPY=0 SHIFT_BY=1 ;;
    *) parse_common_option "$@" ;;
  esac
  shift "$SHIFT_BY"
done

require_target
((DO_COPY || DO_INSTALL)) || die "--copy-only and --install-only together do nothing"
[[ -d $SOURCE_DIR ]] || die "source directory '$SOURCE_DIR' does not exist (--source / SOURCE_DIR)"
SOURCE_DIR=$(cd "$SOURCE_DIR" && pwd)

# pinned_jax_version FILE: X from a `jax==X` line ("jaxlib==" does not count).
pinned_jax_version() {
  sed -nE 's/^[[:space:]]*jax[[:space:]]*==[[:space:]]*([^[:space:];#]+).*$/\1/p' "$1" | sed -n 1p
}

if ((DO_INSTALL)) && [[ -z $JAX_VERSION ]]; then
  [[ -f $SOURCE_DIR/requirements.txt ]] || die "no requirements.txt in $SOURCE_DIR"
  JAX_VERSION=$(pinned_jax_version "$SOURCE_DIR/requirements.txt")
  [[ -n $JAX_VERSION ]] ||
    die "no 'jax==X' pin in $SOURCE_DIR/requirements.txt: pass --jax-version X or set JAX_VERSION"
fi

# list_source_files: NUL-separated paths (relative to SOURCE_DIR) to copy.
list_source_files() {
  if git -C "$SOURCE_DIR" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    local f
    git -C "$SOURCE_DIR" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do
        # Tracked files deleted in the work tree are still listed; skip them.
        if [[ -e $SOURCE_DIR/$f || -L $SOURCE_DIR/$f ]]; then
          printf '%s\0' "$f"
        fi
      done
  else
    (cd "$SOURCE_DIR" && find . \( -name .git -o -name .venv -o -name __pycache__ \) -prune \
      -o \( -type f -o -type l \) -print0)
  fi
}

remote_dir_q=$(shquote "$REMOTE_DIR")
bundle_q=$(shquote "$BUNDLE_NAME")

if ((DO_COPY)); then
  if is_true "$DRY_RUN"; then
    bundle=/tmp/scalejax-setup.XXXXXX/$BUNDLE_NAME
    note "bundle: the files of 'git ls-files --cached --others --exclude-standard' in $SOURCE_DIR"
    printf '+ %s\n' "$(shjoin tar -czf "$bundle" -C "$SOURCE_DIR" --null -T -)"
  else
    tmpdir=$(mktemp -d "${TMPDIR:-/tmp}/scalejax-setup.XXXXXX")
    trap 'rm -rf "$tmpdir"' EXIT
    bundle=$tmpdir/$BUNDLE_NAME
    list_source_files >"$tmpdir/files"
    [[ -s $tmpdir/files ]] || die "nothing to copy from $SOURCE_DIR"
    printf '+ %s\n' "$(shjoin tar -czf "$bundle" -C "$SOURCE_DIR" --null -T "$tmpdir/files")" >&2
    tar -czf "$bundle" -C "$SOURCE_DIR" --null -T "$tmpdir/files"
    info "bundle: $(tr -cd '\0' <"$tmpdir/files" | wc -c | tr -d ' ') files, $(du -h "$bundle" | cut -f1)"
  fi
  tpu_scp_to_all "$bundle" "$BUNDLE_NAME"
fi

# The remote command is one line: `set -e` stops a worker at its first error
# and gcloud then reports that worker's failure.
remote="set -e; mkdir -p $remote_dir_q"
if ((DO_COPY)); then
  remote+="; tar -xzf $bundle_q -C $remote_dir_q; rm -f $bundle_q"
fi
remote+="; cd $remote_dir_q"
if ((DO_INSTALL)); then
  jax_req_q=$(shquote "jax[tpu]==$JAX_VERSION")
  python_q=$(shquote "$PYTHON_VERSION")
  remote+="; if ! python3 -m uv --version >/dev/null 2>&1; then"
  remote+=" python3 -m pip install --user --quiet uv || python3 -m pip install --user --quiet --break-system-packages uv; fi"
  remote+="; python3 -m uv venv --allow-existing --python $python_q .venv"
  remote+="; python3 -m uv pip install --python .venv/bin/python -r requirements.txt $jax_req_q"
  remote+="; echo \"[\$(hostname)] ready: \$(.venv/bin/python -c 'import sys, jax; print(\"python\", sys.version.split()[0], \"jax\", jax.__version__)')\""
else
  remote+="; echo \"[\$(hostname)] code updated in \$PWD\""
fi

tpu_ssh all "$remote"
