"""The largest functions of the product's packages: lines and cyclomatic complexity (McCabe), largest first.

    .venv/bin/python tools/function_sizes.py [--top N] [PATH …]   # default: anexa_core, cli, serve

Lines are the function's source lines (decorators and docstring included); complexity counts 1 plus each
branch point (if/elif, loops, except, boolean operators, comprehension conditions, match cases), as
mccabe and ruff's C901 do. The project's rule (issue 20): none above ~60 lines or complexity ~15
without a comment saying why.
"""

import argparse
import ast
from pathlib import Path

DEFAULT = ["anexa_core", "cli/anexa_cli", "serve/anexa_serve"]


def complexity(node: ast.AST) -> int:
    score = 1
    for child in ast.walk(node):
        if child is not node and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(child, ast.If | ast.For | ast.While | ast.AsyncFor | ast.ExceptHandler | ast.IfExp | ast.With):
            score += 1 if not isinstance(child, ast.With) else 0
        elif isinstance(child, ast.BoolOp):
            score += len(child.values) - 1
        elif isinstance(child, ast.comprehension):
            score += 1 + len(child.ifs)
        elif isinstance(child, ast.match_case):
            score += 1
    return score


def functions(paths: list[str]):
    for root in paths:
        for path in sorted(Path(root).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                    yield path, node.name, node.end_lineno - start + 1, complexity(node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=DEFAULT)
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    found = list(functions(args.paths))
    print(f"{'lines':>5} {'complexity':>10}  function")
    for path, name, lines, score in sorted(found, key=lambda f: (-f[2], -f[3]))[: args.top]:
        print(f"{lines:5} {score:10}  {path}:{name}")
    print("\nmost complex:")
    for path, name, lines, score in sorted(found, key=lambda f: (-f[3], -f[2]))[: args.top]:
        print(f"{lines:5} {score:10}  {path}:{name}")


if __name__ == "__main__":
    main()
