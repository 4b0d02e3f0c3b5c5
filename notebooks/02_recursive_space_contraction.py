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
# # Lesson 2. Recursive contraction on the reasoning tree
#
# **Learning goals.** After this lesson you can
# 1. write the policy gradient at a node of a tree with a terminal reward, and see the reach
#    probability $d(s)$ in front of it;
# 2. explain why squeezing at one node (lesson 1) *recurses*: a branch that loses reach also stops
#    learning inside;
# 3. tell what GRPO does to Pass@1, to coverage and to the number of distinct correct answers, and
#    why zero support is irreversible.
#
# *Time: 15 minutes. Prerequisites: lesson 1; the policy-gradient theorem.*
#
# ## The derivation
#
# A prompt is a complete $b$-ary tree of depth $D$; a response is a root-to-leaf path with reward
# $R \in \{0,1\}$. At node $s$ the policy is $\pi(\cdot\mid s) = \mathrm{softmax}(z_s)$. With
# $Q(s,a)$ the success probability after taking $a$ at $s$, $V(s) = \sum_a \pi(a\mid s)\,Q(s,a)$ and
# $d(s)$ the probability of reaching $s$, the policy-gradient theorem (undiscounted, terminal reward) gives
#
# $$\frac{\partial J}{\partial z_{s,a}} = d(s)\;\pi(a\mid s)\,\bigl(Q(s,a) - V(s)\bigr).$$
#
# Every gradient inside a branch is scaled by the probability of **reaching** it. Once a branch's entry
# token is squeezed (lesson 1), $d(s)$ falls for every node below, those nodes learn more slowly, are
# sampled less, earn fewer rewards, and are squeezed further: the contraction is *recursive*.
# At $\pi = 0$ a token is never sampled and every sampled-token estimator gives it exactly zero
# gradient: zero support is *irreversible*.
#
# The simulator `apo_toy` (docs/simulator.md) measures everything exactly: `coverage` is the share of
# the base model's valid leaves that still have $P(\text{leaf}) \ge 1/256$.

# %%
import os
import sys

ROOT = os.path.abspath("..") if os.path.basename(os.getcwd()) == "notebooks" else os.getcwd()
sys.path.insert(0, ROOT)
import matplotlib.pyplot as plt
import numpy as np
import torch

torch.set_num_threads(1)
from apo_toy import palette
from apo_toy import teaching as T
from paper_figures import style

style.setup()
# %matplotlib inline

# %% [markdown]
# ## Claim 1: the gradient inside a branch is $c_p\, d(s)\, \pi (Q - V)$
#
# `T.reach_scaling()` takes the exact GRPO surrogate of 4 prompts at the reference, backpropagates,
# and divides each logit's gradient by the analytic $\pi(a\mid s)(Q(s,a)-V(s))$. Entries where that
# factor is **exactly zero** (every child of $s$ has the same $Q$, e.g. a subtree without any correct
# leaf) carry no signal; their autograd values are float round-off ($10^{-20}$ and below), so they are
# masked, not plotted.

# %%
rs = T.reach_scaling()
fig, ax = plt.subplots(figsize=(6.5, 4))
for i in range(len(rs["c"])):
    on = rs["prompt"] == i
    ax.loglog(rs["reach"][on], rs["ratio"][on], palette.MARKERS[i], ms=4, alpha=0.7,
              color=list(palette.OKABE_ITO.values())[i + 1], label=f"prompt {i}: $c_p$ = {rs['c'][i]:.3f}")
x = np.geomspace(rs["reach"].min(), 1, 50)
ax.loglog(x, rs["c"].mean() * x, "k--", lw=1, label=r"slope 1: $\propto d(s)$")
ax.set(xlabel=r"reach probability $d(s)$",
       ylabel=r"$\partial J / \partial z_{s,a} \;/\; \pi(a|s)(Q-V)$",
       title="The gradient at a node is proportional to its reach")
ax.legend(fontsize=7)
plt.show()
print(f"{rs['masked']} entries masked (analytic factor exactly 0); {len(rs['reach'])} plotted")

# %% [markdown]
# **What you should see.** Four straight lines of slope 1 on log-log axes, one per prompt, spanning five
# decades of reach. **Why.** The ratio is $c_p\,d(s)$ with one constant per prompt (the group
# normalisation of that prompt's advantages): a node reached with probability $10^{-4}$ learns
# $10^4$ times more slowly than the root.

# %% [markdown]
# ## Claim 2: GRPO raises Pass@1 and contracts the space
#
# `T.contraction(steps, lr)` trains GRPO (exact dynamics, 16 prompts, $10$-ary trees of depth 3) and
# returns pass@1, coverage and distinct@256 per step.

# %%
def plot_contraction(steps=100, lr=30.0):
    c = T.contraction(steps, lr)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    look = palette.style("grpo")
    a1.plot(c["step"], c["pass@1"], color=look["color"], marker="o", ms=3, label="pass@1")
    a1.plot(c["step"], c["coverage"], color=look["color"], ls="--", marker="s", ms=3, label="coverage")
    a1.set(xlabel="RL step (GRPO, exact)", ylabel="share", ylim=(0, 1.05),
           title=f"Pass@1 {c['pass@1'][0]:.2f} -> {c['pass@1'][-1]:.2f}, coverage 1 -> {c['coverage'][-1]:.2f}")
    a1.legend()
    a2.plot(c["step"], c["distinct@256"], color=look["color"], marker="^", ms=3)
    a2.axhline(c["base"]["distinct@256"], color="k", ls="--", lw=1, label="base")
    a2.set(xlabel="RL step", ylabel="expected distinct correct leaves in 256 samples",
           title="Fewer distinct correct answers are reachable")
    a2.legend()
    fig.suptitle("Recursive space contraction under GRPO (tabular tree, 16 prompts)")
    plt.show()
    return c


con = plot_contraction()

# %% [markdown]
# **What you should see.** Pass@1 climbs from about 0.14 to about 0.9 while coverage drops to about half
# of the base model's valid leaves and the distinct correct answers shrink. **Why.** Each step sharpens
# the already-likely correct path and squeezes its siblings; lower reach means slower learning below
# (claim 1), so the lost branches are not won back.
#
# In this *tabular* model (each prompt has its own logits) Pass@256 does not fall below the base: the
# exact update ascends each prompt's own success probability $p$, and $1-(1-p)^k$ rises with $p$. What
# collapses is *which* correct paths remain reachable. Lesson 3 adds shared parameters and held-out
# prompts, where pass@k itself crosses below the base.
#
# **Move the parameter.** A smaller learning rate slows the contraction; it does not change its direction.

# %%
import ipywidgets as widgets

widgets.interact(plot_contraction, steps=widgets.IntSlider(value=100, min=20, max=200, step=20),
                 lr=widgets.FloatLogSlider(value=30.0, base=10, min=0, max=2, step=0.1));

# %% [markdown]
# ## Claim 3: zero support is irreversible
#
# Set one valid root token of each prompt to probability exactly 0 ($z = -10^4$; $e^{-10^4} = 0$ in
# float64) and train GRPO on *sampled* rollouts: the token is never drawn, its logit never moves.

# %%
from apo_toy import SimConfig, SuiteSpec, build_suite, get_method, train_method
from apo_toy.tree import success_q

suite = build_suite(SuiteSpec(n_prompts=8, seed=1))
q_ref, _ = success_q(torch.softmax(suite.ref_logits, -1), suite.rewards, suite.depth)
init = suite.ref_logits.clone()
killed = []
for p in range(suite.n_prompts):
    order = suite.ref_logits[p, 0].argsort(descending=True)
    a = next((int(c) for c in order[1:] if q_ref[p, 0, c] > 0), None)  # a non-mode root token with valid leaves
    if a is not None:
        init[p, 0, a] = -1e4
        killed.append((p, a))
_, final_logits = train_method(suite, get_method("grpo"), SimConfig(mode="sampled", steps=40, eval_every=40),
                               init_logits=init)
moved = [float(final_logits[p, 0, a] - init[p, 0, a]) for p, a in killed]
print(f"{len(killed)} valid branches at zero support; logit change after 40 sampled GRPO steps: {moved}")

# %% [markdown]
# ## Exercises
#
# 1. Which node has $d(s)=1$? Check that its ratio in `rs` equals $c_p$ for every prompt.
# 2. Run `T.contraction(steps=40)` and `T.contraction(steps=40, lr=5.0)` (the default lr is 30): which loses less coverage,
#    and does it also gain less Pass@1?
# 3. Why is the plotted quantity divided by $\pi(a|s)(Q-V)$ and not plotted raw? (Hint: how many entries
#    were masked, and what would their autograd values look like on a log axis?)

# %% tags=["solution"] jupyter={"source_hidden": true}
# Solution 1: the root (reach 1) has ratio c_p.
root = rs["reach"] == 1.0
assert root.any() and np.allclose(rs["ratio"][root], rs["c"][rs["prompt"][root]], rtol=1e-9)
# Solution 2: the smaller learning rate keeps more coverage and gains less Pass@1 (same direction, slower).
fast, slow = T.contraction(steps=40), T.contraction(steps=40, lr=5.0)
assert slow["coverage"][-1] >= fast["coverage"][-1] and slow["pass@1"][-1] < fast["pass@1"][-1]
# Solution 3: the masked entries have an analytic gradient of exactly 0; autograd returns round-off
# (1e-25..1e-19), which a log axis would draw as a cloud of "signal" 20 decades below the real points.
assert rs["masked"] > len(rs["reach"])
print("solutions checked")

# %% [markdown]
# ## Closing checks

# %%
assert np.allclose(rs["ratio"], rs["c"][rs["prompt"]] * rs["reach"], rtol=1e-8)  # grad = c_p d(s) pi (Q - V)
assert np.log10(rs["reach"].max() / rs["reach"].min()) > 3  # the plot spans > 3 decades of reach
assert con["pass@1"][-1] > con["pass@1"][0] + 0.3 and con["coverage"][-1] < 0.8
assert con["distinct@256"][-1] < con["base"]["distinct@256"]
assert killed and all(m == 0.0 for m in moved)  # zero support is irreversible
print("all checks passed")
