# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 7. A claims study in miniature: how a verdict is made, and how it can flip
#
# **Learning goals.** After this lesson you can
# 1. set up a fair comparison: selection (stopping step, hyper-parameter) on **validation** prompts
#    only, the verdict on **test** prompts, the same rule and budget for every arm, the baseline included;
# 2. turn paired per-seed differences into a verdict with its standard error;
# 3. show how a verdict changes with the selection rule, and say which verdict to trust.
#
# *Time: 20 minutes. Prerequisites: lessons 3 and 5.*
#
# ## The protocol
#
# The claim under test: **"APO (reading H) keeps more held-out pass@64 than GRPO."** Each arm trains on
# the coupled model's 32 training prompts (lesson 3) with two settings (GRPO: learning-rate scale 1 or
# 0.5; APO H: $\beta = 0.1$ or $0.2$) for 80 steps, with a checkpoint every 10 steps. The 64 held-out prompts
# are split in half: **validation** (selection) and **test** (report). Per seed $s$ and arm, a rule picks
# one (setting, checkpoint); the verdict is the paired difference
#
# $$d_s = \mathrm{pass@64}_{\text{test}}(\text{APO}, s) - \mathrm{pass@64}_{\text{test}}(\text{GRPO}, s),\qquad
# \bar d \pm \mathrm{se},\ \ \mathrm{se} = \frac{\mathrm{sd}(d_s)}{\sqrt{n}},$$
#
# read as "better" / "worse" when $|\bar d| > 2\,\mathrm{se}$, else "within noise". Two rules:
#
# * **last**: the last checkpoint of each arm's first setting (what a paper table often reports);
# * **validation**: among all (setting, checkpoint) whose *validation* pass@1 beats the base's by at least
#   $\tau$ (the model must have learned something), the one with the highest *validation* pass@64. GRPO gets the same rule, so it may be stopped early or run at the
#   lower learning rate: an early-stopped GRPO is also more diverse, and a regulariser must beat *that*.

# %%
import os
import sys

ROOT = os.path.abspath("..") if os.path.basename(os.getcwd()) == "notebooks" else os.getcwd()
sys.path.insert(0, ROOT)
from functools import lru_cache

import matplotlib.pyplot as plt
import numpy as np
import torch

torch.set_num_threads(1)
from apo_toy import palette
from apo_toy import teaching as T
from paper_figures import style

style.setup()
# %matplotlib inline
ARMS = T.FIGURE_ARMS["07 verdict"]  # ("grpo", "apo_old_token")
study = lru_cache(maxsize=2)(T.study)
runs = study("adam", seeds=3, steps=80)

# %% [markdown]
# ## Claim 1: the selection rule, applied alike to every arm, decides what the comparison means
#
# Left: each arm's validation path (mean over seeds; one line per setting, a marker per checkpoint, all
# starting at the base, the black star) and the line base + $\tau$ (the printout below lists the checkpoints each rule
# picked per seed). Right: the per-seed test differences and the verdict under each rule.

# %%
def plot_verdict(min_gain=0.05, optimizer="adam"):
    r = study(optimizer, seeds=3, steps=80)
    looks = palette.styles([f"{m}@{st}" for m in ARMS for st in r[m]])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for m in ARMS:
        for st, seeds in r[m].items():
            v1 = np.mean([T.pass_at(c["val_p"], 1) for c in seeds], 0)
            vk = np.mean([T.pass_at(c["val_p"], 64) for c in seeds], 0)
            lk = looks[f"{m}@{st}"]
            a1.plot(v1, vk, color=lk["color"], ls=lk["linestyle"], marker=lk["marker"], ms=4,
                    label=f"{style.label(m)}, {T.VERDICT_GRID[m][0]} = {st}")
    first = r[ARMS[0]][next(iter(r[ARMS[0]]))]  # step 0 of every run is the base model
    base1 = np.mean([T.pass_at(c["val_p"][0], 1) for c in first])
    a1.plot(base1, np.mean([T.pass_at(c["val_p"][0], 64) for c in first]), "*", ms=14, color="k", zorder=5,
            label="base (step 0 of every path)")
    a1.axvline(base1 + min_gain, color="k", ls=":", lw=1)
    a1.text(base1 + min_gain, a1.get_ylim()[0], r" base + $\tau$ (seed mean)", fontsize=8, va="bottom")
    a1.set(xlabel="validation pass@1", ylabel="validation pass@64",
           title="Validation paths: every checkpoint of every setting")
    a1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    verdicts = {rule: T.verdict(r, rule, 64, min_gain) for rule in ("last", "validation")}
    for i, (rule, v) in enumerate(verdicts.items()):
        a2.scatter(np.full(len(v["diff"]), i) + np.linspace(-0.08, 0.08, len(v["diff"])), v["diff"],
                   color=palette.color("apo_old_token"), zorder=3)
        a2.errorbar(i + 0.2, v["mean"], yerr=2 * v["se"], color="k", marker="_", ms=16, capsize=4)
    a2.axhline(0, color="k", lw=1)
    a2.set_xticks([0, 1], [f"{rule}\n{v['word']} ({v['mean']:+.3f} ± {v['se']:.3f})" for rule, v in verdicts.items()])
    a2.set(ylabel="test pass@64: APO H minus GRPO (per seed)", xlim=(-0.5, 1.5),
           title="Verdict per rule (bar: mean ± 2 s.e.)")
    fig.suptitle(f"Is APO H better than GRPO at pass@64? ({optimizer}; validation rule: pass@1 at least base + {min_gain})")
    plt.show()
    return verdicts


verdicts = plot_verdict()
for rule, v in verdicts.items():
    print(f"{rule:>10}: {v['word']:>12} d = {v['mean']:+.3f} ± {v['se']:.3f} | pass@1 difference "
          f"{v['diff_pass1'].mean():+.3f} | GRPO picks steps {v['grpo']['step'].tolist()} settings "
          f"{v['grpo']['setting'].tolist()} | APO picks steps {v['apo_old_token']['step'].tolist()}")

# %% [markdown]
# **What you should see.** Two columns of three points each, their means with $\pm 2$ s.e. bars and the verdict
# word under each column; the printout says which checkpoints each rule picked. **Why the rules can
# disagree.** Under "last" both arms are taken at step 80, where GRPO has contracted most; under
# "validation" GRPO too may stop early, at the point of its own path where it is still diverse, and the
# pass@1 difference printed next to the verdict says whether the two arms are compared at equal accuracy.
# A verdict is a statement about a protocol: report the rule with it, and trust the one that selects on
# validation and reports on test.
#
# **Move the parameters.** The slider sets the required pass@1 gain $\tau$; the dropdown switches the optimizer (SGD
# reruns the study, about a minute).

# %%
import ipywidgets as widgets

widgets.interact(plot_verdict, min_gain=widgets.FloatSlider(value=0.05, min=0.0, max=0.1, step=0.01),
                 optimizer=widgets.Dropdown(options=["adam", "sgd"], value="adam"));

# %% [markdown]
# ## Exercises
#
# 1. Recompute the validation verdict's standard error by hand from `verdicts["validation"]["diff"]`.
# 2. Show that the validation rule never reads the test prompts: replace every `test_p` by random numbers
#    and check that the chosen settings and steps do not change.
# 3. Sweep $\tau$ over `np.linspace(0.0, 0.1, 6)` and list the verdict words. Does the verdict
#    depend on the target? What does that tell you about reporting a single number?

# %% tags=["solution"] jupyter={"source_hidden": true}
v = verdicts["validation"]
assert abs(v["se"] - v["diff"].std(ddof=1) / np.sqrt(len(v["diff"]))) < 1e-12  # Solution 1
rng = np.random.default_rng(0)
scrambled = {m: {st: [dict(c, test_p=rng.random(c["test_p"].shape)) for c in seeds] for st, seeds in runs[m].items()}
             for m in runs}
for m in ARMS:  # Solution 2: same choices with scrambled test data
    a, b = T.select(runs[m], "validation", 64, 0.05), T.select(scrambled[m], "validation", 64, 0.05)
    assert (a["step"] == b["step"]).all() and (a["setting"] == b["setting"]).all()
words = {round(float(t), 2): T.verdict(runs, "validation", 64, t)["word"] for t in np.linspace(0.0, 0.1, 6)}
print("Solution 3, verdict per target:", words)
assert set(words.values()) <= {"better", "worse", "within noise"}
print("solutions checked")

# %% [markdown]
# ## Closing checks

# %%
for rule, v in verdicts.items():
    assert len(v["diff"]) == 3 and np.isfinite(v["se"]) and v["word"] in ("better", "worse", "within noise")
    assert v["word"] == "within noise" or abs(v["mean"]) > 2 * v["se"]
last = verdicts["last"]
assert (last["grpo"]["step"] == 80).all() and (last["apo_old_token"]["step"] == 80).all()
spread = np.ptp(np.concatenate([v["diff"] for v in verdicts.values()]))
assert spread > 0.02  # the per-seed differences span a visible range
print("all checks passed")
