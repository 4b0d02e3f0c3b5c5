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
# # Lesson 3. The Pass@K crossover on held-out prompts
#
# **Learning goals.** After this lesson you can
# 1. say why pass@k at large $k$ is governed by the *hardest* prompts, and why a model trained on other
#    prompts can lose there while gaining at $k=1$;
# 2. read a crossover plot drawn as a difference to the base, with seed bands, and find $k^*$;
# 3. compare two methods by their paired difference, not by two curves that overlap.
#
# *Time: 15 minutes. Prerequisites: lessons 1-2; unbiased pass@k.*
#
# ## The derivation
#
# For a prompt with success probability $p$, $\mathrm{pass@}k = 1-(1-p)^k$, and the suite's pass@k is the
# mean over prompts. For small $p$, $1-(1-p)^k \approx kp$: at large $k$ a prompt counts as solved as
# soon as $p$ is not tiny, so pass@k measures how many prompts keep *some* mass on a correct answer.
# The **crossover** $k^*$ is the smallest $k$ with $\mathrm{pass@}k(\theta) < \mathrm{pass@}k(\text{base})$.
#
# In lesson 2 each prompt had its own logits, and exact GRPO raised every prompt's $p$: no crossover
# can happen. In an LLM the prompts share the weights and we measure prompts the model never saw.
# The **coupled model** (`rsc` preset, docs/simulator.md) gives every edge a token $v$ of a shared
# vocabulary, with logits
#
# $$z_\theta(s, v) = (1 + \alpha_{t(s)})\, z_{\text{ref}}(s,v) + u_v + h(s)^\top W e_v ,$$
#
# shared $\theta = (\alpha, u, W)$, $\theta = 0$ the reference. Raising $\alpha$ sharpens *every* node
# of *every* prompt, including held-out prompts whose correct answers sit off the reference mode:
# their $p$ falls, and at large $k$ they decide the average. The model trains on 32 prompts (Adam,
# lr 0.05, exact dynamics) and everything below is measured on 64 held-out prompts.

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
ARMS = T.FIGURE_ARMS["03 crossover"]  # GRPO and APO reading H (r_anchor per token, docs/method.md section 3)
crossover = lru_cache(maxsize=4)(T.crossover)  # the widget re-uses a computed setting

# %% [markdown]
# ## Claim 1: GRPO gains at small $k$ and loses at large $k$ on held-out prompts
#
# `T.crossover(steps)` returns, per arm and seed, the held-out pass@k at the last step, and the base. We
# plot **pass@k minus the base on the same suite** (one suite per seed), mean with a band of $\pm 1$
# standard deviation over 3 seeds. Absolute pass@k curves would
# mix the effect with the seed-to-seed variation of the suites (exercise 3).

# %%
def plot_crossover(steps=150):
    x = crossover(steps, ARMS)
    ks = x["ks"]
    looks = palette.styles(ARMS)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in ARMS:
        d = x["arms"][m] - x["base"]  # [seeds, K], paired by suite
        mean, sd = d.mean(0), d.std(0)
        ax.plot(ks, mean, color=looks[m]["color"], ls=looks[m]["linestyle"], marker=looks[m]["marker"],
                label=style.label(m))
        ax.fill_between(ks, mean - sd, mean + sd, color=looks[m]["color"], alpha=0.18, lw=0)
    ax.axhline(0, color="k", lw=1)
    kst = np.nanmedian(x["kstar"]["grpo"])
    ax.axvline(kst, color=palette.color("grpo"), ls=":", lw=1.2)
    ax.annotate(f"GRPO crosses below the base\nat k* = {kst:g} (median of seeds)", (kst, 0),
                xytext=(kst * 0.35, -0.08), fontsize=8, arrowprops=dict(arrowstyle="->"), color=palette.color("grpo"))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="k (samples per held-out prompt)", ylabel="held-out pass@k minus base (same suite)",
           title=f"After {steps} steps GRPO gains at k = 1 and loses at large k")
    ax.legend(loc="lower left", fontsize=8)
    plt.show()
    return x


x = plot_crossover()

# %% [markdown]
# **What you should see.** The GRPO curve starts above zero at $k=1$ (held-out pass@1 rises) and ends
# below zero at $k = 256..1024$; the band is narrower than the drop. **Why.** The shared update
# sharpens the reference and moves token biases toward what the training prompts rewarded; on the
# held-out prompts whose correct leaves are off the mode, $p$ falls, and those prompts decide pass@k
# at large $k$. The training prompts tell a different story (printed below): what a model is trained on
# rises far more.

# %%
for m in ARMS:
    print(f"{m:>14}: train pass@1 {x['train_pass1'][m].mean():.3f}, held-out pass@1 {x['arms'][m][:, 0].mean():.3f} "
          f"(base {x['base'][:, 0].mean():.3f}); k* per seed {x['kstar'][m].tolist()}")

# %% [markdown]
# ## Claim 2: compared with GRPO, the per-token reading of APO keeps more held-out pass@k
#
# Two curves that overlap say little; the question "does APO do better than GRPO?" is answered by the
# **paired difference** on the same suite and seed, with its band.

# %%
ks = x["ks"]
d = x["arms"]["apo_old_token"] - x["arms"]["grpo"]  # [seeds, K]
look = palette.style("apo_old_token")
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(ks, d.mean(0), color=look["color"], marker=look["marker"], label="APO H minus GRPO (mean of 3 seeds)")
ax.fill_between(ks, d.min(0), d.max(0), color=look["color"], alpha=0.18, lw=0, label="min..max over seeds")
ax.axhline(0, color="k", lw=1)
ax.set_xscale("log", base=2)
ax.set_xticks(ks, [str(k) for k in ks])
ax.set(xlabel="k", ylabel="held-out pass@k: APO H minus GRPO",
       title=f"APO H minus GRPO: {d.mean(0)[0]:+.3f} at k = 1, {d.mean(0)[-3]:+.3f} at k = 256")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# **What you should see.** A curve near zero at $k = 1$ that rises with $k$: at the same training budget,
# APO's reading H loses less of the held-out space. **Why (lesson 5 has the mechanism).** On every
# negative-advantage token the pull moves mass back onto the reference Top-K instead of letting it flow
# to the mode. **Caveat.** This is one fixed budget; lesson 7 asks whether the gain survives a fair
# protocol (GRPO stopped early is also more diverse).
#
# **Move the parameter.** The slider sets the training length: the crossover needs enough steps to appear.

# %%
import ipywidgets as widgets

widgets.interact(plot_crossover, steps=widgets.IntSlider(value=150, min=30, max=300, step=30));

# %% [markdown]
# ## Exercises
#
# 1. From `x`, compute GRPO's mean held-out pass@k gain over the base at $k=1$ and at $k=1024$ and check
#    their signs.
# 2. Using only the base row of `x`, show that pass@k rises with $k$ for every seed (it must: it is
#    $1-(1-p)^k$ averaged over prompts).
# 3. Why plot differences on the same suite rather than absolute pass@1024? Compare the spread over
#    seeds of GRPO's absolute pass@1024 with the spread of its paired difference to the base.

# %% tags=["solution"] jupyter={"source_hidden": true}
gain = (x["arms"]["grpo"] - x["base"]).mean(0)
assert gain[0] > 0 and gain[-1] < 0  # Solution 1: gain at k = 1, loss at k = 1024
assert (np.diff(x["base"], axis=1) >= -1e-12).all()  # Solution 2
# Solution 3: the suites (seeds) differ more than the methods do; pairing by suite removes that.
absolute = x["arms"]["grpo"][:, -1]
paired = x["arms"]["grpo"][:, -1] - x["base"][:, -1]
print(f"GRPO absolute pass@1024 over seeds: {np.round(absolute, 3)} (std {absolute.std():.3f}); "
      f"paired difference to base: {np.round(paired, 3)} (std {paired.std():.3f})")
assert absolute.std() > paired.std()
print("solutions checked")

# %% [markdown]
# ## Closing checks

# %%
g = x["arms"]["grpo"] - x["base"]
assert g[:, 0].mean() > 0 and g[:, -1].mean() < 0  # the crossover, on the seed mean
assert np.isfinite(x["kstar"]["grpo"]).sum() >= 2  # ... and on most seeds
assert np.ptp(g.mean(0)) > 0.05  # the plotted difference spans a visible range
assert d.mean(0)[-1] > d.mean(0)[0]  # APO H's advantage over GRPO grows with k
print("all checks passed")
