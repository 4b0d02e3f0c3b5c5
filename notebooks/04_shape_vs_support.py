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
# # Lesson 4. Shape matching vs support coverage
#
# **Learning goals.** After this lesson you can
# 1. say which divergence a KL *estimator* optimises when it is used as a loss (k1, k2, k3);
# 2. show that the reverse KL fights the sharpening of a correct answer, and that APO does not touch
#    positive-advantage tokens;
# 3. read a trade-off plot drawn as differences to GRPO: what a regulariser costs in accuracy and what
#    it buys in coverage.
#
# *Time: 20 minutes. Prerequisites: lessons 1-2; KL divergence.*
#
# ## The derivation
#
# A KL penalty to the reference $\rho = \pi_{\text{ref}}$ is *shape matching*: it pulls $\pi_\theta$ toward
# $\rho$'s whole density. APO asks only for *support coverage*: mass on the safe manifold
# $\mathcal M = \mathrm{TopK}(\rho)$. Which KL does a KL term optimise? For a sampled $y\sim\pi$ let
# $\delta = \log\rho(y) - \log\pi(y)$. With $\pi$ held fixed in the expectation (on-policy):
#
# | estimator as a loss | $\mathbb E_{y\sim\pi}[\nabla_z k(y)]$ | optimises |
# |---|---|---|
# | $k_1 = -\delta$ | $0$ | nothing |
# | $k_2 = \tfrac12\delta^2$ | $\pi\odot(\log\pi - \log\rho - \mathrm{KL}(\pi\Vert\rho))$ | reverse KL (shape) |
# | $k_3 = e^{\delta} - 1 - \delta$ | $\pi - \rho$ | **forward** KL (mass-covering pull) |
#
# For $k_3$, $\nabla_z k_3 = (1 - e^\delta)\nabla_z\log\pi(y)$ and $\nabla_z \log\pi(y) = e_y - \pi$, so
#
# $$\mathbb E_{y\sim\pi}[\nabla_z k_3] = \sum_y \pi(y)\Bigl(1-\frac{\rho(y)}{\pi(y)}\Bigr)(e_y - \pi) = \pi - \rho .$$
#
# **The sharpening conflict.** Let token 0 be correct and already sharpened, $\pi_0 > \rho_0$. The reward
# gradient on $z_0$ is $\pi_0(1-p) > 0$. The reverse-KL descent direction on $z_0$ is
# $-\pi_0(\log\pi_0/\rho_0 - \mathrm{KL})$, negative once $\pi_0 > \rho_0 e^{\mathrm{KL}}$: the penalty
# pushes the correct answer back down.

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

# %% [markdown]
# ## Claim 1: as losses, k3 is a forward-KL pull and k2 the reverse KL
#
# `T.kl_identities()` computes $\mathbb E_y[\nabla_z k(y)]$ by **enumeration** through `policy_loss`
# (advantage 0, so only the KL term acts; weights $\pi(y)$ make the loss the exact expectation).

# %%
kl = T.kl_identities()
idx = np.arange(len(kl["pi"]))
fig, ax = plt.subplots(figsize=(8, 3.8))
for off, est, c, lbl in ((-0.2, "k3", "orange", r"$k_3$: $\mathbb{E}\nabla_z$ (enumerated)"),
                         (0.2, "k2", "olive", r"$k_2$: $\mathbb{E}\nabla_z$ (enumerated)")):
    got, want = kl[est]
    ax.bar(idx + off, got, 0.4, color=palette.COLORS[c], label=lbl)
    ax.plot(idx + off, want, "k_", ms=11, mew=2)
ax.plot([], [], "k_", ms=11, mew=2, label=r"closed forms $\pi-\rho$ and $\pi(\log\pi-\log\rho-\mathrm{KL})$")
ax.axhline(0, color="k", lw=0.8)
ax.set(xlabel="token", ylabel=r"expected gradient on $z$",
       title=r"k3 as a loss has gradient $\pi - \rho$ (forward KL); k2 the reverse KL's")
ax.legend(fontsize=7)
plt.show()
print({est: float(np.abs(kl[est][0] - kl[est][1]).max()) for est in ("k1", "k2", "k3")}, "max |enumerated - closed form|")

# %% [markdown]
# **What you should see.** Orange and olive bars of different shapes, each topped by its black tick.
# **Why.** The enumerated gradients *are* the closed forms (to $10^{-16}$): the widely used k3 term
# (verl's `low_var_kl`) pulls toward $\rho$'s mass, it does not minimise $\mathrm{KL}(\pi\Vert\rho)$.

# %% [markdown]
# ## Claim 2: the reverse KL pushes a sharpened correct answer back down

# %%
sc = T.sharpening_conflict()
fig, ax = plt.subplots(figsize=(7, 3.8))
ax.plot(sc["ratio"], sc["reward"], color=palette.color("grpo"), marker="o", ms=3, markevery=4,
        label=r"reward gradient on $z_0$: $\pi_0(1-\pi_0)$")
ax.plot(sc["ratio"], sc["kl_descent"], color=palette.color("grpo_kl_full"), marker="D", ms=3, markevery=4,
        label=r"reverse-KL descent on $z_0$")
ax.axhline(0, color="k", lw=0.8)
cross = sc["ratio"][np.argmax(sc["kl_descent"] < 0)]
ax.axvspan(cross, sc["ratio"].max(), color=palette.COLORS["grey"], alpha=0.2)
ax.annotate("conflict: the KL term\npushes the correct token down", (cross, 0), xytext=(cross + 0.3, 0.08), fontsize=8,
            arrowprops=dict(arrowstyle="->"))
ax.set(xlabel=r"sharpening $\pi_0 / \rho_0$ of the correct token", ylabel=r"force on $z_0$",
       title="Reward and reverse KL pull token 0 in opposite directions once it is sharpened")
ax.legend(fontsize=8, loc="lower left")
plt.show()

# %% [markdown]
# **What you should see.** The reward force stays positive; the KL force changes sign near
# $\pi_0/\rho_0 \approx e^{\mathrm{KL}}$ and grows negative after it (grey band). **Why.** Shape matching
# penalises every departure from $\rho$'s shape, including the one correctness needs. APO keeps GRPO's
# ratio on positive-advantage tokens (checked at the end: identical gradients), so it has no such term.

# %% [markdown]
# ## Claim 3: KL regularisers buy coverage with accuracy; APO barely moves either
#
# `T.tradeoff(kl_coef, beta)` trains every arm on the same 12-prompt tabular suite (exact, 60 steps,
# 2 seeds) and returns final pass@1 and coverage **minus GRPO's** on the same suite.

# %%
tradeoff = lru_cache(maxsize=4)(T.tradeoff)


def plot_tradeoff(kl_coef=0.2):
    t = tradeoff(kl_coef)
    looks = palette.styles(t["arms"])
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for m in t["arms"]:
        dx, dy = t["pass@1"][m], t["coverage"][m]
        ax.errorbar(dx.mean(), dy.mean(), xerr=np.ptp(dx) / 2, yerr=np.ptp(dy) / 2, color=looks[m]["color"],
                    marker=looks[m]["marker"], ms=8, capsize=3, ls="none", label=style.label(m))
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(0, color="k", lw=0.8)
    ax.annotate("GRPO", (0, 0), xytext=(0.004, -0.02), fontsize=8)
    ax.set(xlabel="final pass@1 minus GRPO (same suite)", ylabel="final coverage minus GRPO",
           title=f"KL (coef {kl_coef:g}) trades pass@1 for coverage; APO (beta {t['beta']:g}) stays near GRPO")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    plt.show()
    return t


t = plot_tradeoff()

# %% [markdown]
# **What you should see.** The KL arms up and to the left (more coverage, less pass@1); the three APO
# readings near the origin, reading A slightly left, C and H slightly up on one seed (bars: the two
# seeds). **Why.** A KL coefficient large enough to keep the support also pulls the correct mode back
# toward $\rho$'s shape (claim 2). APO's pull acts only on negative-advantage tokens, which become rare
# as pass@1 rises, so on this small tabular suite it changes little; lesson 5 looks inside the pull,
# lesson 7 at what a fair comparison concludes.
#
# **Move the parameter.** The slider sets the KL coefficient of the three KL arms.

# %%
import ipywidgets as widgets

widgets.interact(plot_tradeoff, kl_coef=widgets.SelectionSlider(options=[0.02, 0.05, 0.2, 0.5], value=0.2));

# %% [markdown]
# ## Exercises
#
# 1. Verify the $k_3$ row of the table by hand: compute $\sum_y \pi(y)(1-\rho(y)/\pi(y))(e_y - \pi)$ with numpy
#    from `kl["pi"]`, `kl["rho"]` and compare with `kl["k3"][0]`.
# 2. In `sc`, find the sharpening $\pi_0/\rho_0$ where the KL force changes sign, and show that its sign is
#    always that of $\mathrm{KL} - \log(\pi_0/\rho_0)$.
# 3. Show that APO gives exactly GRPO's gradient on a positive-advantage token (`policy_loss` with
#    `LossConfig(name="apo")` vs `"grpo"`, $A = +1.5$).

# %% tags=["solution"] jupyter={"source_hidden": true}
pi_, rho_ = kl["pi"], kl["rho"]
by_hand = sum(pi_[y] * (1 - rho_[y] / pi_[y]) * (np.eye(len(pi_))[y] - pi_) for y in range(len(pi_)))
assert np.allclose(by_hand, kl["k3"][0], atol=1e-12)  # Solution 1
# Solution 2: the force changes sign exactly where log(pi_0 / rho_0) = KL(pi || rho)
i = int(np.argmax(sc["kl_descent"] < 0))
print(f"sign change between pi_0/rho_0 = {sc['ratio'][i - 1]:.3f} and {sc['ratio'][i]:.3f}; "
      f"e^KL there: {np.exp(sc['kl'][i - 1]):.3f}, {np.exp(sc['kl'][i]):.3f}")
assert (np.sign(np.log(sc["ratio"]) - sc["kl"]) == -np.sign(sc["kl_descent"])).all()
rho0 = torch.softmax(torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), -1)
# Solution 3
from apo_llm.objectives import LossConfig, policy_loss

def grad_on_positive(name):
    z = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    logpi = torch.log_softmax(z, -1)
    topk = rho0.topk(4).indices
    loss, _ = policy_loss(LossConfig(name=name), logpi[:1].view(1, 1), logpi[:1].detach().view(1, 1),
                          torch.tensor([1.5], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool),
                          anchor_logp=logpi[topk].view(1, 1, 4), anchor_ref_logp=rho0.log()[topk].view(1, 1, 4),
                          anchor_is_sampled=(topk == 0).view(1, 1, 4))
    loss.backward()
    return z.grad
g_apo, g_grpo = grad_on_positive("apo"), grad_on_positive("grpo")
assert torch.allclose(g_apo, g_grpo, atol=1e-14, rtol=0)
print("solutions checked")

# %% [markdown]
# ## Closing checks

# %%
for est in ("k1", "k2", "k3"):
    assert np.allclose(*kl[est], atol=1e-12), est
assert not np.allclose(kl["k3"][0], kl["k2"][0], atol=1e-3)  # k3 is not the reverse KL
assert sc["reward"].min() > 0 and sc["kl_descent"][0] > 0 > sc["kl_descent"][-1]  # the conflict
for m in ("grpo_kl", "grpo_kl_full"):
    assert t["pass@1"][m].mean() < -0.02, m  # a strong KL costs accuracy ...
    assert t["coverage"][m].mean() > 0.0, m  # ... and keeps more support than GRPO
assert abs(t["pass@1"]["apo_old_token"].mean()) < abs(t["pass@1"]["grpo_kl"].mean())
print("all checks passed")
