#!/usr/bin/env bash
# The one prepared GPU check (H100/H200, no network): install, GPU info, kernel tests on CUDA, then the
# Triton-vs-SDPA benchmark. Run from the repo root: `bash benchmarks/gpu_check.sh`. Results go to $OUT
# (default ./gpu_out): install.log, kernel_tests.log, attention_gpu.log, gpu_table.md.
# Every stage runs even if an earlier one failed; each has a time limit so the whole stays under ~6 min.
set -u

START=$(date +%s)
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
elapsed() { echo $(( $(date +%s) - START )); }
stage() { printf '\n=== %s (at %ss) ===\n' "$1" "$(elapsed)"; }
STATUS=""
note() { STATUS="$STATUS$1"$'\n'; echo "$1"; }

stage "install (no network)"
if $PY -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    && $PY -c "import anexa_core, anexa_kernels, anexa_plugins" >>"$OUT/install.log" 2>&1; then
  note "install: pip install -e . ok"
else
  # No setuptools or no pip: map the import names onto the folders, and give importlib.metadata a
  # dist-info with the entry points so the built-in plugins still load.
  LINKS=$(mktemp -d)
  ln -s "$PWD/anexa_core" "$LINKS/anexa_core"
  ln -s "$PWD/plugins" "$LINKS/anexa_plugins"
  ln -s "$PWD/kernels" "$LINKS/anexa_kernels"
  ln -s "$PWD/cli" "$LINKS/anexa_cli"
  $PY - "$LINKS" <<'PYEOF' >>"$OUT/install.log" 2>&1
import pathlib, sys, tomllib
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
info = pathlib.Path(sys.argv[1]) / f"anexa-{project['version']}.dist-info"
info.mkdir()
info.joinpath("METADATA").write_text(f"Metadata-Version: 2.1\nName: anexa\nVersion: {project['version']}\n")
lines = []
for group, entries in project.get("entry-points", {}).items():
    lines.append(f"[{group}]")
    lines += [f"{name} = {target}" for name, target in entries.items()]
lines += ["[console_scripts]"] + [f"{name} = {target}" for name, target in project.get("scripts", {}).items()]
info.joinpath("entry_points.txt").write_text("\n".join(lines) + "\n")
PYEOF
  export PYTHONPATH="$LINKS${PYTHONPATH:+:$PYTHONPATH}"
  anexa() { $PY -c "from anexa_cli.main import app; app()" "$@"; }  # stands in for the console script
  if $PY -c "import anexa_core, anexa_kernels, anexa_plugins" >>"$OUT/install.log" 2>&1; then
    note "install: pip failed (see install.log); using PYTHONPATH symlinks in $LINKS"
  else
    note "install: FAILED, packages do not import (see install.log)"
  fi
fi

stage "GPU"
nvidia-smi || note "nvidia-smi: FAILED"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  || note "torch/triton/CUDA check: FAILED"

stage "kernel tests on CUDA (limit 150 s)"
# SIGINT on timeout: pytest still prints its summary of what ran.
ANEXA_TEST_CUDA=1 timeout -s INT -k 10 150 $PY -m pytest tests/test_kernels.py -q -ra --durations=15 -p no:cacheprovider \
  >"$OUT/kernel_tests.log" 2>&1
rc=$?
tail -n 40 "$OUT/kernel_tests.log"
if [ $rc -eq 124 ]; then note "kernel tests: CUT at the 150 s limit (the log's summary shows what ran)"; else note "kernel tests: exit $rc"; fi

stage "attention benchmark (limit 130 s)"
timeout -k 10 130 $PY benchmarks/attention_gpu.py --out "$OUT/gpu_table.md" --budget-s 70 2>&1 | tee "$OUT/attention_gpu.log"
note "benchmark: exit ${PIPESTATUS[0]}"

# Training runs and `anexa bench` on the GPU.
source benchmarks/gpu_train.sh

stage "summary"
printf '%s' "$STATUS"
echo "total $(elapsed) s"
echo
cat "$OUT/gpu_table.md" 2>/dev/null || echo "(no gpu_table.md was written)"
