#!/usr/bin/env bash
# The one prepared GPU check (H100/H200, no network), run from the repo root: `bash benchmarks/gpu_check.sh`.
# Carry `.gpudata` (sherlock.txt; smol.json from `python benchmarks/random_weights.py describe RUN
# .gpudata/smol.json`) and `.whl` (wheels the GPU image lacks: fastapi, uvicorn, pydantic, gguf...).
# Stages, most important first, each under its own time limit so the whole stays under ~8 minutes and
# every stage runs even if an earlier one failed:
#   training (gpu_train.sh): the seed job (5000 steps), `anexa bench train`
#   attention: `anexa bench` (default SDPA, flash, cuDNN, Triton), the CUDA kernel tests, the kernel variants
#   pretrained (gpu_pretrained.sh): a 135M model's LoRA / full fine-tune tokens/s, serve at 1 and 16 streams
# Logs and tables go to $OUT (default ./gpu_out); the summary prints last. GPU_CHECK_ONLY=training,attention
# picks stages; GPU_CHECK_QUICK=1 and the *_S variables below shorten a rerun.
set -u

START=$(date +%s)
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
elapsed() { echo $(( $(date +%s) - START )); }
stage() { printf '\n=== %s (at %ss) ===\n' "$1" "$(elapsed)"; }
STATUS=""
note() { STATUS="$STATUS$1"$'\n'; echo "$1"; }
ONLY=${GPU_CHECK_ONLY:-training,attention,pretrained}  # a rerun can pick stages
wanted() { [[ ",$ONLY," == *",$1,"* ]]; }

stage "install (no network)"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/install.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
    && note "install: carried wheels into /tmp/site" || note "install: carried wheels FAILED (see install.log)"
fi
if $PY -m pip install --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1 \
    && $PY -c "import anexa_core, anexa_kernels, anexa_plugins, anexa_serve" >>"$OUT/install.log" 2>&1; then
  note "install: pip install -e . ok"
else
  note "install: pip install -e . FAILED (see install.log)"
fi
ANEXA="$PY -m anexa_cli"

stage "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || note "nvidia-smi: FAILED"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'cudnn', torch.backends.cudnn.version())" \
  || note "torch/triton/CUDA check: FAILED"

if wanted training; then
  source benchmarks/gpu_train.sh
fi

if wanted attention; then
  if [ -z "${GPU_CHECK_QUICK:-}" ]; then
    stage "anexa bench: SDPA default, flash, cuDNN and Triton, causal bf16 (limit 100 s)"
    timeout -k 5 100 $ANEXA bench --device cuda --dtype bfloat16 --seq 1024,4096,8192 --head-dim 64,128 \
      --batch 4 --heads 16 --repeats 10 \
      --attention sdpa --attention sdpa:backend=flash --attention sdpa:backend=cudnn --attention triton \
      --json "$OUT/bench_attention.json" 2>&1 | tee "$OUT/bench_attention.log"
    note "anexa bench attention: exit ${PIPESTATUS[0]}"
  fi

  stage "kernel tests on CUDA (limit ${KERNEL_TEST_S:-120} s)"
  # SIGINT on timeout: pytest still prints its summary of what ran.
  ANEXA_TEST_CUDA=1 timeout -s INT -k 10 "${KERNEL_TEST_S:-120}" $PY -m pytest tests/test_kernels.py \
    tests/test_kernels_fused_backward.py ${KERNEL_TEST_K:+-k "$KERNEL_TEST_K"} -q -ra -n0 --durations=10 \
    -p no:cacheprovider >"$OUT/kernel_tests.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/kernel_tests.log"
  note "kernel tests: exit $rc"

  stage "kernel variants: 3-pass vs fused backward against SDPA flash/cuDNN/default (limit ${VARIANTS_S:-110} s)"
  timeout -k 10 "${VARIANTS_S:-110}" $PY benchmarks/attention_gpu.py --variants --out "$OUT/variants.md" \
    --budget-s $(( ${VARIANTS_S:-110} - 30 )) 2>&1 | tee "$OUT/attention_gpu.log"
  note "kernel variants: exit ${PIPESTATUS[0]}"
fi

if wanted pretrained; then
  source benchmarks/gpu_pretrained.sh
fi

stage "summary"
printf '%s' "$STATUS"
echo "total $(elapsed) s"
