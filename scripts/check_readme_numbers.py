"""Rerun the fast numbers the README quotes and print every one the docs no longer match.

    python scripts/check_readme_numbers.py                 # all three, about 10 min on 2 free cores
    python scripts/check_readme_numbers.py --only demo,tests
    python scripts/check_readme_numbers.py --outputs DIR   # reuse (or keep) the commands' outputs in DIR

The fast numbers and what counts as quoted (searched in README.md and docs/*.md together):

- demo: `python -m apo_llm.train` (the embedded default, what `make demo` runs second); every line
  of its closing summary (from "training reward" on) must appear verbatim on a line of the docs;
- sim: `python -m apo_toy.run --preset rsc --seeds 5` (what `make demo` runs first); for every row
  of its table.md, one table row of the docs must hold its pass@1, pass@256 and pass@1024 cells
  ("0.429 ± 0.106") and its coverage mean (the docs' labels and extra columns may differ);
- tests: `pytest -m "not slow" -n 2` (`make test-fast`); every line of the docs that names
  `test-fast` and a count "N tests" / "N formula tests" / "N passed" must give the count run now.

Exit code 0 when every number is quoted as rerun, 1 when any is stale (each printed with the docs'
nearest line), 2 when a command fails. Slow numbers (the miniature, full test run, benchmarks) are
not rerun: the docs give their date and commit instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))
from apo_llm.cli import UserError, fail  # noqa: E402  (after the path line)
from apo_llm.options import option, parse_command  # noqa: E402

SUMMARY_START = "training reward"  # first line of apo_llm.evaluate.training_report's text
COUNT = re.compile(r"\b(\d+) (?:formula )?(?:tests|passed)\b")


# --------------------------------------------------------------------------------------------
# Parsing and diffing (pure functions; tests/teaching/test_check_readme_numbers.py)
# --------------------------------------------------------------------------------------------


def _norm(line: str) -> str:
    return " ".join(line.replace("`", "").split())


def demo_summary(stdout: str) -> list[str]:
    """The closing summary lines of `python -m apo_llm.train` (from 'training reward' to the end)."""
    lines = stdout.rstrip("\n").splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith(SUMMARY_START)), None)
    if start is None:
        start = next((i for i, ln in enumerate(lines) if ln.startswith("held-out")), len(lines))
    return [ln for ln in lines[start:] if ln.strip()]


def nearest(line: str, doc_lines: list[str]) -> str:
    """The docs line sharing the most words with `line` ('' when none shares any)."""
    words = set(_norm(line).split())
    best = max(doc_lines, key=lambda d: len(words & set(_norm(d).split())), default="")
    return best if words & set(_norm(best).split()) else ""


def stale_lines(expected: list[str], doc_lines: list[str]) -> list[tuple[str, str]]:
    """(expected line, nearest docs line) for every expected line no docs line contains."""
    docs = [_norm(d) for d in doc_lines]
    return [(e, nearest(e, doc_lines)) for e in expected if not any(_norm(e) in d for d in docs)]


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of every data row of the markdown tables in `markdown` (header and rule rows dropped)."""
    rows = []
    for ln in markdown.splitlines():
        if ln.startswith("|") and not set(ln) <= set("|-: "):
            cells = [c.strip() for c in ln.strip().strip("|").split("|")]
            if cells and cells[0] != "method":
                rows.append(cells)
    return rows


def sim_keys(table_md: str) -> list[tuple[str, list[str]]]:
    """Per row of apo_toy.run's table.md: (method, the strings a docs row must hold): pass@1, pass@256,
    pass@1024 as 'mean ± std' and the coverage mean."""
    out = []
    for cells in table_rows(table_md):
        if len(cells) >= 7:
            out.append((cells[0], [cells[1], cells[2], cells[3], cells[6].split(" ± ")[0]]))
    return out


def stale_sim_rows(table_md: str, doc_lines: list[str]) -> list[tuple[str, str]]:
    """(table.md method and its values, nearest docs table row) for rows no docs table row holds."""
    rows = [ln for ln in doc_lines if ln.startswith("|")]
    bad = []
    for method, want in sim_keys(table_md):
        if not any(all(w in _split_cells(r) for w in want) for r in rows):
            bad.append((f"{method}: " + ", ".join(want), nearest(" ".join(want), rows)))
    return bad


def _split_cells(row: str) -> set[str]:
    cells = {c.strip() for c in row.strip().strip("|").split("|")}
    return cells | {c.split(" ± ")[0] for c in cells}


def passed_count(pytest_output: str) -> int:
    """N of pytest's closing 'N passed' line."""
    found = re.findall(r"(\d+) passed", pytest_output)
    if not found:
        raise ValueError("no 'N passed' in the pytest output")
    return int(found[-1])


def stale_counts(count: int, doc_lines: list[str]) -> list[tuple[str, str]]:
    """(what was run, docs line) for every docs line naming test-fast with another count."""
    bad = []
    for ln in doc_lines:
        if "test-fast" in ln:
            for n in COUNT.findall(ln):
                if int(n) != count:
                    bad.append((f"make test-fast: {count} tests", ln.strip()))
    return bad


# --------------------------------------------------------------------------------------------
# Running the commands
# --------------------------------------------------------------------------------------------


def _run(argv: list[str], log: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    print("$ " + " ".join(argv), flush=True)
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    log.write_text(r.stdout)
    if r.returncode not in (0,):
        sys.stderr.write(r.stderr[-3000:])
        raise RuntimeError(f"{argv[2] if len(argv) > 2 else argv} exited with {r.returncode} (log {log})")
    return r.stdout


def outputs(which: list[str], out: Path) -> dict[str, str]:
    """stdout of each command (table.md for sim), from `out` when saved there before, else run now."""
    py = sys.executable
    got = {}
    cmds = {"demo": ([py, "-m", "apo_llm.train", "--logging.output_dir", str(out / "runs"),
                      "--logging.overwrite", "true"], out / "demo.txt"),
            "sim": ([py, "-m", "apo_toy.run", "--preset", "rsc", "--seeds", "5", "--out", str(out / "rsc")],
                    out / "rsc" / "table.md"),
            "tests": ([py, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "not slow", "-n", "2"],
                      out / "pytest.txt")}
    for name in which:
        argv, saved = cmds[name]
        if not saved.is_file():
            saved.parent.mkdir(parents=True, exist_ok=True)
            _run(argv, saved if name != "sim" else out / "sim.txt")
        got[name] = saved.read_text()
    return got


def check(got: dict[str, str], doc_lines: list[str]) -> list[tuple[str, str, str]]:
    """(part, rerun value, docs' nearest) for every stale number."""
    bad = []
    if "demo" in got:
        bad += [("demo", e, d) for e, d in stale_lines(demo_summary(got["demo"]), doc_lines)]
    if "sim" in got:
        bad += [("sim", e, d) for e, d in stale_sim_rows(got["sim"], doc_lines)]
    if "tests" in got:
        bad += [("tests", e, d) for e, d in stale_counts(passed_count(got["tests"]), doc_lines)]
    return bad


@dataclass
class CheckCommand:
    """What `python scripts/check_readme_numbers.py` takes; each field is one flag (--field_name)."""

    only: str = option("demo,sim,tests", "comma list of demo | sim | tests")
    outputs: Optional[str] = option(None, "folder for the commands' outputs; outputs already there are reused, "
                                    "not rerun (default: a fresh temporary folder)")
    docs: list[str] = option([], "files searched (default: README.md docs/*.md)")


def main(argv=None) -> int:
    try:
        args = parse_command(CheckCommand, argv, prog="python scripts/check_readme_numbers.py",
                             description=__doc__.split("\n")[0])
    except UserError as e:
        fail(str(e))
    which = [w for w in args.only.split(",") if w]
    unknown = set(which) - {"demo", "sim", "tests"}
    if unknown:
        fail(f"only: unknown {sorted(unknown)}")
    docs = [Path(d) for d in args.docs] or [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    doc_lines = [ln for p in docs for ln in p.read_text().splitlines()]
    out = Path(args.outputs) if args.outputs else Path(tempfile.mkdtemp(prefix="readme_numbers_"))
    try:
        got = outputs(which, out)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = check(got, doc_lines)
    for part, value, doc in bad:
        print(f"STALE [{part}] rerun: {value}\n        docs:  {doc or '(nothing close)'}")
    print(f"{len(bad)} stale number(s) in {len(docs)} files; outputs in {out}" if bad else
          f"every checked number ({', '.join(which)}) is quoted as rerun; outputs in {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
