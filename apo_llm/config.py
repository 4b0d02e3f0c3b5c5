"""Configuration of `python -m apo_llm.train`: typed dataclass sections, YAML file, CLI overrides.

Precedence: dataclass defaults < YAML file (`--config file.yaml`) < CLI flags (`--train.lr 2e-5`).
Unknown sections or keys and ill-typed or out-of-range values raise ValueError naming the field
(`train.lr`). The loss section *is* `apo_llm.objectives.LossConfig` (its fields are not
duplicated here).

With no config file at all the defaults are the embedded tiny CPU run: the project's tiny Llama
(apo_llm.tiny), the synthetic arithmetic task, APO.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from apo_llm.cli import MIN_TEMPERATURE
from apo_llm.objectives import LossConfig

TINY_MODEL = "tiny"  # model.name_or_path value meaning: build/load apo_llm.tiny.ensure_tiny_model()


# Mode strings: the Literal is the one list of choices (the YAML/CLI conversion refuses the rest).
TrainEngine = Literal["native", "trl"]
RolloutEngine = Literal["hf", "vllm"]
AdvStd = Literal["unbiased", "population"]


def _f(default, help: str, **kw):
    """A dataclass field with help text (shown by --help and in the README's config reference)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelSection:
    name_or_path: str = _f(TINY_MODEL, "hub id or local dir; 'tiny' = the project's tiny Llama (built if missing)")
    dtype: str = _f("float32", "float32 | bfloat16 | float16 (bfloat16 on GPUs)")
    device: Optional[str] = _f(None, "cpu | cuda | cuda:N; None = the accelerator's device")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (long completions)")
    trust_remote_code: bool = _f(False, "passed to from_pretrained")
    attn_implementation: Optional[str] = _f(None, "e.g. sdpa | flash_attention_2; None = transformers default")
    chat_template: bool = _f(True, "wrap prompts in the tokenizer's chat template when it has one")
    tiny_quick: bool = _f(False, "with name_or_path='tiny': the smaller, faster build used by tests")
    lm_head_fp32: Optional[bool] = _f(
        None, "output projection in float32 under bf16/fp16; None = on for APO (r_anchor divides by a small Z_ref)")


@dataclass
class LoraSection:
    r: int = _f(16, "LoRA rank")
    alpha: int = _f(32, "LoRA alpha (scale alpha / r)")
    dropout: float = _f(0.0, "LoRA dropout")
    target_modules: str = _f("all-linear", "'all-linear' or a comma-separated list of module names")
    adapter_path: Optional[str] = _f(None, "start from this trained adapter; a frozen copy of it is the reference")


@dataclass
class DataSection:
    source: str = _f("synthetic", "gsm8k | math | math500 | synthetic | jsonl | parquet")
    path: Optional[str] = _f(None, "local file for source jsonl/parquet")
    split: str = _f("train", "training split")
    limit: Optional[int] = _f(None, "use at most this many training problems")
    synthetic_n: Optional[int] = _f(
        None, "source synthetic only: size of the generated training pool (None: 2000, so the embedded run "
              "sees each problem about once and what it learns carries to held-out problems; a small pool "
              "such as 64 raises the training reward faster but the tiny model memorises it)")
    eval_source: Optional[str] = _f(None, "held-out source (None: same as source; e.g. math500 for math)")
    eval_split: str = _f("test", "held-out split for the periodic evaluation")
    eval_path: Optional[str] = _f(None, "local file for a jsonl/parquet eval_source (None with a jsonl/parquet "
                                        "source: a held-out slice of data.path, not trained on)")
    reward: Optional[str] = _f(None, "reward function name (None: the source's default; required for jsonl/parquet)")
    seed: int = _f(0, "seed of the data order (one permutation per pass over the data)")


@dataclass
class RolloutSection:
    num_generations: int = _f(8, "G: completions per prompt (group size)")
    max_new_tokens: int = _f(64, "completion length limit (>= 512 GSM8K, >= 1024 MATH)")
    temperature: float = _f(1.0, "sampling temperature; log-probs use logits / temperature")
    top_p: float = _f(1.0, "nucleus sampling (1.0 keeps log-probs equal to the sampling distribution)")
    top_k: int = _f(0, "top-k sampling (0 = off)")
    batch_size: int = _f(64, "rows per generate call")
    engine: RolloutEngine = _f("hf", "hf (transformers generate) | vllm (train.engine trl only; vLLM colocated, GPU)")
    stop_token_ids: list[int] = _f([], "extra token ids that end a completion (the chat template's end-of-turn "
                                       "token is added automatically when model.chat_template is on)")


@dataclass
class TrainSection:
    steps: int = _f(30, "number of RL steps (each: sample, score, update)")
    prompts_per_step: int = _f(16, "prompts sampled per step (rows = prompts_per_step * G)")
    ppo_epochs: int = _f(1, "passes over each step's rollouts")
    mini_batch_size: int = _f(64, "sequences per optimizer step (must divide the rollout rows)")
    micro_batch_size: int = _f(64, "sequences per forward/backward (gradient accumulation within a minibatch)")
    lr: float = _f(1e-3, "AdamW learning rate (LoRA: ~1e-5..3e-5 on real models; the tiny model takes 1e-3: 3e-3 "
                         "drops its reward within 3 steps)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    warmup_steps: int = _f(2, "linear warmup optimizer steps")
    scheduler: str = _f("constant_with_warmup", "transformers.get_scheduler name (linear, cosine, ...)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (<= 0: off, norm still logged)")
    advantage: str = _f("grpo", "advantage estimator of objectives.group_advantages")
    passk_k: Optional[int] = _f(None, "k of the passk advantage (1 <= k <= rollout.num_generations)")
    adv_std: AdvStd = _f("unbiased", "std of the grpo estimator: unbiased (verl) | population")
    seed: int = _f(0, "seed of python / numpy / torch RNGs")
    chunk_size: int = _f(1024, "(row, position) pairs per logits chunk")
    max_consecutive_nonfinite: int = _f(3, "stop with an error after this many non-finite steps in a row")
    stop_at_step: Optional[int] = _f(None, "exit cleanly after this step (preemption / tests); resume later")
    num_threads: int = _f(0, "torch CPU threads (0 = torch default)")
    engine: TrainEngine = _f("native", "native (this package's loop, one process) | trl (inside TRL's GRPOTrainer: "
                               "several processes, DeepSpeed/FSDP, vLLM); see docs/trainer_engines.md")


@dataclass
class EvalSection:
    every: int = _f(10, "evaluate pass@k on held-out problems every N steps (0 = off); also before/after")
    num_problems: int = _f(64, "held-out problems")
    num_samples: int = _f(8, "samples per problem (n >= max k)")
    k: list[int] = _f([1, 4], "pass@k values to report")
    temperature: Optional[float] = _f(None, "sampling temperature (None: rollout.temperature)")
    max_new_tokens: Optional[int] = _f(None, "None: rollout.max_new_tokens")
    seed: int = _f(1234, "fixed sampling seed, so evaluations are comparable across steps")


@dataclass
class LoggingSection:
    output_dir: str = _f("runs", "parent directory of runs")
    run_name: Optional[str] = _f(None, "run directory name (None: <loss>-<source>)")
    tensorboard: bool = _f(False, "also write TensorBoard events")
    plots: bool = _f(True, "write PNG curves at the end")
    progress: bool = _f(True, "progress bar on a terminal (plain log lines otherwise) and one line per step")
    overwrite: bool = _f(False, "start afresh in a run directory that already holds a run, moving the old "
                                "run aside to <run_name>.old-<time> (never mixed)")
    report_to: list[str] = _f([], "extra trackers: wandb and/or trackio (optional installs; train.engine trl)")


@dataclass
class CheckpointSection:
    every: int = _f(10, "save a checkpoint every N steps (0 = only at the end)")
    keep_last: int = _f(2, "checkpoints kept on disk")
    resume: Optional[str] = _f(None, "None | auto (the newest intact checkpoint in the run dir; none yet: start "
                                     "afresh) | path to a checkpoint")
    allow_changed_inputs: bool = _f(False, "resume even though the data file(s) or the base model's weights differ "
                                           "from the checkpoint's fingerprints (refused otherwise)")


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    loss: LossConfig = field(default_factory=lambda: LossConfig(name="apo"))
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    @property
    def run_dir(self) -> Path:
        name = self.logging.run_name or f"{self.loss.name}-{self.data.source}"
        return Path(self.logging.output_dir) / name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = typing.get_type_hints(RunConfig)  # section name -> dataclass


# --------------------------------------------------------------------------------------------
# Type conversion
# --------------------------------------------------------------------------------------------


def _section_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# Fields where +-inf is a meaningful setting ("no cap"); everywhere else it is refused like NaN.
INF_ALLOWED = frozenset({"loss.apo_pull_cap"})


def _convert(key: str, value: Any, hint: Any) -> Any:
    """Coerce a YAML value or CLI string to the field's type; ValueError names the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _convert(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}: choose from {', '.join(map(str, args))}, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key}: expected a boolean (true/false), got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value) if isinstance(value, str) else value
            if isinstance(f, float) and f.is_integer():
                return int(f)
            if isinstance(f, int):
                return f
        except (TypeError, ValueError):
            pass
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
        if math.isnan(out) or (math.isinf(out) and key not in INF_ALLOWED):
            # a NaN compares False everywhere and would disable range checks
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        return out
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if hint is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_convert(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else list(value)
    return value


# --------------------------------------------------------------------------------------------
# Building and validating
# --------------------------------------------------------------------------------------------


def _merge(base: dict, overrides: dict, where: str) -> None:
    for section, values in overrides.items():
        if section not in SECTIONS:
            raise ValueError(f"{section}: unknown config section ({where}); choose from {sorted(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ValueError(f"{section}: expected a mapping of fields ({where}), got {values!r}")
        base.setdefault(section, {}).update(values)


def build_config(yaml_dict: Optional[dict] = None, cli: Optional[dict] = None) -> RunConfig:
    """RunConfig from the YAML mapping and CLI {section: {field: value}}; validated."""
    raw: dict[str, dict] = {}
    _merge(raw, yaml_dict or {}, "config file")
    _merge(raw, cli or {}, "command line")
    sections = {}
    for name, cls in SECTIONS.items():
        hints = _section_hints(cls)
        values = raw.get(name, {})
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                raise ValueError(f"{name}.{key}: unknown field; choose from {sorted(hints)}")
            kwargs[key] = _convert(f"{name}.{key}", value, hints[key])
        if cls is LossConfig:
            kwargs.setdefault("name", "apo")
            try:
                sections[name] = LossConfig(**kwargs)
            except ValueError as e:  # "LossConfig.kl_coef=...": name it as the config key
                raise ValueError(str(e).replace("LossConfig.", "loss.", 1)) from None
        else:
            sections[name] = cls(**kwargs)
    cfg = RunConfig(**sections)
    validate(cfg)
    return cfg


def fill_loss_norm_len(cfg: RunConfig) -> None:
    """Dr. GRPO's constant normaliser defaults to the maximum completion length, the same for every
    micro-batch (the padded width would change with the micro-batch); both engines call this."""
    if cfg.loss.loss_agg == "seq-mean-token-sum-norm" and cfg.loss.loss_norm_len is None:
        cfg.loss.loss_norm_len = cfg.rollout.max_new_tokens


def validate(cfg: RunConfig) -> None:
    """Range and consistency checks; every error names the field. One line per check, in three
    groups (what is loaded, the loop, the engines) checked in this order."""
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            section, name = key.split(".")
            raise ValueError(f"{key}={getattr(getattr(cfg, section), name)!r}: {why}")

    for group in (_validate_inputs, _validate_loop, _validate_engines):
        group(cfg, need)


def _validate_inputs(cfg: RunConfig, need) -> None:
    """model, lora, data, rollout."""
    from apo_llm.data import FILE_SOURCES, SOURCES
    from apo_llm.modeling import DTYPES

    m, lo, d, r = cfg.model, cfg.lora, cfg.data, cfg.rollout
    need(bool(m.name_or_path), "model.name_or_path", "must be set")
    need(m.dtype in DTYPES, "model.dtype", f"choose from {sorted(DTYPES)}")
    need(lo.r >= 1, "lora.r", "must be >= 1")
    need(lo.alpha > 0, "lora.alpha", "must be > 0")
    need(0.0 <= lo.dropout < 1.0, "lora.dropout", "must lie in [0, 1)")
    need(bool(lo.target_modules), "lora.target_modules", "must be 'all-linear' or module names")
    need(d.source in SOURCES, "data.source", f"choose from {', '.join(SOURCES)}")
    need(d.source not in FILE_SOURCES or bool(d.path), "data.path", f"required for source {d.source!r}")
    need(d.limit is None or d.limit >= 1, "data.limit", "must be >= 1 or None")
    need(d.synthetic_n is None or d.synthetic_n >= 1, "data.synthetic_n", "must be >= 1 or None")
    need(r.num_generations >= 2, "rollout.num_generations", "group size G must be >= 2")
    need(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    need(r.temperature >= MIN_TEMPERATURE, "rollout.temperature",
         f"must be >= {MIN_TEMPERATURE:g} (below it logits / temperature overflow and sampling is not finite)")
    need(0.0 < r.top_p <= 1.0, "rollout.top_p", "must lie in (0, 1]")
    need(r.top_k >= 0, "rollout.top_k", "must be >= 0 (0 = off)")
    need(r.batch_size >= 1, "rollout.batch_size", "must be >= 1")

def _validate_loop(cfg: RunConfig, need) -> None:
    """train, eval, checkpoint."""
    r, t, e, c = cfg.rollout, cfg.train, cfg.eval, cfg.checkpoint
    need(t.steps >= 1, "train.steps", "must be >= 1")
    need(t.prompts_per_step >= 1, "train.prompts_per_step", "must be >= 1")
    need(t.ppo_epochs >= 1, "train.ppo_epochs", "must be >= 1")
    rows = t.prompts_per_step * r.num_generations
    need(t.mini_batch_size >= 1 and rows % t.mini_batch_size == 0, "train.mini_batch_size",
         f"must divide the rollout rows prompts_per_step * num_generations = {rows}")
    need(t.micro_batch_size >= 1 and t.mini_batch_size % t.micro_batch_size == 0, "train.micro_batch_size",
         f"must divide train.mini_batch_size = {t.mini_batch_size}")
    need(t.lr > 0 and t.lr < 1, "train.lr", "must lie in (0, 1)")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(len(t.adam_betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.adam_betas),
         "train.adam_betas", "must be two numbers in [0, 1)")
    need(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    from transformers import SchedulerType

    need(t.scheduler in {s.value for s in SchedulerType}, "train.scheduler",
         f"choose from {sorted(s.value for s in SchedulerType)}")
    need(t.advantage in __import__("apo_llm.objectives").objectives.ADVANTAGE_ESTIMATORS, "train.advantage",
         "unknown estimator; see objectives.ADVANTAGE_ESTIMATORS")
    need(t.advantage != "passk" or t.passk_k is not None, "train.passk_k", "required with train.advantage=passk")
    need(t.passk_k is None or 1 <= t.passk_k <= r.num_generations, "train.passk_k",
         f"must lie in [1, rollout.num_generations={r.num_generations}]")
    need(t.adv_std in typing.get_args(AdvStd), "train.adv_std", " | ".join(typing.get_args(AdvStd)))
    need(t.chunk_size >= 1, "train.chunk_size", "must be >= 1")
    need(t.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite", "must be >= 1")
    need(t.stop_at_step is None or t.stop_at_step >= 1, "train.stop_at_step", "must be >= 1 or None")
    need(t.num_threads >= 0, "train.num_threads", "must be >= 0")
    need(e.every >= 0, "eval.every", "must be >= 0")
    need(e.num_problems >= 1, "eval.num_problems", "must be >= 1")
    ks = e.k
    need(len(ks) >= 1 and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks), "eval.k",
         "must be a list of integers >= 1")
    need(e.num_samples >= max(ks), "eval.num_samples", f"must be >= max(eval.k) = {max(ks)}")
    need(e.temperature is None or e.temperature >= MIN_TEMPERATURE, "eval.temperature",
         f"must be >= {MIN_TEMPERATURE:g} (below it sampling is not finite)")
    need(e.max_new_tokens is None or e.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
    need(c.every >= 0, "checkpoint.every", "must be >= 0")
    need(c.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")

def _validate_engines(cfg: RunConfig, need) -> None:
    """Settings that depend on the loss, the data files or the engine."""
    from apo_llm.data import FILE_SOURCES

    d, r, t = cfg.data, cfg.rollout, cfg.train
    need(cfg.loss.kl_estimator != "full" or cfg.loss.kl_coef == 0, "loss.kl_estimator",
         "'full' (exact KL over the vocabulary) is not supported by the LLM trainer; use k1, k2 or k3")
    need(d.source not in FILE_SOURCES or d.reward is not None, "data.reward",
         f"required for source {d.source!r} (gsm8k_strict | gsm8k_flexible | math): it also picks the prompt "
         "suffix and which rows fit")
    need(d.eval_source not in FILE_SOURCES or bool(d.eval_path), "data.eval_path",
         f"required for eval_source {d.eval_source!r}")
    need(t.engine in typing.get_args(TrainEngine), "train.engine", "choose native or trl")
    need(r.engine in typing.get_args(RolloutEngine), "rollout.engine", "choose hf or vllm")
    need(r.engine == "hf" or t.engine == "trl", "rollout.engine", "vllm needs train.engine: trl")
    need(all(isinstance(i, int) and i >= 0 for i in r.stop_token_ids), "rollout.stop_token_ids",
         "must be a list of token ids >= 0")
    need(all(x in ("wandb", "trackio") for x in cfg.logging.report_to), "logging.report_to",
         "choose from wandb, trackio (TensorBoard: logging.tensorboard)")
    need(not cfg.logging.report_to or t.engine == "trl", "logging.report_to", "needs train.engine: trl")
    if d.reward is not None:
        from apo_llm.rewards import REWARD_FNS

        need(d.reward in REWARD_FNS, "data.reward", f"choose from {sorted(REWARD_FNS)}")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_cli(argv: list[str]) -> tuple[Optional[str], dict, bool]:
    """(config path, {section: {field: value-string}}, help?) from argv.

    Accepts `--config F`, `--resume X` (alias of --checkpoint.resume), `--section.field value`
    and `--section.field=value`; a bare `--section.flag` of a boolean field means true.
    """
    config_path, cli, i = None, {}, 0
    bool_fields = {f"{s}.{k}" for s, cls in SECTIONS.items()
                   for k, h in typing.get_type_hints(cls).items() if h is bool}
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            return config_path, cli, True
        if not arg.startswith("--"):
            raise ValueError(f"{arg}: unexpected argument; use --config FILE or --section.field VALUE")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if key in bool_fields and (nxt is None or nxt.startswith("--")):
                val = "true"
            elif nxt is None:
                raise ValueError(f"{key}: missing value")
            else:
                val, i = nxt, i + 1
        i += 1
        if key == "config":
            config_path = val
            continue
        if key == "resume":
            key = "checkpoint.resume"
        section, dot, name = key.partition(".")
        if not dot or not name:
            raise ValueError(f"{key}: expected --section.field (sections: {sorted(SECTIONS)})")
        cli.setdefault(section, {})[name] = val
    return config_path, cli, False


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A config file's sections, with its `base: other.yaml` (a path relative to the file) merged
    under it: a section of the file overrides the base's fields one by one. Bases may chain;
    a cycle, or a base that is not a mapping of sections, is a one-line error naming the files."""
    p = Path(path)
    data = _read_yaml(p)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ValueError(f"config: {p}: base must be a path to another YAML file, got {base!r}")
    base_path = (p.parent / base).resolve()
    chain = _chain + (p.resolve(),)
    if base_path in chain:
        raise ValueError(f"config: {p}: base cycle " + " -> ".join(str(x) for x in chain + (base_path,)))
    if not base_path.is_file():
        raise ValueError(f"config: {p}: base file not found: {base_path}")
    merged = load_yaml(base_path, chain)
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}  # field by field; lists are replaced whole
        else:
            merged[section] = values
    return merged


def _read_yaml(p: Path) -> dict:
    if not p.is_file():
        raise ValueError(f"config: file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or type(e).__name__
        raise ValueError(f"config: {p}:{where}: YAML syntax error ({what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config: cannot read {p} ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config: {p} must hold a mapping of sections")
    return data


def load_config(argv: Optional[list[str]] = None, *, config_path: Optional[str] = None) -> RunConfig:
    """defaults < YAML (`--config` or config_path) < CLI overrides."""
    path, cli, want_help = parse_cli(list(argv or []))
    if want_help:
        print(help_text())
        raise SystemExit(0)
    path = path or config_path
    return build_config(load_yaml(path) if path else None, cli)


# What the LLM trainer accepts where the shared LossConfig help says more (validate() refuses the rest).
HELP_OVERRIDES = {"loss.kl_estimator": "k1 | k2 | k3 (sampled-token estimators; 'full' is simulator-only)"}


def help_text() -> str:
    lines = ["usage: python -m apo_llm.train [--config FILE.yaml] [--resume auto] [--section.field VALUE ...]",
             "", "Precedence: defaults < YAML < command line. Fields:"]
    default = RunConfig()
    for s, cls in SECTIONS.items():
        lines.append(f"\n[{s}]")
        for fld in dataclasses.fields(cls):
            text = HELP_OVERRIDES.get(f"{s}.{fld.name}", fld.metadata.get("help", ""))
            lines.append(f"  --{s}.{fld.name} (default {getattr(getattr(default, s), fld.name)!r}): {text}")
    return "\n".join(lines)


def save_resolved(cfg: RunConfig, out_dir: str | Path, extra: Optional[dict] = None) -> None:
    """config.yaml (resolved, loadable with --config) and run_info.json (seed, versions, git SHA)."""
    from apo_llm.modeling import git_sha

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    from importlib import metadata

    # distribution metadata, not module.__version__: math_verify has no __version__ attribute
    for mod, dist in (("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"),
                      ("accelerate", "accelerate"), ("datasets", "datasets"), ("math_verify", "math-verify"),
                      ("numpy", "numpy"), ("trl", "trl")):
        try:
            versions[mod] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[mod] = None
    info = {"seed": cfg.train.seed, "versions": versions, "git_sha": git_sha(Path(__file__).parent),
            "argv": sys.argv, "loss_reading": loss_reading(cfg), **(extra or {})}
    (out / "run_info.json").write_text(json.dumps(info, indent=2, default=str))


def loss_reading(cfg: RunConfig) -> dict:
    """The APO reading this run trains with (docs/method.md): r_anchor's normaliser, the clip, and the
    effective pull cap (1 + eps_high when loss.apo_pull_cap is None; "inf" for no cap)."""
    lc = cfg.loss
    cap = lc.pull_cap
    return {"name": lc.name, "apo_anchor_norm": lc.apo_anchor_norm, "apo_clip": lc.apo_clip,
            "apo_anchoring": lc.apo_anchoring, "apo_pull_cap": cap if math.isfinite(cap) else str(cap),
            "needs_anchor_old_logp": lc.needs_anchor_old}


# Settings a resume may change: they steer the loop, not what a step computes. Any other difference
# from the checkpoint's config is refused (a resumed run keeps the settings it was started with).
APPLIED_ON_RESUME = frozenset({
    "train.steps", "train.stop_at_step", "train.num_threads", "train.max_consecutive_nonfinite",
    "checkpoint.every", "checkpoint.keep_last", "checkpoint.resume", "checkpoint.allow_changed_inputs",
    "logging.progress", "logging.plots",
    "logging.tensorboard", "logging.overwrite", "eval.every", "model.device"})


def resume_differences(saved: dict, cfg: RunConfig) -> tuple[dict, dict]:
    """(applied, refused): {"section.field": (saved value, new value)} between a checkpoint's config
    and this run's. Fields present on one side only (other versions) are not compared."""
    applied, refused = {}, {}
    for section, values in cfg.to_dict().items():
        old = saved.get(section, {})
        for key, new in values.items():
            if key in old and old[key] != new:
                name = f"{section}.{key}"
                (applied if name in APPLIED_ON_RESUME else refused)[name] = (old[key], new)
    return applied, refused
