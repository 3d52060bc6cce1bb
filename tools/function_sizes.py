"""The largest functions of the product's packages: body lines and cyclomatic complexity (McCabe), largest first.

    .venv/bin/python tools/function_sizes.py [--top N] [PATH …]   # default: anexa_core, cli, serve
    .venv/bin/python tools/function_sizes.py --check [PATH …]      # the rule below; exit 1 if broken

A function's body lines run from its first statement after the docstring to its last line: decorators,
the signature (a typer command declares each option there, with its help, in a long parameter list that is
a table of options rather than logic) and the docstring do not count. Complexity counts 1 plus each branch
point: if/elif, loops, except and match cases, as mccabe and ruff's C901 do, and also boolean operators,
conditional expressions and comprehension clauses, which they leave out (so this flags functions C901
passes). A nested function's branches count toward the function that holds it.

The project's rule (issue 20): no function above 60 body lines or complexity 15 without a comment saying
why. ``--check`` lists every function that breaks it: one is justified by a comment line inside it (after
its ``def`` line, outside any function nested in it) that starts ``# Why long:`` or ``# Why complex:`` and
goes on to give a reason of a few words.
"""

import argparse
import ast
import re
import sys
import tokenize
from pathlib import Path

DEFAULT = ["anexa_core", "cli/anexa_cli", "serve/anexa_serve"]
MAX_LINES, MAX_COMPLEXITY = 60, 15
WHY = re.compile(r"#\s*Why (long|complex):\s*\S+\s+\S+\s+\S+")  # the tag, then a reason of 3 words or more

Function = ast.FunctionDef | ast.AsyncFunctionDef


def complexity(node: ast.AST) -> int:
    score = 1
    for child in ast.walk(node):
        if isinstance(child, ast.If | ast.For | ast.While | ast.AsyncFor | ast.ExceptHandler | ast.IfExp):
            score += 1
        elif isinstance(child, ast.BoolOp):
            score += len(child.values) - 1
        elif isinstance(child, ast.comprehension):
            score += 1 + len(child.ifs)
        elif isinstance(child, ast.match_case):
            score += 1
    return score


def body_lines(node: Function) -> int:
    first = node.body[1] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body[0]
    return (node.end_lineno or node.lineno) - first.lineno + 1


def justified(node: Function, why_lines: list[int]) -> bool:
    """Whether a ``# Why …:`` comment lies inside ``node`` and not inside a function nested in it."""
    nested = [(n.lineno, n.end_lineno or n.lineno) for n in ast.walk(node) if n is not node and isinstance(n, Function)]
    return any(
        node.lineno < line <= (node.end_lineno or 0) and not any(a <= line <= b for a, b in nested)
        for line in why_lines
    )


def functions(paths: list[str]):
    """Each function of the ``.py`` files under ``paths``: path, name, body lines, complexity, justified."""
    for root in paths:
        for path in [Path(root)] if Path(root).is_file() else sorted(Path(root).rglob("*.py")):
            with tokenize.open(path) as file:
                source = file.read()
                file.seek(0)
                tokens = list(tokenize.generate_tokens(file.readline))
            why_lines = [t.start[0] for t in tokens if t.type == tokenize.COMMENT and WHY.match(t.string)]
            for node in ast.walk(ast.parse(source, str(path))):
                if isinstance(node, Function):
                    yield path, node.name, body_lines(node), complexity(node), justified(node, why_lines)


def check(found: list) -> int:
    broken = [f[:4] for f in found if (f[2] > MAX_LINES or f[3] > MAX_COMPLEXITY) and not f[4]]
    for path, name, lines, score in broken:
        print(f"{path}:{name}: {lines} body lines, complexity {score}")
    if broken:
        print(
            f"\n{len(broken)} function(s) above {MAX_LINES} body lines or complexity {MAX_COMPLEXITY} without a "
            "'# Why long:' or '# Why complex:' comment giving the reason (issue 20): add one, or split the function."
        )
        return 1
    print(f"OK: every function above {MAX_LINES} body lines or complexity {MAX_COMPLEXITY} says why.")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=DEFAULT)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--check", action="store_true", help="list the functions that break issue 20's rule")
    args = parser.parse_args()
    if missing := [path for path in args.paths if not Path(path).exists()]:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    found = list(functions(args.paths))
    if args.check:
        sys.exit(check(found))
    print(f"{'lines':>5} {'complexity':>10}  function")
    for path, name, lines, score, _ in sorted(found, key=lambda f: (-f[2], -f[3]))[: args.top]:
        print(f"{lines:5} {score:10}  {path}:{name}")
    print("\nmost complex:")
    for path, name, lines, score, _ in sorted(found, key=lambda f: (-f[3], -f[2]))[: args.top]:
        print(f"{lines:5} {score:10}  {path}:{name}")


if __name__ == "__main__":
    main()
