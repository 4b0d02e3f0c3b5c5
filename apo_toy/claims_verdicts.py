"""The claims study's verdicts: the selection rule (validation rows in, hyper-parameters and steps
out), the statistics (one-sided paired t-tests, Holm), the verdict per claim, arm, setting and rule,
and the claims.md report. The study that produces the rows: apo_toy/claims.py.
"""

from __future__ import annotations

import math

import numpy as np

from .table import markdown

RULES = ("final", "best")  # (a) final step, (b) best-validation-pass@1 step


# --------------------------------------------------------------------------------------------
# Selection: validation rows in, (hyper-parameters, step per seed) out
# --------------------------------------------------------------------------------------------


class ValRows(tuple):
    """Rows {arm, hparams, seed, step, val/...}: the only table `select` is given. Any other key is refused."""

    ALLOWED = ("arm", "hparams", "seed", "step")

    def __new__(cls, rows):
        rows = tuple(dict(r) for r in rows)
        for r in rows:
            bad = [k for k in r if k not in cls.ALLOWED and not k.startswith("val/")]
            if bad:
                raise ValueError(f"ValRows: key(s) {bad} are not validation metrics")
        return super().__new__(cls, rows)


def select(val_rows: ValRows, rule: str) -> tuple[tuple, dict]:
    """The one selection rule of every arm: (hyper-parameters, {seed: step}).

    Per run (hparams, seed) the step is its last ("final") or its best-validation-pass@1 one
    ("best"; the earliest of ties). The hyper-parameters maximise the seed-mean validation pass@1
    of the runs' best steps, whatever the rule (ties: first in grid order).
    """
    if not isinstance(val_rows, ValRows):
        raise TypeError("select: val_rows must be a ValRows table (validation metrics only)")
    if rule not in RULES:
        raise ValueError(f"rule: {rule!r} not in {RULES}")
    runs: dict = {}
    for r in val_rows:
        runs.setdefault(r["hparams"], {}).setdefault(r["seed"], []).append(r)
    best_step = {hp: {s: max(rs, key=lambda r: (r["val/pass@1"], -r["step"])) for s, rs in seeds.items()}
                 for hp, seeds in runs.items()}
    score = {hp: np.mean([r["val/pass@1"] for r in by_seed.values()]) for hp, by_seed in best_step.items()}
    hp = max(score, key=lambda h: (score[h], -list(score).index(h)))
    if rule == "best":
        return hp, {s: r["step"] for s, r in best_step[hp].items()}
    return hp, {s: max(r["step"] for r in rs) for s, rs in runs[hp].items()}


# --------------------------------------------------------------------------------------------
# Statistics and verdicts
# --------------------------------------------------------------------------------------------


def t_sf(t: float, df: int) -> float:
    """P(T > t), Student's t with integer df >= 1 (exact finite series, Abramowitz & Stegun 26.7.3-4)."""
    th = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(th) ** 2, math.sin(th)
    acc = 0.0
    if df % 2:
        term = math.cos(th)
        for k in range(1, (df - 1) // 2 + 1):
            acc += term
            term *= c2 * (2 * k) / (2 * k + 1)
        a = 2 / math.pi * (th + s * acc)
    else:
        term = 1.0
        for k in range(1, df // 2 + 1):
            acc += term
            term *= c2 * (2 * k - 1) / (2 * k)
        a = s * acc
    p = (1 - a) / 2
    return p if t >= 0 else 1 - p


def p_greater(d: np.ndarray) -> float:
    """One-sided paired t-test p-value of mean(d) > 0 over seeds (d constant: 0 if > 0 else 1)."""
    n, m = len(d), float(np.mean(d))
    se = float(np.std(d, ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    if se == 0.0 or not math.isfinite(se):
        return 0.0 if m > 0 else 1.0
    return t_sf(m / se, n - 1)


def holm(ps: list) -> list:
    """Holm step-down adjusted p-values (same order as `ps`)."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, run = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        run = max(run, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = run
    return out


def mean_se(d: np.ndarray) -> tuple:
    return float(np.mean(d)), (float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan"))


CLAIMS = {
    1: "RSC under GRPO: test pass@1 above the base's, pass@256 and coverage below it",
    2: "KL trades pass@1 for coverage: below the null's test pass@1, above its pass@256",
    3: "APO breaks the trade-off: test pass@1 >= the null's - tol, pass@256 and coverage >= the base's - tol",
}


def claim_parts(claim: int, arm: dict, null: dict, base: dict, tol: float) -> list:
    """Per-seed differences d (one array per part) that the claim says are > 0."""
    if claim == 1:
        return [arm["pass@1"] - base["pass@1"], base["pass@256"] - arm["pass@256"], base["coverage"] - arm["coverage"]]
    if claim == 2:
        return [null["pass@1"] - arm["pass@1"], arm["pass@256"] - null["pass@256"]]
    return [arm["pass@1"] - null["pass@1"] + tol, arm["pass@256"] - base["pass@256"] + tol,
            arm["coverage"] - base["coverage"] + tol]


def judge(family: list, alpha: float) -> list:
    """family: [(key, parts)]. Holds: every part > 0 (intersection-union, p = max over parts);
    fails: some part < 0 (p = Bonferroni min over parts); both Holm-adjusted over the family."""
    p_hold = [max(p_greater(d) for d in parts) for _, parts in family]
    p_fail = [min(1.0, len(parts) * min(p_greater(-d) for d in parts)) for _, parts in family]
    out = []
    for (key, _), ph, pf in zip(family, holm(p_hold), holm(p_fail)):
        verdict = "holds" if ph < alpha else ("fails" if pf < alpha else "inconclusive")
        out.append({"key": key, "verdict": verdict, "p_holds_holm": ph, "p_fails_holm": pf})
    return out


def verdicts(plan, results: dict) -> list:
    """results[(setting, rule)][arm] = {metric: [per seed]}, plus "base". One row per claim, arm, setting, rule."""
    rows = []
    roles = {a.name: a.role for a in plan.arms}
    null = next(a.name for a in plan.arms if a.role == "null")
    for (setting, rule), res in results.items():
        arr = {k: {m: np.asarray(v) for m, v in r.items()} for k, r in res.items()}
        base = arr["base"]
        for claim, arms in ((1, [null]), (2, [a for a in arr if roles.get(a) == "kl"]),
                            (3, [a for a in arr if roles.get(a) in ("apo", "control", "other")])):
            fam = [(a, claim_parts(claim, arr[a], arr[null], base, plan.tol)) for a in arms]
            for j in judge(fam, plan.alpha):
                a = j.pop("key")
                ref = base if claim == 1 else arr[null]
                gains = {f"gain_{m}": mean_se(arr[a][m] - ref[m]) for m in ("pass@1", "pass@256", "coverage")}
                gains["gain_vs_base_pass@256"] = mean_se(arr[a]["pass@256"] - base["pass@256"])
                rows.append({"claim": claim, "arm": a, "setting": setting, "rule": rule, **j, **gains,
                             "n_seeds": len(base["pass@1"])})
    return rows


def summarise(rows: list) -> list:
    """'holds in x of y settings' per claim, arm and rule."""
    out: dict = {}
    for r in rows:
        k = (r["claim"], r["arm"], r["rule"])
        o = out.setdefault(k, {"claim": r["claim"], "arm": r["arm"], "rule": r["rule"], "holds": 0, "fails": 0,
                               "inconclusive": 0, "settings": 0})
        o[r["verdict"]] += 1
        o["settings"] += 1
    return list(out.values())


# --------------------------------------------------------------------------------------------
# claims.md
# --------------------------------------------------------------------------------------------

_V = {"holds": "holds", "fails": "**fails**", "inconclusive": "?"}


def _pm(ms: tuple) -> str:
    return f"{ms[0]:+.3f} ± {ms[1]:.3f}"


def claims_markdown(out: dict, header: str = "") -> str:
    """The verdict table (claim x arm x rule by setting, with 'holds in x of y'), the grid, the gains."""
    plan, settings = out["plan"], out["plan"]["settings"]
    lines = [header] if header else []
    lines += ["## Verdicts", "", "Cells: verdict per setting (`?` = inconclusive). Rule: `final` = each arm at its "
              "final step, `best` = at its best-validation-pass@1 step. Settings: " +
              ", ".join(f"s{i + 1} = {s}" for i, s in enumerate(settings)) + ".", ""]
    cell = {(r["claim"], r["arm"], r["rule"], r["setting"]): r["verdict"] for r in out["verdicts"]}
    rows = [[sm["claim"], out["labels"].get(sm["arm"], sm["arm"]), sm["rule"],
             *(_V[cell[(sm["claim"], sm["arm"], sm["rule"], s)]] for s in settings),
             f"{sm['holds']} of {sm['settings']} (fails {sm['fails']})"] for sm in out["summary"]]
    lines += markdown(["claim", "arm", "rule", *(f"s{i + 1}" for i in range(len(settings))), "holds in"],
                      rows).splitlines()
    lines += ["", "Claims: " + "; ".join(f"{k}. {v}" for k, v in CLAIMS.items()) +
              f" (tol = {plan['tol']}). Claims 4-6 (gradient alignment, elastic recovery, the KL/sharpening "
              "conflict) are not judged here: 4 and 6 are identities checked in float64 by tests/core, 5 is the "
              "tabular `recovery` preset.", ""]
    lines += _grid_lines(out) + [""] + _gain_lines(out)
    return "\n".join(lines) + "\n"


def _grid_lines(out: dict) -> list:
    plan = out["plan"]
    lines = ["## Tuning grid and selected values", "",
             f"Learning rates: {plan['lrs']}; each arm's strength grid below; tuned on {plan['tune']} with "
             f"{plan['tune_seeds']} suites (seeds 1000+, never reported), by validation pass@1 at each run's best "
             f"step; reported on {plan['seeds']} other suites per setting.", "",
             ]
    sel = {(t["arm"], t["optimizer"]): t["hparams"] for t in out["tuned"]}
    fmt = lambda hp: ", ".join(f"{k}={v:g}" for k, v in hp.items()) if hp else "-"  # noqa: E731
    rows = [[a["name"], a["strength"] or "-", list(a["grid"]) or "-", fmt(sel.get((a["name"], "adam"), {})),
             fmt(sel.get((a["name"], "sgd"), {}))] for a in plan["arms"]]
    return lines + markdown(["arm", "strength", "grid", "selected (adam)", "selected (sgd)"], rows).splitlines()


def _gain_lines(out: dict) -> list:
    lines = ["## Paired gains on the test split (mean ± s.e. over seeds)", "",
             "Claim 1 rows: GRPO minus base; other rows: arm minus the null (GRPO, same rule). `vs base p@256`: "
             "arm minus base. Clip: `apo/neg_clipped_frac` (APO-family arms) or `clip_frac/neg`, training mean.", "",
             ]
    diag = {(d["setting"], d["arm"]): d for d in out["diagnostics"]}
    rows = []
    for r in out["verdicts"]:
        d = diag.get((r["setting"], r["arm"]), {})
        clip = d.get("apo/neg_clipped_frac", d.get("clip_frac/neg", float("nan")))
        rows.append([r["setting"], r["rule"], r["claim"], out["labels"].get(r["arm"], r["arm"]), _pm(r["gain_pass@1"]),
                     _pm(r["gain_pass@256"]), _pm(r["gain_coverage"]), _pm(r["gain_vs_base_pass@256"]), f"{clip:.3f}",
                     r["verdict"]])
    header = ["setting", "rule", "claim", "arm", "Δ pass@1", "Δ pass@256", "Δ coverage", "vs base p@256", "clip (neg)",
              "verdict"]
    return lines + markdown(header, rows).splitlines()
