"""Config: precedence defaults < YAML < CLI, type conversion, every error path, shipped configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from apo_llm.config import ALIASES, RunConfig, build_config, help_text, load_config
from apo_llm.options import parse_argv
from apo_llm.provenance import save_resolved

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
REAL = [p for p in CONFIGS if not p.name.startswith(("tiny_", "toy_"))]


def test_defaults_are_the_embedded_tiny_apo_run():
    cfg = load_config([])
    assert cfg.model.name_or_path == "tiny" and cfg.data.source == "synthetic"
    assert cfg.loss.name == "apo" and cfg.loss.needs_anchors and cfg.loss.apo_k == 8
    assert cfg.rollout.top_k == 0 and cfg.rollout.top_p == 1.0
    assert cfg.lora.target_modules == "all-linear"


def test_precedence_defaults_yaml_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"train": {"lr": 1e-4, "steps": 7}, "loss": {"name": "grpo_kl", "kl_coef": 0.05}}))
    cfg = load_config(["--config", str(f), "--train.lr", "3e-5", "--loss.kl_estimator=k2"])
    assert cfg.train.lr == 3e-5  # CLI beats YAML
    assert cfg.train.steps == 7  # YAML beats default
    assert cfg.train.prompts_per_step == RunConfig().train.prompts_per_step  # default kept
    assert cfg.loss.name == "grpo_kl" and cfg.loss.kl_coef == 0.05 and cfg.loss.kl_estimator == "k2"
    assert cfg.loss.needs_ref_logp and not cfg.loss.needs_anchors


def test_cli_type_conversion():
    cfg = load_config(["--train.steps", "12", "--logging.tensorboard", "--model.gradient_checkpointing=false",
                       "--eval.k", "1,2", "--train.adam_betas", "[0.9, 0.95]", "--data.limit", "None",
                       "--loss.clip_c", "3", "--train.stop_at_step", "5", "--eval.num_samples", "4",
                       "--resume", "auto"])
    assert cfg.train.steps == 12 and isinstance(cfg.train.steps, int)
    assert cfg.logging.tensorboard is True and cfg.model.gradient_checkpointing is False
    assert cfg.eval.k == [1, 2] and cfg.train.adam_betas == [0.9, 0.95] and cfg.data.limit is None
    assert cfg.loss.clip_c == 3.0 and cfg.train.stop_at_step == 5 and cfg.checkpoint.resume == "auto"


@pytest.mark.parametrize("argv, field", [
    (["--train.lrr", "1"], "train.lrr"),
    (["--bogus.x", "1"], "bogus"),
    (["--train.lr", "abc"], "train.lr"),
    (["--train.lr", "0"], "train.lr"),
    (["--train.steps", "2.5"], "train.steps"),
    (["--train.steps", "0"], "train.steps"),
    (["--logging.tensorboard", "maybe"], "logging.tensorboard"),
    (["--loss.name", "ppo"], "loss.name"),
    (["--loss.kl_coef", "-1"], "loss.kl_coef"),
    (["--loss.eps_low", "1.5"], "loss.eps_low"),
    (["--loss.apo_k", "0"], "loss.apo_k"),
    (["--loss.kl_coef", "0.1", "--loss.kl_estimator", "full"], "loss.kl_estimator"),
    (["--model.dtype", "fp8"], "model.dtype"),
    (["--lora.r", "0"], "lora.r"),
    (["--lora.dropout", "1.0"], "lora.dropout"),
    (["--data.source", "imagenet"], "data.source"),
    (["--data.source", "jsonl"], "data.path"),
    (["--data.reward", "nope"], "data.reward"),
    (["--data.limit", "0"], "data.limit"),
    (["--rollout.num_generations", "1"], "rollout.num_generations"),
    (["--rollout.temperature", "0"], "rollout.temperature"),
    (["--rollout.top_p", "0"], "rollout.top_p"),
    (["--rollout.top_k", "-1"], "rollout.top_k"),
    (["--rollout.max_new_tokens", "0"], "rollout.max_new_tokens"),
    (["--rollout.batch_size", "0"], "rollout.batch_size"),
    (["--train.mini_batch_size", "7"], "train.mini_batch_size"),
    (["--train.micro_batch_size", "5"], "train.micro_batch_size"),
    (["--train.ppo_epochs", "0"], "train.ppo_epochs"),
    (["--train.prompts_per_step", "0"], "train.prompts_per_step"),
    (["--train.scheduler", "zigzag"], "train.scheduler"),
    (["--train.advantage", "magic"], "train.advantage"),
    (["--train.advantage", "passk"], "train.passk_k"),
    (["--train.advantage", "passk", "--train.passk_k", "9"], "train.passk_k"),  # > G = 8
    (["--train.max_grad_norm", "nan"], "train.max_grad_norm"),  # NaN would silently disable clipping
    (["--train.lr", "inf"], "train.lr"),
    (["--loss.apo_beta", "nan"], "loss.apo_beta"),
    (["--data.source", "jsonl", "--data.path", "x.jsonl"], "data.reward"),  # never guessed from rows
    (["--train.adv_std", "sample"], "train.adv_std"),
    (["--train.adam_betas", "[0.9]"], "train.adam_betas"),
    (["--train.warmup_steps", "-1"], "train.warmup_steps"),
    (["--train.weight_decay", "-0.1"], "train.weight_decay"),
    (["--train.chunk_size", "0"], "train.chunk_size"),
    (["--train.max_consecutive_nonfinite", "0"], "train.max_consecutive_nonfinite"),
    (["--train.stop_at_step", "0"], "train.stop_at_step"),
    (["--train.num_threads", "-2"], "train.num_threads"),
    (["--eval.k", "1,16"], "eval.num_samples"),
    (["--eval.k", "[0]"], "eval.k"),
    (["--eval.every", "-1"], "eval.every"),
    (["--eval.num_problems", "0"], "eval.num_problems"),
    (["--eval.temperature", "0"], "eval.temperature"),
    (["--eval.max_new_tokens", "0"], "eval.max_new_tokens"),
    (["--checkpoint.every", "-1"], "checkpoint.every"),
    (["--checkpoint.keep_last", "0"], "checkpoint.keep_last"),
    (["--model.name_or_path", ""], "model.name_or_path"),
    (["--train.lr"], "train.lr"),  # missing value
    (["train.lr", "1"], "train.lr"),  # not a flag
    (["--trainlr", "1"], "trainlr"),  # no section
])
def test_errors_name_the_field(argv, field):
    with pytest.raises(ValueError) as e:
        load_config(argv)
    assert str(e.value).startswith(field), str(e.value)


def test_yaml_errors_name_the_field(tmp_path):
    def err(data):
        f = tmp_path / "c.yaml"
        f.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
        with pytest.raises(ValueError) as e:
            load_config(["--config", str(f)])
        return str(e.value)

    assert err({"train": {"lr": "fast"}}).startswith("train.lr")
    assert err({"train": {"learning_rate": 1e-5}}).startswith("train.learning_rate")
    assert err({"optim": {"lr": 1}}).startswith("optim")
    assert err({"train": 5}).startswith("train")
    assert err("- a\n- b\n").startswith("config")
    assert err({"logging": {"tensorboard": "perhaps"}}).startswith("logging.tensorboard")
    with pytest.raises(ValueError, match="config: file not found"):
        load_config(["--config", str(tmp_path / "missing.yaml")])


def test_parse_cli_help_flag():
    assert parse_argv(RunConfig, ["--help"], ALIASES)[2] is True
    text = help_text()
    assert "--train.lr" in text and "--loss.apo_beta" in text and "APO pull" in text


def test_save_resolved_roundtrip(tmp_path):
    cfg = load_config(["--train.lr", "5e-4", "--loss.name", "kl_on_wrong", "--loss.kl_coef", "0.02"])
    save_resolved(cfg, tmp_path)
    again = load_config(["--config", str(tmp_path / "config.yaml")])
    assert again == cfg
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["seed"] == cfg.train.seed and info["versions"]["torch"] and "git_sha" in info


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    cfg = load_config(["--config", str(path)])
    assert cfg.loss.name in path.stem


def test_real_configs_cover_the_matrix_and_avoid_traps():
    names = {p.stem for p in REAL}
    for ds in ("gsm8k", "math"):
        for model in ("qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct", "qwen2.5-math-7b"):
            for loss in ("grpo", "grpo_kl", "kl_on_wrong", "apo"):
                assert f"{ds}_{model}_{loss}" in names
    for p in REAL:
        cfg = load_config(["--config", str(p)])
        assert cfg.rollout.max_new_tokens >= (512 if cfg.data.source == "gsm8k" else 1024), p.name
        assert cfg.rollout.num_generations >= 8 and cfg.rollout.top_k == 0 and cfg.rollout.top_p == 1.0
        assert cfg.lora.target_modules == "all-linear" and 1e-5 <= cfg.train.lr <= 3e-5
        assert cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing
        assert (cfg.loss.kl_coef > 0) == cfg.loss.name.endswith(("_kl", "kl_on_wrong")), p.name
        assert cfg.logging.run_name == p.stem


def test_yaml_syntax_error_is_one_line_naming_the_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("train:\n  lr: 1e-3\n  steps: [1, 2\n")
    with pytest.raises(ValueError) as e:
        load_config(["--config", str(f)])
    msg = str(e.value)
    assert str(f) in msg and "line" in msg and "\n" not in msg and "<unicode string>" not in msg


def test_passk_k_is_accepted_within_the_group():
    cfg = load_config(["--train.advantage", "passk", "--train.passk_k", "4"])
    assert cfg.train.passk_k == 4


def test_help_offers_only_kl_estimators_the_trainer_accepts():
    line = [x for x in help_text().splitlines() if "--loss.kl_estimator" in x][0]
    assert "full" not in line.split(":", 1)[1].replace("'full' is simulator-only", "")
    with pytest.raises(ValueError, match="loss.kl_estimator"):
        load_config(["--loss.kl_estimator", "full", "--loss.kl_coef", "0.1"])


def test_run_info_versions_are_the_installed_ones(tmp_path):
    from importlib import metadata

    save_resolved(load_config([]), tmp_path)
    versions = json.loads((tmp_path / "run_info.json").read_text())["versions"]
    assert versions["math_verify"] == metadata.version("math-verify")  # was null: no __version__ attribute
    assert versions["torch"] == metadata.version("torch")


def test_resume_differences_split_applied_and_refused():
    from apo_llm.provenance import resume_differences

    old = load_config([]).to_dict()
    applied, refused = resume_differences(old, load_config(["--train.steps", "60", "--train.lr", "1e-4"]))
    assert applied == {"train.steps": (30, 60)} and refused == {"train.lr": (1e-3, 1e-4)}


# --------------------------------------------------------------------------------------------
# Composed configs: `base: other.yaml`
# --------------------------------------------------------------------------------------------

BASES = sorted((Path(__file__).resolve().parents[2] / "configs" / "base").glob("*.yaml"))


@pytest.mark.parametrize("path", BASES, ids=lambda p: p.name)
def test_shipped_bases_resolve_and_validate(path):
    load_config(["--config", str(path)])


def test_every_shipped_overlay_names_an_existing_base():
    from apo_llm.options import load_yaml

    for p in CONFIGS:
        base = yaml.safe_load(p.read_text()).get("base")
        if base is not None:
            assert (p.parent / base).is_file(), p.name
            merged = load_yaml(p)
            assert "base" not in merged and merged["logging"]["run_name"] == p.stem


def test_base_is_relative_to_the_file_and_merged_field_by_field(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "root.yaml").write_text(yaml.safe_dump(
        {"train": {"lr": 1e-4, "steps": 7}, "eval": {"k": [1, 2, 4]}, "loss": {"name": "grpo_kl", "kl_coef": 0.05}}))
    (tmp_path / "b" / "mid.yaml").write_text(yaml.safe_dump({"base": "root.yaml", "train": {"steps": 9}}))
    (tmp_path / "top.yaml").write_text(yaml.safe_dump({"base": "b/mid.yaml", "eval": {"k": [1]},
                                                       "loss": {"kl_coef": 0.1}}))
    cfg = load_config(["--config", str(tmp_path / "top.yaml"), "--train.lr", "3e-5"])
    assert cfg.train.steps == 9 and cfg.train.lr == 3e-5  # mid overrides root; the CLI overrides all
    assert cfg.eval.k == [1]  # lists are replaced, not merged
    assert cfg.loss.name == "grpo_kl" and cfg.loss.kl_coef == 0.1  # a section is merged field by field


@pytest.mark.parametrize("files, words", [
    ({"a.yaml": {"base": "b.yaml"}, "b.yaml": {"base": "a.yaml"}}, "base cycle"),
    ({"a.yaml": {"base": "a.yaml"}}, "base cycle"),
    ({"a.yaml": {"base": "missing.yaml"}}, "file not found"),
    ({"a.yaml": {"base": 3}}, "base must be a path"),
])
def test_bad_base_is_a_one_line_error(tmp_path, files, words):
    for name, data in files.items():
        (tmp_path / name).write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError) as e:
        load_config(["--config", str(tmp_path / "a.yaml")])
    assert words in str(e.value) and "\n" not in str(e.value) and "a.yaml" in str(e.value)


@pytest.mark.parametrize("flag, value, choices", [("--train.engine", "nope", "native, trl"),
                                                  ("--rollout.engine", "sglang", "hf, vllm"),
                                                  ("--train.adv_std", "sample", "unbiased, population")])
def test_mode_strings_accept_only_their_literal_choices(flag, value, choices):
    with pytest.raises(ValueError) as e:
        load_config([flag, value])
    assert flag[2:] in str(e.value) and choices in str(e.value)
