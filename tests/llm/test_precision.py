"""bf16 on CPU: both engines train in `--model.dtype bfloat16`, the bf16-vs-float32 gaps of one update
on one batch (apo_llm/precision.py), what model.lm_head_fp32 buys, and w = 1 at the start of a TRL update.

torch runs bf16 matmuls and autocast on CPU, so these are the GPU's numerics minus the kernels.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from apo_llm.config import load_config

torch.set_num_threads(1)

STEPS = 3


def _run_args(model_dir, out, engine: str, loss: str) -> list[str]:
    rows = 8  # 2 prompts x 4 completions
    args = ["--model.name_or_path", str(model_dir), "--model.device", "cpu", "--model.dtype", "bfloat16",
            "--loss.name", loss, "--train.steps", str(STEPS), "--train.prompts_per_step", "2",
            "--rollout.num_generations", "4", "--rollout.max_new_tokens", "16", "--train.mini_batch_size", str(rows),
            "--train.micro_batch_size", "4", "--train.lr", "1e-2", "--train.warmup_steps", "0",
            "--data.synthetic_n", "16", "--eval.every", "0", "--checkpoint.every", "0",
            "--logging.output_dir", str(out), "--logging.run_name", f"{engine}_{loss}", "--logging.plots", "false",
            "--logging.progress", "false"]
    return args + (["--train.engine", "trl"] if engine == "trl" else [])


@pytest.mark.parametrize("engine", ["native", "trl"])
@pytest.mark.parametrize("loss", ["grpo", "apo"])
def test_three_bf16_steps(tiny_model_dir, tmp_path, engine, loss):
    if engine == "trl":
        pytest.importorskip("trl")
    from apo_llm import train as train_mod

    summary = train_mod.main(_run_args(tiny_model_dir, tmp_path, engine, loss))
    assert summary["steps"] == STEPS
    run = tmp_path / f"{engine}_{loss}"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
        assert math.isfinite(r["entropy"]) and r["entropy"] > 0, r
    if loss == "apo":  # the APO terms ran (from a float32 head: lm_head_fp32's default under bf16)
        assert all(0 < r["apo/manifold_mass"] <= 1 for r in rows), rows
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_bf16_gaps_of_one_update_and_what_the_float32_head_buys(tiny_model_dir):
    """Same weights, completions, advantages and anchor ids; float32 vs bf16 with / without the
    float32 head. The policy sits near the reference (LoRA 0.02 N(0, 1)), as early in training.

    Measured on the quick tiny model (seed 0): the mean relative error of r_anchor is 0.017 with the
    float32 head and 0.032 without; the loss differs by ~1e-4 and the LoRA gradient by ~8% in
    both (the bf16 backbone and its backward dominate those; the head does not change them)."""
    from apo_llm.precision import precision_gaps
    from apo_llm.prompts import format_for_run
    from apo_llm.train import load_data
    from transformers import AutoTokenizer

    cfg = load_config(["--model.name_or_path", str(tiny_model_dir), "--loss.name", "apo",
                       "--rollout.num_generations", "4", "--rollout.max_new_tokens", "24", "--data.synthetic_n", "16"])
    problems, _, _ = load_data(cfg)
    prompts = format_for_run(cfg, AutoTokenizer.from_pretrained(str(tiny_model_dir)), [p.prompt for p in problems[:4]])
    out = precision_gaps(cfg, str(tiny_model_dir), prompts, lora_scale=0.02, seed=0)
    print(json.dumps(out))
    assert out["tokens"] > 50
    head32, plain = out["bf16_head32"], out["bf16"]
    for g in (head32, plain):
        assert 1e-4 < g["r_anchor_rel_mean"] < 0.06  # bf16 really ran, and is not broken
        assert 0 < g["loss_abs"] < 2e-3
        assert 1e-4 < g["grad_rel"] < 0.3
    # what the float32 head is for: r_anchor's error measurably smaller
    assert head32["r_anchor_rel_mean"] < 0.8 * plain["r_anchor_rel_mean"], out


def test_precision_gap_is_zero_for_float32_against_itself(random_tiny_model_dir):
    """The yardstick: the same variant twice gives exactly no gap (so the gaps above are bf16's)."""
    from apo_llm import precision

    cfg = load_config(["--model.name_or_path", str(random_tiny_model_dir), "--loss.name", "apo",
                       "--rollout.num_generations", "2", "--rollout.max_new_tokens", "8",
                       "--train.mini_batch_size", "32", "--train.micro_batch_size", "32"])
    out = precision.precision_gaps(cfg, str(random_tiny_model_dir), ["1 + 2 =", "3 + 4 ="], lora_scale=0.02,
                                   variants=["fp32"])
    assert out["fp32"] == {"loss_abs": 0.0, "r_anchor_rel_max": 0.0, "r_anchor_rel_mean": 0.0, "grad_rel": 0.0}


def test_trl_ratio_is_one_at_the_start_of_every_bf16_update(tiny_model_dir, tmp_path):
    """2 epochs over each batch, so TRL runs its old-policy pass: the training forward's first
    log-probs must equal it exactly (TRL's fused head under autocast was up to 0.039 nats off)."""
    te = pytest.importorskip("apo_llm.trl_engine")
    from apo_llm import train as train_mod

    args = _run_args(tiny_model_dir, tmp_path, "trl", "apo")
    args += ["--train.ppo_epochs", "2", "--train.steps", "2", "--train.micro_batch_size", "4"]
    seen: list[float] = []
    orig = te.APOGRPOTrainer._compute_loss

    def spy(self, model, inputs):
        if self._step % (self.args.steps_per_generation * self.num_iterations) < self.args.steps_per_generation:
            with torch.no_grad():  # first epoch over this batch: the weights are pi_old's
                st, t = self._token_stats(model, inputs, slice(0, inputs["completion_ids"].shape[0]))
            m = inputs["completion_mask"][:, :t].bool()
            seen.append(float((st.logp - inputs["old_per_token_logps"][:, :t])[m].abs().max()))
        return orig(self, model, inputs)

    te.APOGRPOTrainer._compute_loss = spy
    try:
        train_mod.main(args)
    finally:
        te.APOGRPOTrainer._compute_loss = orig
    assert len(seen) == 2 * 2  # 2 generation batches x 2 micro-batches of their first epoch
    assert seen == [0.0] * len(seen)
