"""The package's layout rules that ruff does not check: short functions."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"
MAX_LINES = 60


def function_lengths(path):
    """Yields (qualified name, first line, lines) for every function and method in one file.

    A function's lines run from its first decorator to its last line, docstring included.
    """
    tree = ast.parse(path.read_text(), filename=str(path))

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                name = f"{prefix}{child.name}"
                yield name, start, child.end_lineno - start + 1
                name += "."
            elif isinstance(child, ast.ClassDef):
                name = f"{prefix}{child.name}."
            yield from visit(child, name)

    yield from visit(tree, "")


def test_no_function_in_the_package_is_over_60_lines():
    files = sorted(PACKAGE.rglob("*.py"))
    assert files, f"no Python files under {PACKAGE}"
    too_long = [
        f"{path.relative_to(PACKAGE.parent)}:{line} {name} is {lines} lines"
        for path in files
        for name, line, lines in function_lengths(path)
        if lines > MAX_LINES
    ]
    assert not too_long, f"functions over {MAX_LINES} lines:\n" + "\n".join(too_long)
