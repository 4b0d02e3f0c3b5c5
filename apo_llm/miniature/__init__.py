"""The paper's experiment in miniature on a CPU: every arm on the tiny Llama, selected on validation, pass@k on test.

    python -m apo_llm.miniature [--quick] [--out DIR] [--arms A B ...] [--seeds N] ...

The protocol (docs/miniature.md), the same for every arm, GRPO (the null) included:

1. Train a LoRA adapter with `apo_llm.train` on the synthetic training pool, saving a checkpoint
   every `Sizes.every` steps.
2. Evaluate every checkpoint on the `validation` split (disjoint from train and test, drawn like
   test; apo_llm.data) with val_n samples per problem.
3. Stopping step = `select_best` over the run's validation pass@1 per step (the one selection
   rule; it receives `ValidationScores`, built from validation records only).
4. Evaluate the selected step and the final step on the reported splits (`test`, and `test_hard`
   with 4 events per problem) at n samples per problem (common random numbers across models).
5. Seeds: every arm gets `seeds`; in each group of `more_seeds_for` the arm `select_best` picks
   on validation (seed mean of the validation pass@1 at each seed's stopping step) gets
   `more_seeds`. A group of one arm (GRPO) always gets them.

Reported per arm and split, at the selected and at the final step (seed mean and spread):
pass@k for k = 1 ... n (unbiased, metrics.pass_at_k), k* (the smallest k with pass@k below the
base's), the paired per-problem gap to base at k = 1, n/4, n with its s.e. over problems, the share
of problems whose c/n fell / rose, and training diagnostics; curves.json / the curves figure: per
step entropy, KL(old || ref), manifold mass, the clipped share of the push (`clip_grad_frac/neg`,
which equals `apo/neg_clipped_grad_frac` for APO) and validation pass@1 per arm.

Resumable: each (arm, seed) trains in its own run directory (a finished one is skipped, an
interrupted one resumes from its last checkpoint) and every evaluated (label, problem) is a line
of eval*/per_problem.jsonl (the evaluator's resume unit); labels are "<arm>-s<seed>@<step>".
An arm that fails is recorded in FAILED and counted in the summary, not retried silently
(`--retry_failed` retries it) and not dropped. Several processes over disjoint --arms may share
a directory: a group's extra seeds wait until every arm of the group has its validation numbers.

Modules, one room each: `design` (arms, sizes, names), `layout` (the sweep directory on disk),
`stats` (pass@k, k*, paired gaps from (n, c) counts), `selection` (the one validation-only rule),
`sweep` (training, evaluation, resumption), `report` (results*.json / .md, curves.json),
`__main__` (the command line). The figures are paper_figures.miniature's.
"""

from .design import (A_ARMS, ARMS, BASE, BETAS, CH_ARMS, CURVE_KEYS, DIAG_KEYS, FULL, KL_ARMS, NULL_ARM,
                     QUICK, READINGS, SILENCE_LOSS, SPLITS, SUFFIX, VALIDATION, Sizes, eval_steps, label_of,
                     run_name, split_size)
from .layout import check_settings, split_counts, write_atomic
from .report import curves, markdown, summarize, validation_table
from .selection import ValidationScores, group_picks, select_best, stop_steps, validation_scores
from .stats import crossover_k, gap_ks, gap_vs_base, p_shift, passk_curve
from .sweep import adapters_of, evaluate_split, run_config, run_sweep, train_one

__all__ = ["A_ARMS", "ARMS", "BASE", "BETAS", "CH_ARMS", "CURVE_KEYS", "DIAG_KEYS", "FULL", "KL_ARMS", "NULL_ARM",
           "QUICK", "READINGS", "SILENCE_LOSS", "SPLITS", "SUFFIX", "VALIDATION", "Sizes", "ValidationScores",
           "adapters_of", "check_settings", "crossover_k", "curves", "eval_steps", "evaluate_split", "gap_ks",
           "gap_vs_base", "group_picks", "label_of", "markdown", "p_shift", "passk_curve", "run_config", "run_name",
           "run_sweep", "select_best", "split_counts", "split_size", "stop_steps", "summarize", "train_one",
           "validation_scores", "validation_table", "write_atomic"]
