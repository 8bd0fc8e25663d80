#!/usr/bin/env bash
# The reduced reproduction in docs/RESULTS.md, end to end, resumable (rerun to continue).
#
#   STEPS=300 SEEDS=0,1,2 PARALLEL=2 bash scripts/run_study.sh runs/study
#
# Per corpus: (1) the tuning protocol: an LR sweep of the baseline alone (seed 0), the
# lowest final eval loss wins; (2) the suite at that one LR for every variant and seed.
# Env: STEPS, SEEDS, PARALLEL, LRS (sweep grid), VARIANTS (subset of the paper suite),
# POST_VARIANTS (Post-Norm subset), OPTIMIZERS, SCHEDULES, CORPORA; LR=<value> skips the
# sweep and uses that LR for every variant.
set -euo pipefail
OUT=${1:-runs/study}
STEPS=${STEPS:-300}
SEEDS=${SEEDS:-0,1,2}
PARALLEL=${PARALLEL:-2}
LRS=${LRS:-1e-3,2e-3,4e-3,8e-3}
VARIANTS=${VARIANTS:-baseline,no_scale,decay_all,decay_none,decay_iwd,hg,dp,dnp,magdir,magdir_unit,unified}
POST_VARIANTS=${POST_VARIANTS-baseline@post,no_scale@post}
OPTIMIZERS=${OPTIMIZERS:-adamw}
SCHEDULES=${SCHEDULES:-cosine}
CORPORA=${CORPORA:-shakespeare_char study_stdlib}
COMMON=(--set train.steps=$STEPS --set train.eval_every=$((STEPS / 5)) --set data.eval_batches=32
        --set checkpoint.every=100000 --set train.log_every=50 --set train.sample_tokens=0
        --parallel $PARALLEL --optimizers $OPTIMIZERS --schedules $SCHEDULES)

for corpus in $CORPORA; do
  out=$OUT/$corpus
  mkdir -p $out
  if [ -n "${LR:-}" ]; then best=$LR; else
  echo "== $corpus: LR sweep of the baseline ($LRS), seed 0 == $(date -u +%T)"
  python -m scalejax.studies.ablation --config configs/$corpus.py --out $out --suite paper_post \
      --variants baseline --seeds 0 --lrs $LRS "${COMMON[@]}" > $out.sweep.log
  best=$(python - "$out" <<'PY'
import json, sys
s = json.load(open(sys.argv[1] + '/summary.json'))['summary']
print(min(((g, r['baseline']['mean']) for g, r in s.items()), key=lambda x: x[1])[0]
      .split('-lr')[1].split('@')[0])
PY
)
  echo "   best lr $best"; cp $out/results.md $out/sweep.md
  fi
  echo "== $corpus: suite at lr $best == $(date -u +%T)"
  python -m scalejax.studies.ablation --config configs/$corpus.py --out $out --suite paper_post \
      --variants $VARIANTS,$POST_VARIANTS --seeds $SEEDS --lrs $best "${COMMON[@]}"
done
echo "== done $(date -u +%T)"
