"""Top-K coverage of reference solutions: `python -m apo_llm.topk_coverage`.

The paper's motivating table for the safe manifold M = TopK(pi_ref(. | context)): with teacher
forcing on reference solutions y_1..y_T, how often is the true next token inside the model's
Top-K?

    coverage@K = #{t : y_t in TopK(pi_ref(. | prompt, y_<t))} / #{t},     miss@K = 1 - coverage@K

counted over all solution tokens of all problems (a token-level micro average), also broken down
by the token's position t in the solution (buckets such as 0-15, 16-63, 64-255, 256+).
Paper (Qwen2.5-Math-7B, 1,000 MATH problems): Top-1 83.84%, Top-4 95.52%, Top-8 97.47%,
Top-16 98.46%.

The Top-K ids come from `modeling.completion_token_stats(topk=max K)`, which works in chunks of
positions, so the full-vocabulary logits of a long solution are never all kept at once. The
prompt is built as in training (`prompts.format_prompts`), the solution is tokenized on its own
and appended, exactly like sampled completion tokens follow the prompt during RL.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from apo_llm.cli import check_model_spec, check_shared_fields, parse_ks
from apo_llm.data import load_eval_problems
from apo_llm.modeling import load_base_model
from apo_llm.options import option, parse_command
from apo_llm.prompts import format_prompts

PAPER_COVERAGE = {1: 0.8384, 4: 0.9552, 8: 0.9747, 16: 0.9846}  # Qwen2.5-Math-7B on MATH (paper)
SOLUTION_PREFIXES = {"newline": "\n", "space": " ", "none": ""}  # text between prompt and solution


@dataclass
class CoverageConfig:
    """Everything `python -m apo_llm.topk_coverage` takes; each field is one flag (--field_name)."""

    model: Optional[str] = option(None, "reference model: hub id or local dir (default: the embedded tiny model)")
    dataset: str = option("synthetic", "gsm8k | math500 | math | synthetic | jsonl:PATH | parquet:PATH")
    split: str = option("test", "dataset split (test: problems the model was not fine-tuned on)")
    limit: Optional[int] = option(None, "use only the first LIMIT problems")
    k: str = option("1,4,8,16", "comma-separated K values")
    buckets: str = option("16,64,256", "position bucket edges: '16,64,256' -> 0-15, 16-63, 64-255, 256+")
    max_target_tokens: int = option(1024, "longer solutions are cut to this many tokens (counted)")
    solution_prefix: str = option("auto", "text between prompt and solution: auto (a newline after a raw "
                                     "prompt, nothing after a chat template) | newline | space | none")
    append_eos: bool = option(False, "also score the EOS token after each solution")
    batch_size: int = option(8, "problems per forward pass")
    chunk_size: int = option(256, "positions per log-softmax/Top-K chunk")
    chat_template: str = option("auto", "auto | on | off, as in training")
    prompt_style: str = option("gsm8k", "instruction suffix of jsonl:/parquet: prompts: gsm8k | math")
    out: str = option("runs/topk_coverage", "output directory (topk_coverage.json, .md, .png in it are overwritten)")
    dtype: Optional[str] = option(None, "model dtype (default: bfloat16 on GPU, float32 on CPU)")
    device: Optional[str] = option(None, "cpu | cuda | ... (default: cuda if available)")
    threads: int = option(0, "torch CPU threads (0 = torch default; 1 is fastest for tiny models)")

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        parse_ks(self.k)
        parse_buckets(self.buckets)
        for name in ("max_target_tokens", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        check_shared_fields(self)
        if self.solution_prefix != "auto" and self.solution_prefix not in SOLUTION_PREFIXES:
            raise ValueError(f"solution_prefix: must be auto or one of {sorted(SOLUTION_PREFIXES)}, "
                             f"got {self.solution_prefix!r}")
        if self.prompt_style not in ("gsm8k", "math"):
            raise ValueError(f"prompt_style: must be gsm8k or math, got {self.prompt_style!r}")


def parse_buckets(spec: str | Sequence[int]) -> list[int]:
    """'16,64,256' -> [16, 64, 256]: strictly increasing positive edges ('' = a single bucket)."""
    items = [s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    try:
        edges = [int(str(s).strip()) for s in items]
    except ValueError:
        raise ValueError(f"buckets: {spec!r} is not a comma-separated list of integers") from None
    if any(e < 1 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"buckets: edges must be positive and strictly increasing, got {edges}")
    return edges


def bucket_names(edges: Sequence[int]) -> list[str]:
    """[16, 64] -> ['0-15', '16-63', '64+']."""
    lows = [0] + list(edges)
    return [f"{lo}-{hi - 1}" for lo, hi in zip(lows, edges)] + [f"{lows[-1]}+"]


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


def build_teacher_forcing_batch(prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]],
                                pad_id: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """The trainer's layout: a left-padded prompt block of width n_prompt, then the right-padded
    solution block of width T. Returns input_ids [B, n_prompt + T], attention_mask [B, n_prompt + T],
    target_mask [B, T] (1 on real solution tokens) and n_prompt."""
    if len(prompt_ids) != len(target_ids) or not prompt_ids:
        raise ValueError("prompt_ids/target_ids: need the same, non-zero number of sequences")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids: every prompt needs at least one token (its last one predicts y_1)")
    n_prompt = max(len(p) for p in prompt_ids)
    width = max(len(t) for t in target_ids)
    B = len(prompt_ids)
    input_ids = torch.full((B, n_prompt + width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, n_prompt + width), dtype=torch.long)
    for b, (p, t) in enumerate(zip(prompt_ids, target_ids)):
        input_ids[b, n_prompt - len(p):n_prompt] = torch.as_tensor(p, dtype=torch.long)
        input_ids[b, n_prompt:n_prompt + len(t)] = torch.as_tensor(t, dtype=torch.long)
        attention_mask[b, n_prompt - len(p):n_prompt + len(t)] = 1
    return input_ids, attention_mask, attention_mask[:, n_prompt:].clone(), n_prompt


def topk_hits(topk_ids: Tensor, targets: Tensor, target_mask: Tensor, ks: Sequence[int],
              edges: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Hit counts per (K, position bucket) and token counts per bucket.

    topk_ids [B, T, Kmax] sorted by decreasing probability, targets [B, T], target_mask [B, T].
    Returns hits [len(ks), n_buckets] and totals [n_buckets] (int64).
    """
    if topk_ids.shape[-1] < max(ks):
        raise ValueError(f"topk_ids: have {topk_ids.shape[-1]} ids per position, need max K = {max(ks)}")
    B, T = targets.shape
    match = topk_ids == targets.unsqueeze(-1)  # [B, T, Kmax]; at most one True per position
    # rank of the true token among the Top-Kmax (Kmax when it is outside): hit@K <=> rank < K
    rank = torch.where(match.any(-1), match.float().argmax(-1), torch.full_like(targets, topk_ids.shape[-1]))
    positions = torch.arange(T, device=targets.device).expand(B, T).contiguous()
    bucket = torch.bucketize(positions, torch.as_tensor(list(edges), device=targets.device), right=True)  # [B, T]
    valid = target_mask.bool()
    n_buckets = len(edges) + 1
    totals = torch.bincount(bucket[valid], minlength=n_buckets)
    hits = torch.stack([torch.bincount(bucket[valid & (rank < k)], minlength=n_buckets) for k in ks])
    return hits.cpu(), totals.cpu()


@dataclass
class CoverageCounts:
    """Raw counts: hits[i, b] true tokens inside the Top-ks[i] in position bucket b; totals[b]."""

    ks: list[int]
    edges: list[int]
    hits: Tensor
    totals: Tensor
    problems: int = 0


def coverage_counts(model: Any, examples: Sequence[tuple[Sequence[int], Sequence[int]]], ks: Sequence[int],
                    edges: Sequence[int], *, pad_id: int, batch_size: int = 8, chunk_size: int = 256,
                    stats_fn: Optional[Callable] = None, progress: bool = True) -> CoverageCounts:
    """Teacher-force every (prompt_ids, solution_ids) example and count Top-K hits.

    Examples are batched in order of length (less padding); only Top-max(K) ids per position are
    kept, via completion_token_stats, under torch.no_grad.
    """
    from tqdm.auto import tqdm

    if stats_fn is None:
        from apo_llm.modeling import completion_token_stats as stats_fn
    ks = sorted(set(int(k) for k in ks))
    hits = torch.zeros(len(ks), len(edges) + 1, dtype=torch.long)
    totals = torch.zeros(len(edges) + 1, dtype=torch.long)
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]) + len(examples[i][1]))
    used = [i for i in order if len(examples[i][1]) > 0]
    for start in tqdm(range(0, len(used), batch_size), desc="top-k coverage", unit="batch", disable=not (progress and sys.stderr.isatty())):
        batch = [examples[i] for i in used[start:start + batch_size]]
        input_ids, attention_mask, target_mask, n_prompt = build_teacher_forcing_batch(
            [p for p, _ in batch], [t for _, t in batch], pad_id)
        with torch.no_grad():
            stats = stats_fn(model, input_ids.to(device), attention_mask.to(device), n_prompt,
                             topk=max(ks), chunk_size=chunk_size)
        h, tot = topk_hits(stats.topk_ids, input_ids[:, n_prompt:].to(device), target_mask.to(device), ks, edges)
        hits += h
        totals += tot
    return CoverageCounts(list(ks), list(edges), hits, totals, problems=len(used))


def coverage_report(counts: CoverageCounts) -> dict:
    """Coverage and miss rate per K, overall and per position bucket (None for an empty bucket)."""
    total = int(counts.totals.sum())
    if total == 0:
        raise ValueError("dataset: no solution tokens to score")

    def frac(h: int, t: int) -> Optional[float]:
        return h / t if t else None

    overall = {str(k): frac(int(counts.hits[i].sum()), total) for i, k in enumerate(counts.ks)}
    buckets = []
    for b, name in enumerate(bucket_names(counts.edges)):
        t = int(counts.totals[b])
        buckets.append({"positions": name, "tokens": t,
                        "coverage": {str(k): frac(int(counts.hits[i, b]), t) for i, k in enumerate(counts.ks)}})
    return {"problems": counts.problems, "tokens": total, "ks": counts.ks, "coverage": overall,
            "miss_rate": {k: 1.0 - v for k, v in overall.items()}, "buckets": buckets}


def markdown_table(report: dict) -> str:
    """| K | coverage | miss rate | per bucket ... | paper |, percentages."""
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    head = ["K", "coverage", "miss rate"] + [f"pos {b['positions']} (n={b['tokens']})" for b in report["buckets"]]
    head.append("paper (Qwen2.5-Math-7B, MATH)")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in report["ks"]:
        cells = [str(k), pct(report["coverage"][str(k)]), pct(report["miss_rate"][str(k)])]
        cells += [pct(b["coverage"][str(k)]) for b in report["buckets"]]
        cells.append(pct(PAPER_COVERAGE.get(k)))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_coverage(report: dict, path: str | Path, title: str = "") -> None:
    """Coverage against K (log2 axis): all tokens, each position bucket, and the paper's points."""
    import matplotlib.pyplot as plt  # the backend is the caller's: a notebook keeps its inline plots

    ks = report["ks"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(ks, [report["coverage"][str(k)] for k in ks], "o-", lw=2, color="k", label=f"all ({report['tokens']} tokens)")
    for b in report["buckets"]:
        if b["tokens"]:
            ax.plot(ks, [b["coverage"][str(k)] for k in ks], ".--", label=f"positions {b['positions']} ({b['tokens']})")
    paper = sorted(PAPER_COVERAGE.items())
    ax.plot([k for k, _ in paper], [v for _, v in paper], "x:", color="gray", label="paper: Qwen2.5-Math-7B, MATH")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K")
    ax.set_ylabel("P(true next token in Top-K)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def tokenize_examples(tokenizer: Any, problems: Sequence[Any], chat_template: str, max_target_tokens: int,
                      append_eos: bool, solution_prefix: str = "auto") -> tuple[list[tuple[list[int], list[int]]], dict]:
    """(prompt_ids, solution_ids) per problem with a solution; counts skipped and cut problems.

    Both are tokenized without added special tokens, separately, as `generate_completions` and
    the tiny model's SFT do. solution_prefix 'auto': after a raw-text prompt the tiny model's
    COMPLETION_PREFIX (a newline: its completions start on a new line), nothing after a
    chat-templated prompt (the assistant turn starts right there).
    """
    from apo_llm.tiny import COMPLETION_PREFIX

    with_solution = [p for p in problems if p.solution]
    prompts = format_prompts(tokenizer, [p.prompt for p in with_solution], chat_template)
    templated = bool(with_solution) and prompts[0] != with_solution[0].prompt
    if solution_prefix == "auto":
        prefix = "" if templated else COMPLETION_PREFIX
    else:
        prefix = SOLUTION_PREFIXES[solution_prefix]
    examples, cut = [], 0
    for problem, prompt in zip(with_solution, prompts):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target = tokenizer(prefix + problem.solution, add_special_tokens=False)["input_ids"]
        if append_eos and tokenizer.eos_token_id is not None:
            target = target + [tokenizer.eos_token_id]
        if len(target) > max_target_tokens:
            target, cut = target[:max_target_tokens], cut + 1
        examples.append((list(prompt_ids), list(target)))
    stats = {"loaded": len(problems), "skipped_no_solution": len(problems) - len(with_solution),
             "cut_to_max_target_tokens": cut, "solution_prefix": prefix}
    return examples, stats


def run_coverage(cfg: CoverageConfig) -> dict:
    """Load model and problems, count Top-K hits, write topk_coverage.{json,md,png}."""
    cfg.validate()
    from apo_llm.runlock import RunLock

    with RunLock(Path(cfg.out), "out: the output directory", "out"):  # one writer per --out (apo_llm/runlock.py)
        return _run_coverage_locked(cfg)


def _run_coverage_locked(cfg: CoverageConfig) -> dict:
    ks, edges = parse_ks(cfg.k), parse_buckets(cfg.buckets)
    check_model_spec(cfg.model)
    problems, _ = load_eval_problems(cfg.dataset, cfg.split, cfg.limit, prompt_style=cfg.prompt_style)
    model, tokenizer, model_path = load_base_model(cfg)
    model.eval()
    examples, data_stats = tokenize_examples(tokenizer, problems, cfg.chat_template, cfg.max_target_tokens,
                                             cfg.append_eos, cfg.solution_prefix)
    if not examples:
        raise ValueError(f"dataset: none of the {len(problems)} problems of {cfg.dataset!r} has a reference solution")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    counts = coverage_counts(model, examples, ks, edges, pad_id=pad_id, batch_size=cfg.batch_size,
                             chunk_size=cfg.chunk_size)
    report = coverage_report(counts)
    report.update({"model": model_path, "data": data_stats, "config": dataclasses.asdict(cfg),
                   "paper": {str(k): v for k, v in PAPER_COVERAGE.items()}})
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(report)
    (out / "topk_coverage.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "topk_coverage.md").write_text(f"Top-K coverage of {cfg.dataset} ({cfg.split}) solutions, model {model_path}: "
                                          f"{report['problems']} problems, {report['tokens']} tokens\n\n{table}\n")
    plot_coverage(report, out / "topk_coverage.png", title=f"{Path(model_path).name} on {cfg.dataset}")
    print(table)
    return report


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = parse_command(CoverageConfig, argv, prog="python -m apo_llm.topk_coverage",
                        description="Teacher-forced Top-K coverage of reference solutions.")
    return run_coverage(cfg)


if __name__ == "__main__":
    import matplotlib

    from apo_llm.cli import run_or_exit

    matplotlib.use("Agg")  # an entry point may choose the backend; the library never does

    run_or_exit(main, catch=(ValueError,))  # one line naming the field or file, exit code 2
