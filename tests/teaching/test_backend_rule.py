"""Library code never sets the matplotlib backend (issue 22): a `matplotlib.use(...)` call or an
MPLBACKEND assignment switches inline plotting off for the rest of any notebook that calls the
function. Only a command-line entry point may set it: a function named `main`, or the body of
`if __name__ == "__main__":`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("apo_llm", "apo_toy", "paper_figures", "benchmarks", "notebooks")


def _sets_backend(node: ast.AST) -> bool:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        f = node.func
        if f.attr == "use" and isinstance(f.value, ast.Name) and f.value.id in ("matplotlib", "mpl"):
            return True  # matplotlib.use(...)
        if f.attr == "setdefault" and node.args and isinstance(node.args[0], ast.Constant):
            return node.args[0].value == "MPLBACKEND"  # os.environ.setdefault("MPLBACKEND", ...)
    if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "MPLBACKEND"  # os.environ[...] =
    return False


def _is_entry_point(node: ast.AST) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return node.name == "main"
    if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
        left = node.test.left
        return isinstance(left, ast.Name) and left.id == "__name__"
    return False


def backend_setters(source: str) -> list[int]:
    """Line numbers of backend-setting statements outside entry points."""
    found: list[int] = []

    def visit(node: ast.AST) -> None:
        if _is_entry_point(node):
            return
        if _sets_backend(node):
            found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def test_the_rule_finds_what_it_should():
    """The checker itself: flags library calls, allows main() and the __main__ block."""
    lib = "import matplotlib\ndef plot():\n    matplotlib.use('Agg')\n"
    env = "import os\ndef f():\n    os.environ.setdefault('MPLBACKEND', 'Agg')\n    os.environ['MPLBACKEND'] = 'x'\n"
    entry = "import matplotlib\ndef main():\n    matplotlib.use('Agg')\nif __name__ == '__main__':\n    matplotlib.use('Agg')\n"
    assert backend_setters(lib) == [3]
    assert backend_setters(env) == [3, 4]
    assert backend_setters(entry) == []


def test_no_library_code_sets_the_matplotlib_backend():
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 30  # the packages were found
    bad = {str(p.relative_to(ROOT)): lines for p in files if (lines := backend_setters(p.read_text()))}
    assert not bad, f"matplotlib backend set outside an entry point: {bad}"
