"""The data behind the course's figures (notebooks/): one plain function per lesson widget.

Each function returns the numbers a lesson plots, so a lesson runs headless with its defaults, its
widget (ipywidgets) only re-calls the function, and tests/teaching/test_lessons.py checks the data
(ranges that a reader can see, the claims the figures state). Everything runs on the simulator or
on tensors handed in; nothing here imports transformers or matplotlib.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional, Sequence

import numpy as np
import torch

from apo_llm.objectives import LossConfig, anchor_ratio, policy_loss

from .coupled import CoupledSpec, build_coupled_suite
from .dynamics import exact_batch, exact_loss
from .measures import PASS_KS, per_prompt_success
from .methods import get_method
from .node import squeeze_step
from .presets import RSC_RUN, get_preset
from .training import SimConfig, _optimizer, exact_update, make_policy, run_methods
from .tree import SuiteSpec, build_suite, reach_and_leaf_logp, success_q

# the arms each lesson draws in one figure (tests/toy/test_palette.py checks they look distinct)
FIGURE_ARMS = {
    "03 crossover": ("grpo", "apo_old_token"),
    "04 tradeoff": ("grpo", "grpo_kl", "grpo_kl_full", "kl_on_wrong", "apo", "apo_old_mass", "apo_old_token"),
    "05 silence": ("apo", "apo_push_only", "apo_old_mass"),
    "07 verdict": ("grpo", "apo_old_token"),
}

# ------------------------------------------------------------------------------------------------
# Lesson 1: squeezing at one node
# ------------------------------------------------------------------------------------------------

PI_DEMO = (0.55, 0.15, 0.10, 0.06, 0.05, 0.03, 0.025, 0.02, 0.015, 0.01)


def squeeze_profile(eta: float = 0.3, ybar: int = 3, pi: Sequence[float] = PI_DEMO) -> dict:
    """One descent step on log pi_ybar at one node: measured and first-order change of log pi_k.

    First order: d log pi_k = eta (pi_k - ||pi||^2 + pi_ybar) for k != ybar, and
    d log pi_ybar = -eta (1 + ||pi||^2 - 2 pi_ybar); token k gains iff pi_k > ||pi||^2 - pi_ybar.
    """
    p = torch.tensor(pi, dtype=torch.float64)
    p = p / p.sum()
    if not 0 <= ybar < len(p):
        raise ValueError(f"ybar: {ybar} is not a token index in 0..{len(p) - 1}")
    sq = float((p ** 2).sum())
    first = eta * (p - sq + p[ybar])
    first[ybar] = -eta * (1 + sq - 2 * p[ybar])
    after = torch.softmax(squeeze_step(p, ybar, eta), -1)
    return {"pi": p.numpy(), "after": after.numpy(), "measured": (after.log() - p.log()).numpy(),
            "first_order": first.numpy(), "threshold": sq - float(p[ybar]), "ybar": ybar}


def repeated_push(eta: float = 0.3, ybar: int = 3, steps: int = 30, pi: Sequence[float] = PI_DEMO) -> np.ndarray:
    """Probabilities [steps + 1, b] while ybar is pushed down `steps` times."""
    p = torch.tensor(pi, dtype=torch.float64)
    traj = [p / p.sum()]
    for _ in range(steps):
        traj.append(torch.softmax(squeeze_step(traj[-1], ybar, eta), -1))
    return torch.stack(traj).numpy()


# ------------------------------------------------------------------------------------------------
# Lesson 2: recursive contraction on the tree (tabular model)
# ------------------------------------------------------------------------------------------------


def contraction(steps: int = 100, lr: Optional[float] = None, n_prompts: int = 16, seed: int = 0) -> dict:
    """GRPO (exact) on the tabular tree: pass@1, coverage and distinct@256 per step, and the base."""
    cfg = SimConfig(mode="exact", steps=steps, eval_every=max(1, steps // 20))
    if lr is not None:
        cfg = dataclasses.replace(cfg, lr=lr)
    table = run_methods(SuiteSpec(n_prompts=n_prompts, seed=seed), ["grpo"], cfg)
    g, base = table.where(method="grpo"), table.where(method="base").rows[0]
    keys = ("pass@1", "coverage", "distinct@256")
    return {"step": g.column("step"), **{k: g.column(k) for k in keys}, "base": {k: base[k] for k in keys}}


def reach_scaling(n_prompts: int = 4, seed: int = 3) -> dict:
    """The exact GRPO gradient at the reference against d(s) pi(a|s) (Q(s,a) - V(s)), entries where the
    analytic factor is exactly zero masked out (their autograd value is round-off, not signal).

    Returns per kept entry: reach d(s), the ratio grad / (pi (Q - V)) (= c_p d(s), c_p one constant per
    prompt), the prompt index, and c_p fitted per prompt.
    """
    suite = build_suite(SuiteSpec(n_prompts=n_prompts, seed=seed))
    cfg = LossConfig(name="grpo")
    logits = suite.ref_logits.clone().requires_grad_(True)
    loss, _ = exact_loss(suite, cfg, logits, exact_batch(suite, cfg, logits, 8, {"estimator": "grpo"}))
    loss.backward()
    grad = -logits.grad  # ascent direction [P, N, b]
    pi = torch.softmax(suite.ref_logits, -1)
    q, v = success_q(pi, suite.rewards, suite.depth)
    log_reach, _ = reach_and_leaf_logp(pi.log(), suite.depth)  # [P, N]
    factor = pi * (q - v[..., None])  # pi(a|s) (Q - V), [P, N, b]
    keep = factor != 0  # exact zeros: no signal to scale (a sibling set with one value of Q)
    reach = log_reach.exp()[..., None].expand_as(grad)
    prompt = torch.arange(n_prompts)[:, None, None].expand_as(grad)
    ratio = grad[keep] / factor[keep]
    c = torch.stack([(ratio[prompt[keep] == i] / reach[keep][prompt[keep] == i]).mean() for i in range(n_prompts)])
    return {"reach": reach[keep].numpy(), "ratio": ratio.numpy(), "prompt": prompt[keep].numpy(), "c": c.numpy(),
            "masked": int((~keep).sum())}


# ------------------------------------------------------------------------------------------------
# Lesson 3: the crossover on the coupled model (held-out prompts)
# ------------------------------------------------------------------------------------------------


def crossover(steps: int = 150, arms: Sequence[str] = ("grpo", "apo_old_token"), seeds: int = 3,
              n_train: int = 32, n_heldout: int = 64) -> dict:
    """The rsc preset (coupled, Adam): held-out pass@k per arm and seed, the base, and GRPO's k*.

    Returns ks [K], base [seeds, K], arms {name: [seeds, K]} (final step), train_pass1 {name: [seeds]},
    kstar {name: [seeds]} (NaN where no crossover up to k = 1024).
    """
    pre = get_preset("rsc")
    spec = dataclasses.replace(pre.spec, n_train=n_train, n_heldout=n_heldout)
    cfg = dataclasses.replace(pre.cfg, steps=steps, eval_every=steps)
    table = run_methods(spec, list(arms), cfg, seeds=seeds, preset="rsc")
    ks = np.array(PASS_KS)
    fin = table.final()

    def mat(t):  # [seeds, K] in seed order
        rows = sorted(t.rows, key=lambda r: r["seed"])
        return np.array([[r[f"pass@{k}"] for k in ks] for r in rows])

    out = {"ks": ks, "base": mat(table.where(method="base")), "arms": {}, "train_pass1": {}, "kstar": {}}
    for m in arms:
        t = fin.where(method=m)
        out["arms"][m] = mat(t)
        rows = sorted(t.rows, key=lambda r: r["seed"])
        out["train_pass1"][m] = np.array([r["train/pass@1"] for r in rows])
        out["kstar"][m] = np.array([np.nan if r["crossover_k"] is None else r["crossover_k"] for r in rows], float)
    return out


# ------------------------------------------------------------------------------------------------
# Lesson 4: shape vs support
# ------------------------------------------------------------------------------------------------


def kl_identities(b: int = 8, seed: int = 0, spread: float = 0.8) -> dict:
    """E_{y~pi}[grad_z k(y)] of k1 / k2 / k3 used as losses (by enumeration through policy_loss) and
    their closed forms 0, pi (log pi - log rho - KL(pi||rho)), pi - rho."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, dtype=torch.float64, generator=g)
    rho = torch.softmax(z + spread * torch.randn(b, dtype=torch.float64, generator=g), -1)
    pi = torch.softmax(z, -1)
    out = {"pi": pi.numpy(), "rho": rho.numpy()}
    kl = float((pi * (pi.log() - rho.log())).sum())
    closed = {"k1": torch.zeros(b, dtype=torch.float64), "k2": pi * (pi.log() - rho.log() - kl), "k3": pi - rho}
    for est in ("k1", "k2", "k3"):
        zz = z.clone().requires_grad_(True)
        logpi = torch.log_softmax(zz, -1)
        cfg = LossConfig(name="grpo_kl", kl_coef=1.0, kl_estimator=est)
        loss, _ = policy_loss(cfg, logpi.view(b, 1), logpi.detach().view(b, 1), torch.zeros(b, dtype=torch.float64),
                              torch.ones(b, 1, dtype=torch.bool), ref_logp=rho.log().view(b, 1),
                              weights=logpi.exp().detach(), global_tokens=1.0)
        loss.backward()
        out[est] = (zz.grad.numpy(), closed[est].numpy())
    return out


def tradeoff(kl_coef: float = 0.2, beta: float = 0.2, steps: int = 60, seeds: int = 2, n_prompts: int = 12) -> dict:
    """Final pass@1 and coverage minus GRPO's (same suite), per arm and seed, on the tabular tree (exact)."""
    arms = [get_method("grpo"),
            get_method("grpo_kl", name="grpo_kl", kl_coef=kl_coef),
            get_method("grpo_kl_full", name="grpo_kl_full", kl_coef=kl_coef),
            get_method("kl_on_wrong", name="kl_on_wrong", kl_coef=kl_coef),
            get_method("apo", name="apo", apo_beta=min(beta, 0.2)),  # rectified A: beta > 0.25 silences it
            get_method("apo_old_mass", name="apo_old_mass", apo_beta=min(beta, 0.2)),
            get_method("apo_old_token", name="apo_old_token", apo_beta=min(beta, 0.2))]
    table = run_methods(SuiteSpec(n_prompts=n_prompts), arms, SimConfig(mode="exact", steps=steps, eval_every=steps),
                seeds=seeds)
    fin = table.final()

    def col(m, k):
        return np.array([r[k] for r in sorted(fin.where(method=m).rows, key=lambda r: r["seed"])])

    out = {"arms": [a.name for a in arms[1:]], "kl_coef": kl_coef, "beta": min(beta, 0.2), "grpo": {}}
    for k in ("pass@1", "coverage"):
        out["grpo"][k] = col("grpo", k)
        out[k] = {a.name: col(a.name, k) - col("grpo", k) for a in arms[1:]}
    return out


def sharpening_conflict(shifts: Sequence[float] = tuple(np.linspace(-0.7, 1.6, 36)), b: int = 8, seed: int = 0) -> dict:
    """Token 0 correct; its logit moved by `shift` from the reference. Returns the sharpening pi_0/rho_0,
    KL(pi||rho), the reward gradient pi_0 (1 - pi_0) on z_0 and the reverse-KL descent direction
    -pi_0 (log pi_0/rho_0 - KL): they oppose once pi_0/rho_0 > e^KL."""
    g = torch.Generator().manual_seed(seed)
    rho = torch.softmax(torch.randn(b, dtype=torch.float64, generator=g), -1)
    ratio, kls, rew, kl_push = [], [], [], []
    for s in shifts:
        z = rho.log().clone()
        z[0] += float(s)
        pi = torch.softmax(z, -1)
        kl = float((pi * (pi.log() - rho.log())).sum())
        ratio.append(float(pi[0] / rho[0]))
        kls.append(kl)
        rew.append(float(pi[0] * (1 - pi[0])))
        kl_push.append(float(-pi[0] * (pi[0].log() - rho[0].log() - kl)))
    return {"ratio": np.array(ratio), "kl": np.array(kls), "reward": np.array(rew), "kl_descent": np.array(kl_push)}


# ------------------------------------------------------------------------------------------------
# Lesson 5: the pull, the clip and when APO silences itself
# ------------------------------------------------------------------------------------------------


def elastic_pull(beta: float = 0.1, A: float = -1.3, b: int = 12, K: int = 6, seed: int = 1,
                 shifts: Sequence[float] = tuple(np.linspace(0, 4, 9))) -> dict:
    """Pull on an anchor per unit of its probability, measured by autograd through policy_loss, while
    logit mass is moved off the safe manifold; predicted |A| (beta / Z_ref) (1 - M_S)."""
    g = torch.Generator().manual_seed(seed)
    z_ref = torch.randn(b, dtype=torch.float64, generator=g) * 1.5
    z0 = z_ref + 0.5 * torch.randn(b, dtype=torch.float64, generator=g)
    topk = z_ref.topk(K).indices
    y = int(topk[2])
    S = topk[topk != y]
    ref_logp = torch.log_softmax(z_ref, -1)
    Z_ref = float(ref_logp[S].exp().sum())
    outside = torch.ones(b, dtype=torch.bool)
    outside[topk] = False

    def grad(bt, z):
        zz = z.clone().requires_grad_(True)
        logpi = torch.log_softmax(zz, -1)
        cfg = LossConfig(name="apo", apo_beta=bt, apo_clip="push_only", apo_k=K)
        loss, _ = policy_loss(cfg, logpi[y].view(1, 1), logpi[y].detach().view(1, 1), torch.tensor([A], dtype=torch.float64),
                              torch.ones(1, 1, dtype=torch.bool), anchor_logp=logpi[topk].view(1, 1, K),
                              anchor_ref_logp=ref_logp[topk].view(1, 1, K), anchor_is_sampled=(topk == y).view(1, 1, K))
        loss.backward()
        return zz.grad

    ms, measured, predicted = [], [], []
    for s in shifts:
        z = z0.clone()
        z[outside] += float(s)
        pull = grad(beta, z) - grad(0.0, z)  # the pull term alone
        p = torch.softmax(z, -1)
        m_s = float(p[S].sum())
        ms.append(m_s)
        measured.append(float((-pull[S] / p[S]).mean()))
        predicted.append(abs(A) * beta / Z_ref * (1 - m_s))
    return {"manifold_mass": np.array(ms), "measured": np.array(measured), "predicted": np.array(predicted),
            "Z_ref": Z_ref}


def silenced_share(betas: Sequence[float] = tuple(np.round(np.linspace(0.0, 0.6, 25), 3)), drift: float = 1.0,
                   n_tokens: int = 400, b: int = 16, K: int = 8, seed: int = 0) -> dict:
    """Share of negative-advantage tokens whose whole gradient is clipped at the first PPO epochs (w = 1)
    per beta, from policy_loss's `apo/neg_clipped_frac`, for reading A / C with the rectified clip and
    for push_only. Policies are reference logits plus `drift` x Gaussian noise.

    Rectified: r_APO = lambda - beta r_anchor leaves [1 - eps_low, ...] iff r_anchor > (lambda - 1 +
    eps_low) / beta; reading C has r_anchor = 1 at w = 1, so it silences every negative token at once
    when beta > lambda - 1 + eps_low = 0.25; reading A's r_anchor = M_S / Z_ref differs per token.
    """
    g = torch.Generator().manual_seed(seed)
    z_ref = 2.0 * torch.randn(n_tokens, b, dtype=torch.float64, generator=g)
    z = z_ref + drift * torch.randn(n_tokens, b, dtype=torch.float64, generator=g)
    logpi, ref_logp = torch.log_softmax(z, -1), torch.log_softmax(z_ref, -1)
    topk = z_ref.topk(K, dim=-1).indices  # [T, K]
    y = torch.randint(0, b, (n_tokens,), generator=g)  # the sampled (wrong) token
    is_s = topk == y[:, None]
    anchor_logp, anchor_ref = logpi.gather(-1, topk), ref_logp.gather(-1, topk)
    r_a, _ = anchor_ratio(anchor_logp, anchor_ref, ~is_s)  # reading A per token, [T]
    arms = {"apo": dict(apo_clip="rectified"), "apo_old_mass": dict(apo_clip="rectified", apo_anchor_norm="old_mass"),
            "apo_push_only": dict(apo_clip="push_only")}
    out = {"beta": np.array(betas), "r_anchor": r_a.numpy(), "drift": drift}
    lp = logpi.gather(-1, y[:, None])  # [T, 1]
    for name, kw in arms.items():
        share = []
        for bt in betas:
            with warnings.catch_warnings():  # beta past the threshold warns "positive-only": that is the point here
                warnings.simplefilter("ignore")
                cfg = LossConfig(name="apo", apo_beta=float(bt), apo_k=K, **kw)
            extra = dict(anchor_logp=anchor_logp[:, None], anchor_ref_logp=anchor_ref[:, None],
                         anchor_is_sampled=is_s[:, None])
            if cfg.needs_anchor_old:
                extra["anchor_old_logp"] = anchor_logp[:, None]
            _, m = policy_loss(cfg, lp, lp, -torch.ones(n_tokens, dtype=torch.float64),
                               torch.ones(n_tokens, 1, dtype=torch.bool), **extra)
            share.append(m["apo/neg_clipped_frac"])
        out[name] = np.array(share)
    return out


# ------------------------------------------------------------------------------------------------
# Lesson 6: from tree to tokens
# ------------------------------------------------------------------------------------------------


def anchor_stats_by_k(ref_topk_logp: torch.Tensor, pol_topk_logp: torch.Tensor, topk_ids: torch.Tensor,
                      targets: torch.Tensor, mask: torch.Tensor, ks: Sequence[int] = (1, 2, 4, 8, 16)) -> dict:
    """Per K (a prefix of a Top-K_max computed once; ids sorted by reference probability):
    share of sampled tokens inside TopK(pi_ref), the policy's mass on it, Z_ref and r_anchor (exclusive).

    Shapes: ref_topk_logp, pol_topk_logp, topk_ids [B, T, K_max]; targets [B, T]; mask [B, T] bool.
    """
    kmax = topk_ids.shape[-1]
    if any(k < 1 or k > kmax for k in ks):
        raise ValueError(f"ks: every K must be in 1..{kmax} (the Top-K computed)")
    out = {"K": np.array(ks), "inside": [], "manifold_mass": [], "Z_ref": [], "r_anchor": []}
    for k in ks:
        ids, ref, pol = topk_ids[..., :k], ref_topk_logp[..., :k], pol_topk_logp[..., :k]
        is_s = ids == targets[..., None]  # [B, T, k]
        r, z_ref = anchor_ratio(pol, ref, ~is_s)
        out["inside"].append(float(is_s.any(-1)[mask].float().mean()))
        out["manifold_mass"].append(float(pol.exp().sum(-1)[mask].mean()))
        out["Z_ref"].append(float(z_ref[mask].mean()))
        ok = mask & (z_ref > 0)
        out["r_anchor"].append(float(r[ok].median()) if ok.any() else float("nan"))
    return {k: np.array(v) if isinstance(v, list) else v for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# Lesson 7: a claims study in miniature under a fair protocol
# ------------------------------------------------------------------------------------------------

VERDICT_GRID = {"grpo": ("lr_scale", (1.0, 0.5)), "apo_old_token": ("apo_beta", (0.1, 0.2))}


def checkpoints(arm: str, setting: float, optimizer: str = "adam", seed: int = 0, steps: int = 80,
                every: int = 10, n_train: int = 32, n_heldout: int = 64) -> dict:
    """Train one arm (one hyper-parameter setting) on a coupled suite; at every checkpoint the per-prompt
    success p of the held-out prompts, split in half: validation (first half) and test (second).

    Returns step [C], val_p [C, n_heldout/2], test_p [C, n_heldout/2].
    """
    key, _ = VERDICT_GRID[arm]
    method = get_method(arm, **{key: setting})
    lr = {"adam": RSC_RUN.lr, "sgd": 0.5}[optimizer]
    suite = build_coupled_suite(dataclasses.replace(CoupledSpec(), n_train=n_train, n_heldout=n_heldout, seed=seed))
    policy = make_policy(suite)
    opt = _optimizer(optimizer, policy.params, lr * method.lr_scale)
    loss_cfg = method.loss_config()
    half = n_heldout // 2
    steps_out, ps = [], []

    def record(step):
        with torch.no_grad():
            ps.append(per_prompt_success(suite.heldout, policy.logits("heldout")).numpy())
        steps_out.append(step)

    record(0)
    for step in range(1, steps + 1):
        exact_update(suite.train, loss_cfg, lambda: policy.logits("train"), opt, 8, method.adv, diagnostics=False)
        if step % every == 0:
            record(step)
    p = np.stack(ps)  # [C, n_heldout]
    return {"step": np.array(steps_out), "val_p": p[:, :half], "test_p": p[:, half:]}


def pass_at(p: np.ndarray, k: int) -> np.ndarray:
    """pass@k = 1 - (1 - p)^k, averaged over the last axis (prompts)."""
    return (1.0 - (1.0 - p) ** k).mean(-1)


def select(runs: dict, rule: str = "validation", k: int = 64, min_gain: float = 0.05) -> dict:
    """One arm's choice per seed under a selection rule applied identically to every arm.

    runs: {setting: [seed] -> checkpoints(...)}. Rules: "validation": among all (setting, checkpoint)
    whose validation pass@1 is at least the base's (step 0) plus `min_gain`, the one with the highest
    validation pass@k (none reaches it: the highest validation pass@1); "last": the last checkpoint of
    the first setting (the paper-style default). Returns per seed the chosen setting, step and the TEST pass@1 / pass@k.
    """
    if rule not in ("validation", "last"):
        raise ValueError(f"rule: {rule!r} is not 'validation' or 'last'")
    settings = list(runs)
    n_seeds = len(runs[settings[0]])
    out = {"setting": [], "step": [], "test_pass1": [], "test_passk": []}
    for s in range(n_seeds):
        if rule == "last":
            best = (settings[0], -1)
        else:
            cands = [(st, c) for st in settings for c in range(len(runs[st][s]["step"]))]
            v1 = {sc: pass_at(runs[sc[0]][s]["val_p"][sc[1]], 1) for sc in cands}
            target = pass_at(runs[settings[0]][s]["val_p"][0], 1) + min_gain  # step 0 is the base model
            ok = [sc for sc in cands if v1[sc] >= target]
            best = (max(ok, key=lambda sc: pass_at(runs[sc[0]][s]["val_p"][sc[1]], k)) if ok
                    else max(cands, key=lambda sc: v1[sc]))
        r = runs[best[0]][s]
        out["setting"].append(best[0])
        out["step"].append(int(r["step"][best[1]]))
        out["test_pass1"].append(float(pass_at(r["test_p"][best[1]], 1)))
        out["test_passk"].append(float(pass_at(r["test_p"][best[1]], k)))
    return {key: np.array(v) for key, v in out.items()}


def study(optimizer: str = "adam", seeds: int = 3, steps: int = 80, every: int = 10) -> dict:
    """Every arm of VERDICT_GRID x its settings x seeds: {arm: {setting: [checkpoints per seed]}}."""
    return {arm: {st: [checkpoints(arm, st, optimizer, seed, steps, every) for seed in range(seeds)]
                  for st in settings}
            for arm, (_, settings) in VERDICT_GRID.items()}


def verdict(runs: dict, rule: str = "validation", k: int = 64, min_gain: float = 0.05,
            treated: str = "apo_old_token", null: str = "grpo") -> dict:
    """The claim "treated beats null at pass@k on test prompts": paired difference per seed, its mean
    and standard error, and the word: 'better' / 'worse' beyond 2 s.e., else 'within noise'."""
    a, b0 = (select(runs[m], rule, k, min_gain) for m in (treated, null))
    d = a["test_passk"] - b0["test_passk"]
    d1 = a["test_pass1"] - b0["test_pass1"]
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    mean = float(d.mean())
    word = "within noise" if not np.isfinite(se) or abs(mean) <= 2 * se else ("better" if mean > 0 else "worse")
    return {"diff": d, "mean": mean, "se": se, "word": word, "diff_pass1": d1, treated: a, null: b0,
            "rule": rule, "k": k}
