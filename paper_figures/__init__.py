"""paper_figures: `python -m paper_figures` regenerates every figure of the project as PNG and PDF.

    python -m paper_figures [--out paper_figures/figures] [--quick] [--only NAME ...]
                            [--train_runs DIR ...] [--eval_dirs DIR ...] [--topk DIR] [--frontier DIR]
                            [--miniature DIR]

Simulator figures (always): see `SIM_FIGURES`. Top-K coverage: read from a topk_coverage output
dir (--topk) or computed on the project's tiny model. Training curves / eval pass@k: only when
trainer / evaluator output dirs are given. The miniature's figures (paper_figures/miniature.py): from a
`python -m apo_llm.miniature` sweep dir (--miniature). Frontier: read from a `python -m apo_toy.run --preset frontier`
output dir (--frontier), or the preset is run here. Colours: one per method, defined in `style.py`.
"""

SIM_FIGURES = ("squeezing", "rsc_trajectories", "passk_curves", "frontier", "elastic_recovery",
               "ablation_clip_anchoring")
ALL_FIGURES = SIM_FIGURES + ("topk_coverage", "training_curves", "eval_passk")
