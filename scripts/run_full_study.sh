#!/usr/bin/env bash
# The full-budget reproduction: 2000 steps, 5 seeds, LR-tuned baselines. Resumable: the
# harness skips finished trials, so rerun the same command to continue after a stop.
#
#   bash scripts/run_full_study.sh runs/full [STAGE ...]
#
# Stages, in the order that puts what matters most first (default: all of them):
#   sweep     LR sweep (seed 0) of baseline, no_scale and unified on both corpora
#   pre       Pre-Norm suite on tinyshakespeare at the baseline's best LR; no_scale and
#             unified also at their own best LR (removal "after retuning")
#   sandwich  IWD where Output-Norms exist: sandwich placement + QK-norm, decay policies
#             none/all/iwd at optimizer.scale_decay in $SCALE_DECAYS (each corpus)
#   qk        DNP against QK-norm: baseline@qk, dnp@qk, unified@qk, DNP on v/gate/up only
#             (each corpus)
#   stdlib    the Pre-Norm suite on the Python-stdlib corpus
#   post      Post-Norm on tinyshakespeare: baseline, no_scale, decay policies, unified_nohg
#   batch     global batch 12/48/192 at a fixed token budget (3 seeds): baseline,
#             no_scale, unified; LR scaled by the square root of the batch ratio (Adam),
#             warmup kept at the same number of tokens
# After the stages, `python -m scalejax.studies.claims --out OUT` writes the claims table
# (`--out docs/results/full --results docs/RESULTS.md`: from the published studies, and
# the report's copy of the table too).
# Every stage needs the sweep's winners: it reads them from OUT/sweep_<corpus>/summary.json
# (or the published one, below) and refuses to go on if a winner sits at the edge of the
# grid (widen $LRS and rerun).
# The trial folders under OUT are not committed; what is, $PUBLISHED/<stage folder>/
# (results.md, summary.json, plots), is enough to go on: each study restores the trials
# that its published summary lists instead of training them again (--restore), and
# after each study its results are copied there, to commit. A study on a fresh machine
# thus resumes where the committed results stopped.
# Env: PARALLEL (2: two trials at once, each pinned to half the CPUs; on a 2-core CPU
# that gave 1.39x the throughput of one trial on both cores), SEEDS (0,1,2,3,4),
# LRS (2.5e-4,5e-4,1e-3,2e-3,4e-3,8e-3: at 5e-4 unified's best sat at the lower edge),
# SCALE_DECAYS (0.1 0.3 1.0), CORPORA of the sandwich and qk stages (shakespeare_char
# study_stdlib), BATCH_SEEDS (0,1,2), PUBLISHED (docs/results/full),
# PUBLISH_ONLY (1: train nothing; publish what each named stage has finished, with what
# its published copy already listed: how a stopped study's trials reach a commit).
set -euo pipefail
OUT=${1:-runs/full}
shift || true
STAGES=${*:-sweep pre sandwich qk stdlib post batch}
PARALLEL=${PARALLEL:-2}
PUBLISH_ONLY=${PUBLISH_ONLY:-0}
SEEDS=${SEEDS:-0,1,2,3,4}
LRS=${LRS:-2.5e-4,5e-4,1e-3,2e-3,4e-3,8e-3}
SCALE_DECAYS=${SCALE_DECAYS:-0.1 0.3 1.0}
CORPORA=${CORPORA:-shakespeare_char study_stdlib}
BATCH_SEEDS=${BATCH_SEEDS:-0,1,2}
PUBLISHED=${PUBLISHED:-docs/results/full}
SHAKESPEARE=configs/shakespeare_char.py
COMMON=(--suite full --set train.sample_tokens=0 --set checkpoint.every=500 --parallel "$PARALLEL")
# Most-asked first: trials run in this order, so a stopped study has these cells first
PRE=baseline,no_scale,unified,dnp,hg,dp,magdir,magdir_unit,unified_nohg,unified_frozen

# study NAME ARGS...: one study in OUT/NAME. A run another stage already finished (same
# command but for its folder, e.g. seed 0 of the sweep's winner) is copied, and one its
# published copy lists is restored: neither is trained again.
study() {
  local name=$1 restore=() only=()
  shift
  if [[ -d $PUBLISHED/$name ]]; then
    restore=(--restore "$PUBLISHED/$name")
  fi
  if [[ $PUBLISH_ONLY == 1 ]]; then
    [[ -d $OUT/$name/trials ]] || { echo "$name: no trials here, nothing to publish"; return; }
    only=(--aggregate_only)
  fi
  python -m scalejax.studies.ablation "${COMMON[@]}" --out "$OUT/$name" \
    --reuse "$(find "$OUT" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | sort | paste -sd, -)" \
    "${restore[@]}" "${only[@]}" "$@"
  mkdir -p "$PUBLISHED/$name"
  if [[ ! "$OUT/$name" -ef "$PUBLISHED/$name" ]]; then
    cp "$OUT/$name/results.md" "$OUT/$name/summary.json" "$PUBLISHED/$name/"
    find "$OUT/$name" -maxdepth 1 -name '*.png' -exec cp {} "$PUBLISHED/$name/" \;
  fi
}

# best VARIANT CORPUS: the LR with the lowest final eval loss in that corpus's sweep
# (this machine's, else the published one)
best() {
  local path=$OUT/sweep_$2/summary.json
  [[ -f $path ]] || path=$PUBLISHED/sweep_$2/summary.json
  python - "$path" "$1" "$LRS" <<'PY'
import json, os, sys
path, variant, grid = sys.argv[1], sys.argv[2], [float(x) for x in sys.argv[3].split(',')]
if not os.path.exists(path):
  sys.exit(f'{path}: no such file: run the sweep stage first')
summary = json.load(open(path))['summary']
losses = {float(g.split('-lr')[1].split('@')[0]): r[variant]['mean']
          for g, r in summary.items() if variant in r}
missing = [lr for lr in grid if lr not in losses]
if missing:
  sys.exit(f'{path}: {variant} has no result at lr {missing}: run the sweep stage first')
lr = min(losses, key=losses.get)
if lr in (min(grid), max(grid)):
  sys.exit(f'{path}: the best lr of {variant} is {lr:g}, at the edge of the grid {grid}: '
           'widen LRS and rerun the sweep stage')
print(f'{lr:g}')
PY
}

# pre_norm_suite CORPUS: the Pre-Norm suite at the baseline's best LR, then no_scale and
# unified (each with the baseline) at their own best LR
pre_norm_suite() {
  local lr own v
  lr=$(best baseline "$1")
  study "pre_$1" --config "configs/$1.py" --variants $PRE --seeds "$SEEDS" --lrs "$lr"
  for v in no_scale unified; do
    own=$(best $v "$1")
    study "retuned_${v}_$1" --config "configs/$1.py" --variants baseline,$v \
      --seeds "$SEEDS" --lrs "$own"
  done
}

for stage in $STAGES; do
  echo "== $stage $(date -u +%T)"
  case $stage in
    sweep)
      for c in shakespeare_char study_stdlib; do
        study "sweep_$c" --config configs/$c.py --variants baseline,no_scale,unified \
          --seeds 0 --lrs "$LRS"
      done ;;
    pre) pre_norm_suite shakespeare_char ;;
    sandwich)
      for c in $CORPORA; do
        lr=$(best baseline "$c")
        for wd in $SCALE_DECAYS; do
          study "sandwich_${c}_wd$wd" --config "configs/$c.py" --set optimizer.scale_decay="$wd" \
            --variants baseline@sandwich,decay_all@sandwich,decay_iwd@sandwich --seeds "$SEEDS" --lrs "$lr"
        done
      done ;;
    qk)
      for c in $CORPORA; do
        lr=$(best baseline "$c")
        study "qk_$c" --config "configs/$c.py" \
          --variants baseline@qk,dnp@qk,unified@qk,dnp,dnp_no_qk --seeds "$SEEDS" --lrs "$lr"
      done ;;
    stdlib) pre_norm_suite study_stdlib ;;
    post)
      lr=$(best baseline shakespeare_char)
      study post_shakespeare_char --config $SHAKESPEARE --seeds "$SEEDS" --lrs "$lr" \
        --variants baseline@post,no_scale@post,decay_all@post,decay_iwd@post,unified_nohg@post ;;
    batch)
      lr=$(best baseline shakespeare_char)
      for b in 12 48 192; do
        steps=$((2000 * 12 / b)); warm=$((100 * 12 / b))
        blr=$(python -c "print(f'{$lr * ($b / 12) ** 0.5:g}')")
        study "batch$b" --config $SHAKESPEARE --variants baseline,no_scale,unified \
          --seeds "$BATCH_SEEDS" --lrs "$blr" --set train.batch_size=$b --set train.steps=$steps \
          --set optimizer.warmup_steps=$warm --set train.eval_every=$((steps / 8))
      done ;;
    *) echo "unknown stage $stage; valid: sweep pre sandwich qk stdlib post batch" >&2; exit 2 ;;
  esac
done
echo "== claims $(date -u +%T)"
# The claims table across the stages (what has run so far): OUT/claims.{md,json,png}
python -m scalejax.studies.claims --out "$OUT"
echo "== done $(date -u +%T)"
