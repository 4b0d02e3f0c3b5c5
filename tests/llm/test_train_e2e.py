"""End to end: RL on the synthetic task raises the mean reward of the SFT tiny model, for grpo and
apo (fixed seeds; the same calls as `python -m apo_llm.train`).

The training pool is 16 fixed problems (`data.synthetic_n`), so every step revisits all of them:
RLVR on a fixed training set, as with GSM8K's train split over epochs. On the quick tiny model
(sampled pass@1 ~ 0.13) 20 steps took the training reward from 0.13 to 0.64 (grpo) and to 0.48
(apo) when this test was written; the margin below is about 3 standard errors of the difference
of two 5-step means (5 x 128 samples each). Whether the held-out reward moves is not asserted:
on this tiny model the gain is mostly specific to the problems trained on (see README).
"""

from __future__ import annotations

import json

import pytest
import torch

import apo_llm.train as train_mod
from apo_llm.config import load_config

torch.set_num_threads(1)  # see tests/llm/test_modeling.py

STEPS = 20
MARGIN = 0.10  # mean training reward of the last 5 steps must exceed the first 5 by this much


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["grpo", "apo"])
def test_training_raises_reward(tiny_model_dir, tmp_path, loss):
    cfg = load_config([
        "--model.name_or_path", str(tiny_model_dir), "--loss.name", loss, "--train.steps", str(STEPS),
        "--train.lr", "3e-3",  # the setting this margin was calibrated at (the embedded default is now 1e-3)
        "--data.synthetic_n", "16", "--eval.every", str(STEPS), "--eval.num_problems", "16",
        "--eval.num_samples", "4", "--checkpoint.every", "0", "--logging.output_dir", str(tmp_path),
        "--logging.run_name", loss, "--logging.progress", "false", "--logging.plots", "false",
        "--train.num_threads", "1",
    ])
    summary = train_mod.train(cfg)
    rows = [json.loads(x) for x in (tmp_path / loss / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    early = sum(r["reward"] for r in steps[:5]) / 5
    late = sum(r["reward"] for r in steps[-5:]) / 5
    before, after = summary["eval"][0], summary["eval"][-1]
    msg = (f"{loss}: train reward {early:.3f} -> {late:.3f}; held-out mean reward "
           f"{before['eval/mean_reward']:.3f} -> {after['eval/mean_reward']:.3f}")
    print(msg)
    assert 0.0 < early < 1.0, msg  # the base model is neither hopeless nor perfect
    assert late >= early + MARGIN, msg
    assert (tmp_path / loss / "adapter" / "adapter_config.json").exists()
