"""Per-file counts of a mutmut run: killed, survived, not reached by the selected tests, timed out, not run.

    .venv/bin/python tools/mutmut_scores.py [FILE …]      # e.g. anexa_core/training plugins/anexa_plugins/samplers

Reads mutmut's own records (``mutants/**/*.py.meta``: the exit code of the test run per mutant; 0 means no
test failed), so it works while a run is in progress. The score is killed / (killed + survived).
"""

import json
import sys
from collections import Counter
from pathlib import Path

OUTCOMES = {0: "survived", 1: "killed", 33: "no tests", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout"}


def main(wanted: list[str]) -> None:
    print(f"{'file':28} {'killed':>7} {'survived':>9} {'no tests':>9} {'timeout':>8} {'not run':>8} {'score':>7}")
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        name = str(meta.relative_to("mutants")).removesuffix(".py.meta")
        if wanted and name not in wanted:
            continue
        codes = json.loads(meta.read_text())["exit_code_by_key"].values()
        counts = Counter("not run" if code is None else OUTCOMES.get(code, f"exit {code}") for code in codes)
        if not codes or (not wanted and counts["not run"] == len(codes)):
            continue
        judged = counts["killed"] + counts["survived"]
        score = f"{counts['killed'] / judged:.1%}" if judged else "—"
        print(
            f"{name:28} {counts['killed']:7} {counts['survived']:9} {counts['no tests']:9} {counts['timeout']:8} "
            f"{counts['not run']:8} {score:>7}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
