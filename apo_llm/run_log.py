"""What a native run writes about itself: metrics.jsonl (TRL/verl metric names), its one-line step
summaries and warnings, and the held-out pass@k evaluations it runs every eval.every steps."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from apo_llm.config import RunConfig
from apo_llm.metrics import pass_at_k
from apo_llm.objectives import kl_estimate
from apo_llm.passes import RolloutPasses
from apo_llm.prompts import format_for_run
from apo_llm.rollout import Completions, generate_completions

log = logging.getLogger("apo_llm.train")

TRUNCATION_WARN = 0.5  # warn when more than this share of completions hit max_new_tokens
ZERO_STD_WARN = 0.9  # warn when more than this share of groups have identical rewards (zero gradient)


class MetricsLog:
    """metrics.jsonl (one line per step and per evaluation) + optional TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, keep_lines: Optional[int] = None):
        self.path = run_dir / "metrics.jsonl"
        if keep_lines is not None and self.path.exists():  # resume: drop lines written after the checkpoint
            lines = self.path.read_text().splitlines(keepends=True)[:keep_lines]
            self.path.write_text("".join(lines))
        elif keep_lines is None and self.path.exists():
            self.path.unlink()
        self.lines = sum(1 for _ in self.path.open()) if self.path.exists() else 0
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.lines += 1
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def step_metrics(cfg: RunConfig, comp: Completions, rewards: torch.Tensor, passes: RolloutPasses, upd: dict,
                 optimizer) -> dict[str, float]:
    """TRL/verl-named metrics of one step."""
    G = cfg.rollout.num_generations
    groups = rewards.view(-1, G)  # [P, G]
    lengths = comp.lengths.float()
    mask = comp.completion_mask.bool()
    m = {
        "reward": float(rewards.mean()),
        "reward_std": float(groups.std(-1, unbiased=False).mean()),  # TRL: mean within-group std
        "frac_reward_zero_std": float((groups.std(-1, unbiased=False) == 0).float().mean()),
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(comp.truncated.float().mean()),
        "entropy": float(passes.entropy[mask].mean()) if mask.any() else 0.0,
        "num_tokens": float(mask.sum()),
        "learning_rate": float(optimizer.param_groups[0]["lr"]),
    }
    if passes.ref_logp is not None and mask.any():
        # KL(pi_old || pi_ref) on the sampled tokens (k3), whatever the loss: a drift diagnostic
        m["kl"] = float(kl_estimate("k3", passes.old_logp, passes.ref_logp, None)[mask].mean())
    for k, v in upd.items():
        if k == "kl":
            m["kl_loss_term"] = v  # the loss's own KL term (current policy, its estimator)
        elif k != "entropy":  # entropy is logged from the behaviour pass above
            m[k] = v
    return m


def summary_line(step: int, m: dict) -> str:
    parts = [f"step {step}", f"reward {m['reward']:.3f}", f"zero_std {m['frac_reward_zero_std']:.2f}",
             f"len {m['completions/mean_length']:.1f}", f"trunc {m['completions/clipped_ratio']:.2f}",
             f"H {m['entropy']:.3f}"]
    if "kl" in m:
        parts.append(f"kl {m['kl']:.4f}")
    if "apo/manifold_mass" in m:
        parts.append(f"M-mass {m['apo/manifold_mass']:.3f} outside {m['apo/outside_topk_frac']:.3f}")
    parts += [f"gnorm {m['grad_norm']:.3f}", f"lr {m['learning_rate']:.2e}", f"{m['timing/step']:.1f}s"]
    return " | ".join(parts)


def loud_warnings(m: dict) -> None:
    if m["completions/clipped_ratio"] > TRUNCATION_WARN:
        msg = (f"{100 * m['completions/clipped_ratio']:.0f}% of completions hit rollout.max_new_tokens without EOS: "
               f"rewards are mostly from truncated text; raise rollout.max_new_tokens")
        log.warning(msg)
    if m["frac_reward_zero_std"] > ZERO_STD_WARN:
        msg = (f"{100 * m['frac_reward_zero_std']:.0f}% of groups have identical rewards: their advantages are 0 "
               f"and they give no gradient (task too easy/hard, or the reward never fires)")
        log.warning(msg)


# --------------------------------------------------------------------------------------------
# Held-out pass@k (small; the standalone evaluator is apo_llm.evaluate)
# --------------------------------------------------------------------------------------------


def evaluate_pass_at_k(cfg: RunConfig, model, tokenizer, problems, prompts: list[str], reward: str) -> dict:
    """pass@k (unbiased, metrics.pass_at_k) and mean reward on held-out problems, fixed sampling seed."""
    from apo_llm.rewards import score_completions

    e = cfg.eval
    comp = generate_completions(model, tokenizer, prompts, e.num_samples,
                                max_new_tokens=e.max_new_tokens or cfg.rollout.max_new_tokens,
                                temperature=e.temperature or cfg.rollout.temperature,
                                batch_size=cfg.rollout.batch_size, seed=e.seed)
    golds = [problems[i].gold for i in comp.prompt_index]
    r = np.asarray(score_completions(reward, comp.texts, golds), dtype=float).reshape(len(problems), e.num_samples)
    c = (r > 0.5).sum(-1)
    out = {f"eval/pass@{k}": float(np.mean(pass_at_k(e.num_samples, c, k))) for k in e.k}
    out["eval/mean_reward"] = float(r.mean())
    out["eval/clipped_ratio"] = float(comp.truncated.float().mean())
    out["correct"] = c.tolist()  # per problem: the paired change between two evaluations needs them
    return out


class Evaluator:
    """Held-out pass@k at fixed steps, written to metrics.jsonl and kept in the loop state."""

    def __init__(self, s, mlog: MetricsLog, state: dict):
        self.s, self.mlog, self.state = s, mlog, state
        self.on = s.cfg.eval.every > 0 and bool(s.eval_problems)
        self.prompts = format_for_run(s.cfg, s.tokenizer, [p.prompt for p in s.eval_problems])

    def __call__(self, step: int, say=None) -> dict:
        t0 = time.perf_counter()
        s = self.s
        ev = evaluate_pass_at_k(s.cfg, s.policy, s.tokenizer, s.eval_problems, self.prompts, s.reward_name)
        ev.update(step=step, **{"timing/eval": time.perf_counter() - t0})
        self.mlog.write(ev)
        self.state["eval_history"].append(ev)
        if say is not None:
            say(f"eval step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if k.startswith("eval/")))
        return ev
