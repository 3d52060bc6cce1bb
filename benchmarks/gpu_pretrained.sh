# Sourced by gpu_check.sh: a 135M pretrained architecture on the GPU. SmolLM2-135M-Instruct's GGUF (98 MB)
# exceeds what the GPU machine can be sent, so the run is rebuilt there from `.gpudata/smol.json` (its
# metadata: config, tokenizer, chat template) with random weights (benchmarks/random_weights.py): speed
# does not depend on the weights' values. LoRA and full fine-tune tokens/s (steps.jsonl), then decode
# tokens/s through `anexa serve` with 1 and 16 concurrent streams. Writes pretrained.log, serve_load.json.
DATA=${ANEXA_GPU_DATA:-.gpudata/sherlock.txt}
PRE=$(mktemp -d)
PLOG="$OUT/pretrained.log"

stage "135M run with random weights"
$PY benchmarks/random_weights.py build .gpudata/smol.json "$PRE/smol" 2>&1 | tee -a "$PLOG"

for kind in lora full; do
  stage "fine-tune 135M, $kind, ${FT_STEPS:-100} steps of 16 x 512 tokens (limit ${FT_S:-75} s)"
  extra=()
  [ "$kind" = lora ] && extra=(--lora r=16,alpha=32,dropout=0.05)
  timeout -k 5 "${FT_S:-75}" $ANEXA train --init-from "$PRE/smol" "${extra[@]}" --data "$DATA" \
    --steps "${FT_STEPS:-100}" --batch-size 16 --seq-len 512 --eval-every "${FT_STEPS:-100}" --save-every "${FT_STEPS:-100}" --out "$PRE/$kind" --device cuda >>"$PLOG" 2>&1
  note "fine-tune $kind: exit $?"
  tail -n 3 "$PRE/$kind/steps.jsonl" 2>/dev/null
  cp "$PRE/$kind/steps.jsonl" "$OUT/finetune_${kind}_steps.jsonl" 2>/dev/null
done

stage "anexa serve on cuda, 135M: 1 and 16 concurrent streams (limit ${SERVE_S:-120} s)"
timeout -k 5 "${SERVE_S:-120}" $PY benchmarks/serve_load.py --model "$PRE/smol" --device cuda --threads 0 --clients 1,16 \
  --requests "${SERVE_REQUESTS:-2}" --tokens 128 --parallel 16 --json "$OUT/serve_load.json" 2>&1 | tee -a "$PLOG"
note "serve load: exit ${PIPESTATUS[0]}"
