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
# # Lesson 5. The pull, the clip, and when APO silences itself
#
# **Learning goals.** After this lesson you can
# 1. write APO's rectified ratio and show that its pull is gradient **ascent on the safe-manifold mass**;
# 2. explain why the pull is *elastic* (stronger when the manifold has lost mass);
# 3. predict, from $\lambda$, $\beta$ and the clip range, when the rectified clip switches off every
#    negative token, and why the `push_only` placement does not.
#
# *Time: 20 minutes. Prerequisites: lessons 1 and 4; PPO's clipped surrogate.*
#
# ## The derivation
#
# For a negative-advantage token $y$ ($A<0$) APO replaces the ratio $w = \pi_\theta(y)/\pi_{\text{old}}(y)$ by
#
# $$r_{\text{APO}} = \lambda\, w - \beta\, r_{\text{anchor}}, \qquad
# S = \mathrm{TopK}(\pi_{\text{ref}}) \setminus \{y\}, \quad Z_{\text{ref}} = \sum_{k\in S}\pi_{\text{ref}}(k), \quad
# r_{\text{anchor}} = \frac{1}{Z_{\text{ref}}}\sum_{k\in S}\pi_\theta(k) = \frac{M_S}{Z_{\text{ref}}}$$
#
# (reading A; reading C divides by $M_S(\theta_{\text{old}})$ instead, reading H weighs each anchor by
# $\pi_\theta/\pi_{\text{old}}$; docs/method.md section 3). The loss term $-A\,r_{\text{APO}}$ contains
# $A\beta\, r_{\text{anchor}}$, whose gradient is $-(\beta|A|/Z_{\text{ref}})\nabla M_S$: minimising it is
# **ascent on $M_S$**. In logits ($\partial M_S/\partial z_j = \pi_j(\mathbb 1[j\in S] - M_S)$):
#
# $$-\frac{\partial L}{\partial z_j} = |A|\Bigl[\lambda w\,(\pi_j - \mathbb 1[j=y])
#   + \frac{\beta}{Z_{\text{ref}}}\,\pi_j\,\bigl(\mathbb 1[j\in S] - M_S\bigr)\Bigr].$$
#
# Every anchor gets an extra push-up $(\beta/Z_{\text{ref}})\,\pi_j(1-M_S)$ per unit $|A|$, which **grows
# as $M_S$ shrinks**: the pull is elastic.
#
# **The clip.** With `apo_clip="rectified"` the whole $r_{\text{APO}}$ goes through PPO's clip; for $A<0$
# a ratio below $1-\varepsilon_{\text{low}}$ is clipped and the token gets *zero* gradient, push included.
# At the start of an update $w=1$, so the token is silenced iff
#
# $$\lambda - \beta\, r_{\text{anchor}} < 1 - \varepsilon_{\text{low}}
# \iff r_{\text{anchor}} > \frac{\lambda - 1 + \varepsilon_{\text{low}}}{\beta}.$$
#
# Reading C has $r_{\text{anchor}} = 1$ at $w=1$: with $\lambda = 1.05$, $\varepsilon_{\text{low}} = 0.2$ every
# negative token is silenced as soon as $\beta > 0.25$ (the run is then positive-only learning, and the
# project labels it so). `push_only` clips $\lambda w$ only and adds the pull unclipped: never silenced.

# %%
import os
import sys

ROOT = os.path.abspath("..") if os.path.basename(os.getcwd()) == "notebooks" else os.getcwd()
sys.path.insert(0, ROOT)
import matplotlib.pyplot as plt
import numpy as np
import torch

torch.set_num_threads(1)
from apo_llm.objectives import LossConfig
from apo_toy import palette
from apo_toy import teaching as T
from paper_figures import style

style.setup()
# %matplotlib inline
cfg0 = LossConfig(name="apo")
BETA_STAR = cfg0.apo_lambda - 1 + cfg0.eps_low  # 0.25

# %% [markdown]
# ## Claim 1: the pull is elastic
#
# `T.elastic_pull(beta)` moves logit mass off the Top-K step by step and measures, by autograd through
# `policy_loss`, the pull on an anchor per unit of its probability, next to $|A|(\beta/Z_{\text{ref}})(1-M_S)$.

# %%
ep = T.elastic_pull()
fig, ax = plt.subplots(figsize=(6.5, 4))
ax.plot(ep["manifold_mass"], ep["measured"], "o", ms=8, color=palette.color("apo_push_only"),
        label="measured (autograd through policy_loss)")
ax.plot(ep["manifold_mass"], ep["predicted"], "-", color="k", lw=1, label=r"$|A|\,(\beta/Z_{ref})\,(1-M_S)$")
ax.annotate("less mass on the manifold:\nstronger pull", (ep["manifold_mass"][-1], ep["measured"][-1]),
            xytext=(0.25, 0.5 * ep["measured"][-1]), fontsize=8, arrowprops=dict(arrowstyle="->"))
ax.set(xlabel=r"safe-manifold mass $M_S$", ylabel=r"pull on an anchor per unit $\pi_j$",
       title=r"The pull grows linearly as $M_S$ shrinks (elastic recovery)")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# **What you should see.** The dots on the line, falling from left to right: the pull at $M_S \approx 0.05$ is about
# 2.5 times the pull at $M_S \approx 0.6$. **Why.** The factor $(1-M_S)$ in the logit gradient above:
# ascent on $M_S$ moves each anchor's logit relative to the mass *outside* the set.

# %% [markdown]
# ## Claim 2: past a threshold the rectified clip silences every negative token
#
# `T.silenced_share(betas, drift)` builds 400 negative-advantage tokens (reference logits, a policy
# `drift` away from them, a sampled wrong token), and reads `policy_loss`'s own
# `apo/neg_clipped_frac`: the share of negative tokens whose gradient the clip zeroes at $w = 1$.

# %%
def plot_silence(drift=1.0):
    s = T.silenced_share(drift=drift)
    looks = palette.styles(T.FIGURE_ARMS["05 silence"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, lbl in (("apo", "rectified, reading A (r_anchor = M_S / Z_ref)"),
                   ("apo_old_mass", "rectified, reading C (r_anchor = 1 at w = 1)"),
                   ("apo_push_only", "push_only (pull outside the clip)")):
        ax.plot(s["beta"], s[m], color=looks[m]["color"], ls=looks[m]["linestyle"], marker=looks[m]["marker"],
                ms=4, label=lbl)
    ax.axvline(BETA_STAR, color="k", ls=":", lw=1)
    ax.annotate(r"$\beta^* = \lambda - 1 + \varepsilon_{low}$ = " + f"{BETA_STAR:.2f}", (BETA_STAR, 0.5),
                xytext=(BETA_STAR + 0.08, 0.45), fontsize=8, arrowprops=dict(arrowstyle="->"))
    ax.axvline(0.1, color=palette.COLORS["grey"], lw=1)
    ax.text(0.105, 0.85, "paper's beta", fontsize=7, color=palette.COLORS["grey"])
    ax.set(xlabel=r"$\beta$", ylabel="share of A<0 tokens with zero gradient", ylim=(-0.03, 1.03),
           title=f"Rectified APO goes silent past beta = {BETA_STAR:.2f}; push_only never does")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(0.0, 0.6))
    plt.show()
    return s


sil = plot_silence()

# %% [markdown]
# **What you should see.** Reading C jumps from 0 to 1 at $\beta^* = 0.25$; reading A rises around the same
# place but smoothly (its $r_{\text{anchor}}$ differs per token, printed below); push_only stays at 0.
# **Why.** The threshold condition $r_{\text{anchor}} > (\lambda-1+\varepsilon_{\text{low}})/\beta$ above. At the
# paper's $\beta = 0.1$ a token is silenced only if $r_{\text{anchor}} > 2.5$, which in an LLM happens when the
# sampled token is the reference's own top token (small $Z_{\text{ref}}$): lesson 6 measures it.
#
# **Move the parameter.** With a larger `drift` the policy is farther from the reference, $r_{\text{anchor}}$
# spreads out, and reading A starts to silence tokens at smaller $\beta$.

# %%
print("reading A r_anchor quantiles (10/50/90%):", np.round(np.percentile(sil["r_anchor"], [10, 50, 90]), 3))
import ipywidgets as widgets

widgets.interact(plot_silence, drift=widgets.FloatSlider(value=1.0, min=0.0, max=3.0, step=0.25));

# %% [markdown]
# ## Exercises
#
# 1. At `drift=0` the policy *is* the reference. What is reading A's $r_{\text{anchor}}$ then, and what does
#    its curve look like? Check with `T.silenced_share(drift=0.0)`.
# 2. Show with autograd that the pull's gradient equals $-(\beta|A|/Z_{\text{ref}})\nabla_z M_S$ on one token
#    (use `T.elastic_pull`'s construction or your own: `policy_loss` with $\beta$ minus with $\beta = 0$).
# 3. For reading A at $\beta = 0.1$: what $r_{\text{anchor}}$ silences a token? Express it through
#    $Z_{\text{ref}}$ when the policy has all of $S$'s reference mass, $M_S = Z_{\text{ref}}$, plus a fraction $f$ of the
#    sampled token's mass moved onto $S$.

# %% tags=["solution"] jupyter={"source_hidden": true}
# Solution 1: r_anchor = M_S / Z_ref = 1 for every token; reading A becomes reading C (a step at beta*).
s0 = T.silenced_share(drift=0.0)
assert np.allclose(s0["r_anchor"], 1.0) and np.allclose(s0["apo"], s0["apo_old_mass"])
assert (s0["apo"][s0["beta"] > BETA_STAR + 1e-9] == 1).all() and (s0["apo"][s0["beta"] < BETA_STAR - 1e-9] == 0).all()
# Solution 2
from apo_llm.objectives import policy_loss

g = torch.Generator().manual_seed(5)
z, z_ref = torch.randn(10, dtype=torch.float64, generator=g), torch.randn(10, dtype=torch.float64, generator=g)
topk, y, A, beta = z_ref.topk(5).indices, int(z_ref.topk(5).indices[1]), -0.7, 0.1

def grad(bt):
    zz = z.clone().requires_grad_(True)
    lp = torch.log_softmax(zz, -1)
    loss, _ = policy_loss(LossConfig(name="apo", apo_beta=bt, apo_clip="push_only", apo_k=5), lp[y].view(1, 1),
                          lp[y].detach().view(1, 1), torch.tensor([A], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool),
                          anchor_logp=lp[topk].view(1, 1, 5), anchor_ref_logp=torch.log_softmax(z_ref, -1)[topk].view(1, 1, 5),
                          anchor_is_sampled=(topk == y).view(1, 1, 5))
    loss.backward()
    return zz.grad

S = topk[topk != y]
zz = z.clone().requires_grad_(True)
torch.softmax(zz, -1)[S].sum().backward()
Z = float(torch.softmax(z_ref, -1)[S].sum())
assert torch.allclose(grad(beta) - grad(0.0), -(beta * abs(A) / Z) * zz.grad, atol=1e-14)
# Solution 3: silenced iff r_anchor > (lambda - 1 + eps_low) / beta = 2.5. With M_S = Z_ref + f pi(y):
# r_anchor = 1 + f pi(y) / Z_ref > 2.5  <=>  Z_ref < f pi(y) / 1.5 : a small anchor set next to a big sampled token.
assert abs((cfg0.apo_lambda - 1 + cfg0.eps_low) / 0.1 - 2.5) < 1e-12
print("solutions checked")

# %% [markdown]
# ## Closing checks

# %%
assert np.allclose(ep["measured"], ep["predicted"], atol=1e-12) and ep["measured"][-1] > 2 * ep["measured"][0]
c = sil["apo_old_mass"]
assert (c[sil["beta"] < BETA_STAR - 1e-9] == 0).all() and (c[sil["beta"] > BETA_STAR + 1e-9] == 1).all()
assert (sil["apo_push_only"] == 0).all()
assert sil["apo"][0] == 0 and sil["apo"][-1] > 0.9 and np.ptp(sil["apo"]) > 0.9  # visible range: 0 -> 1
print("all checks passed")
