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
# # Lesson 6. From the tree to tokens: the same loss on a tiny LLM
#
# **Learning goals.** After this lesson you can
# 1. map the simulator's objects to an LLM's: node $\to$ context $(x, y_{<t})$, children $\to$ vocabulary,
#    safe manifold $\to \mathrm{TopK}(\pi_{\text{ref}}(\cdot\mid x, y_{<t}))$;
# 2. compute APO's per-token inputs from a model without ever holding a $[B, T, V]$ float tensor;
# 3. read a training run's APO metrics and a pass@k evaluation.
#
# *Time: 20 minutes (plus about 90 s the first time, to build the tiny model). Prerequisites: lessons 1, 4, 5.*
#
# ## The mapping
#
# Per completion token $y_t$ the trainer (`apo_llm.train`) needs, with $\mathcal M_t = \mathrm{TopK}(\pi_{\text{ref}}(\cdot\mid y_{<t}))$:
#
# $$\log\pi_\theta(y_t),\ \log\pi_{\text{old}}(y_t) \ \ [B,T], \qquad
# \text{ids of } \mathcal M_t,\ \log\pi_{\text{ref}}(\mathcal M_t)\ \ [B,T,K] \ (\text{reference pass}), \qquad
# \log\pi_\theta(\mathcal M_t)\ \ [B,T,K]\ (\text{training pass}).$$
#
# `apo_llm.modeling.completion_token_stats` computes them in chunks of positions (a $[B,T,V]$ float32
# tensor would be 4 GB at $B{=}8$, $T{=}1024$, $V{=}128\mathrm k$) and hands them to the very `policy_loss`
# the simulator used. Exclusive anchoring drops $y_t$ from $\mathcal M_t$: $S_t = \mathcal M_t\setminus\{y_t\}$,
# $Z_{\text{ref},t} = \sum_{k\in S_t}\pi_{\text{ref}}(k)$, $r_{\text{anchor},t} = M_{S_t}/Z_{\text{ref},t}$.

# %%
import os
import sys

ROOT = os.path.abspath("..") if os.path.basename(os.getcwd()) == "notebooks" else os.getcwd()
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import copy
import json
import shutil
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

torch.set_num_threads(2)
from apo_llm.data import synthetic_problems
from apo_llm.modeling import completion_token_stats, load_model_and_tokenizer
from apo_llm.objectives import LossConfig, group_advantages, policy_loss
from apo_llm.prompts import format_prompts
from apo_llm.rewards import default_reward_for, score_completions
from apo_llm.rollout import generate_completions
from apo_llm.tiny import ensure_tiny_model
from apo_toy import palette
from apo_toy import teaching as T
from paper_figures import style

style.setup()
# %matplotlib inline
model_dir = ensure_tiny_model(quick=True)  # cached under $APO_CACHE_DIR (default ~/.cache/apo_rlvr)
ref, tok = load_model_and_tokenizer(str(model_dir), dtype="float32", device="cpu")
ref.eval()
print(model_dir.name, "base sampled pass@1:", json.loads((model_dir / "build_info.json").read_text())["pass_at_1"])

# %% [markdown]
# ## Rollouts, rewards, advantages
# Four held-out synthetic problems, $G = 4$ completions each, 0/1 rewards, GRPO's group advantages
# $A_i = (R_i - \bar R_g)/(\mathrm{std}_g + \epsilon)$.

# %%
problems = synthetic_problems(4, seed=0, split="test")
prompts = format_prompts(tok, [p.prompt for p in problems], "auto")
G = 4
comp = generate_completions(ref, tok, prompts, G, max_new_tokens=64, temperature=1.0, seed=0)
rewards = torch.tensor(score_completions(default_reward_for("synthetic"), comp.texts,
                                         [problems[i].gold for i in comp.prompt_index]))
adv = group_advantages(rewards, G)  # [B]
print(problems[0].prompt, "->", repr(comp.texts[0][:80]))
print("rewards per group:", rewards.view(-1, G).tolist())

# %% [markdown]
# A "policy" that has drifted from the reference: a copy with a perturbed output layer (in training this
# is the LoRA-adapted model and the reference is the adapter switched off). The reference pass keeps a
# Top-16 per position; every $K \le 16$ is a prefix of it.

# %%
policy = copy.deepcopy(ref)
torch.manual_seed(0)
with torch.no_grad():
    head = policy.get_output_embeddings().weight
    head.add_(0.5 * head.std() * torch.randn_like(head))
KMAX = 16
ids, am, n_prompt = comp.input_ids, comp.attention_mask, comp.n_prompt
mask = comp.completion_mask.bool()  # [B, T]
with torch.no_grad():
    ref_stats = completion_token_stats(ref, ids, am, n_prompt, topk=KMAX)  # sorted by pi_ref, [B, T, 16]
pol = completion_token_stats(policy, ids, am, n_prompt, gather_ids=ref_stats.topk_ids)  # differentiable
targets = ids[:, n_prompt:]  # y_t, [B, T]

# %% [markdown]
# ## Claim 1: a small Top-K already holds the sampled token and most of the policy's mass
#
# `T.anchor_stats_by_k(...)` returns, per $K$: the share of sampled tokens inside $\mathrm{TopK}(\pi_{\text{ref}})$,
# the drifted policy's mass on that set, and the median $r_{\text{anchor}}$ (exclusive anchoring).

# %%
def plot_anchor_stats(ks=(1, 2, 4, 8, 16)):
    a = T.anchor_stats_by_k(ref_stats.topk_logp, pol.gathered_logp.detach(), ref_stats.topk_ids, targets, mask, ks)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(a["K"]))
    a1.bar(x - 0.2, a["inside"], 0.4, color=palette.COLORS["blue"], label="sampled token inside TopK(ref)")
    a1.bar(x + 0.2, a["manifold_mass"], 0.4, color=palette.COLORS["sky"], label="policy mass on TopK(ref)")
    a1.set_xticks(x, [str(k) for k in a["K"]])
    low = max(0.0, min(a["inside"].min(), a["manifold_mass"].min()) - 0.1)
    a1.set(xlabel="K", ylabel="share", ylim=(low, 1.01),
           title=f"K = {a['K'][-1]}: {a['inside'][-1]:.1%} of sampled tokens inside, {a['manifold_mass'][-1]:.1%} of the mass")
    a1.legend(fontsize=7, loc="lower right")
    a2.semilogy(a["K"], a["r_anchor"], "o-", color=palette.color("apo"))
    a2.axhline(2.5, color="k", ls=":", lw=1)
    a2.annotate(r"above $(\lambda-1+\varepsilon_{low})/\beta$ = 2.5 the rectified clip silences a token", (a["K"][0], 2.5),
                xytext=(a["K"][0], 2.5 * 0.8), fontsize=7)
    a2.set_xscale("log", base=2)
    a2.set_xticks(a["K"], [str(k) for k in a["K"]])
    a2.set(xlabel="K", ylabel=r"median $r_{anchor}$ (tokens with $Z_{ref} > 0$)",
           title=r"The typical $r_{anchor}$ stays below the silencing line")
    plt.show()
    return a


anchors = plot_anchor_stats()

# %% [markdown]
# **What you should see.** The sampled-token share climbs with $K$ and is close to 1 at $K = 8$; the drifted
# policy keeps most of its mass on the reference Top-K; the *median* $r_{\text{anchor}}$ stays below the
# silencing line. **Why.** A confident model samples its reference's top token most of the time, so
# $S = \mathcal M\setminus\{y_t\}$ holds little reference mass: $Z_{\text{ref}}$ is small and any policy mass on
# $S$ makes $r_{\text{anchor}}$ large. The typical token stays below the line, but the *mean* that `policy_loss`
# logs below (`apo/r_anchor_mean`) is dominated by the few tokens with tiny $Z_{\text{ref}}$, and those are the
# ones the rectified clip silences (`apo/neg_clipped_frac`, lesson 5).
#
# **Move the parameter.** Pick which $K$ values to show.

# %%
import ipywidgets as widgets

widgets.interact(lambda kmax: plot_anchor_stats(tuple(k for k in (1, 2, 4, 8, 16) if k <= kmax)),
                 kmax=widgets.Dropdown(options=[2, 4, 8, 16], value=16));

# %% [markdown]
# ## The loss on real tensors
# The same `policy_loss` as in the simulator, at $K = 8$; the APO loss backpropagates through the
# chunked statistics into the model.

# %%
K = 8
is_sampled = ref_stats.topk_ids[..., :K] == targets[..., None]  # [B, T, K]
losses = {}
for name in ("grpo", "apo"):
    cfg = LossConfig(name=name, apo_k=K)
    extra = dict(anchor_logp=pol.gathered_logp[..., :K], anchor_ref_logp=ref_stats.topk_logp[..., :K],
                 anchor_is_sampled=is_sampled) if cfg.needs_anchors else {}
    losses[name] = policy_loss(cfg, pol.logp, pol.logp.detach(), adv.to(pol.logp.dtype), mask, **extra)
    print(name, {k: round(v, 4) for k, v in losses[name][1].items() if k.startswith(("apo/", "loss", "frac_neg"))})
policy.zero_grad()
losses["apo"][0].backward()
grad_ok = all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)
print("APO loss backpropagates into the model:", grad_ok)

# %% [markdown]
# ## Claim 2: a training run and its evaluation, read end to end
# A 2-step APO run through the trainer's Python API (LoRA, 2 prompts $\times$ 4 completions per step), then
# base vs adapter pass@k on 4 held-out problems with $n = 8$ samples (unbiased estimator). Two steps change
# the model little: the point is the procedure and how to read it.

# %%
from apo_llm.config import build_config
from apo_llm.evaluate import EvalConfig, run_eval
from apo_llm.train import train

work = Path(tempfile.mkdtemp(prefix="apo_lesson6_"))
cfg = build_config(cli={
    "model": {"name_or_path": str(model_dir)},
    "rollout": {"num_generations": 4, "max_new_tokens": 48},
    "train": {"steps": 2, "prompts_per_step": 2, "mini_batch_size": 8, "micro_batch_size": 8, "num_threads": 2},
    "eval": {"every": 2, "num_problems": 4, "num_samples": 4, "k": [1, 4]},
    "logging": {"output_dir": str(work), "run_name": "apo_tiny", "progress": False, "plots": False},
    "checkpoint": {"every": 0},
})
summary = train(cfg)
run_dir = work / "apo_tiny"
records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
steps = [r for r in records if not any(k.startswith("eval/") for k in r)]
show = ["reward", "frac_reward_zero_std", "apo/neg_clipped_frac", "apo/manifold_mass", "apo/r_anchor_mean", "apo/pull"]
for r in steps:
    print("step", r["step"], {k: round(r[k], 4) for k in show if k in r})
ev = run_eval(EvalConfig(model=str(model_dir), adapters=[str(run_dir)], labels=["apo"], n=8, k="1,2,4,8", limit=4,
                         max_new_tokens=48, out=str(work / "eval"), device="cpu", batch_size=32))
ks = ev["ks"]
looks = palette.styles(list(ev["models"]))
fig, ax = plt.subplots(figsize=(6, 3.8))
for j, (lab, e) in enumerate(ev["models"].items()):  # models side by side (x nudged) so equal curves stay visible
    ax.errorbar(np.array(ks) * 1.06 ** j, [e["pass@k"][str(k)]["mean"] for k in ks],
                yerr=[e["pass@k"][str(k)]["se"] or 0 for k in ks], color=looks[lab]["color"],
                ls=looks[lab]["linestyle"], marker=looks[lab]["marker"], capsize=3, label=lab)
ax.set(xscale="log", xlabel="k", ylabel="pass@k (unbiased), $\\pm$1 s.e. over problems",
       title="Base vs the 2-step APO adapter: within noise on 4 problems")
ax.set_xticks(ks, [str(k) for k in ks])
ax.minorticks_off()
ax.legend()
plt.show()

# %% [markdown]
# **What you should see.** Two pass@k curves rising with $k$, error bars that overlap: two steps on four
# problems cannot show an effect, and the plot says so. **How to read the metrics** (names follow TRL / verl):
# `frac_reward_zero_std` is the share of groups with equal rewards (advantage 0: no gradient, no pull);
# `apo/neg_clipped_frac` the share of negative tokens the clip silenced (lesson 5); `apo/manifold_mass` the
# policy's mass on the reference Top-K, the quantity APO protects; `apo/pull` is $|A|\beta r_{\text{anchor}}$.
# `python -m paper_figures --miniature ...` runs the real comparison (docs/).
#
# ## Exercises
#
# 1. Recompute `apo/manifold_mass` of the APO loss above from `pol.gathered_logp[..., :8]` and `mask`.
# 2. Check that the share of sampled tokens inside the Top-K can only grow with $K$ (`anchors["inside"]`).
# 3. Compute the unbiased pass@k of one problem by hand, $1 - \binom{n-c}{k}/\binom{n}{k}$, for $n=8$, $c=2$,
#    $k=4$, and compare with `apo_llm.metrics.pass_at_k`.

# %% tags=["solution"] jupyter={"source_hidden": true}
mm = float(pol.gathered_logp[..., :K].detach().exp().sum(-1)[mask].mean())
assert abs(losses["apo"][1]["apo/manifold_mass"] - mm) < 1e-5  # Solution 1
assert (np.diff(anchors["inside"]) >= 0).all()  # Solution 2
from math import comb

from apo_llm.metrics import pass_at_k

assert abs(pass_at_k(8, 2, 4) - (1 - comb(6, 4) / comb(8, 4))) < 1e-12  # Solution 3
print("solutions checked")

# %% [markdown]
# ## Closing checks

# %%
assert 0.0 < anchors["manifold_mass"][-1] <= 1.0 + 1e-6 and anchors["inside"][-1] > anchors["inside"][0]
assert torch.isfinite(losses["apo"][0]) and grad_ok
assert len(steps) == 2 and all(0.0 <= r["apo/manifold_mass"] <= 1.0 + 1e-6 for r in steps)
for lab, e in ev["models"].items():
    curve = [e["pass@k"][str(k)]["mean"] for k in ks]
    assert all(b >= a - 1e-12 for a, b in zip(curve, curve[1:])), (lab, curve)
shutil.rmtree(work, ignore_errors=True)  # the run and eval folders were only for this lesson
print("all checks passed")
