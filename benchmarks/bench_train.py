"""Per-step time and peak memory of grpo (no reference pass), grpo_kl and apo, side by side.

Two modes, both through the trainer's own functions:

- interleaved (default): one rollout batch is generated once; then, round after round, every loss
  runs the trainer's old-log-prob + reference pass (`train.behaviour_and_reference`) and its update
  (`train.update`) on it, and the medians are reported. Interleaving on one machine keeps the ratios
  meaningful when other processes load the CPU. Peak memory: per loss on CUDA; on CPU it is the
  process's peak RSS so far (monotone, not per loss).
- loop: the full training loop (`python -m apo_llm.train`) per loss in its own process (so CPU
  peak RSS is per run), same seeds; means of the per-step timings after the first step.

Split: generate / old log-probs / reference / update. Targets from issue 4: apo <= 1.10x grpo and
apo <= 1.03x grpo_kl (step time).

    HF_HUB_OFFLINE=1 python benchmarks/bench_train.py                     # tiny + random ~25M Llama
    HF_HUB_OFFLINE=1 python benchmarks/bench_train.py --models tiny --steps 6
    python benchmarks/bench_train.py --device cuda --models tiny,random25m --max_new_tokens 256

Timings on a shared CPU are noisy: rerun, and compare only numbers from the same machine and run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))
from apo_llm.cli import UserError, fail  # noqa: E402  (after the path line: run as a script)
from apo_llm.options import option, parse_command  # noqa: E402
LOSSES = {"grpo": [], "grpo_kl": ["--loss.kl_coef", "0.001"], "apo": []}
PHASES = ["timing/generate", "timing/old_logp", "timing/reference", "timing/update", "timing/step"]


def build_random_llama(out: Path, tokenizer_from: str, hidden: int = 512, layers: int = 8) -> Path:
    """A random-init Llama (~25M parameters at the defaults) with the tiny model's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"[bench] random Llama: {model.num_parameters() / 1e6:.1f}M parameters at {out}", flush=True)
    return out


def run_one(model_path: str, loss: str, out_dir: Path, args) -> dict:
    name = f"{Path(model_path).name}-{loss}"
    cmd = [sys.executable, "-m", "apo_llm.train", "--model.name_or_path", model_path, "--loss.name", loss,
           *LOSSES[loss], "--train.steps", str(args.steps), "--train.prompts_per_step", str(args.prompts),
           "--rollout.num_generations", str(args.G), "--rollout.max_new_tokens", str(args.max_new_tokens),
           "--train.mini_batch_size", str(args.prompts * args.G), "--train.micro_batch_size", str(args.micro),
           "--eval.every", "0", "--checkpoint.every", "0", "--logging.plots", "false",
           "--logging.progress", "false", "--logging.output_dir", str(out_dir), "--logging.run_name", name]
    if args.device:
        cmd += ["--model.device", args.device]
    if args.dtype:
        cmd += ["--model.dtype", args.dtype]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "timing/step" in r][1:]  # drop the warm-up step
    res = {k: sum(r[k] for r in rows) / len(rows) for k in PHASES}
    res["memory/peak_mb"] = max(r["memory/peak_mb"] for r in rows)
    res["num_tokens"] = sum(r["num_tokens"] for r in rows) / len(rows)
    return res


def interleaved(model_path: str, args, work: Path) -> dict:
    """One rollout batch, then old/reference/update of every loss in turn, repeated; medians.

    The losses share the generation (same policy, same seed), so interleaving them on one machine
    makes the comparison far less sensitive to load from other processes than separate runs. The
    model, tokenizer, data, optimizer and accelerator are the trainer's own (`train.setup`).
    """
    import statistics
    import time

    import torch

    from apo_llm import train as T
    from apo_llm.config import load_config
    from apo_llm.modeling import peak_memory_mb
    from apo_llm.objectives import group_advantages
    from apo_llm.prompts import format_for_run
    from apo_llm.rollout import generate_completions

    common = ["--model.name_or_path", model_path, "--train.prompts_per_step", str(args.prompts),
              "--rollout.num_generations", str(args.G), "--rollout.max_new_tokens", str(args.max_new_tokens),
              "--train.mini_batch_size", str(args.prompts * args.G), "--train.micro_batch_size", str(args.micro),
              "--train.ppo_epochs", "1", "--train.lr", "1e-12", "--train.scheduler", "constant",  # the policy stays put
              "--train.warmup_steps", "0", "--eval.every", "0", "--logging.output_dir", str(work),
              "--logging.run_name", f"interleaved-{Path(model_path).name}", "--logging.overwrite", "true"]
    for flag, value in (("--model.device", args.device), ("--model.dtype", args.dtype)):
        common += [flag, value] if value else []
    cfgs = {loss: load_config(["--loss.name", loss, *LOSSES[loss], *common]) for loss in args.losses.split(",")}
    s = T.setup(next(iter(cfgs.values())))
    dev = s.device
    probs = s.train_problems[:args.prompts]
    t0 = time.perf_counter()
    prompts = format_for_run(s.cfg, s.tokenizer, [p.prompt for p in probs])
    comp = generate_completions(s.policy, s.tokenizer, prompts, args.G, max_new_tokens=args.max_new_tokens, seed=0)
    t_gen = time.perf_counter() - t0
    rewards = torch.tensor([float(i % 3 == 0) for i in range(len(comp.texts))])  # fixed, varied rewards
    adv = group_advantages(rewards, args.G)
    times = {loss: {"old_logp": [], "reference": [], "update": []} for loss in cfgs}
    peak = {}
    for rep in range(args.repeats + 1):
        for loss, cfg in cfgs.items():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            passes, t_old, t_ref = T.behaviour_and_reference(cfg, s.policy, comp, dev)
            t1 = time.perf_counter()
            T.update(cfg, s.model, s.optimizer, s.scheduler, s.accelerator, comp, adv, passes, dev)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t_upd = time.perf_counter() - t1
            peak[loss] = peak_memory_mb(dev)
            if rep:  # the first round is warm-up
                for k, v in (("old_logp", t_old), ("reference", t_ref), ("update", t_upd)):
                    times[loss][k].append(v)
    out = {}
    for loss, t in times.items():
        r = {f"timing/{k}": statistics.median(v) for k, v in t.items()}
        r["timing/generate"] = t_gen
        r["timing/step"] = t_gen + sum(r[f"timing/{k}"] for k in ("old_logp", "reference", "update"))
        r["memory/peak_mb"] = peak[loss]
        r["num_tokens"] = float(comp.completion_mask.sum())
        out[loss] = r
    return out


@dataclass
class BenchTrainCommand:
    """What `python benchmarks/bench_train.py` takes; each field is one flag (--field_name)."""

    models: str = option("tiny,random25m", "comma list: tiny | random25m | a model path")
    losses: str = option("grpo,grpo_kl,apo", "comma list of losses")
    steps: int = option(4, "steps per run (the first is dropped as warm-up)")
    prompts: int = option(8, "prompts per step")
    G: int = option(8, "completions per prompt")
    max_new_tokens: int = option(64, "generation length limit")
    micro: int = option(32, "sequences per forward/backward")
    device: Optional[str] = option(None, "cpu | cuda (default: the accelerator's)")
    dtype: Optional[str] = option(None, "float32 | bfloat16")
    mode: str = option("interleaved", "interleaved: one process, losses alternate on the same rollouts, medians "
                       "(default); loop: the full training loop per loss in separate processes",
                       choices=("interleaved", "loop"))
    repeats: int = option(5, "interleaved rounds after one warm-up round")
    tiny_path: Optional[str] = option(None, "use this tiny model dir instead of ensure_tiny_model()")
    out: Optional[str] = option(None, "keep the runs here (default: a temp dir)")
    json: Optional[str] = option(None, "also write the results to this file")


def main(argv=None) -> dict:
    try:
        args = parse_command(BenchTrainCommand, argv, prog="python benchmarks/bench_train.py", description=__doc__)
    except UserError as e:
        fail(str(e))
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_train_"))
    results: dict[str, dict] = {}
    tiny_path = args.tiny_path
    if tiny_path is None and ({"tiny", "random25m"} & set(args.models.split(","))):
        from apo_llm.tiny import ensure_tiny_model

        tiny_path = str(ensure_tiny_model())
    for model in args.models.split(","):
        if model == "tiny":
            path = tiny_path
        elif model == "random25m":
            path = str(build_random_llama(work / "random25m", tiny_path))
        else:
            path = model
        results[model] = {}
        if args.mode == "interleaved":
            print(f"[bench] {model}: interleaved {args.losses} x {args.repeats} rounds ...", flush=True)
            results[model] = interleaved(path, args, work)
            continue
        for loss in args.losses.split(","):
            print(f"[bench] {model} / {loss} ...", flush=True)
            results[model][loss] = run_one(path, loss, work, args)

    cols = ["generate", "old_logp", "reference", "update", "step"]
    how = (f"median of {args.repeats} interleaved rounds, shared generation" if args.mode == "interleaved"
           else f"mean of steps 2..{args.steps}")
    print(f"\nseconds per step ({how}), prompts={args.prompts} G={args.G} "
          f"max_new_tokens={args.max_new_tokens}; peak memory in MB")
    print(f"{'model':<12}{'loss':<10}" + "".join(f"{c:>11}" for c in cols) + f"{'peak MB':>10}{'tokens':>8}")
    for model, by_loss in results.items():
        label = Path(model).name[:11]
        for loss, r in by_loss.items():
            print(f"{label:<12}{loss:<10}" + "".join(f"{r['timing/' + c]:>11.3f}" for c in cols)
                  + f"{r['memory/peak_mb']:>10.0f}{r['num_tokens']:>8.0f}")
        if {"apo", "grpo", "grpo_kl"} <= by_loss.keys():
            a, g, k = by_loss["apo"], by_loss["grpo"], by_loss["grpo_kl"]
            train_side = lambda r: r["timing/step"] - r["timing/generate"]  # noqa: E731
            print(f"  {label}: apo/grpo step {a['timing/step'] / g['timing/step']:.3f}x (target <= 1.10), "
                  f"apo/grpo_kl step {a['timing/step'] / k['timing/step']:.3f}x (target <= 1.03); "
                  f"without generation: {train_side(a) / train_side(g):.3f}x, {train_side(a) / train_side(k):.3f}x; "
                  f"peak memory apo/grpo {a['memory/peak_mb'] / g['memory/peak_mb']:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
