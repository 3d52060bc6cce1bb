# Sourced by gpu_check.sh: the seed job (5000 steps on Sherlock) and `anexa bench train`. Uses
# stage/note/$OUT/$PY/$ANEXA from gpu_check.sh; writes gpu_train.log, seed_metrics.jsonl, seed_steps.jsonl.
DATA=${ANEXA_GPU_DATA:-.gpudata/sherlock.txt}
RUNS=$(mktemp -d)
LOG="$OUT/gpu_train.log"

stage "anexa train: seed preset, 5000 steps on Sherlock (limit 75 s)"
seed_start=$(date +%s%N)
timeout -k 5 75 $ANEXA train --data "$DATA" --steps 5000 --eval-every 500 --save-every 5000 \
  --out "$RUNS/seed" --device cuda >>"$LOG" 2>&1
rc=$?
note "seed training: exit $rc, $(( ($(date +%s%N) - seed_start) / 1000000 )) ms wall (the whole command)"
cp "$RUNS/seed/metrics.jsonl" "$OUT/seed_metrics.jsonl" 2>/dev/null
cp "$RUNS/seed/steps.jsonl" "$OUT/seed_steps.jsonl" 2>/dev/null
cat "$OUT/seed_metrics.jsonl" 2>/dev/null
echo "--- sample (200 tokens, temperature 0.8, seed 0):"
$ANEXA generate "Sherlock Holmes" -n 200 --temperature 0.8 --seed 0 --model "$RUNS/seed" --device cuda 2>&1 | tee -a "$LOG"

if [ -z "${GPU_CHECK_QUICK:-}" ]; then
  stage "anexa bench train: seed and small presets (limit 60 s)"
  timeout -k 5 30 $ANEXA bench train --preset seed --device cuda 2>&1 | tee -a "$LOG"
  timeout -k 5 30 $ANEXA bench train --preset small --device cuda 2>&1 | tee -a "$LOG"
fi
