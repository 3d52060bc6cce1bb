# Sourced by gpu_check.sh: the seed model's 5000 steps on Sherlock, a training run through the Triton
# kernel, and `anexa bench` on the GPU. Uses stage/note/$OUT/$PY from gpu_check.sh; writes
# gpu_train.log, seed_metrics.jsonl and bench_attention.json under $OUT.
DATA=${ANEXA_GPU_DATA:-.gpudata/sherlock.txt}
RUNS=$(mktemp -d)
ANEXA="$PY -m anexa_cli"  # works with pip install -e . and with the PYTHONPATH fallback alike
LOG="$OUT/gpu_train.log"

stage "anexa train: seed preset, 5000 steps on Sherlock (limit 90 s)"
timeout -k 5 90 $ANEXA train --data "$DATA" --steps 5000 --eval-every 500 --save-every 5000 \
  --out "$RUNS/seed" --device cuda >>"$LOG" 2>&1
note "seed training: exit $?"
cp "$RUNS/seed/metrics.jsonl" "$OUT/seed_metrics.jsonl" 2>/dev/null
tail -n 3 "$OUT/seed_metrics.jsonl" 2>/dev/null
echo "--- sample (200 tokens, temperature 0.8, seed 0):"
$ANEXA generate "Sherlock Holmes" -n 200 --temperature 0.8 --seed 0 --model "$RUNS/seed" 2>&1 | tee -a "$LOG"

stage "anexa train --attention triton: small preset, 200 steps (limit 50 s)"
timeout -k 5 50 $ANEXA train --data "$DATA" --preset small --attention triton --steps 200 --eval-every 100 \
  --out "$RUNS/triton" --device cuda >>"$LOG" 2>&1
note "triton training: exit $?"
grep -h '"step"' "$RUNS/triton/metrics.jsonl" 2>/dev/null

stage "anexa bench on the GPU (limit 95 s)"
timeout -k 5 40 $ANEXA bench --device cuda --dtype bfloat16 --seq 1024,4096 --batch 8 --heads 16 --head-dim 64 \
  --json "$OUT/bench_attention.json" 2>&1 | tee -a "$LOG"
timeout -k 5 30 $ANEXA bench train --preset small --device cuda 2>&1 | tee -a "$LOG"
timeout -k 5 25 $ANEXA bench generate --preset small --device cuda --prompt-len 128 --new-tokens 128 2>&1 | tee -a "$LOG"
