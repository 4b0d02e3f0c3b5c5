"""The training loop: resume equivalence, NaN guard, run directory contents, reference passes.

These use a tiny random character-level Llama and a deterministic stand-in reward (so groups have
reward variance and the adapter really moves); the reward-rises test on the SFT tiny model is in
tests/llm/test_train_e2e.py.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import zlib

import pytest
import torch

import apo_llm.rewards
import apo_llm.loop as loop_mod
import apo_llm.passes
import apo_llm.train as train_mod
from apo_llm.checkpoint import latest_checkpoint, load_checkpoint
from apo_llm.config import load_config
from apo_llm.modeling import load_model_and_tokenizer, wrap_lora
from tests.llm.test_modeling import build_char_llama

torch.set_num_threads(1)  # see tests/llm/test_modeling.py

VOLATILE = ("timing/", "tokens_per_second", "memory/")  # wall-clock measurements differ between runs


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory):
    return build_char_llama(tmp_path_factory.mktemp("char_llama_train"), seed=6)


@pytest.fixture(autouse=True)
def parity_reward(monkeypatch):
    """Reward = parity of a checksum of the text: varied rewards, no dependence on model quality."""
    def score(name, completions, golds, **kw):
        return [float(zlib.crc32(c.encode()) % 2) for c in completions]

    monkeypatch.setattr(apo_llm.rewards, "score_completions", score)


def _cfg(char_dir, out, *extra):
    return load_config([
        "--model.name_or_path", str(char_dir), "--data.limit", "40", "--train.prompts_per_step", "2",
        "--rollout.num_generations", "4", "--rollout.max_new_tokens", "6", "--train.mini_batch_size", "4",
        "--train.micro_batch_size", "2", "--train.ppo_epochs", "2", "--train.lr", "5e-2", "--train.warmup_steps", "1",
        "--train.scheduler", "linear", "--eval.every", "2", "--eval.num_problems", "2", "--eval.num_samples", "2",
        "--eval.k", "1,2", "--logging.output_dir", str(out), "--logging.progress", "false",
        "--logging.plots", "false", "--lora.dropout", "0.1", *extra])


def _metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.mark.parametrize("loss", ["apo", "grpo_kl"])
def test_resume_gives_identical_metrics(char_dir, tmp_path, loss):
    """4 steps straight == 2 steps, exit, resume for 2 more (rollouts regenerated after resume)."""
    extra = ["--loss.name", loss] + (["--loss.kl_coef", "0.1"] if loss == "grpo_kl" else [])
    straight = _cfg(char_dir, tmp_path, "--train.steps", "4", "--checkpoint.every", "2",
                    "--logging.run_name", "straight", *extra)
    train_mod.train(straight)
    first = _cfg(char_dir, tmp_path, "--train.steps", "4", "--checkpoint.every", "2", "--train.stop_at_step", "2",
                 "--logging.run_name", "resumed", *extra)
    s1 = train_mod.train(first)
    assert s1["steps"] == 2 and not s1["finished"]
    again = _cfg(char_dir, tmp_path, "--train.steps", "4", "--checkpoint.every", "2", "--resume", "auto",
                 "--logging.run_name", "resumed", *extra)
    s2 = train_mod.train(again)
    assert s2["steps"] == 4 and s2["finished"]
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert len(a) == len(b) == 4 + 3  # 4 steps + evals at steps 0, 2, 4
    assert a == b
    # the adapter moved (the test would be vacuous with zero gradients)
    steps = [r for r in a if "reward" in r]
    assert all(r["optimizer_steps"] == 4 for r in steps) and any(r["grad_norm"] > 0 for r in steps)
    assert any(r["frac_reward_zero_std"] < 1 for r in steps)
    base, _ = load_model_and_tokenizer(str(char_dir))
    m1 = wrap_lora(base, r=16, alpha=32)
    load_checkpoint(latest_checkpoint(tmp_path / "straight"), m1, restore_rng=False)
    w1 = {n: p.detach().clone() for n, p in m1.named_parameters() if "lora_" in n}
    load_checkpoint(latest_checkpoint(tmp_path / "resumed"), m1, restore_rng=False)
    assert all(torch.equal(w1[n], p) for n, p in m1.named_parameters() if "lora_" in n)
    assert any(p.abs().max() > 0 for n, p in w1.items() if "lora_B" in n)


def test_run_directory_and_metric_names(char_dir, tmp_path):
    # TensorBoard is an optional extra: its event file is checked only where it is installed
    has_tb = importlib.util.find_spec("tensorboard") is not None
    cfg = _cfg(char_dir, tmp_path, "--train.steps", "2", "--logging.run_name", "r", "--logging.plots", "true",
               "--logging.tensorboard", str(has_tb).lower())
    summary = train_mod.train(cfg)
    run = tmp_path / "r"
    for f in ("config.yaml", "run_info.json", "metrics.jsonl", "summary.json", "curves.png",
              "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (run / f).exists(), f
    assert not has_tb or list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in rows if "reward" in r][0]
    for k in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
              "entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "grad_norm", "learning_rate",
              "num_tokens", "timing/generate", "timing/reference", "timing/update", "tokens_per_second",
              "memory/peak_mb", "apo/manifold_mass", "apo/outside_topk_frac", "apo/r_anchor_mean", "apo/pull",
              "apo/neg_clipped_frac"):
        assert k in step and math.isfinite(step[k]), k
    assert 0 <= step["apo/manifold_mass"] <= 1 + 1e-6 and 0 <= step["apo/outside_topk_frac"] <= 1
    assert any("eval/pass@2" in r for r in rows)
    assert summary["finished"] and load_config(["--config", str(run / "config.yaml")]) == cfg
    # the final adapter loads with plain peft
    from peft import PeftModel

    base, _ = load_model_and_tokenizer(str(char_dir))
    PeftModel.from_pretrained(base, str(run / "adapter"))


def test_grpo_runs_without_reference_pass(char_dir, tmp_path, monkeypatch):
    calls = []
    real = apo_llm.passes.reference_context

    def spy(model):
        calls.append(1)
        return real(model)

    monkeypatch.setattr(apo_llm.passes, "reference_context", spy)
    cfg = _cfg(char_dir, tmp_path, "--train.steps", "1", "--loss.name", "grpo", "--logging.run_name", "g",
               "--eval.every", "0")
    train_mod.train(cfg)
    assert not calls
    row = json.loads((tmp_path / "g" / "metrics.jsonl").read_text().splitlines()[0])
    assert "kl" not in row and "apo/manifold_mass" not in row and row["timing/reference"] < 0.05


@pytest.mark.parametrize("norm", ["old_mass", "old_token"])
def test_two_step_run_with_an_old_reading(char_dir, tmp_path, norm):
    """loss.apo_anchor_norm and loss.apo_pull_cap from the command line reach the loss, run_info.json
    and metrics.jsonl (the new APO diagnostics)."""
    cfg = _cfg(char_dir, tmp_path, "--train.steps", "2", "--eval.every", "0", "--logging.run_name", norm,
               "--loss.apo_anchor_norm", norm, "--loss.apo_clip", "push_only", "--loss.apo_pull_cap", "2.5")
    train_mod.train(cfg)
    rows = [json.loads(x) for x in (tmp_path / norm / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["optimizer_steps"] == 4 for r in rows)
    for key in ("apo/neg_clipped_grad_frac", "apo/r_anchor_median", "apo/pull_force_share", "apo/pull_capped_frac",
                "apo/z_ref_mean"):
        assert all(key in r and math.isfinite(r[key]) for r in rows), key
    info = json.loads((tmp_path / norm / "run_info.json").read_text())["loss_reading"]
    assert info == {"name": "apo", "apo_anchor_norm": norm, "apo_clip": "push_only", "apo_anchoring": "exclusive",
                    "apo_pull_cap": 2.5, "needs_anchor_old_logp": True}


def _perturbed_policy(char_dir):
    base, tok = load_model_and_tokenizer(str(char_dir))
    model = wrap_lora(base, r=4, alpha=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # pi_theta != pi_ref: old and reference log-probs at the anchors differ
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model, tok


def _independent_pi_old_at_anchors(cfg, model, comp):
    """log pi_old at the Top-K ids of pi_ref, from two plain full-width forwards: [N, T, K] each."""
    ids, am, n = comp.input_ids, comp.attention_mask, comp.n_prompt
    temp = cfg.rollout.temperature
    with torch.no_grad():
        with apo_llm.passes.reference_context(model):
            ref = loop_mod.completion_token_stats(model, ids, am, n, temperature=temp, topk=cfg.loss.apo_k)
        old = loop_mod.completion_token_stats(model, ids, am, n, temperature=temp, gather_ids=ref.topk_ids)
    return ref, old


@pytest.mark.parametrize("norm", ["old_mass", "old_token"])
def test_anchor_old_logp_is_pi_old_at_the_reference_topk(char_dir, norm, monkeypatch):
    """Both paths: the old pass (2 epochs) stores it; with the single-pass skip the loss receives the
    training forward's gather, detached. Either equals an independent gather of pi_old."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    from apo_llm.rollout import generate_completions

    model, tok = _perturbed_policy(char_dir)
    comp = generate_completions(model, tok, ["12+7=", "30-4="], 4, max_new_tokens=6, seed=0)
    mask = comp.completion_mask.bool()
    for epochs in ("2", "1"):
        cfg = load_config(["--model.name_or_path", str(char_dir), "--loss.apo_anchor_norm", norm,
                           "--train.ppo_epochs", epochs, "--train.prompts_per_step", "2",
                           "--rollout.num_generations", "4", "--train.mini_batch_size", "8",
                           "--train.micro_batch_size", "8", "--rollout.max_new_tokens", "6"])
        ref, old = _independent_pi_old_at_anchors(cfg, model, comp)
        assert (old.gathered_logp[mask] - ref.topk_logp[mask]).abs().max() > 1e-2  # the test can tell them apart
        passes, _, _ = train_mod.behaviour_and_reference(cfg, model, comp, torch.device("cpu"))
        assert torch.equal(passes.anchor_ids[mask], ref.topk_ids[mask])
        if epochs == "2":
            torch.testing.assert_close(passes.anchor_old_logp[mask], old.gathered_logp[mask], rtol=0, atol=1e-5)
            continue
        assert passes.anchor_old_logp is None  # skipped: update() supplies it
        seen = []
        real = loop_mod.policy_loss

        def spy(*a, **kw):
            seen.append(kw["anchor_old_logp"].detach().clone())
            assert not kw["anchor_old_logp"].requires_grad
            return real(*a, **kw)

        monkeypatch.setattr(loop_mod, "policy_loss", spy)
        m = copy.deepcopy(model)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        adv = torch.randn(8)
        torch.manual_seed(3)
        order = torch.randperm(8)  # the minibatch order update() draws next
        torch.manual_seed(3)
        loop_mod.update(cfg, m, opt, get_scheduler("constant", opt), Accelerator(cpu=True), comp, adv, passes,
                         torch.device("cpu"))
        assert len(seen) == 1
        t = seen[0].shape[1]
        expect, m_rows = old.gathered_logp[order, :t], mask[order, :t]
        torch.testing.assert_close(seen[0][m_rows], expect[m_rows], rtol=0, atol=1e-5)


@pytest.mark.parametrize("norm", ["ref", "old_token"])
def test_unsynced_metrics_give_the_same_floats(norm):
    """policy_loss(sync_metrics=False) + the trainer's one-sync accumulation (train._add_weighted) give
    exactly the floats of the synced path, summed the way the trainer summed them before."""
    from apo_llm.objectives import LossConfig, policy_loss

    gen = torch.Generator().manual_seed(4)
    B, T, K = 6, 5, 4
    cfg = LossConfig(name="apo", apo_anchor_norm=norm, apo_beta=0.3)
    calls = []
    for _ in range(3):  # three micro-batches
        logp = -torch.rand(B, T, generator=gen) * 3
        anchor_logp = -torch.rand(B, T, K, generator=gen) * 3
        kw = dict(anchor_logp=anchor_logp, anchor_ref_logp=anchor_logp - 0.2 * torch.rand(B, T, K, generator=gen),
                  anchor_is_sampled=torch.zeros(B, T, K, dtype=torch.bool))
        if norm != "ref":
            kw["anchor_old_logp"] = anchor_logp - 0.1 * torch.randn(B, T, K, generator=gen)
        mask = torch.rand(B, T, generator=gen) < 0.8
        args = (cfg, logp, logp + 0.2 * torch.randn(B, T, generator=gen), torch.randn(B, generator=gen), mask)
        calls.append((float(mask.sum()), args, kw))
    synced, seen = {}, []
    for w, args, kw in calls:
        loss_a, floats = policy_loss(*args, **kw)
        loss_b, tensors = policy_loss(*args, **kw, sync_metrics=False)
        assert torch.equal(loss_a, loss_b) and set(floats) == set(tensors)
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in tensors.values())
        for k, v in floats.items():
            synced[k] = synced.get(k, 0.0) + w * v
        seen.append((w, tensors))
    unsynced: dict = {}
    loop_mod._add_weighted(unsynced, seen)
    assert unsynced == synced  # bit-identical, not close
    assert any(v != 0 for v in synced.values())


def test_truncation_and_zero_variance_warnings(char_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(apo_llm.rewards, "score_completions", lambda name, c, g, **kw: [0.0] * len(c))
    cfg = _cfg(char_dir, tmp_path, "--train.steps", "1", "--logging.run_name", "w", "--eval.every", "0",
               "--rollout.max_new_tokens", "2")
    with caplog.at_level("WARNING", logger="apo_llm.train"):
        train_mod.train(cfg)
    text = caplog.text
    assert "hit rollout.max_new_tokens" in text and "identical rewards" in text


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss with a poisoned gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _poison_steps(monkeypatch, bad_steps, how: str):
    """Make policy_loss non-finite (loss, or only its gradient) during the given RL steps."""
    real_loss, real_update = loop_mod.policy_loss, loop_mod.update
    step = {"n": 0}

    def counting_update(*a, **k):
        step["n"] += 1
        return real_update(*a, **k)

    def patched(*a, **k):
        loss, m = real_loss(*a, **k)
        if step["n"] in bad_steps:
            loss = loss * float("nan") if how == "loss" else _NanGrad.apply(loss)
        return loss, m

    monkeypatch.setattr(loop_mod, "update", counting_update)
    monkeypatch.setattr(loop_mod, "policy_loss", patched)


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_nonfinite_steps_are_skipped_then_stop(char_dir, tmp_path, monkeypatch, how):
    _poison_steps(monkeypatch, range(3, 100), how=how)
    cfg = _cfg(char_dir, tmp_path, "--train.steps", "6", "--checkpoint.every", "1", "--eval.every", "0",
               "--train.max_consecutive_nonfinite", "2", "--logging.run_name", "nan")
    with pytest.raises(train_mod.NonFiniteError, match="2 consecutive steps"):
        train_mod.train(cfg)
    run = tmp_path / "nan"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["nonfinite/skipped_updates"] > 0 for r in rows] == [False, False, True, True]
    assert rows[-1]["nonfinite/steps_total"] == 2
    latest = latest_checkpoint(run)
    assert latest.name == "step-000002"  # no checkpoint of a non-finite step
    base, _ = load_model_and_tokenizer(str(char_dir))
    model = wrap_lora(base, r=16, alpha=32)
    load_checkpoint(latest, model, restore_rng=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_single_nonfinite_step_is_skipped_and_training_continues(char_dir, tmp_path, monkeypatch):
    _poison_steps(monkeypatch, {2}, how="grad")
    cfg = _cfg(char_dir, tmp_path, "--train.steps", "3", "--eval.every", "0", "--logging.run_name", "one")
    summary = train_mod.train(cfg)
    assert summary["finished"] and summary["nonfinite_steps"] == 1
    rows = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    # 2 ppo_epochs x 2 minibatches = 4 optimizer steps per step; none in the poisoned one
    assert [r["optimizer_steps"] for r in rows] == [4, 0, 4]
    assert [r["nonfinite/skipped_updates"] for r in rows] == [0, 4, 0]


def test_main_reports_config_errors(capsys):
    with pytest.raises(SystemExit) as e:
        train_mod.main(["--train.lr", "-1"])
    assert e.value.code == 2 and "train.lr" in capsys.readouterr().err


def test_prompt_sampler_positions_are_resumable():
    a = train_mod.PromptSampler(5, seed=3)
    seq = a.take(12)
    b = train_mod.PromptSampler(5, seed=3, position=7)
    assert b.take(5) == seq[7:12]
    assert sorted(seq[:5]) == list(range(5)) and sorted(seq[5:10]) == list(range(5))  # each pass a permutation


# --------------------------------------------------------------------------------------------
# Issue 12: reliability (each of these fails on the trainer before the fix)
# --------------------------------------------------------------------------------------------


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _lora_finite(char_dir, ckpt):
    base, _ = load_model_and_tokenizer(str(char_dir))
    model = wrap_lora(base, r=16, alpha=32)
    load_checkpoint(ckpt, model, restore_rng=False)
    return all(torch.isfinite(p).all() for n, p in model.named_parameters() if "lora_" in n)


def test_resume_falls_back_past_a_corrupt_latest_checkpoint(char_dir, tmp_path, caplog):
    """Item 2 through train(): a truncated newest optimizer.pt -> the previous checkpoint, same run."""
    common = ["--train.steps", "4", "--eval.every", "0", "--checkpoint.keep_last", "3"]
    train_mod.train(_cfg(char_dir, tmp_path, *common, "--checkpoint.every", "2", "--logging.run_name", "straight"))
    train_mod.train(_cfg(char_dir, tmp_path, *common, "--checkpoint.every", "2", "--train.stop_at_step", "3",
                         "--logging.run_name", "broken"))
    run = tmp_path / "broken"
    opt = run / "checkpoints" / "step-000003" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:64])
    with caplog.at_level("WARNING"):
        s = train_mod.train(_cfg(char_dir, tmp_path, *common, "--checkpoint.every", "2", "--resume", "auto",
                                 "--logging.run_name", "broken"))
    assert s["finished"] and "skipped checkpoint step-000003" in caplog.text and "optimizer.pt" in caplog.text
    assert _metrics(tmp_path / "straight") == _metrics(run)  # resumed from step 2, bit for bit


def test_nonfinite_weight_after_an_optimizer_step_rolls_the_step_back(char_dir, tmp_path, monkeypatch):
    """Item 3: a NaN written into a LoRA weight by an optimizer step is rolled back, never checkpointed."""
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def poisoned(self, *a, **k):
        out = real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 6:  # the 2nd of the 4 optimizer steps of RL step 2
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    real_update, seen = loop_mod.update, []

    def spy(cfg, model, *a, **k):
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        out = real_update(cfg, model, *a, **k)
        seen.append((before, [p.detach().clone() for p in model.parameters() if p.requires_grad]))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    monkeypatch.setattr(loop_mod, "update", spy)
    cfg = _cfg(char_dir, tmp_path, "--train.steps", "3", "--eval.every", "0", "--checkpoint.every", "1",
               "--checkpoint.keep_last", "5", "--logging.run_name", "roll")
    s = train_mod.train(cfg)
    rows = _rows(tmp_path / "roll")
    assert s["finished"] and s["nonfinite_steps"] == 1
    assert [r["optimizer_steps"] for r in rows] == [4, 0, 4]
    assert [r["nonfinite/weights_rolled_back"] for r in rows] == [0, 1, 0]
    before, after = seen[1]  # step 2 ends exactly where it started
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    ckpts = sorted(p.name for p in (tmp_path / "roll" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000001", "step-000003"]
    assert all(_lora_finite(char_dir, tmp_path / "roll" / "checkpoints" / c) for c in ckpts)


def test_nonfinite_weights_are_never_checkpointed(char_dir, tmp_path, monkeypatch):
    """Item 3: weights corrupted outside an optimizer step stop the run before the checkpoint."""
    real_metrics, calls = loop_mod.step_metrics, {"n": 0}

    def poison_at_step_2(cfg, comp, rewards, passes, upd, optimizer):
        calls["n"] += 1
        if calls["n"] == 2:  # after the update of step 2, before its checkpoint
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return real_metrics(cfg, comp, rewards, passes, upd, optimizer)

    monkeypatch.setattr(loop_mod, "step_metrics", poison_at_step_2)
    cfg = _cfg(char_dir, tmp_path, "--train.steps", "3", "--eval.every", "0", "--checkpoint.every", "1",
               "--logging.run_name", "corrupt")
    with pytest.raises(train_mod.NonFiniteError, match="Last good checkpoint: .*step-000001"):
        train_mod.train(cfg)
    latest = latest_checkpoint(tmp_path / "corrupt")
    assert latest.name == "step-000001" and _lora_finite(char_dir, latest)


def test_nan_rewards_are_counted_and_treated_as_zero(char_dir, tmp_path, monkeypatch, caplog):
    def score(name, completions, golds, **kw):
        return [float("nan") if i % 3 == 0 else float(zlib.crc32(c.encode()) % 2) for i, c in enumerate(completions)]

    monkeypatch.setattr(apo_llm.rewards, "score_completions", score)
    cfg = _cfg(char_dir, tmp_path, "--train.steps", "2", "--eval.every", "0", "--logging.run_name", "nanr")
    with caplog.at_level("WARNING", logger="apo_llm.train"):
        s = train_mod.train(cfg)
    rows = _rows(tmp_path / "nanr")
    assert s["finished"] and [r["nonfinite/rewards"] for r in rows] == [3, 3]  # rows 0, 3, 6 of 8
    assert all(math.isfinite(r["reward"]) for r in rows) and "were NaN/inf; counted as 0" in caplog.text


def test_nonfinite_logprob_skips_the_update(char_dir, tmp_path, monkeypatch):
    """The non-finite log-prob branch of update(), through train()."""
    real_stats, real_update, step = loop_mod.completion_token_stats, loop_mod.update, {"n": 0}

    def counting_update(*a, **k):
        step["n"] += 1
        return real_update(*a, **k)

    def stats(*a, **k):
        st = real_stats(*a, **k)
        if step["n"] == 2 and torch.is_grad_enabled():
            st.logp = st.logp - float("inf")
        return st

    monkeypatch.setattr(loop_mod, "update", counting_update)
    monkeypatch.setattr(loop_mod, "completion_token_stats", stats)
    cfg = _cfg(char_dir, tmp_path, "--train.steps", "3", "--eval.every", "0", "--logging.run_name", "lp")
    assert train_mod.train(cfg)["nonfinite_steps"] == 1
    assert [r["optimizer_steps"] for r in _rows(tmp_path / "lp")] == [4, 0, 4]


def test_resume_applies_loop_settings_and_refuses_others(char_dir, tmp_path, caplog):
    """Item 6: a changed setting on resume is applied and logged, or refused; never recorded and ignored."""
    from apo_llm.cli import UserError

    first = _cfg(char_dir, tmp_path, "--train.steps", "2", "--eval.every", "0", "--logging.run_name", "re")
    train_mod.train(first)
    with pytest.raises(UserError, match="train.lr"):
        train_mod.train(_cfg(char_dir, tmp_path, "--train.steps", "2", "--eval.every", "0", "--resume", "auto",
                             "--logging.run_name", "re", "--train.lr", "1e-4"))
    assert load_config(["--config", str(tmp_path / "re" / "config.yaml")]).train.lr == 5e-2  # not rewritten
    with caplog.at_level("INFO", logger="apo_llm.train"):
        s = train_mod.train(_cfg(char_dir, tmp_path, "--train.steps", "3", "--eval.every", "0", "--resume", "auto",
                                 "--logging.run_name", "re"))
    assert s["steps"] == 3 and "applying changed setting train.steps: 2 -> 3" in caplog.text
    assert [r["step"] for r in _rows(tmp_path / "re")] == [1, 2, 3]


def test_jsonl_without_eval_path_holds_out_a_slice(tmp_path, caplog):
    """Item 6: the evaluation set is a held-out slice of the file, not the training file itself."""
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"question": f"q{i}", "gold": str(i)}) + "\n" for i in range(12)))
    cfg = load_config(["--data.source", "jsonl", "--data.path", str(f), "--data.reward", "gsm8k_strict",
                       "--eval.num_problems", "2"])
    with caplog.at_level("WARNING", logger="apo_llm.train"):
        train, evals, reward = train_mod.load_data(cfg)
    assert reward == "gsm8k_strict" and len(evals) == 2 and len(train) == 10
    assert not {p.id for p in train} & {p.id for p in evals}
    assert "held-out slice of 2 of the 12 problems" in caplog.text
    train, evals, _ = train_mod.load_data(load_config(["--data.source", "jsonl", "--data.path", str(f),
                                                        "--data.reward", "gsm8k_strict", "--eval.every", "0"]))
    assert len(train) == 12 and evals == []


def test_progress_is_plain_lines_when_not_a_terminal(char_dir, tmp_path, capsys, caplog):
    """Item 8: no progress bar redraws in redirected output; one plain line per step instead."""
    cfg = _cfg(char_dir, tmp_path, "--train.steps", "2", "--eval.every", "0", "--logging.run_name", "p",
               "--logging.progress", "true")
    with caplog.at_level("INFO", logger="apo_llm.train"):
        train_mod.train(cfg)
    err = capsys.readouterr().err
    assert "\r" not in err and "apo_llm.train:" not in err
    assert caplog.text.count("| reward ") == 2


def test_first_run_builds_the_tiny_model_and_equals_the_second(tmp_path, monkeypatch):
    """Item 7: the seed is applied after the tiny model is built on first use, so run 1 == run 2."""
    import dataclasses

    import apo_llm.tiny as tiny

    spec = dataclasses.replace(tiny.QUICK, name="tiny-firstrun", hidden=32, intermediate=64, max_steps=10,
                               min_steps=10, eval_every=10, eval_problems=2, eval_samples=1, final_problems=2,
                               final_samples=1, n_train=64, max_new_tokens=16)
    monkeypatch.setattr(tiny, "QUICK", spec)
    monkeypatch.setattr(tiny, "DEFAULT_CACHE", tmp_path / "cache")
    args = ["--model.name_or_path", "tiny", "--model.tiny_quick", "true", "--train.steps", "2", "--eval.every", "0",
            "--rollout.max_new_tokens", "8", "--lora.dropout", "0.1"]
    assert not (tmp_path / "cache").exists()
    train_mod.train(_cfg(None, tmp_path, *args, "--logging.run_name", "first"))
    assert list((tmp_path / "cache").glob("tiny-firstrun-*/build_info.json"))  # built inside the first run
    train_mod.train(_cfg(None, tmp_path, *args, "--logging.run_name", "second"))
    a, b = _metrics(tmp_path / "first"), _metrics(tmp_path / "second")
    assert len(a) == 2 and a == b


def test_passk_advantage_is_wired_with_its_k(char_dir, tmp_path, monkeypatch):
    """train.passk_k reaches objectives.group_advantages (k is required by validation)."""
    seen = []
    real = loop_mod.group_advantages

    def spy(rewards, G, estimator, **kw):
        seen.append((estimator, kw.get("k")))
        return real(rewards, G, estimator, **kw)

    monkeypatch.setattr(loop_mod, "group_advantages", spy)
    cfg = _cfg(char_dir, tmp_path, "--train.steps", "1", "--eval.every", "0", "--logging.run_name", "pk",
               "--train.advantage", "passk", "--train.passk_k", "2")
    assert train_mod.train(cfg)["finished"] and seen == [("passk", 2)]
