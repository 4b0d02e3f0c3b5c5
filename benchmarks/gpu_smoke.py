"""GPU smoke run: a random Qwen2.5-0.5B-shaped model, 3 RL steps per engine, one JSON line per engine.

For the day a GPU is lent (issue 11). The model has Qwen2.5-0.5B's architecture (Qwen2Config: hidden
896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocabulary 151936, tied embeddings), built with
`from_config` and random weights: no hub. The tokenizer is the project's offline BPE
(`apo_llm.tiny.train_tokenizer`) padded with filler tokens ("fill<id>") to exactly 151936 entries,
so the embedding and the LM head keep Qwen's full size (the head is the memory and time cost the
chunked log-prob pass exists for) and every id the random model samples decodes, in HF generate
and in vLLM alike. Prompts are the synthetic task's; with random weights almost every completion
runs to `--max-new-tokens`, which is what a throughput check wants.

Engines, each in its own process (peak memory per engine; vLLM gets a clean GPU), all in bf16:

    native    apo_llm.train.setup + rl_step (HF generate)
    trl_hf    apo_llm.trl_engine.build_trainer, rollout.engine hf (HF generate inside TRL)
    trl_vllm  the same with rollout.engine vllm (colocated); a "skipped" line when `import vllm` fails

Each prints ONE line `{"engine": ..., "s_per_step": ..., "generate_share": ..., "tokens_per_s": ...,
"peak_gpu_mb": ...}`: seconds per step and the rest over the steps after the first (the first,
with CUDA warm-up, is reported apart as `first_step_s`); tokens are completion tokens.
A crashed or timed-out engine prints {"engine": ..., "failed": ...} and the exit code is 1. The
per-engine time limits (TIMEOUT_S) keep the whole run under 8 minutes; it has not yet been run on a
GPU (written on a CPU-only machine, where tests/llm/test_gpu_smoke.py runs the same engine code on
the tiny model). On a machine without CUDA it refuses (one line on stderr, exit code 2) before
building anything.

    HF_HUB_OFFLINE=1 python benchmarks/gpu_smoke.py                       # all engines
    HF_HUB_OFFLINE=1 python benchmarks/gpu_smoke.py --engines native --steps 3 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))
ENGINES = ["native", "trl_hf", "trl_vllm"]
# seconds each engine's process may take (load, 3 steps, exit); with the model build (~20-40 s)
# the three together stay under the 8 minutes issue 11 allows. vLLM's start (import, engine,
# CUDA graphs) takes a minute or two by itself.
TIMEOUT_S = {"native": 120, "trl_hf": 120, "trl_vllm": 200}
QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                  rms_norm_eps=1e-6, max_position_embeddings=32768, hidden_act="silu")


def refuse_without_cuda() -> None:
    """Exit 2 with one line on stderr when no CUDA device is visible (only torch is imported)."""
    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device (torch.cuda.is_available() is False); this benchmark needs a GPU",
              file=sys.stderr)
        sys.exit(2)


def padded_tokenizer(vocab_size: int):
    """The project's offline BPE tokenizer with filler entries "fill<id>" appended up to `vocab_size`.

    Fillers are plain ASCII, so the byte-level decoder turns them into text; the digit splitter
    means encoding never produces them, so prompts use only the trained ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from apo_llm.tiny import EOS, PAD, train_tokenizer

    spec = json.loads(train_tokenizer().backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size: {vocab_size} is smaller than the trained tokenizer's {len(vocab)} entries")
    vocab.update({f"fill{i}": i for i in range(len(vocab), vocab_size)})
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=EOS,
                                  pad_token=PAD, model_max_length=4096)
    assert len(tok) == vocab_size, (len(tok), vocab_size)  # a silent mismatch would shrink the head
    return tok


def build_model_dir(out: Path) -> Path:
    """Save the random bf16 Qwen2.5-0.5B-shaped model and the padded tokenizer to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = padded_tokenizer(QWEN25_05B["vocab_size"])
    cfg = Qwen2Config(**QWEN25_05B, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"[gpu_smoke] random Qwen2-0.5B shape: {model.num_parameters() / 1e6:.0f}M parameters at {out}",
          file=sys.stderr, flush=True)
    return out


def config_args(a, engine: str, model_dir: str, out: str, device: str = "cuda", dtype: str = "bfloat16") -> list[str]:
    """Command-line overrides of the run config: the same batch for every engine (device/dtype: for
    the CPU test of the timing plumbing in tests/llm/test_gpu_smoke.py)."""
    rows = a.prompts * a.G
    args = ["--model.name_or_path", model_dir, "--model.device", device, "--model.dtype", dtype,
            "--loss.name", a.loss, "--train.steps", str(a.steps), "--train.prompts_per_step", str(a.prompts),
            "--rollout.num_generations", str(a.G), "--rollout.max_new_tokens", str(a.max_new_tokens),
            "--train.mini_batch_size", str(rows),
            "--train.micro_batch_size", str(a.micro), "--train.lr", "1e-5", "--eval.every", "0",
            "--checkpoint.every", "0", "--logging.output_dir", out, "--logging.run_name", engine,
            "--logging.plots", "false", "--logging.progress", "false"]
    if engine == "native":
        args += ["--rollout.batch_size", str(rows)]  # one generate call, as TRL makes (it refuses the field)
    else:
        args += ["--train.engine", "trl", "--rollout.engine", "vllm" if engine == "trl_vllm" else "hf"]
    return args


def summarize(engine: str, steps: list[dict], peak_gpu_mb: float, used_gpu_mb: float) -> dict:
    """One engine's JSON record from per-step {"step_s", "generate_s", "tokens"}.

    The first step (CUDA/kernel warm-up, vLLM's first weight sync) is reported apart; the rates are
    over the remaining steps (all of them when there is only one): s_per_step = mean step time,
    generate_share = sum(generate) / sum(step), tokens_per_s = sum(tokens) / sum(step)."""
    if not steps:
        raise ValueError(f"{engine}: no step timings recorded")
    for i, s in enumerate(steps):
        if not s["step_s"] > 0 or not 0 <= s["generate_s"] <= s["step_s"] * 1.01:
            raise ValueError(f"{engine}: step {i + 1} has step_s={s['step_s']} generate_s={s['generate_s']}")
    rest = steps[1:] or steps
    total = sum(s["step_s"] for s in rest)
    return {"engine": engine, "steps": len(steps), "first_step_s": round(steps[0]["step_s"], 4),
            "s_per_step": round(total / len(rest), 4),
            "generate_share": round(sum(s["generate_s"] for s in rest) / total, 4),
            "tokens_per_s": round(sum(s["tokens"] for s in rest) / total, 1),
            "peak_gpu_mb": round(peak_gpu_mb, 1), "device_used_mb": round(used_gpu_mb, 1)}


def _sync() -> None:
    """Wait for queued CUDA work, so that wall-clock stamps measure it (a no-op on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_native(cfg) -> list[dict]:
    """The native trainer's own setup and rl_step, timed per step (CUDA synchronised)."""
    from apo_llm import train as T

    s = T.setup(cfg)
    sampler = T.PromptSampler(len(s.train_problems), cfg.data.seed)
    steps = []
    for _ in range(cfg.train.steps):
        _sync()
        t0 = time.perf_counter()
        m = T.rl_step(s, [s.train_problems[i] for i in sampler.take(cfg.train.prompts_per_step)])
        _sync()
        steps.append({"step_s": time.perf_counter() - t0, "generate_s": m["timing/generate"],
                      "tokens": m["num_tokens"]})
    return steps


def run_trl(cfg) -> list[dict]:
    """The TRL engine's build_trainer + train(); TRL's _generate is wrapped to time generation."""
    from transformers import TrainerCallback

    import apo_llm.trl_engine as te

    trainer = te.build_trainer(cfg)
    gen: list[tuple[float, int]] = []
    inner = trainer._generate

    def timed_generate(prompts):
        _sync()
        t0 = time.perf_counter()
        out = inner(prompts)
        _sync()
        gen.append((time.perf_counter() - t0, sum(len(c) for c in out[1])))  # out[1]: completion ids
        return out

    trainer._generate = timed_generate
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            if not stamps:
                _sync()
                stamps.append(time.perf_counter())

        def on_step_end(self, *args, **kw):
            _sync()
            stamps.append(time.perf_counter())

    trainer.add_callback(Stamp())
    trainer.train()
    if len(gen) != len(stamps) - 1:  # one generation per optimizer step (mini_batch_size == rows)
        raise RuntimeError(f"{len(gen)} generations for {len(stamps) - 1} steps")
    return [{"step_s": b - a, "generate_s": g, "tokens": n} for a, b, (g, n) in zip(stamps, stamps[1:], gen)]


def worker(a, engine: str) -> dict:
    import torch

    from apo_llm.config import load_config

    if engine == "trl_vllm":
        try:
            import vllm  # noqa: F401
        except Exception as e:  # not installed, or a build that does not match torch
            return {"engine": engine, "skipped": f"import vllm failed: {type(e).__name__}: {str(e)[:200]}"}
    runs = str(Path(a.model_dir).parent)  # beside the model, in the folder main() removes
    cfg = load_config(config_args(a, engine, a.model_dir, runs))
    steps = run_native(cfg) if engine == "native" else run_trl(cfg)
    free, total = torch.cuda.mem_get_info()
    return summarize(engine, steps, torch.cuda.max_memory_allocated() / 2**20, (total - free) / 2**20)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_smoke.py", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--micro", type=int, default=16, help="sequences per forward/backward")
    p.add_argument("--loss", default="apo")
    p.add_argument("--timeout", type=int, default=None,
                   help=f"seconds per engine before it is reported as failed (default {TIMEOUT_S})")
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    refuse_without_cuda()
    unknown = set(a.engines.split(",")) - set(ENGINES)
    if unknown:
        p.error(f"--engines: unknown {sorted(unknown)}; choose from {ENGINES}")
    if a.worker:
        print("RESULT " + json.dumps(worker(a, a.worker)), flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="gpu_smoke_"))  # the ~1 GB model and the runs; removed at the end
    try:
        failed = run_engines(a, argv, build_model_dir(work / "model"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        sys.exit(1)  # a skipped vLLM is not a failure; a crashed or timed-out engine is


def run_engines(a, argv, model_dir: Path) -> int:
    """Each engine in its own process; prints its JSON line; returns how many failed."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    failed = 0
    for engine in a.engines.split(","):
        limit = a.timeout or TIMEOUT_S[engine]
        print(f"[gpu_smoke] {engine} (at most {limit} s) ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", engine,
               "--model-dir", str(model_dir)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            res = json.loads(line[-1][7:]) if proc.returncode == 0 and line else \
                {"engine": engine, "failed": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
        except subprocess.TimeoutExpired:
            res = {"engine": engine, "failed": f"timed out after {limit} s"}
        failed += "failed" in res
        print(json.dumps(res), flush=True)
    return failed


if __name__ == "__main__":
    main()
