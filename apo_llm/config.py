"""The schema of `python -m apo_llm.train`: typed dataclass sections with help per field.

Precedence: dataclass defaults < YAML file (`--config file.yaml`) < CLI flags (`--train.lr 2e-5`),
parsed by the project's one parser (apo_llm.options); range checks live in apo_llm.validation, the
run's provenance and resume policy in apo_llm.provenance. Unknown sections or keys and ill-typed or
out-of-range values raise a one-line UserError (a ValueError) naming the field (`train.lr`). The
loss section *is* `apo_llm.objectives.LossConfig` (its fields are not
duplicated here).

With no config file at all the defaults are the embedded tiny CPU run: the project's tiny Llama
(apo_llm.tiny), the synthetic arithmetic task, APO.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from apo_llm.objectives import LossConfig
from apo_llm.options import UserError, build, help_text as _help_text, load_yaml, merge, option, parse_argv
# fill_loss_norm_len: both engines import it from here
from apo_llm.validation import fill_loss_norm_len, validate  # noqa: F401

TINY_MODEL = "tiny"  # model.name_or_path value meaning: build/load apo_llm.tiny.ensure_tiny_model()


# Mode strings: the Literal is the one list of choices (the YAML/CLI conversion refuses the rest).
TrainEngine = Literal["native", "trl"]
RolloutEngine = Literal["hf", "vllm"]
AdvStd = Literal["unbiased", "population"]


_f = option  # a field with its help text (shown by --help and in the README's config reference)


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
# Building: defaults < YAML < command line, then validation
# --------------------------------------------------------------------------------------------

LOSS_DEFAULT = {"loss": {"name": "apo"}}  # the trainer's default loss (LossConfig's own default is grpo)
ALIASES = {"resume": "checkpoint.resume"}  # --resume X is --checkpoint.resume X
# What the LLM trainer accepts where the shared LossConfig help says more (validate() refuses the rest).
HELP_OVERRIDES = {"loss.kl_estimator": "k1 | k2 | k3 (sampled-token estimators; 'full' is simulator-only)"}


def _sections_only(values: Optional[dict], where: str) -> dict:
    for section, fields in (values or {}).items():
        if section not in SECTIONS:
            raise UserError(f"{section}: unknown config section ({where}); choose from {sorted(SECTIONS)}")
        if fields is not None and not isinstance(fields, dict):
            raise UserError(f"{section}: expected a mapping of fields ({where}), got {fields!r}")
    return {k: v for k, v in (values or {}).items() if v is not None}


def build_config(yaml_dict: Optional[dict] = None, cli: Optional[dict] = None) -> RunConfig:
    """RunConfig from the YAML mapping and CLI {section: {field: value}}; validated."""
    raw = merge(merge(LOSS_DEFAULT, _sections_only(yaml_dict, "config file")), _sections_only(cli, "command line"))
    cfg = build(RunConfig, raw)
    validate(cfg)
    return cfg


def load_config(argv: Optional[list[str]] = None, *, config_path: Optional[str] = None) -> RunConfig:
    """defaults < YAML (`--config` or config_path) < CLI overrides (`--section.field VALUE`)."""
    path, cli, want_help = parse_argv(RunConfig, list(argv or []), ALIASES)
    if want_help:
        print(help_text())
        raise SystemExit(0)
    path = path or config_path
    return build_config(load_yaml(path) if path else None, cli)


def help_text() -> str:
    return _help_text(RunConfig, "python -m apo_llm.train", aliases=ALIASES, overrides=HELP_OVERRIDES)
