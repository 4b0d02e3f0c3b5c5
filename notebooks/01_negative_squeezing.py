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
# # Lesson 1. Negative squeezing at one decision node
#
# **Learning goals.** After this lesson you can
# 1. derive, to first order in the step size $\eta$, how pushing down one wrong token changes every
#    other token's log-probability;
# 2. state the *gain threshold* $\lVert\pi\rVert^2 - \pi_{\bar y}$ and say which tokens clear it;
# 3. explain why a rare but valid token loses probability when RLVR punishes a wrong one.
#
# *Time: 15 minutes. Prerequisites: softmax and its Jacobian; what a policy gradient is.*
#
# ## The derivation
#
# At one node (one token position) the policy is $\pi = \mathrm{softmax}(z)$ over $b$ tokens. RLVR
# samples a wrong token $\bar y$ and gives it advantage $A = -1$; one descent step on
# $-A \log \pi_{\bar y}$ moves the logits by
#
# $$\Delta z = -\eta\, \nabla_z \log \pi_{\bar y} = -\eta\,(e_{\bar y} - \pi).$$
#
# Since $\partial \log \pi_k / \partial z_j = \mathbb 1[j=k] - \pi_j$, the change of $\log \pi_k$ to first
# order is $\sum_j (\mathbb 1[j=k] - \pi_j)\,\Delta z_j$. Writing $\lVert \pi\rVert^2 = \sum_j \pi_j^2$:
#
# $$\Delta \log \pi_k = \eta\,\bigl(\pi_k - \lVert\pi\rVert^2 + \pi_{\bar y}\bigr) \quad (k \neq \bar y),
# \qquad \Delta \log \pi_{\bar y} = -\eta\,\bigl(1 + \lVert\pi\rVert^2 - 2\pi_{\bar y}\bigr).$$
#
# So token $k$ **gains iff** $\pi_k > \lVert\pi\rVert^2 - \pi_{\bar y}$. For a peaked $\pi$ the squared
# norm is close to the mode's probability, and only the mode clears the bar: the mass freed by
# $\bar y$ goes to the token that already had the most ("the rich get richer").
#
# The step is taken with the project's one loss, `apo_llm.objectives.policy_loss` (GRPO, $A=-1$):
# at $\theta = \theta_{\text{old}}$ the ratio is 1, unclipped, and the gradient of $-A\,w$ is
# exactly $\nabla \log \pi_{\bar y}$ (`apo_toy.node.squeeze_step`).

# %%
import os
import sys

ROOT = os.path.abspath("..") if os.path.basename(os.getcwd()) == "notebooks" else os.getcwd()
sys.path.insert(0, ROOT)  # run from the repo root or from notebooks/
import matplotlib.pyplot as plt
import numpy as np
import torch

torch.set_num_threads(1)  # small tensors; CI runs the lessons on 2 shared cores
from apo_toy import palette
from apo_toy import teaching as T
from paper_figures import style

style.setup()
# %matplotlib inline

# %% [markdown]
# ## Claim 1: the first-order formula is the measured change
#
# `T.squeeze_profile(eta, ybar)` takes one step and returns the measured $\Delta\log\pi$ and the formula.
# The relative error should shrink in proportion to $\eta$.

# %%
for eta in (0.3, 0.03, 0.003):
    d = T.squeeze_profile(eta)
    err = np.abs(d["measured"] - d["first_order"]).max() / np.abs(d["first_order"]).max()
    print(f"eta={eta:<6} max relative error of the first-order formula: {err:.2e}")

# %%
YBAR, VALID = 3, 5  # the pushed-down wrong token, and a rare valid token


def plot_squeeze(eta=0.3, ybar=YBAR):
    d = T.squeeze_profile(eta, ybar)
    idx = np.arange(len(d["pi"]))
    gains = d["pi"] > d["threshold"]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    cols = [palette.COLORS["vermillion"] if i == ybar else palette.COLORS["green"] if i == VALID
            else palette.COLORS["blue"] if g else palette.COLORS["sky"] for i, g in zip(idx, gains)]
    ax.bar(idx, d["measured"], color=cols)
    ax.plot(idx, d["first_order"], "k_", ms=18, mew=2, label=r"first order $\eta(\pi_k-\|\pi\|^2+\pi_{\bar y})$")
    ax.axhline(0, color="k", lw=0.8)
    ax.annotate("only the mode gains", (0, d["measured"][0]), xytext=(1.5, 0.6 * d["measured"][0] + 1e-3),
                arrowprops=dict(arrowstyle="->"))
    ax.annotate("rare valid token loses", (VALID, d["measured"][VALID]), xytext=(5.5, 0.5 * d["measured"][ybar]),
                arrowprops=dict(arrowstyle="->"), color=palette.COLORS["green"])
    ax.set(xlabel=r"token $k$ (sorted by $\pi_k$; red: $\bar y$, green: rare valid)",
           ylabel=r"$\Delta \log \pi_k$ (nats)",
           title=fr"Pushing $\bar y$={ybar} down: only $\pi_k > \|\pi\|^2-\pi_{{\bar y}}$ = {d['threshold']:.3f} gains")
    ax.legend(loc="lower left")
    plt.show()
    return d


d = plot_squeeze()

# %% [markdown]
# **What you should see.** One blue bar above zero (the mode, $\pi_0 = 0.54$), every other bar below,
# the red one ($\bar y$) far below; the black ticks (formula) sit on the bars.
#
# **Why.** The threshold $\lVert\pi\rVert^2 - \pi_{\bar y} \approx 0.28$ lies between the mode and every
# other token, so the push hands its mass to the mode only.
#
# **Move the parameter.** The slider changes $\eta$ and the dropdown the pushed token: with $\bar y$ the
# mode itself, the threshold falls below zero and *every* other token gains.

# %%
import ipywidgets as widgets

widgets.interact(plot_squeeze, eta=widgets.FloatLogSlider(value=0.3, base=10, min=-3, max=0, step=0.1),
                 ybar=widgets.Dropdown(options=list(range(10)), value=YBAR));

# %% [markdown]
# ## Claim 2: repeating the push starves the rare valid token
#
# Push $\bar y$ down 30 times in a row (each step from the current $\pi$): $\bar y$ goes to zero and the
# mode collects nearly all of its mass, while the rare valid token ends *below* where it started.

# %%
traj = T.repeated_push(0.3, YBAR, 30)
fig, ax = plt.subplots(figsize=(6.5, 3.8))
for k, name, c in ((0, "mode (k=0)", "blue"), (YBAR, r"wrong $\bar y$ (k=3)", "vermillion"),
                   (VALID, "rare valid (k=5)", "green")):
    ax.plot(traj[:, k], color=palette.COLORS[c], label=name)
ax.annotate(f"{traj[0, VALID]:.3f} -> {traj[-1, VALID]:.3f}", (30, traj[-1, VALID]), xytext=(14, 0.008),
            arrowprops=dict(arrowstyle="->"), color=palette.COLORS["green"])
ax.set(xlabel=r"push steps on $\bar y$ ($\eta$ = 0.3)", ylabel="probability", yscale="log",
       title=f"The mode rises {traj[0, 0]:.2f} -> {traj[-1, 0]:.2f}; the rare valid token falls")
ax.legend()
plt.show()

# %% [markdown]
# **What you should see.** The red curve falls by orders of magnitude, blue rises towards 1, green
# (a *valid* token nobody punished) drifts down.
#
# **Why.** At every step only the tokens above the current threshold gain; as the mode grows,
# $\lVert\pi\rVert^2$ grows with it and the bar rises further above the rare token.

# %% [markdown]
# ## Claim 3: the same in the simulator
#
# The `squeeze` preset of `apo_toy` is a suite of one-node prompts ($b = 16$) trained with GRPO through
# the same `policy_loss`, in exact mode (no sampling noise). GRPO grows the dominant correct token and
# squeezes a rare correct one inside the reference Top-K.

# %%
from apo_toy import SimConfig, SuiteSpec, run_methods

table = run_methods(SuiteSpec(n_prompts=16, branching=16, depth=1, n_extra_correct=0), ["grpo"],
                    SimConfig(mode="exact", steps=60, eval_every=5), seeds=1)
g = table.where(method="grpo")
dom, rare = g.column("branch_dominant"), g.column("branch_rare_in")
fig, ax = plt.subplots(figsize=(6.5, 3.8))
look = palette.style("grpo")
ax.plot(g.column("step"), dom, color=look["color"], marker="o", ms=3, label="P(dominant correct token)")
ax.plot(g.column("step"), rare, color=look["color"], ls="--", marker="v", ms=3, label="P(rare correct token in Top-K)")
ax.set(xlabel="RL step (GRPO, exact)", ylabel="probability (mean over prompts)", yscale="log",
       title=f"GRPO: dominant {dom[0]:.2f} -> {dom[-1]:.2f}, rare correct {rare[0]:.4f} -> {rare[-1]:.4f}")
ax.legend()
plt.show()

# %% [markdown]
# **What you should see.** The solid curve rises, the dashed one falls: a correct answer is lost
# although it was never punished. **Why:** every wrong sample pushes mass to the mode (claim 1), and
# every right sample of the mode sharpens it further (positive sharpening, docs/theory.md section 3).
#
# ## Exercises
#
# 1. For a uniform $\pi$ over $b$ tokens, what is the gain threshold? Which tokens gain when one is
#    pushed down? Check with `T.squeeze_profile(pi=...)`.
# 2. Find the smallest $\pi_k$ (for $k\neq\bar y$) that still gains in the demo distribution when
#    $\bar y = 0$ (the mode is pushed down).
# 3. Show numerically that the first-order error is $O(\eta^2)$ in absolute terms: halving $\eta$
#    divides it by about 4.

# %% tags=["solution"] jupyter={"source_hidden": true}
# Solution 1: ||pi||^2 = 1/b, so the threshold is 1/b - 1/b = 0: every other token gains, equally.
uni = T.squeeze_profile(0.01, 0, pi=[0.1] * 10)
assert abs(uni["threshold"]) < 1e-12 and (uni["measured"][1:] > 0).all()
assert np.ptp(uni["measured"][1:]) < 1e-12  # all others gain the same amount
# Solution 2: with ybar the mode, the threshold ||pi||^2 - pi_0 is negative: every other token gains.
d0 = T.squeeze_profile(0.01, 0)
assert d0["threshold"] < 0 and (d0["measured"][1:] > 0).all()
print("smallest gaining pi_k:", d0["pi"][1:].min())
# Solution 3: absolute error ~ eta^2
e = [np.abs(T.squeeze_profile(x)["measured"] - T.squeeze_profile(x)["first_order"]).max() for x in (0.02, 0.01)]
assert 3.5 < e[0] / e[1] < 4.5, e
print("solutions checked")

# %% [markdown]
# ## Closing checks
# The lesson fails in CI if the phenomenon is not there.

# %%
errs = []
for e_ in (1e-2, 1e-3):
    d_ = T.squeeze_profile(e_)
    errs.append(np.abs(d_["measured"] - d_["first_order"]).max() / np.abs(d_["first_order"]).max())
assert errs[0] < 0.05 and errs[1] < errs[0] / 5, errs  # first order, relative error O(eta)
small = T.squeeze_profile(1e-3)
others = [k for k in range(10) if k != YBAR]
assert all((small["measured"][k] > 0) == (small["pi"][k] > small["threshold"]) for k in others)  # gain iff above
assert d["measured"][VALID] < 0 and d["measured"][0] > 0  # rare valid loses, mode gains
assert traj[-1, VALID] < traj[0, VALID] and traj[-1, 0] > traj[0, 0] + 0.05
assert dom[-1] > dom[0] and rare[-1] < rare[0]
print("all checks passed")
