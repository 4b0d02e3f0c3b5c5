"""The miniature's design: its arms, the seed rule's groups, the sizes (FULL and QUICK), and the
names every file of a sweep is keyed by (runs "<arm>-s<seed>", labels "<run>@<step>").

Nothing here trains or reads a file. A sweep directory made with these names and sizes is resumed
by any later version, so none of them may change (apo_llm/miniature/layout.py says where each goes).
"""

from __future__ import annotations

from dataclasses import dataclass

BETAS = (0.01, 0.03, 0.1)  # APO's pull weight, per reading: its force depends on what r_anchor divides by
READINGS = {"apo_ref": "ref", "apo_old_mass": "old_mass", "apo_old_token": "old_token"}  # A, C, H
SILENCE_LOSS = "apo_silence"  # the silence-only control (a registered loss term, when there is one)


def _arms() -> dict[str, dict]:
    """arm -> trainer config overrides {section: {field: value}}. KL coefficients: 1e-3 is the value
    LLM recipes use (verl / TRL examples), 0.1 a strong one; kl_on_wrong applies its KL on A < 0 only.
    The silence-only control is listed only when the loss registry has it (apo_llm.objectives)."""
    from apo_llm.objectives import POLICY_TERMS

    arms: dict[str, dict] = {
        "grpo": {"loss": {"name": "grpo"}},
        "grpo_kl_1e-3": {"loss": {"name": "grpo_kl", "kl_coef": 1e-3}},
        "grpo_kl_0.1": {"loss": {"name": "grpo_kl", "kl_coef": 0.1}},
        "kl_on_wrong": {"loss": {"name": "kl_on_wrong", "kl_coef": 0.1}},
    }
    for prefix, reading in READINGS.items():
        for beta in BETAS:
            arms[f"{prefix}_b{beta:g}"] = {"loss": {"name": "apo", "apo_anchor_norm": reading, "apo_beta": beta}}
    if SILENCE_LOSS in POLICY_TERMS:  # silences exactly the tokens reading A at beta 0.1 silences, no pull
        arms[SILENCE_LOSS] = {"loss": {"name": SILENCE_LOSS, "apo_anchor_norm": "ref", "apo_beta": 0.1}}
    arms["psr"] = {"loss": {"name": "grpo"}, "train": {"advantage": "psr"}}
    arms["nsr"] = {"loss": {"name": "grpo"}, "train": {"advantage": "nsr"}}
    return arms


ARMS: dict[str, dict] = _arms()
BASE = "base"
NULL_ARM = "grpo"
A_ARMS = tuple(f"apo_ref_b{b:g}" for b in BETAS)
CH_ARMS = tuple(f"{p}_b{b:g}" for p in ("apo_old_mass", "apo_old_token") for b in BETAS)
KL_ARMS = ("grpo_kl_1e-3", "grpo_kl_0.1")
DIAG_KEYS = ("reward", "entropy", "kl", "grad_norm", "clip_ratio/low_mean", "clip_grad_frac/neg",
             "apo/neg_clipped_frac", "apo/neg_clipped_grad_frac", "apo/manifold_mass", "apo/r_anchor_mean",
             "apo/outside_topk_frac", "apo/pull")
# the per-step curves (one axis each); clip_grad_frac/neg is apo/neg_clipped_grad_frac's formula for every loss
CURVE_KEYS = ("entropy", "kl", "apo/manifold_mass", "clip_grad_frac/neg")
VALIDATION = "validation"


@dataclass(frozen=True)
class Sizes:
    """Everything that sets the sweep's cost and design. `train` entries are trainer config overrides."""

    arms: tuple[str, ...]  # the study's arms (--arms narrows what one process trains, not this)
    seeds: int  # seeds of every arm
    more_seeds: int  # seeds of the arm each group of `more_seeds_for` picks on validation
    more_seeds_for: tuple[tuple[str, ...], ...]
    steps: int
    every: int  # checkpoint interval: the steps evaluated on validation (and the final step)
    problems: int  # problems per reported split
    n: int  # samples per reported problem (pass@k up to k = n)
    val_problems: int  # validation problems
    val_n: int  # samples per validation problem (selection reads pass@1 only)
    tiny_quick: bool
    train: dict
    splits: tuple[str, ...] = ("test", "test_hard")  # reported splits (of SPLITS)


SUFFIX = {"test": "", "test_hard": "_test_hard", VALIDATION: "_validation"}  # eval{s}/, results{s}.*, figures
SPLITS = ("test", "test_hard")  # the reported splits; validation is read by selection only


# 120 steps (at 30 no arm narrows the tiny model measurably); validation every 20 steps. 5 seeds for
# GRPO and for the validation-best of reading A, of the two k3 KL strengths and of readings C / H.
FULL = Sizes(arms=tuple(ARMS), seeds=3, more_seeds=5, more_seeds_for=((NULL_ARM,), A_ARMS, KL_ARMS, CH_ARMS),
             steps=120, every=20, problems=40, n=256, val_problems=40, val_n=64, tiny_quick=False, train={})
# CI: the quick tiny model, three arms (one with a "." in its name), one seed, 2 steps; GRPO and the
# validation-best of the other two get a second seed
QUICK = Sizes(arms=("grpo", "apo_ref_b0.1", "grpo_kl_0.1"), seeds=1, more_seeds=2,
              more_seeds_for=((NULL_ARM,), ("apo_ref_b0.1", "grpo_kl_0.1")), steps=2, every=1, problems=4, n=32,
              val_problems=4, val_n=16, tiny_quick=True,
              train={"train": {"prompts_per_step": 4, "mini_batch_size": 32, "micro_batch_size": 32},
                     "data": {"synthetic_n": 16}, "rollout": {"max_new_tokens": 48}})


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


def label_of(run: str, step: int) -> str:
    """Evaluation label of one checkpoint: "grpo_kl_0.1-s0@20"."""
    return f"{run}@{step}"


def eval_steps(sz: Sizes) -> list[int]:
    """The steps every run is evaluated at on validation: each checkpoint and the final step."""
    return sorted(set(range(sz.every, sz.steps + 1, sz.every)) | {sz.steps})


def split_size(sz: Sizes, split: str) -> tuple[int, int]:
    """(problems, samples per problem) of a split."""
    return (sz.val_problems, sz.val_n) if split == VALIDATION else (sz.problems, sz.n)
