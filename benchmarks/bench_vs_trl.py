"""Native trainer vs stock TRL GRPOTrainer, and APO vs GRPO inside the TRL engine: s/step and peak memory.

Variants, each run in its own process (so CPU peak RSS is per run), in interleaved rounds
(round 1: all variants, round 2: all variants, ...) so that load from other processes on a shared
machine hits them alike:

    native          python -m apo_llm.train, loss grpo (one optimizer step per RL step)
    trl_stock       trl.GRPOTrainer as shipped (loss_type "dapo", beta 0), the same LoRA model and data
    trl_engine_grpo apo_llm.trl_engine.APOGRPOTrainer, loss grpo
    trl_engine_apo  apo_llm.trl_engine.APOGRPOTrainer, loss apo

Same model, prompts, G, P, L, LoRA rank, learning rate, float32 on CPU (bf16 on GPU); TRL on CPU
needs use_cpu=True and bf16=False explicitly (grpo_config sets both) and has gradient
checkpointing off. Seconds per optimizer step: median over steps after the first of each run, then
median over rounds. Targets (issue 11): native <= 0.85x trl_stock; trl_engine_apo <= 1.10x
trl_engine_grpo.

    HF_HUB_OFFLINE=1 python benchmarks/bench_vs_trl.py                 # tiny model, G8 P4 L32, 4 rounds
    HF_HUB_OFFLINE=1 python benchmarks/bench_vs_trl.py --rounds 2 --steps 4
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from apo_llm.cli import UserError, fail, parse_hiding_internal  # noqa: E402  (after the path line)
from apo_llm.options import option  # noqa: E402

VARIANTS = ["native", "trl_stock", "trl_engine_grpo", "trl_engine_apo"]


def config_args(a, variant: str, out: str) -> list[str]:
    rows = a.prompts * a.G
    loss = "apo" if variant == "trl_engine_apo" else "grpo"
    return ["--model.name_or_path", a.model, "--model.device", a.device, "--model.dtype", a.dtype,
            "--loss.name", loss, "--train.steps", str(a.steps), "--train.prompts_per_step", str(a.prompts),
            "--rollout.num_generations", str(a.G), "--rollout.max_new_tokens", str(a.max_new_tokens),
            "--train.mini_batch_size", str(rows), "--train.micro_batch_size", str(rows), "--lora.r", str(a.lora_r),
            "--lora.alpha", str(2 * a.lora_r), "--train.lr", str(a.lr), "--eval.every", "0", "--checkpoint.every", "0",
            "--logging.output_dir", out, "--logging.run_name", variant, "--logging.plots", "false",
            "--logging.progress", "false", "--train.num_threads", str(a.threads),
            "--train.engine", "native" if variant == "native" else "trl"]


def worker(a, variant: str) -> dict:
    """Run one variant; print {"s_per_step": [...], "peak_mb": float}."""
    import torch

    from apo_llm.config import load_config
    from apo_llm.modeling import peak_memory_mb

    out = tempfile.mkdtemp(prefix="bench_vs_trl_")
    cfg = load_config(config_args(a, variant, out))
    device = torch.device("cuda" if a.device == "cuda" else "cpu")
    if variant == "native":
        from apo_llm.train import train

        train(cfg)
        rows = [json.loads(x) for x in (Path(out) / variant / "metrics.jsonl").read_text().splitlines()]
        times = [r["timing/step"] for r in rows if "timing/step" in r]
    else:
        from transformers import TrainerCallback

        import apo_llm.trl_engine as te

        stamps: list[float] = []

        class Stamp(TrainerCallback):
            def on_step_begin(self, *args, **kw):
                stamps.append(time.perf_counter()) if not stamps else None

            def on_step_end(self, *args, **kw):
                stamps.append(time.perf_counter())

        trainer = te.build_trainer(cfg) if variant != "trl_stock" else stock_trainer(cfg)
        trainer.add_callback(Stamp())
        trainer.train()
        times = [b - s for s, b in zip(stamps, stamps[1:])]
    return {"variant": variant, "s_per_step": times, "peak_mb": peak_memory_mb(device)}


def stock_trainer(cfg):
    """trl.GRPOTrainer unchanged, on the same LoRA model, data and reward as the TRL engine."""
    from trl import GRPOTrainer

    import apo_llm.trl_engine as te
    from apo_llm.train import add_lora, load_base, load_data

    args = te.grpo_config(cfg, 1)
    problems, _, reward = load_data(cfg)
    base, tok, _ = load_base(cfg, None)  # the TRL engine's model and LoRA (train.load_base / add_lora)
    model = add_lora(cfg, base)
    return GRPOTrainer(model=model, args=args, reward_funcs=[te.make_reward_func(reward)],
                       train_dataset=te.build_dataset(cfg, tok, problems), processing_class=tok)


@dataclass
class BenchVsTrlCommand:
    """What `python benchmarks/bench_vs_trl.py` takes; each field is one flag (--field_name)."""

    model: str = option("tiny", "model dir or 'tiny' (the project's tiny Llama)")
    device: str = option("cpu", "cpu | cuda", choices=("cpu", "cuda"))
    dtype: Optional[str] = option(None, "default: float32 on cpu, bfloat16 on cuda")
    G: int = option(8, "completions per prompt")
    prompts: int = option(4, "prompts per step")
    max_new_tokens: int = option(32, "generation length limit")
    lora_r: int = option(8, "LoRA rank")
    lr: float = option(1e-5, "learning rate")
    steps: int = option(5, "steps per run (the first is dropped)")
    rounds: int = option(4, "interleaved rounds")
    threads: int = option(1, "torch CPU threads per run")
    variants: str = option(",".join(VARIANTS), f"comma list of {' | '.join(VARIANTS)}")


@dataclass
class _WorkerCommand(BenchVsTrlCommand):
    """The command plus the internal flag the parent passes to each variant's process (not in --help)."""

    worker: Optional[str] = option(None, "internal: run this one variant and print its RESULT line")


def main() -> None:
    try:
        a = parse_hiding_internal(_WorkerCommand, BenchVsTrlCommand, prog="python benchmarks/bench_vs_trl.py",
                                  description=__doc__.splitlines()[0])
    except UserError as e:
        fail(str(e))
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    if a.worker:
        print("RESULT " + json.dumps(worker(a, a.worker)), flush=True)
        return
    variants = a.variants.split(",")
    res: dict[str, dict[str, list[float]]] = {v: {"s": [], "mb": []} for v in variants}
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(a.threads))
    for r in range(a.rounds):
        for v in variants:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", v]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"[bench] {v} failed:\n{proc.stderr[-3000:]}")
            out = json.loads(line[0][7:])
            res[v]["s"].append(statistics.median(out["s_per_step"][1:]))
            res[v]["mb"].append(out["peak_mb"])
            print(f"[bench] round {r + 1} {v}: {res[v]['s'][-1]:.3f} s/step, peak {out['peak_mb']:.0f} MB", flush=True)
    med = {v: (statistics.median(d["s"]), statistics.median(d["mb"])) for v, d in res.items()}
    print(f"\nG{a.G} P{a.prompts} L{a.max_new_tokens} LoRA r{a.lora_r} {a.dtype} on {a.device}, "
          f"{a.rounds} interleaved rounds x {a.steps} steps (first dropped); medians")
    print(f"{'variant':<18}{'s/step':>9}{'peak MB':>10}")
    for v, (s, mb) in med.items():
        print(f"{v:<18}{s:>9.3f}{mb:>10.0f}")
    pairs = [("native", "trl_stock", 0.85), ("trl_engine_apo", "trl_engine_grpo", 1.10),
             ("trl_engine_grpo", "trl_stock", None)]
    for x, y, goal in pairs:
        if x in med and y in med:
            ratio = med[x][0] / med[y][0]
            note = f" (goal <= {goal:.2f}: {'met' if ratio <= goal else 'NOT met'})" if goal else ""
            print(f"{x} / {y}: {ratio:.2f}x s/step, {med[x][1] / med[y][1]:.2f}x peak memory{note}")


if __name__ == "__main__":
    main()
