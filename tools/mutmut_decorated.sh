#!/usr/bin/env bash
# Mutation testing of the functions mutmut skips: it never mutates a decorated function (see
# docs/testing.md), and two core ones are decorated with @torch.no_grad(): generation.generate_ids (the
# decoding loop) and training.estimate_loss (evaluation). This runs mutmut, with the project's
# [tool.mutmut] settings, on a copy of the working tree whose copies of those two functions lack the
# decorator — without it they compute the same values, only with autograd bookkeeping the tests do not
# look at — and prints the surviving mutants.
#
#   tools/mutmut_decorated.sh                 # both functions
#   tools/mutmut_decorated.sh --max-children 1
#
# The copy lives in ${ANEXA_MUTATE_DIR:-/tmp/anexa-undecorated}; its results stay there (`cd` into it and
# run `mutmut results` / `mutmut show NAME`). Run it niced on a shared machine.
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
copy=${ANEXA_MUTATE_DIR:-/tmp/anexa-undecorated}
mutmut="$repo/.venv/bin/mutmut"

rm -rf "$copy"
mkdir -p "$copy"
cd "$repo"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' path; do
    case "$path" in mutants/*) continue ;; esac         # mutmut's own copy of a run in the repository
    if [ -e "$path" ]; then cp --parents -- "$path" "$copy"; fi   # not files deleted in the working tree
done
for file in anexa_core/infer/generation.py anexa_core/train/loop.py; do
    grep -q '^@torch.no_grad()$' "$copy/$file" || { echo "no @torch.no_grad() left in $file: update $0" >&2; exit 1; }
    sed -i '/^@torch.no_grad()$/d' "$copy/$file"
done
# The tests read the books from ../shared/data of the repository, not of the copy.
if [ -z "${ANEXA_DATA_DIR:-}" ] && [ -d "$repo/../shared/data" ]; then
    ANEXA_DATA_DIR=$(cd "$repo/../shared/data" && pwd)
    export ANEXA_DATA_DIR
fi
cd "$copy"
"$mutmut" run "$@" "anexa_core.infer.generation.x_generate_ids__mutmut_*" "anexa_core.train.step.x_estimate_loss__mutmut_*"
"$mutmut" results | grep -E "x_(generate_ids|estimate_loss)__" || echo "no surviving mutants"
