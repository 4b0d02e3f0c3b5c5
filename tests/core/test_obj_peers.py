"""The peer objectives (CISPO, GSPO, GSPO-token, SAPO, GMPO, GPG, SimKO) and the top-entropy-quantile
selection, in float64 against closed forms or a plainly written, independent computation:

- cispo:  d loss / d log pi_t = -min(w_t, eps_max) A_t / N               (closed form)
- gspo:   s_i = (prod_t w_it)^(1/|y_i|) by an explicit per-sequence loop, max(-A s, -A clip(s)),
          mean over sequences; autograd of that loop vs policy_loss
- gspo_token = gspo (value and gradient) when A is per sequence; differs for a per-token A
- sapo:   d loss / d log pi_t = -A 4 sig (1 - sig) w / N, sig = sigmoid(tau (w - 1))   (closed form)
- gmpo:   per-sequence loop with the log-space clip; autograd vs policy_loss; flat where clipped
- gpg:    d loss / d log pi_t = -A_t / N                                  (closed form)
- simko:  closed-form gradients at log pi(y_t) and at the policy's own Top-K, with the per-sequence
          entropy quantile recomputed in numpy
- top_entropy_quantile: numpy quantile over the call's tokens; the policy term and the entropy
  bonus act on the selected tokens only, the normaliser is unchanged (TRL's convention)

Micro-batch invariance: every term here is invariant when micro-batches hold whole sequences (the
trainers split by rows); GSPO / GMPO / SimKO-with-quantile are not when a sequence is split across
calls, and top_entropy_quantile is not at all (its quantile is per call, as TRL's per micro-batch).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apo_llm.objectives import LossConfig, policy_loss

F64 = torch.float64
QUICK = settings(max_examples=30, deadline=None)


def _batch(seed: int, B: int = 4, T: int = 5, K: int = 3, drift: float = 0.3, adv_per_token: bool = False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    old = -0.3 - 2.0 * r(B, T)
    logp = (old + drift * (2 * r(B, T) - 1)).requires_grad_()
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = (2 * r(B, T) - 1) if adv_per_token else (2 * r(B) - 1)
    topk = (-0.05 - 1.5 * r(B, T, K)).sort(-1, descending=True).values.requires_grad_()
    entropy = 0.1 + 2.0 * r(B, T)
    return dict(logp=logp, old_logp=old, advantages=adv, mask=mask, policy_topk_logp=topk, entropy=entropy)


def _grad(loss, x):
    return torch.autograd.grad(loss, x, retain_graph=True, allow_unused=True)[0]


def _adv_bt(x):
    a = x["advantages"]
    return a[:, None].expand_as(x["logp"]) if a.dim() == 1 else a


@QUICK
@given(seed=st.integers(0, 2**31), cap=st.floats(0.8, 3.0), per_token=st.booleans())
def test_cispo_gradient_closed_form(seed, cap, per_token):
    x = _batch(seed, drift=1.0, adv_per_token=per_token)
    cfg = LossConfig(name="cispo", cispo_eps_max=cap)
    loss, _ = policy_loss(cfg, **{k: x[k] for k in ("logp", "old_logp", "advantages", "mask")})
    n = float(x["mask"].sum())
    w = (x["logp"] - x["old_logp"]).detach().exp()
    want = torch.where(x["mask"], -torch.minimum(w, torch.tensor(cap, dtype=F64)) * _adv_bt(x) / n, 0.0)
    torch.testing.assert_close(_grad(loss, x["logp"]), want, rtol=1e-12, atol=1e-12)


def _gspo_plain(logp, old, adv, mask, lo, hi):
    """GSPO written per sequence: s_i = (prod_t w_t)^(1/|y_i|), then the mean over sequences."""
    losses = []
    for i in range(logp.shape[0]):
        n = int(mask[i].sum())
        if n == 0:
            losses.append(logp.new_zeros(()))
            continue
        s = torch.prod(torch.exp(logp[i, :n] - old[i, :n])) ** (1.0 / n)
        a = adv[i]
        losses.append(torch.maximum(-a * s, -a * s.clamp(1 - lo, 1 + hi)))
    return torch.stack(losses).mean()


@QUICK
@given(seed=st.integers(0, 2**31), lo=st.floats(0.01, 0.3), hi=st.floats(0.01, 0.3))
def test_gspo_equals_per_sequence_formula(seed, lo, hi):
    x = _batch(seed)
    cfg = LossConfig(name="gspo", eps_low=lo, eps_high=hi, loss_agg="seq-mean-token-mean")
    base = {k: x[k] for k in ("logp", "old_logp", "advantages", "mask")}
    loss, m = policy_loss(cfg, **base)
    want = _gspo_plain(x["logp"], x["old_logp"], x["advantages"], x["mask"], lo, hi)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(loss, x["logp"]), _grad(want, x["logp"]), rtol=1e-12, atol=1e-12)
    # GSPO-token: same value and gradient for a sequence-level advantage (the paper's identity)
    tok, _ = policy_loss(LossConfig(name="gspo_token", eps_low=lo, eps_high=hi, loss_agg="seq-mean-token-mean"),
                         **base)
    torch.testing.assert_close(tok, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(tok, x["logp"]), _grad(loss, x["logp"]), rtol=1e-12, atol=1e-12)


def test_gspo_token_differs_from_gspo_for_per_token_advantages():
    x = _batch(3, adv_per_token=True, drift=0.0)  # on-policy: nothing clipped
    x["mask"][:] = True
    base = {k: x[k] for k in ("logp", "old_logp", "advantages", "mask")}
    g = [_grad(policy_loss(LossConfig(name=n, loss_agg="seq-mean-token-mean"), **base)[0], x["logp"])
         for n in ("gspo", "gspo_token")]
    # gspo: every token gets the sequence's mean advantage; gspo_token: each its own A_t (/ |y| / B)
    B, T = x["logp"].shape
    torch.testing.assert_close(g[0], -x["advantages"].mean(-1, keepdim=True).expand(B, T) / (T * B), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g[1], -x["advantages"] / (T * B), rtol=1e-12, atol=1e-12)


@QUICK
@given(seed=st.integers(0, 2**31), tp=st.floats(0.2, 3.0), tn=st.floats(0.2, 3.0))
def test_sapo_gradient_closed_form(seed, tp, tn):
    x = _batch(seed, drift=1.0, adv_per_token=True)
    cfg = LossConfig(name="sapo", sapo_tau_pos=tp, sapo_tau_neg=tn, loss_agg="token-mean")  # closed form per N
    loss, _ = policy_loss(cfg, **{k: x[k] for k in ("logp", "old_logp", "advantages", "mask")})
    a = x["advantages"]
    w = (x["logp"] - x["old_logp"]).detach().exp()
    tau = torch.where(a > 0, torch.tensor(tp, dtype=F64), torch.tensor(tn, dtype=F64))
    sig = torch.sigmoid(tau * (w - 1))
    want = torch.where(x["mask"], -a * 4 * sig * (1 - sig) * w / float(x["mask"].sum()), 0.0)
    torch.testing.assert_close(_grad(loss, x["logp"]), want, rtol=1e-12, atol=1e-12)
    # on-policy the gate's slope is 1: the plain policy gradient
    on, _ = policy_loss(cfg, x["logp"], x["logp"].detach(), a, x["mask"])
    torch.testing.assert_close(_grad(on, x["logp"]), torch.where(x["mask"], -a / float(x["mask"].sum()), 0.0),
                               rtol=1e-12, atol=1e-12)


def _gmpo_plain(logp, old, adv, mask, lo, hi):
    losses = []
    for i in range(logp.shape[0]):
        n = int(mask[i].sum())
        if n == 0:
            losses.append(logp.new_zeros(()))
            continue
        a = adv[i, :n].mean()
        terms = []
        for t in range(n):
            lw = logp[i, t] - old[i, t]
            clipped = lw.clamp(-lo, hi)
            terms.append(torch.maximum(lw, clipped) if a < 0 else torch.minimum(lw, clipped))
        losses.append(-a * torch.exp(torch.stack(terms).mean()))
    return torch.stack(losses).mean()


@QUICK
@given(seed=st.integers(0, 2**31), lo=st.floats(0.05, 0.5), hi=st.floats(0.05, 0.5))
def test_gmpo_equals_per_sequence_formula(seed, lo, hi):
    x = _batch(seed, drift=0.8, adv_per_token=True)
    cfg = LossConfig(name="gmpo", eps_low=lo, eps_high=hi, loss_agg="seq-mean-token-mean")
    loss, _ = policy_loss(cfg, **{k: x[k] for k in ("logp", "old_logp", "advantages", "mask")})
    want = _gmpo_plain(x["logp"], x["old_logp"], x["advantages"], x["mask"], lo, hi)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    g = _grad(loss, x["logp"])
    torch.testing.assert_close(g, _grad(want, x["logp"]), rtol=1e-12, atol=1e-12)
    # flat where the log-space clip binds in the advantage's direction
    lw = (x["logp"] - x["old_logp"]).detach()
    a_seq = (torch.where(x["mask"], x["advantages"], 0.0).sum(-1) / x["mask"].sum(-1))[:, None]
    flat = x["mask"] & (((a_seq > 0) & (lw > hi)) | ((a_seq < 0) & (lw < -lo)))
    assert (g[flat] == 0).all()


@QUICK
@given(seed=st.integers(0, 2**31), per_token=st.booleans())
def test_gpg_gradient_closed_form(seed, per_token):
    x = _batch(seed, drift=1.0, adv_per_token=per_token)
    loss, _ = policy_loss(LossConfig(name="gpg"), **{k: x[k] for k in ("logp", "old_logp", "advantages", "mask")})
    want = torch.where(x["mask"], -_adv_bt(x) / float(x["mask"].sum()), 0.0)
    torch.testing.assert_close(_grad(loss, x["logp"]), want, rtol=1e-12, atol=1e-12)


def _row_quantile_sel(h, mask, q):
    """numpy: per row, H_t > the linear-interpolation q-quantile of the row's response entropies."""
    out = np.zeros(h.shape, dtype=bool)
    for i in range(h.shape[0]):
        vals = h[i][mask[i]]
        if vals.size:
            out[i] = mask[i] & (h[i] > np.quantile(vals, q))
    return torch.from_numpy(out)


@QUICK
@given(seed=st.integers(0, 2**31), alpha=st.floats(0.0, 1.0), lam=st.floats(0.5, 2.0),
       q=st.one_of(st.none(), st.floats(0.0, 0.95)), top1_share=st.floats(0.0, 1.0), drift=st.floats(0.0, 0.5))
def test_simko_gradient_closed_form(seed, alpha, lam, q, top1_share, drift):
    x = _batch(seed, drift=drift, adv_per_token=True)
    g = torch.Generator().manual_seed(seed + 1)
    is_top1 = torch.rand(x["logp"].shape, generator=g) < top1_share
    with torch.no_grad():  # make y_t the policy's top-1 on some tokens (log pi(y_t) = column 0)
        topk = x["policy_topk_logp"].detach().clone()
        topk[..., 0] = torch.where(is_top1, x["logp"].detach(), torch.maximum(topk[..., 0], x["logp"].detach() + 0.01))
        topk = topk.sort(-1, descending=True).values
    x["policy_topk_logp"] = topk.requires_grad_()
    cfg = LossConfig(name="simko", simko_alpha=alpha, simko_lambda=lam, simko_entropy_quantile=q)
    loss, m = policy_loss(cfg, **x)
    mask, a = x["mask"], x["advantages"]
    n, K = float(mask.sum()), topk.shape[-1]
    sel = mask if q is None else _row_quantile_sel(x["entropy"].numpy(), mask.numpy(), q)
    w = (x["logp"] - x["old_logp"]).detach().exp()
    top1 = x["logp"].detach() >= topk[..., 0].detach()
    lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
    live = mask & (((a > 0) & (w <= hi)) | ((a < 0) & (w >= lo)) | (a == 0))  # not flat under the clip
    a_t = torch.where((a < 0) & sel & top1, lam * a, a)
    al = alpha * sel.to(F64)
    want_y = torch.where(live, -a_t * w * torch.where(a > 0, 1 - al, 1.0) / n, 0.0)
    want_k = torch.where(live & (a > 0), -a * w * al / (K * n), 0.0)[..., None].expand_as(topk)
    torch.testing.assert_close(_grad(loss, x["logp"]), want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(loss, x["policy_topk_logp"]), want_k, rtol=1e-12, atol=1e-12)
    # the value is GRPO's with the penalised advantage (gamma~ = w in value)
    grpo_val = torch.where(mask, torch.maximum(-a_t * w, -a_t * w.clamp(lo, hi)), 0.0).sum() / n
    torch.testing.assert_close(loss.detach(), grpo_val, rtol=1e-12, atol=1e-12)
    assert m["simko/selected_frac"] == pytest.approx(float(sel.sum()) / n)


@QUICK
@given(seed=st.integers(0, 2**31), rho=st.floats(0.05, 0.95), ent=st.floats(0.001, 0.1),
       name=st.sampled_from(["grpo", "cispo", "sapo", "gpg", "apo"]))
def test_top_entropy_quantile_selects_for_any_term(seed, rho, ent, name):
    """policy term * 1[H >= quantile_{1-rho}(H of the call)] (+ the entropy bonus on the same tokens),
    normaliser unchanged; checked against the unselected term's own per-token losses."""
    x = _batch(seed)
    B, T, K = x["policy_topk_logp"].shape
    anchors = dict(anchor_logp=x["policy_topk_logp"], anchor_ref_logp=x["policy_topk_logp"].detach() - 0.1,
                   anchor_is_sampled=torch.zeros(B, T, K, dtype=torch.bool))
    kw = dict(x, **(anchors if name == "apo" else {}))
    kw["entropy"] = x["entropy"].clone().requires_grad_()
    h = x["entropy"].numpy()
    thr = np.quantile(h[x["mask"].numpy()], 1 - rho)
    sel = x["mask"] & torch.from_numpy(h >= thr)
    n = float(x["mask"].sum())
    full_cfg = LossConfig(name=name, loss_agg="token-mean")  # the masked-batch twin needs one normaliser N
    sel_cfg = LossConfig(name=name, top_entropy_quantile=rho, ent_coef=ent, loss_agg="token-mean")
    loss, m = policy_loss(sel_cfg, **kw)
    masked = dict(kw, mask=sel)  # per-token terms: the plain term on the selected tokens only
    plain, _ = policy_loss(full_cfg, **masked, global_tokens=n)
    want = plain - ent * (x["entropy"] * sel).sum() / n
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(loss, x["logp"]), _grad(plain, x["logp"]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(loss, kw["entropy"]), torch.where(sel, torch.tensor(-ent / n, dtype=F64), torch.tensor(0.0, dtype=F64)), rtol=1e-12, atol=1e-12)
    assert m["entropy_select/frac"] == pytest.approx(float(sel.sum()) / n)


@pytest.mark.parametrize("name, kw", [
    ("cispo", {}), ("gspo", {}), ("gspo_token", {}), ("sapo", {}), ("gmpo", {}), ("gpg", {}),
    ("dppo_tv", {}), ("dppo_kl", {}), ("simko", {}), ("simko", {"simko_entropy_quantile": None}),
])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_of_whole_sequences_sum_to_the_batch(name, kw, agg):
    cfg = LossConfig(name=name, loss_agg=agg, loss_norm_len=5, **kw)
    x = _batch(7, B=6, T=5, drift=0.3, adv_per_token=True)
    full, _ = policy_loss(cfg, **x)
    g_full = torch.autograd.grad(full, [x["logp"], x["policy_topk_logp"]], allow_unused=True)
    n_tok, n_seq = float(x["mask"].sum()), 6.0
    total = 0.0
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):
        part = {k: v[rows] for k, v in x.items()}
        loss, _ = policy_loss(cfg, **part, global_tokens=n_tok, global_seqs=n_seq)
        total = total + loss
    g_mb = torch.autograd.grad(total, [x["logp"], x["policy_topk_logp"]], allow_unused=True)
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_mb, g_full):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["gspo", "gmpo"])
def test_sequence_ratio_needs_the_whole_sequence_in_one_call(name):
    """Splitting a sequence's tokens across two calls changes GSPO / GMPO (their ratio is per sequence)."""
    cfg = LossConfig(name=name, eps_low=0.9, eps_high=0.9)  # wide clip: the ratio itself matters
    assert cfg.sequence_coupled
    x = _batch(11, B=2, T=6, drift=0.5)
    x["mask"][:] = True
    full, _ = policy_loss(cfg, **x)
    parts = sum(policy_loss(cfg, **{k: (v[:, c] if v.dim() > 1 else v) for k, v in x.items()},
                            global_tokens=12.0)[0] for c in (slice(0, 3), slice(3, 6)))
    assert abs(float((full - parts).detach())) > 1e-6


def test_peer_flags_and_presets():
    assert LossConfig(name="gspo").eps_low == 3e-4 and LossConfig(name="gspo").eps_high == 4e-4
    assert LossConfig(name="gmpo").eps_low == 0.4 and LossConfig(name="cispo").cispo_eps_max == 5.0
    for name in ("gspo", "gspo_token", "gmpo", "simko"):
        assert LossConfig(name=name).sequence_coupled
    for name in ("cispo", "sapo", "gpg", "grpo", "apo"):
        assert not LossConfig(name=name).sequence_coupled and not LossConfig(name=name).needs_policy_topk
    tok = LossConfig(name="simko", simko_entropy_quantile=None)
    assert not tok.sequence_coupled and tok.policy_topk == 3 and tok.needs_entropy
    assert LossConfig(name="cispo", top_entropy_quantile=0.2).batch_coupled


@pytest.mark.parametrize("value, why", [
    (None, "required"), (torch.zeros(4, 5), "expected shape"), (torch.zeros(4, 6, 3), "expected shape"),
    (torch.zeros(4, 5, 0), "expected shape"), (torch.zeros(4, 5, 5), "expected K = simko_k = 3"),
])
def test_policy_topk_bad_input_is_named(value, why):
    x = _batch(0)
    x["policy_topk_logp"] = value
    with pytest.raises(ValueError, match=rf"^policy_topk_logp: .*{why}"):
        policy_loss(LossConfig(name="simko"), **x)


def test_policy_topk_nan_on_a_response_position_is_named():
    x = _batch(0)
    x["mask"][0, 0] = True
    bad = x["policy_topk_logp"].detach().clone()
    bad[0, 0, 1] = math.nan
    x["policy_topk_logp"] = bad
    with pytest.raises(ValueError, match=r"^policy_topk_logp: 1 response position"):
        policy_loss(LossConfig(name="simko"), **x)


@QUICK
@given(seed=st.integers(0, 2**31), dlo=st.floats(0.01, 0.5), dhi=st.floats(0.01, 0.5), c=st.floats(0.5, 20.0),
       div=st.sampled_from(["tv", "kl"]))
def test_dppo_gradient_closed_form(seed, dlo, dhi, c, div):
    """d loss / d log pi_t = -A min(w, c) M_t / N, M_t the binary TV / KL trust-region mask, written
    here from the Bernoulli divergences in numpy."""
    x = _batch(seed, drift=1.0, adv_per_token=True)
    x["logp"] = x["logp"].detach().clamp(max=-0.01).requires_grad_()  # probabilities below 1
    cfg = LossConfig(name=f"dppo_{div}", dppo_delta_low=dlo, dppo_delta_high=dhi, dppo_trunc=c)
    loss, m = policy_loss(cfg, **{k: x[k] for k in ("logp", "old_logp", "advantages", "mask")})
    p, po = np.exp(x["logp"].detach().numpy()), np.exp(x["old_logp"].numpy())
    a = x["advantages"].numpy()
    if div == "tv":
        keep = np.where(a > 0, p - po <= dhi, p - po >= -dlo)
    else:
        d = po * np.log(po / p) + (1 - po) * np.log((1 - po) / (1 - p))
        keep = np.where(a > 0, (d <= dhi) | (p <= po), (d <= dlo) | (p >= po))
    w = np.minimum(p / po, c)
    n = float(x["mask"].sum())
    want = torch.from_numpy(np.where(x["mask"].numpy() & keep, -a * w / n, 0.0))
    torch.testing.assert_close(_grad(loss, x["logp"]), want, rtol=1e-10, atol=1e-12)
    assert m["dppo/masked_frac"] == pytest.approx(float((x["mask"].numpy() & ~keep).sum()) / n)


# --------------------------------------------------------------------------------------------
# Defaults by name, non-finite log-probs, SimKO's candidate order, the top-entropy edge cases
# --------------------------------------------------------------------------------------------


def test_sequence_level_names_default_to_the_per_sequence_mean():
    """gspo, gspo_token, gmpo, sapo default to seq-mean-token-mean (their papers, verl, TRL);
    everything else to token-mean; an explicit loss_agg always wins."""
    for name in ("gspo", "gspo_token", "gmpo", "sapo"):
        assert LossConfig(name=name).loss_agg == "seq-mean-token-mean"
        assert LossConfig(name=name, loss_agg="token-mean").loss_agg == "token-mean"
    for name in ("grpo", "dapo", "apo", "cispo", "gpg", "dppo_tv", "dppo_kl", "simko"):
        assert LossConfig(name=name).loss_agg == "token-mean"
    # the default gspo / gmpo loss is the per-sequence mean of the plainly written loops
    x = _batch(5, drift=0.8, adv_per_token=True)
    x["advantages"] = x["advantages"][:, 0].contiguous()  # one A per sequence (gspo's setting)
    base = {k: x[k] for k in ("logp", "old_logp", "advantages", "mask")}
    a_bt = _adv_bt(x)
    for name, plain, (lo, hi) in (("gspo", _gspo_plain, (0.05, 0.05)), ("gmpo", _gmpo_plain, (0.4, 0.4))):
        loss, _ = policy_loss(LossConfig(name=name, eps_low=lo, eps_high=hi), **base)
        adv = x["advantages"] if name == "gspo" else a_bt
        want = plain(x["logp"], x["old_logp"], adv, x["mask"], lo, hi)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)


def test_dppo_default_thresholds_follow_the_divergence():
    """0.15 for the binary TV, 0.05 for the binary KL; explicit values win."""
    tv, kl = LossConfig(name="dppo_tv"), LossConfig(name="dppo_kl")
    assert (tv.dppo_delta_low, tv.dppo_delta_high) == (0.15, 0.15)
    assert (kl.dppo_delta_low, kl.dppo_delta_high) == (0.05, 0.05)
    assert LossConfig(name="dppo_kl", dppo_delta_high=0.2).dppo_delta_high == 0.2
    # the default KL budget binds: a token whose binary KL lies between 0.05 and 0.2 moved with A
    logp = torch.tensor([[math.log(0.75)]], dtype=F64)
    old = torch.tensor([[math.log(0.5)]], dtype=F64)  # binary KL(0.5 || 0.75) = 0.1438
    _, m = policy_loss(kl, logp, old, torch.ones(1, dtype=F64), torch.ones(1, 1, dtype=torch.bool))
    assert m["dppo/masked_frac"] == 1.0
    _, m = policy_loss(LossConfig(name="dppo_kl", dppo_delta_high=0.2), logp, old, torch.ones(1, dtype=F64),
                       torch.ones(1, 1, dtype=torch.bool))
    assert m["dppo/masked_frac"] == 0.0


@pytest.mark.parametrize("name", ["cispo", "gpg", "dppo_tv", "dppo_kl"])
def test_log_linear_terms_stay_finite_at_a_zero_probability_token(name):
    """log pi = -inf on a response token (A of both signs and 0): finite loss and gradient; the
    token counts with log pi_old - 20 and no gradient; every other token keeps its closed-form
    gradient -A sg(weight) M / N (the same batch without the -inf tokens, global count N)."""
    x = _batch(9, B=4, T=5, drift=0.3, adv_per_token=True)
    x["mask"][:] = True
    adv = x["advantages"].clone()
    adv[0, :] = torch.tensor([1.0, 0.0, -1.0, 0.5, -0.5], dtype=F64)
    dead = torch.zeros_like(x["mask"])
    dead[0, :3] = True  # pi_theta(y_t) = 0 at A = 1, 0, -1
    logp = torch.where(dead, torch.tensor(-math.inf, dtype=F64), x["logp"].detach()).requires_grad_()
    cfg = LossConfig(name=name)
    loss, m = policy_loss(cfg, logp, x["old_logp"], adv, x["mask"])
    g = _grad(loss, logp)
    assert math.isfinite(float(loss.detach())) and math.isfinite(m["loss"]) and torch.isfinite(g).all()
    assert (g[dead] == 0).all()
    n = float(x["mask"].sum())
    # the other tokens: as a batch without the dead ones, normalised by the same N
    live, _ = policy_loss(cfg, x["logp"], x["old_logp"], adv, x["mask"] & ~dead, global_tokens=n)
    torch.testing.assert_close(g[~dead], _grad(live, x["logp"])[~dead], rtol=1e-12, atol=1e-12)
    # the dead tokens' value: -A sg(weight) (log pi_old - 20) M, weight = min(e^-20, cap)
    w = math.exp(-20.0)
    old = x["old_logp"][dead]
    a = adv[dead]
    if name == "gpg":
        dead_val = -a * (old - 20.0)
    elif name == "cispo":
        dead_val = -min(w, cfg.cispo_eps_max) * a * (old - 20.0)
    else:  # p = 0: kept when A > 0 (moved against A), masked when A < 0; A = 0 gives 0 either way
        dead_val = torch.where(a > 0, -a * w * (old - 20.0), torch.zeros_like(a))
    torch.testing.assert_close(loss.detach(), live.detach() + dead_val.sum() / n, rtol=1e-12, atol=1e-12)


def test_simko_policy_topk_in_any_column_order():
    """The top-1 test reads the largest candidate, not column 0: permuting the K columns changes
    neither the loss nor the gradient (permuted with them)."""
    x = _batch(4, drift=0.2, adv_per_token=True)
    x["advantages"] = -x["advantages"].abs()  # wrong tokens: the top-1 penalty applies
    lp = x["logp"].detach()[..., None]
    g = torch.Generator().manual_seed(1)
    is_top1 = torch.rand(lp.shape[:2], generator=g) < 0.5
    # sorted candidates: y_t is the top-1 on is_top1, else the second (a larger candidate above it)
    topk = torch.cat([torch.where(is_top1[..., None], lp, lp + 0.3), torch.where(is_top1[..., None], lp - 0.2, lp),
                      lp - 0.4], dim=-1)
    cfg = LossConfig(name="simko", simko_entropy_quantile=None, simko_lambda=1.5)
    perm = torch.tensor([2, 0, 1])
    out = []
    for t in (topk, topk[..., perm]):
        t = t.clone().requires_grad_()
        loss, m = policy_loss(cfg, **dict(x, policy_topk_logp=t))
        out.append((loss, _grad(loss, x["logp"]), m["simko/top1_penalised_frac"]))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-12, atol=1e-12)
    n_neg = float((x["mask"] & (x["advantages"] < 0)).sum())
    assert out[0][2] == out[1][2] == pytest.approx(float((is_top1 & x["mask"] & (x["advantages"] < 0)).sum()) / n_neg)


def test_top_entropy_quantile_zero_keeps_only_the_highest_entropy_token():
    """rho = 0 (TRL: "masks all but the highest entropy token"): the quantile at 1 is the maximum,
    so only the token(s) at the call's maximum entropy keep the policy term."""
    x = _batch(2, drift=0.3, adv_per_token=True)
    base = {k: x[k] for k in ("logp", "old_logp", "advantages", "mask", "entropy")}
    h = torch.where(x["mask"], x["entropy"], -math.inf)
    top = x["mask"] & (x["entropy"] == h.max())
    assert int(top.sum()) == 1
    loss, m = policy_loss(LossConfig(name="gpg", top_entropy_quantile=0.0), **base)
    n = float(x["mask"].sum())
    want = torch.where(top, -_adv_bt(x) / n, 0.0)
    torch.testing.assert_close(_grad(loss, x["logp"]), want, rtol=1e-12, atol=1e-12)
    assert m["entropy_select/frac"] == pytest.approx(1.0 / n)


def test_top_entropy_quantile_with_gmpo_masks_the_term_not_the_ratio():
    """The selection zeroes the unselected tokens' copies of GMPO's sequence loss; the geometric
    mean still runs over every token: loss = mean_i (n_sel_i / |y_i|) loss_i (docs/objectives.md)."""
    x = _batch(6, drift=0.8, adv_per_token=True)
    base = {k: x[k] for k in ("logp", "old_logp", "advantages", "mask", "entropy")}
    rho = 0.4
    h = x["entropy"].numpy()
    sel = x["mask"] & torch.from_numpy(h >= np.quantile(h[x["mask"].numpy()], 1 - rho))
    loss, _ = policy_loss(LossConfig(name="gmpo", top_entropy_quantile=rho), **base)
    share = sel.sum(-1).to(F64) / x["mask"].sum(-1).to(F64)
    per_seq = [_gmpo_plain(x["logp"][i:i + 1], x["old_logp"][i:i + 1], x["advantages"][i:i + 1],
                           x["mask"][i:i + 1], 0.4, 0.4) for i in range(x["logp"].shape[0])]
    want = (share * torch.stack(per_seq)).mean()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(loss, x["logp"]), _grad(want, x["logp"]), rtol=1e-12, atol=1e-12)
