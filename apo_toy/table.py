"""The results table of the simulator: a pandas-free tidy `Table` and the one markdown-table writer."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

SUMMARY_KEYS = ("pass@1", "pass@4", "pass@16", "pass@64", "pass@256", "pass@1024", "crossover_k",
                "frac_prompts_below_base", "coverage", "distinct@256", "rsc_lost", "entropy", "manifold_mass",
                "branch_dominant", "branch_secondary", "branch_rare_in", "branch_rare_out",
                "train/pass@1", "train/pass@256", "train/pass@1024", "train/coverage")
TABLE_KEYS = ("pass@1", "pass@256", "pass@1024", "crossover_k", "frac_prompts_below_base", "coverage", "distinct@256")


class Table:
    """A pandas-free tidy table: a list of dict rows with a few helpers."""

    def __init__(self, rows: Iterable[dict]):
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __repr__(self) -> str:
        return f"Table({len(self.rows)} rows, columns={self.columns()[:8]}...)"

    def columns(self) -> list[str]:
        cols: dict = {}
        for r in self.rows:
            cols.update(dict.fromkeys(r))
        return list(cols)

    def where(self, **eq) -> "Table":
        """Rows whose columns equal the given values."""
        return Table(r for r in self.rows if all(r.get(k) == v for k, v in eq.items()))

    def column(self, key: str) -> np.ndarray:
        return np.array([r.get(key, np.nan) for r in self.rows], dtype=float)

    def unique(self, key: str) -> list:
        return list(dict.fromkeys(r[key] for r in self.rows if key in r))

    def final(self) -> "Table":
        """The last step of every (method, seed)."""
        last: dict = {}
        for r in self.rows:
            k = (r.get("method"), r.get("seed"))
            if k not in last or r["step"] >= last[k]["step"]:
                last[k] = r
        return Table(last.values())

    def summary(self, keys: Sequence[str] = SUMMARY_KEYS, by: str = "method") -> list[dict]:
        """Mean and std over seeds of the final values, one dict per `by` value (table order)."""
        fin = self.final()
        out = []
        for value in fin.unique(by):
            sub = fin.where(**{by: value})
            row = {by: value, "n_seeds": len(sub)}
            for k in keys:
                col = sub.column(k)
                if np.isfinite(col).any():
                    row[k] = float(np.nanmean(col))
                    row[k + "_std"] = float(np.nanstd(col))
            kstar = sub.column("crossover_k")  # NaN: no crossover up to k = 1024 on that seed
            row["crossover_k_median"] = float(np.nanmedian(kstar)) if np.isfinite(kstar).any() else None
            row["crossover_seeds"] = int(np.isfinite(kstar).sum())
            out.append(row)
        return out


def markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub markdown table: the header row, the rule, one line per row (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def summary_markdown(summary: dict, keys: tuple = TABLE_KEYS) -> str:
    """Final mean +- std over seeds per method, with the base policy first (README format)."""
    rows = [dict(summary["base"], method="base (reference)")] + summary["methods"]
    return markdown(["method", *keys], ([r["method"], *(_cell(r, k) for k in keys)] for r in rows))


def _cell(r: dict, k: str) -> str:
    """mean ± std; the crossover k* as its median over the seeds that have one, and how many do."""
    if k == "crossover_k":
        med = r.get("crossover_k_median")
        return "none" if med is None else f"{med:g} ({r['crossover_seeds']}/{r['n_seeds']} seeds)"
    return f"{r[k]:.3f} ± {r.get(k + '_std', 0.0):.3f}" if k in r else "n/a"
