"""An offline tiny base model for CPU runs and tests: BPE tokenizer + tiny Llama, warm-started by SFT.

No hub is reachable here, so the project builds its own "base model" for the synthetic arithmetic task
(apo_llm.data.synthetic_problems):

  1. train a byte-level BPE tokenizer (digits split one per token) on the task text;
  2. build a tiny LlamaConfig model from scratch;
  3. supervised fine-tuning on (prompt, worked solution) pairs (next-token loss on the story and the
     solution; the story's repeated names teach the copying the solutions need), evaluating sampled
     pass@1 (temperature 1) every few steps and stopping once it reaches `target_pass1`, so the policy
     is right often but not always: RL has something to sharpen and something to lose;
  4. save_pretrained (model + tokenizer) and build_info.json (pass@1, params, seconds).

Builds are seeded and bit-identical on one machine (not across CPUs or library builds: build_info.json
records both), run under a file lock, and are written to a temporary
directory renamed into place, so parallel processes (pytest-xdist workers) never see half a model.

    python -m apo_llm.tiny [--quick] [--rebuild] [--cache_dir DIR]
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from apo_llm.data import Problem, synthetic_problems
from apo_llm.options import option, parse_command
from apo_llm.rewards import gsm8k_strict

VERSION = "v3"  # bump when the task, tokenizer or model format changes: cached builds are rebuilt
DEFAULT_CACHE = Path(os.environ.get("APO_CACHE_DIR", "~/.cache/apo_rlvr")).expanduser()
EOS, PAD = "<|endoftext|>", "<|pad|>"
COMPLETION_PREFIX = "\n"  # the SFT completions start on a new line after the prompt


@dataclass
class TinySpec:
    """Size and warm-start schedule of one tiny build."""

    name: str  # subdirectory stem
    hidden: int = 128  # d_model
    layers: int = 2
    heads: int = 4
    intermediate: int = 384  # MLP width
    vocab_size: int = 512  # BPE vocabulary incl. byte alphabet and specials
    batch_size: int = 16  # SFT sequences per step (small batches: more updates per CPU second)
    lr: float = 3e-3  # AdamW peak; linear warmup, then cosine decay to lr/10 at max_steps
    warmup: int = 30
    max_steps: int = 1500  # SFT step cap
    min_steps: int = 300  # no early stop before this
    eval_every: int = 50  # SFT steps between pass@1 checks
    eval_problems: int = 32  # held-out problems x eval_samples per check
    eval_samples: int = 2
    target_pass1: float = 0.4  # stop SFT once a check reaches this
    final_problems: int = 128  # pass@1 written to build_info.json: final_problems x final_samples
    final_samples: int = 4
    max_new_tokens: int = 80  # the longest synthetic solution is ~66 tokens
    prompt_loss: bool = True  # also next-token loss on the story: repeated names/items teach copying early
    n_train: int = 8000  # synthetic training problems (cycled)
    seed: int = 0


FULL = TinySpec(name="tiny-llama")
QUICK = TinySpec(name="tiny-llama-quick", hidden=64, intermediate=192, lr=5e-3, max_steps=800, min_steps=200,
                 target_pass1=0.25, final_problems=64)


# ----------------------------------------------------------------------------------------------
# Tokenizer and model
# ----------------------------------------------------------------------------------------------


def train_tokenizer(vocab_size: int = 512, seed: int = 0):
    """Byte-level BPE trained on synthetic prompts + solutions; digits are single tokens so
    the tiny model can learn column arithmetic. Returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [t for p in synthetic_problems(3000, seed, "tokenizer") for t in (p.prompt, COMPLETION_PREFIX + p.solution)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=512)


def build_model(spec: TinySpec, tokenizer):
    """A randomly initialised tiny Llama (tied input/output embeddings) for `tokenizer`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(spec.seed)
    return AutoModelForCausalLM.from_config(config)


# ----------------------------------------------------------------------------------------------
# SFT warm start and pass@1
# ----------------------------------------------------------------------------------------------


def _encode_pairs(tokenizer, problems: list[Problem]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS), tokenized separately exactly as at sampling time."""
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    comps = tokenizer([COMPLETION_PREFIX + p.solution for p in problems], add_special_tokens=False)["input_ids"]
    return [(p, c + [tokenizer.eos_token_id]) for p, c in zip(prompts, comps)]


def _sft_batch(pairs, pad_id: int, prompt_loss: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [B, L] ids, mask, labels (-100 on padding, and on the prompt unless prompt_loss)."""
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad_id)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), -100)
    for i, (p, c) in enumerate(pairs):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        start = 0 if prompt_loss else len(p)
        labels[i, start : len(seq)] = torch.tensor(seq[start:])
    return ids, mask, labels


@torch.no_grad()
def sampled_pass_at_1(model, tokenizer, problems: list[Problem], *, samples: int = 4, max_new_tokens: int = 96,
                      temperature: float = 1.0, seed: int = 0, batch_size: int = 128) -> float:
    """Mean gsm8k_strict reward of `samples` completions per problem sampled at `temperature`
    (top_k=0, top_p=1: the full distribution), i.e. the sampled estimate of pass@1."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    prompts = [p.prompt for p in problems for _ in range(samples)]
    golds = [p.gold for p in problems for _ in range(samples)]
    torch.manual_seed(seed)
    rewards = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        rewards += [gsm8k_strict(t, g) for t, g in zip(texts, golds[i : i + batch_size])]
    model.train(was_training)
    return sum(rewards) / len(rewards)


def _lr_factor(step: int, spec: TinySpec) -> float:
    """Linear warmup over spec.warmup steps, then cosine from 1 down to 0.1 at spec.max_steps."""
    if step < spec.warmup:
        return (step + 1) / spec.warmup
    frac = min(1.0, (step - spec.warmup) / max(1, spec.max_steps - spec.warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))


def sft_warm_start(model, tokenizer, spec: TinySpec, log=print) -> dict:
    """SFT on synthetic (prompt, solution) pairs until the sampled pass@1 check reaches
    spec.target_pass1 (checked every spec.eval_every steps after spec.min_steps) or spec.max_steps."""
    rng = random.Random(spec.seed)
    pairs = _encode_pairs(tokenizer, synthetic_problems(spec.n_train, spec.seed, "train"))
    held_out = synthetic_problems(spec.eval_problems, spec.seed, "sft_validation")
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, spec))
    model.train()
    order, pos, checks = list(range(len(pairs))), len(pairs), []
    step, t0 = 0, time.time()
    log(f"[tiny] SFT: at most {spec.max_steps} steps; from step {spec.min_steps} a sampled pass@1 check every "
        f"{spec.eval_every} steps stops it at >= {spec.target_pass1}")
    for step in range(1, spec.max_steps + 1):
        if pos + spec.batch_size > len(order):
            rng.shuffle(order)
            pos = 0
        batch = [pairs[j] for j in order[pos : pos + spec.batch_size]]
        ids, mask, labels = _sft_batch(batch, tokenizer.pad_token_id, spec.prompt_loss)
        pos += spec.batch_size
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % spec.eval_every == 0 and step < spec.min_steps:  # progress against the budget
            log(f"[tiny] step {step}/{spec.max_steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
        if step % spec.eval_every == 0 and step >= spec.min_steps:
            p1 = sampled_pass_at_1(model, tokenizer, held_out, samples=spec.eval_samples,
                                   max_new_tokens=spec.max_new_tokens, seed=spec.seed + step)
            checks.append((step, round(loss.item(), 4), p1))
            log(f"[tiny] step {step}/{spec.max_steps} loss {loss.item():.3f} pass@1~{p1:.2f} "
                f"(target {spec.target_pass1}, {time.time() - t0:.0f} s)")
            if p1 >= spec.target_pass1:
                break
    return {"sft_steps": step, "final_loss": loss.item(), "checks": checks}


# ----------------------------------------------------------------------------------------------
# Cached builds
# ----------------------------------------------------------------------------------------------


def _machine() -> dict:
    """What else decides the build's floats: a build is bit-identical on one machine, but another CPU
    (its SIMD kernels) or library version can give a different model (docs/trainer.md)."""
    import platform
    from importlib import metadata

    libs = {name: metadata.version(name) for name in ("transformers", "tokenizers")}
    return {**libs, "cpu": platform.processor() or platform.machine(), "torch_cpu_capability":
            torch.backends.cpu.get_cpu_capability()}


@contextmanager
def _one_thread():
    """Build on one intra-op thread: the same float reductions on every run on one machine (other
    CPUs may still differ, see _machine), and no thread oversubscription when pytest-xdist workers or
    other jobs share the cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _model_dir(cache_dir: str | Path | None, spec: TinySpec) -> Path:
    return Path(cache_dir or DEFAULT_CACHE).expanduser() / f"{spec.name}-{VERSION}"


def _build_atomically(final: Path, make, rebuild: bool) -> Path:
    """Run make(tmp_dir) under a file lock and rename tmp_dir to `final`; skip when already built."""
    from filelock import FileLock

    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "build_info.json").is_file() and not rebuild:
            return final  # another process built it while we waited
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        try:
            make(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_tiny_model(cache_dir: str | Path | None = None, *, rebuild: bool = False, quick: bool = False,
                      log=print) -> Path:
    """Directory of the SFT-warm-started tiny model (built when missing; `quick`: the smaller test build).

    Loadable with AutoTokenizer / AutoModelForCausalLM.from_pretrained; build_info.json records the
    measured sampled pass@1 (temperature 1), parameter count and build seconds.
    """
    spec = QUICK if quick else FULL
    final = _model_dir(cache_dir, spec)
    if (final / "build_info.json").is_file() and not rebuild:
        return final

    def make(out: Path) -> None:
        with _one_thread():
            _build_trained(out, spec, final, log)

    return _build_atomically(final, make, rebuild)


def _build_trained(out: Path, spec: TinySpec, final: Path, log) -> None:
    """Tokenizer -> random tiny Llama -> SFT warm start -> final pass@1 -> save into `out`."""
    t0 = time.time()
    tokenizer = train_tokenizer(spec.vocab_size, spec.seed)
    model = build_model(spec, tokenizer)
    log(f"[tiny] building {final.name}: {model.num_parameters():,} parameters (once; cached in {final.parent})")
    sft = sft_warm_start(model, tokenizer, spec, log=log)
    test = synthetic_problems(spec.final_problems, spec.seed, "test")
    p1 = sampled_pass_at_1(model, tokenizer, test, samples=spec.final_samples,
                           max_new_tokens=spec.max_new_tokens, seed=spec.seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"version": VERSION, "spec": asdict(spec), "params": model.num_parameters(),
            "pass_at_1": p1, "pass_at_1_samples": spec.final_problems * spec.final_samples,
            "pass_at_1_split": "test", "temperature": 1.0, "seconds": round(time.time() - t0, 1),
            "torch": torch.__version__, **_machine(), **sft}
    (out / "build_info.json").write_text(json.dumps(info, indent=2))
    if not 0.05 < p1 < 0.95:
        warnings.warn(f"tiny model {final.name}: sampled pass@1 {p1:.3f} is not safely inside (0, 1); "
                      "RL on it will see mostly zero-variance groups", stacklevel=3)
    log(f"[tiny] built {final.name}: pass@1 {p1:.3f} after {sft['sft_steps']} SFT steps, {info['seconds']} s")


def ensure_random_tiny_model(cache_dir: str | Path | None = None, *, quick: bool = True) -> Path:
    """Untrained tiny Llama with the same tokenizer (instant): for tests that only need shapes."""
    spec = QUICK if quick else FULL
    final = _model_dir(cache_dir, spec).with_name(f"{spec.name}-random-{VERSION}")
    if (final / "build_info.json").is_file():
        return final

    def make(out: Path) -> None:
        tokenizer = train_tokenizer(spec.vocab_size, spec.seed)
        model = build_model(spec, tokenizer)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        info = {"version": VERSION, "spec": asdict(spec), "params": model.num_parameters(), "trained": False}
        (out / "build_info.json").write_text(json.dumps(info, indent=2))

    return _build_atomically(final, make, rebuild=False)


@dataclass
class TinyCommand:
    """What `python -m apo_llm.tiny` takes; each field is one flag (--field_name)."""

    quick: bool = option(False, "the small test build")
    rebuild: bool = option(False, "rebuild even when cached (replaces the cached build, which every run on it uses)")
    cache_dir: Optional[str] = option(None, f"default {DEFAULT_CACHE} (env APO_CACHE_DIR)")


def main(argv: list[str] | None = None) -> None:
    args = parse_command(TinyCommand, argv, prog="python -m apo_llm.tiny", description="Build (or locate) the "
                         f"offline tiny model: {FULL.name}-{VERSION} (default) or {QUICK.name}-{VERSION} (--quick).")
    path = ensure_tiny_model(args.cache_dir, rebuild=args.rebuild, quick=args.quick)
    print(path)
    print((path / "build_info.json").read_text())


if __name__ == "__main__":
    from apo_llm.cli import run_or_exit

    run_or_exit(main)  # a flag mistake: one line, exit code 2
