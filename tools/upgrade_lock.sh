#!/usr/bin/env bash
# Move constraints.txt (the versions the suite was last green with, which the README's set-up and .ci/run
# install) to the newest releases of every dependency: a fresh virtual environment installs the project
# without the constraints, runs the whole suite, and only when it passes is constraints.txt rewritten.
# It prints what changed, for the CHANGELOG.
#
#   tools/upgrade_lock.sh            # upgrade, test, rewrite constraints.txt on success
#   tools/upgrade_lock.sh --check    # upgrade and test, leave constraints.txt alone
#
# Early warning of an upstream release that breaks Anexa: run it before starting work on a new issue.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
check_only=${1:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
venv="$work/venv"

python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q -U pip
# torch stays at the pin the project needs (a newer one is a separate, deliberate change).
"$venv/bin/pip" install -q torch==2.13.0 -e ".[dev]" ./examples/anexa-topk ./examples/anexa-sliding
"$venv/bin/pip" freeze --exclude-editable | grep -v -i -E '^(anexa|anexa-topk|anexa-sliding|anexa_topk|anexa_sliding)( @|==)' \
    | sed -E 's/^(torch==[0-9.]+)\+cpu$/\1/' | sort -f > "$work/constraints.new"

echo "testing with the newest releases (this takes as long as the suite)…"
if ! "$venv/bin/python" -m pytest -q -p no:cacheprovider; then
    echo "the suite fails with the newest releases: constraints.txt is unchanged; see above" >&2
    exit 1
fi

{
    echo "# The versions the suite was last green with (tools/upgrade_lock.sh writes this file; do not edit by hand)."
    echo "# The README's set-up and .ci/run install with it: pip install -c constraints.txt …"
    cat "$work/constraints.new"
} > "$work/constraints.txt"

echo "changed releases:"
diff <(grep -v '^#' constraints.txt | sort -f) <(grep -v '^#' "$work/constraints.txt" | sort -f) \
    | sed -n -E 's/^< /  was: /p; s/^> /  now: /p' || true
if [ "$check_only" = "--check" ]; then
    echo "--check: constraints.txt left as it is"
else
    cp "$work/constraints.txt" constraints.txt
    echo "constraints.txt updated: note the changes in CHANGELOG.md"
fi
