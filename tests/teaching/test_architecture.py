"""The layout docs/architecture.md promises, checked on the code: no import circle inside a package,
modules that fit one room, a thin trainer entry, and the short path from each entry point to the loss."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("apo_llm", "apo_toy")
LONG_OK = {"apo_llm/objectives.py"}  # the one loss module (its terms are short; there are many)
MAX_LINES = 500


def modules(pkg: str) -> dict[str, Path]:
    base = ROOT / pkg
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(base.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every module of `known` that `path` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out |= {n for n in names if n in known}
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        stack.pop()
        return []

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return []


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_import_circle(pkg):
    mods = modules(pkg)
    graph = {m: imports_of(p, set(mods)) - {m, pkg} for m, p in mods.items()}
    assert find_cycle(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("pkg", PACKAGES)
def test_every_module_fits_a_room(pkg):
    long = {str(p.relative_to(ROOT)): n for p in modules(pkg).values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES and str(p.relative_to(ROOT)) not in LONG_OK}
    assert long == {}


def test_the_trainer_entry_is_thin():
    assert len((ROOT / "apo_llm/train.py").read_text().splitlines()) < 150


def calls_in(path: Path, func: str) -> set[str]:
    """Names called (f(...) or mod.f(...)) in the body of top-level function `func` of `path`."""
    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func)
    out = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            f = node.func
            out.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return out


def test_trainer_path_to_the_loss_is_four_calls():
    """main -> loop.train -> loop.update -> objectives.policy_loss -> POLICY_TERMS[name] (docs/architecture.md)."""
    assert "train" in calls_in(ROOT / "apo_llm/train.py", "main")
    assert "update" in calls_in(ROOT / "apo_llm/loop.py", "train")
    assert "policy_loss" in calls_in(ROOT / "apo_llm/loop.py", "update")
    body = (ROOT / "apo_llm/objectives.py").read_text().split("\ndef policy_loss", 1)[1].split("\ndef ", 1)[0]
    assert "POLICY_TERMS[cfg.name]" in body and "fn" in calls_in(ROOT / "apo_llm/objectives.py", "policy_loss")  # term.fn(...)
