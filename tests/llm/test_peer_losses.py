"""The peer objectives (CISPO, GSPO, GSPO-token, SAPO, GMPO, GPG, SimKO, the top-entropy selection)
inside both trainers, on the quick tiny model:

- every name trains 2 steps under `train.engine native` and `trl` (finite loss, one row per step);
- where TRL has the loss itself (cispo, sapo, gspo = importance_sampling_level "sequence", dapo,
  dr_grpo, bnpo, top_entropy_quantile), our term inside the TRL engine and TRL's own `loss_type`
  give the same loss and LoRA gradient on one identical batch (float32, 1e-6 relative on the loss).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import apo_llm.train as train_mod
from apo_llm.config import load_config
from apo_llm.modeling import completion_token_stats

trl_engine = pytest.importorskip("apo_llm.trl_engine")  # needs the `trl` extra
from tests.llm.test_trl_engine import G, P, _cfg  # noqa: E402

torch.set_num_threads(1)

PEERS = {
    "cispo": [], "gspo": ["--loss.loss_agg", "seq-mean-token-mean"], "gspo_token": [],
    "sapo": ["--loss.loss_agg", "seq-mean-token-mean"], "gmpo": [], "gpg": [], "simko": [],
    "dppo_tv": [], "dppo_kl": [],
    "grpo_top_entropy": ["--loss.top_entropy_quantile", "0.2", "--loss.ent_coef", "0.01"],
}


def _loss_args(key):
    return ["--loss.name", "grpo" if key == "grpo_top_entropy" else key, *PEERS[key]]


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("key", list(PEERS))
def test_native_engine_trains_two_steps(tiny_model_dir, tmp_path, key):
    cfg = load_config([
        "--model.name_or_path", str(tiny_model_dir), "--model.device", "cpu", "--train.steps", "2",
        "--train.prompts_per_step", str(P), "--rollout.num_generations", str(G), "--train.mini_batch_size", "4",
        "--train.micro_batch_size", "2", "--train.ppo_epochs", "2", "--rollout.max_new_tokens", "16",
        "--eval.every", "0", "--checkpoint.every", "0", "--data.synthetic_n", "16", "--logging.output_dir", str(tmp_path),
        "--logging.run_name", key, "--logging.plots", "false", "--logging.progress", "false", *_loss_args(key)])
    train_mod.train(cfg)
    rows = _rows(tmp_path / key / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize("key", list(PEERS))
def test_trl_engine_trains_two_steps(tiny_model_dir, tmp_path, key):
    cfg = _cfg(tiny_model_dir, tmp_path, "--train.steps", "2", *_loss_args(key))
    summary = trl_engine.train_trl(cfg)
    rows = _rows(tmp_path / "t" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and summary["steps"] == 2
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


# ours (LossConfig args) vs TRL's own loss (GRPOTrainer attributes set for its _compute_loss)
TRL_TWINS = {
    "cispo": (["--loss.name", "cispo", "--loss.cispo_eps_max", "1.2"], dict(loss_type="cispo", epsilon_high=1.2)),
    "sapo": (["--loss.name", "sapo", "--loss.loss_agg", "seq-mean-token-mean"], dict(loss_type="sapo")),
    "gspo": (["--loss.name", "gspo", "--loss.loss_agg", "seq-mean-token-mean", "--loss.eps_low", "0.05",
              "--loss.eps_high", "0.05"],
             dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=0.05, epsilon_high=0.05)),
    "dapo": (["--loss.name", "dapo"], dict(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28)),
    "dr_grpo": (["--loss.name", "grpo", "--loss.loss_agg", "seq-mean-token-sum-norm"], dict(loss_type="dr_grpo")),
    # bnpo = token-mean over the local batch: on one process with one accumulation step, our token-mean
    "bnpo": (["--loss.name", "grpo"], dict(loss_type="bnpo")),
    "top_entropy": (["--loss.name", "dapo", "--loss.top_entropy_quantile", "0.3"],
                    dict(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, top_entropy_quantile=0.3)),
}


@pytest.mark.parametrize("key", list(TRL_TWINS))
def test_our_term_equals_trls_own_loss_type(tiny_model_dir, tmp_path, key):
    ours_args, trl_attrs = TRL_TWINS[key]
    cfg = _cfg(tiny_model_dir, tmp_path, *ours_args)
    trainer = trl_engine.build_trainer(cfg)
    model = trainer.model
    model.train()
    gen = torch.Generator().manual_seed(0)
    lora = [p for _, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for p in lora:
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    ds = trainer.train_dataset
    torch.manual_seed(1)
    inputs = trainer._generate_and_score_completions([ds[i] for i in range(P) for _ in range(G)])
    mask = inputs["completion_mask"].bool()
    with torch.no_grad():  # off-policy ratios and both advantage signs: clipping binds
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        cur = completion_token_stats(model, ids, am, inputs["prompt_ids"].shape[1]).logp
    inputs["old_per_token_logps"] = torch.where(mask, cur + 0.3 * torch.randn(cur.shape, generator=gen), 0.0)
    inputs["advantages"] = torch.randn(P * G, generator=gen)

    loss_ours = trainer.compute_loss(model, inputs)
    g_ours = torch.autograd.grad(loss_ours, lora)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this test does not enter
    for name, value in dict(beta=0.0, **trl_attrs).items():  # TRL reads these from the trainer
        setattr(trainer, name, value)
        if hasattr(trainer.args, name):
            setattr(trainer.args, name, value)
    # 1. TRL's loss formula on the log-probs of our chunked forward: the formulas must agree
    full_t = inputs["completion_ids"].shape[1]

    def our_logps(model_, *args, **kw):  # TRL's hook for per-token log-probs and entropies
        st, t = trainer._token_stats(model_, inputs, slice(None), want_entropy=True)
        pad = lambda v: torch.nn.functional.pad(v, (0, full_t - t))  # noqa: E731  (masked columns)
        return pad(st.logp), pad(st.entropy), None

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "_get_per_token_logps_and_entropies", our_logps)
        loss_f = trl_engine.GRPOTrainer._compute_loss(trainer, model, inputs)
    g_f = torch.autograd.grad(loss_f, lora)
    # 2. TRL end to end (its own full-logits forward): equal loss; the gradient differs by float32
    #    rounding of the two forward paths (chunked head vs one [B, L, V] logits tensor)
    #    (the engine routes the old-policy pass through our head; here TRL's own pass is the point)
    own = trl_engine.GRPOTrainer._get_per_token_logps_and_entropies.__get__(trainer)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "_get_per_token_logps_and_entropies", own)
        loss_trl = trl_engine.GRPOTrainer._compute_loss(trainer, model, inputs)
    g_trl = torch.autograd.grad(loss_trl, lora)
    a, f, b = float(loss_ours.detach()), float(loss_f.detach()), float(loss_trl.detach())
    scale = max(float(g.abs().max()) for g in g_trl)
    d_f = max(float((x - y).abs().max()) for x, y in zip(g_ours, g_f)) / scale
    d_trl = max(float((x - y).abs().max()) for x, y in zip(g_ours, g_trl)) / scale
    print(f"{key}: ours {a:.8f} TRL-formula {f:.8f} TRL {b:.8f}; max |grad diff| / scale: formula {d_f:.1e}, "
          f"end to end {d_trl:.1e}")
    assert scale > 1e-4
    assert abs(a - f) <= 1e-6 * max(1.0, abs(f)) and abs(a - b) <= 1e-6 * max(1.0, abs(b))
    for x, y in zip(g_ours, g_f):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * scale)
    assert d_trl < 1e-3  # forward-path rounding only (measured ~6e-5)
