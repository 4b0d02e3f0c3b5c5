"""End to end: RL on the synthetic task raises the held-out reward of the SFT tiny model, for
grpo and apo (fixed seeds; the same calls as `python -m apo_llm.train`)."""

from __future__ import annotations

import json

import pytest
import torch

import apo_llm.train as train_mod
from apo_llm.config import load_config

torch.set_num_threads(1)  # see tests/test_modeling.py

STEPS = 16
MARGIN = 0.08  # held-out mean reward must rise by at least this much (128 samples per evaluation)


@pytest.mark.slow
@pytest.mark.xfail(strict=False, raises=AssertionError, reason=(
    "NOT YET ACHIEVED (issue 4): on the quick tiny model, 16-30 steps of grpo at lr 1e-3..2e-2 did not raise "
    "the held-out reward beyond noise in calibration runs (larger lr collapsed it). Kept running so that a "
    "tuned setup shows up as XPASS; see the H4 report."))
@pytest.mark.parametrize("loss", ["grpo", "apo"])
def test_training_raises_held_out_reward(tiny_model_dir, tmp_path, loss):
    cfg = load_config([
        "--model.name_or_path", str(tiny_model_dir), "--loss.name", loss, "--train.steps", str(STEPS),
        "--train.lr", "1e-3", "--train.mini_batch_size", "32", "--train.ppo_epochs", "2",
        "--rollout.max_new_tokens", "64", "--eval.every", str(STEPS), "--eval.num_problems", "32",
        "--eval.num_samples", "4", "--checkpoint.every", "0", "--logging.output_dir", str(tmp_path),
        "--logging.run_name", loss, "--logging.progress", "false", "--logging.plots", "false",
    ])
    summary = train_mod.train(cfg)
    before, after = summary["eval"][0], summary["eval"][-1]
    assert before["step"] == 0 and after["step"] == STEPS
    rows = [json.loads(x) for x in (tmp_path / loss / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    early = sum(r["reward"] for r in steps[:4]) / 4
    late = sum(r["reward"] for r in steps[-4:]) / 4
    msg = f"{loss}: held-out {before['eval/mean_reward']:.3f} -> {after['eval/mean_reward']:.3f}, " \
          f"train reward {early:.3f} -> {late:.3f}"
    print(msg)
    assert 0.0 < before["eval/mean_reward"] < 1.0, msg
    assert after["eval/mean_reward"] >= before["eval/mean_reward"] + MARGIN, msg
    assert late > early, msg
