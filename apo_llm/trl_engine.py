"""`train.engine: trl`: the same YAML config and loss code, run inside TRL's GRPOTrainer.

TRL supplies what the native trainer does not: several processes (DDP, DeepSpeed ZeRO-2/3, FSDP
through `accelerate launch` or `torchrun`), vLLM generation and multi-node runs. This module adds
to it only what APO needs (docs/trainer_engines.md has the field-by-field mapping):

    TRL generates and scores            -> our reward function on our data loader's problems
    advantages                          -> objectives.group_advantages (train.advantage), recomputed
                                           from TRL's gathered rewards so groups spanning ranks stay whole
    one no-grad reference pass          -> log pi_ref(y_t) and, for APO, the safe manifold
                                           M_t = TopK(pi_ref) ids + log-probs [B, T, K], chunked;
                                           for the old_mass / old_token readings then log pi_old
                                           at those ids (after TRL's own old pass, or the forward's
                                           detached gather when TRL skips it)
    optional loss tensors               -> passes.loss_inputs, from objectives.required_inputs
    loss                                -> objectives.policy_loss for every loss.name (TRL's beta = 0:
                                           any KL lives in LossConfig), with TRL's token normaliser
                                           as global_tokens

The training forward goes through the wrapped model (DDP / DeepSpeed / FSDP) so that gradients
sync: a forward hook keeps the backbone's last hidden state and our chunked head turns it into
log-probs, so no [B, L, V] float32 logits tensor exists (apo_llm/modeling.py, chunked_token_stats).

A run has the native engine's guarantees, from the same code: rank 0 takes the run-directory lock
(apo_llm.runlock) and resolves the checkpoint to resume (checkpoint.resolve_resume with the TRL
layout: manifest-verified, falling back to the newest intact one; run_setup.prepare_run_dir: changed
settings refused, loop settings applied), then tells every rank; every checkpoint-N gets a
manifest, a COMPLETE marker and apo_state.pt (config, metrics offset, input fingerprints) from
`RunGuard`; metrics.jsonl is cut back to the checkpoint on resume; SIGTERM / SIGINT on any rank
stop all ranks after the same RL step (one all-reduce of the flag per optimizer step), which is
checkpointed before exit 143 / 130 (apo_llm.preemption).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from apo_llm.checkpoint import (
    TRL, checkpoint_step, latest_checkpoint, read_trainer_state, writing,
)
from apo_llm.config import RunConfig, fill_loss_norm_len
from apo_llm.modeling import (
    chunked_token_stats, peft_trl_deprecation_quiet, position_ids_from_mask, unwrap_causal_lm,
)
from apo_llm.objectives import group_advantages, kl_estimate, policy_loss
from apo_llm.passes import loss_inputs, reference_pass
from apo_llm.preemption import Preemption, resume_command
from apo_llm.trl_callbacks import JsonlMetrics, RunGuard, _claim_run_dir, _on_main
from apo_llm.trl_config import build_dataset, epoch_sampler, grpo_config, make_reward_func, set_vllm_stops
from apo_llm.run_log import MetricsLog
from apo_llm.run_setup import (
    add_lora, check_inputs, check_window, context_window, drop_long_prompts, load_base, load_data,
    requeued_afresh, resolve_model_path, run_inputs, start_run_dir, world_size,
)

log = logging.getLogger("apo_llm.trl_engine")


# --------------------------------------------------------------------------------------------
# Config mapping: our sections -> trl.GRPOConfig
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Rewards and data
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------

from trl import GRPOTrainer  # noqa: E402  (heavy; this module is only imported for engine: trl)


def _full(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An FSDP2 DTensor parameter as a plain tensor (the hidden states are plain tensors)."""
    return p.full_tensor() if p is not None and hasattr(p, "full_tensor") else p


def _full_head(head) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight, bias) of the frozen output layer as plain full tensors, gathered once per pass.

    FSDP2 shards them as DTensors (full_tensor()), ZeRO-3 partitions them to 0 elements
    (GatheredParameters, copied out). Gathering is a collective: once per pass, every rank calls it
    the same number of times whatever its chunk count, and a chunk recomputed in backward reads the
    copy (re-entering ZeRO-3's gather there handed it an empty weight). The head is frozen under
    LoRA, so the copy needs no gradient. Unsharded heads are used as they are.
    """
    w, b = head.weight, head.bias
    if hasattr(w, "full_tensor"):
        return _full(w).detach(), _full(b).detach() if b is not None else None
    if hasattr(w, "ds_id"):  # DeepSpeed ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for p in (w, b) if p is not None], modifier_rank=None):
            return w.detach().clone(), b.detach().clone() if b is not None else None
    return w, b


class APOGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose advantages, reference pass and loss are the project's (objectives.py)."""

    def __init__(self, run_cfg: RunConfig, *args, **kwargs):
        self.run_cfg = run_cfg
        self.loss_cfg = run_cfg.loss
        self._gathered_rewards: Optional[torch.Tensor] = None
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, dataset=None):
        return epoch_sampler(super()._get_train_sampler(dataset))  # resumes see the uninterrupted data order

    def _save_checkpoint(self, model, trial):
        """transformers' checkpoint save; a failed write (disk full) is one line naming the folder."""
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        writing(folder, lambda: super(APOGRPOTrainer, self)._save_checkpoint(model, trial))

    # ---- generation batch: our advantages + the reference pass -------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # [N_global]: the same weighted sum TRL logs as `reward`; kept for group_advantages
        self._gathered_rewards = (per_func * self.reward_weights.to(per_func.device)[None]).nansum(1)
        return per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        tc = self.run_cfg.train
        G = self.num_generations
        adv = group_advantages(self._gathered_rewards.float().cpu(), G, tc.advantage, std=tc.adv_std)  # [N_global]
        n = out["prompt_ids"].shape[0]
        rank = self.accelerator.process_index
        out["advantages"] = adv[rank * n:(rank + 1) * n].to(out["prompt_ids"].device)  # this rank's rows
        t0 = time.perf_counter()
        out.update(self._reference_pass(out))
        self._metrics["train"]["timing/reference"].append(time.perf_counter() - t0)
        if self.loss_cfg.needs_anchor_old and out.get("old_per_token_logps") is not None:
            # TRL ran its old pass before the reference pass existed: gather log pi_old at the anchors
            # now (the weights have not moved since). Without TRL's old pass, _compute_loss uses the
            # forward's own gather, detached (pi_old = pi_theta).
            out["anchor_old_logp"] = self._anchor_old_pass(out)
        return out

    @torch.no_grad()
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, **extra):
        """TRL's old-policy pass (and vLLM's sampling correction) through our chunked head.

        TRL's own pass projects with its fused head under autocast, ours in the head's dtype (float32
        with model.lm_head_fp32): under bf16 they differ by up to ~0.04 nats, so w = pi_theta / pi_old
        would start an update away from 1. Through the training forward's own function, w = 1 there.
        input_ids, attention_mask [B, P + C]; returns (log-probs [B, C] (0 past each end), entropies or None, None).
        """
        if any(v is not None and v is not False for v in extra.values()):  # images, MoE aux loss: TRL's pass
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, **extra)
        n_prompt = input_ids.shape[1] - logits_to_keep
        batch = {"prompt_ids": input_ids[:, :n_prompt], "completion_ids": input_ids[:, n_prompt:],
                 "prompt_mask": attention_mask[:, :n_prompt], "completion_mask": attention_mask[:, n_prompt:]}
        logp = input_ids.new_zeros(input_ids.shape[0], logits_to_keep, dtype=torch.float32)
        ent = torch.zeros_like(logp) if compute_entropy else None
        step = batch_size or input_ids.shape[0]
        for s in range(0, input_ids.shape[0], step):
            rows = slice(s, s + step)
            st, t = self._token_stats(model, batch, rows, want_entropy=compute_entropy)
            logp[rows, :t] = st.logp.float()
            if compute_entropy:
                ent[rows, :t] = st.entropy.float()
        return logp, ent, None

    @torch.no_grad()
    def _anchor_old_pass(self, batch: dict) -> torch.Tensor:
        """log pi_old at the reference Top-K ids, [B, T, K] (-inf past each completion's end)."""
        B = batch["completion_ids"].shape[0]
        out = torch.full(batch["anchor_ids"].shape, -math.inf, device=batch["anchor_ids"].device)
        was_training = self.model.training
        self.model.eval()
        for s in range(0, B, self.args.per_device_train_batch_size):
            rows = slice(s, min(s + self.args.per_device_train_batch_size, B))
            st, t = self._token_stats(self.model, batch, rows, gather_ids=batch["anchor_ids"][rows])
            out[rows, :t] = st.gathered_logp.float()
        self.model.train(was_training)
        return out

    @torch.no_grad()
    def _reference_pass(self, batch: dict) -> dict:
        """passes.reference_pass (the native engine's too) through this trainer's forward: ref_logp
        [B, T] and, when the loss needs anchors, anchor ids / log-probs [B, T, K] and y_t in M_t."""
        if not self.loss_cfg.needs_reference:
            return {}
        B, mb = batch["completion_ids"].shape[0], self.args.per_device_train_batch_size
        # self.model, not the DDP wrapper: no gradient to sync here, and no collective that every rank
        # would have to match; ZeRO-3 / FSDP2 hooks sit on the module itself and still gather weights
        policy = self.accelerator.unwrap_model(self.model)
        was_training = self.model.training
        self.model.eval()
        def stats_of(rows, topk):
            return self._token_stats(self.model, batch, rows, topk=topk)

        out = reference_pass(self.loss_cfg, policy, stats_of, batch["completion_ids"],
                             [slice(s, min(s + mb, B)) for s in range(0, B, mb)], batch["completion_ids"].device)
        self.model.train(was_training)
        return out

    # ---- forward through the wrapped model -------------------------------------------------

    def _token_stats(self, model, batch: dict, rows, *, topk: int = 0, gather_ids=None, want_entropy=False):
        """(TokenStats, T') of `rows`, completion columns trimmed to the longest completion T'."""
        cmask = batch["completion_mask"][rows]
        t = max(int(cmask.sum(-1).max().item()), 1)
        n_prompt = batch["prompt_ids"].shape[1]
        ids = torch.cat([batch["prompt_ids"][rows], batch["completion_ids"][rows, :t]], dim=1)  # [b, P + t]
        am = torch.cat([batch["prompt_mask"][rows], cmask[:, :t]], dim=1)
        hidden = self._hidden_states(model, ids, am)  # [b, P + t, H]
        feats = hidden[:, n_prompt - 1: n_prompt - 1 + t].reshape(-1, hidden.shape[-1])  # [b*t, H] predict y_t
        g = gather_ids[:, :t] if gather_ids is not None else None
        st = chunked_token_stats(feats, self._head_fn(model), ids[:, n_prompt:], topk=topk, gather_ids=g,
                                 want_entropy=want_entropy, chunk_size=self.run_cfg.train.chunk_size)
        return st, t

    def _lm(self, model):
        return unwrap_causal_lm(self.accelerator.unwrap_model(model))

    def _hidden_states(self, model, ids, am) -> torch.Tensor:
        """Backbone's last hidden state, from a forward of the *wrapped* model (so DDP/ZeRO/FSDP hooks run)."""
        lm = self._lm(model)
        backbone = getattr(lm, lm.base_model_prefix)
        kept: dict[str, torch.Tensor] = {}

        def keep(_module, _args, output):
            kept["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

        handle = backbone.register_forward_hook(keep)
        try:
            # logits_to_keep=1: the model's own head projects a single position; ours does the rest in chunks
            model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am), use_cache=False,
                  logits_to_keep=1)
        finally:
            handle.remove()
        return kept["h"]

    def _head_fn(self, model):
        """Chunk [n, H] -> logits [n, V] / temperature, float32 (the head weight gathered under ZeRO-3/FSDP)."""
        head = self._lm(model).get_output_embeddings()
        temperature = self.run_cfg.rollout.temperature
        w, b = _full_head(head)

        def to_logits(x: torch.Tensor) -> torch.Tensor:
            # no autocast: the head runs in its own dtype (float32 under model.lm_head_fp32)
            with torch.autocast(x.device.type, enabled=False):
                z = F.linear(x.to(w.dtype), w, b)
            return z.to(torch.promote_types(z.dtype, torch.float32)) / temperature

        return to_logits

    # ---- the loss ------------------------------------------------------------------------------

    def _loss_normalisers(self, inputs: dict) -> tuple[float, float]:
        """(global_tokens, global_seqs) such that DDP's gradient mean over processes gives the
        whole-batch aggregate: TRL's "dapo" normaliser (tokens of the generation batch / processes,
        times GA / steps_per_generation = 1 here) and the same for sequences."""
        n_proc = self.accelerator.num_processes
        ga = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        scale = ga / self.args.steps_per_generation
        tokens = float(inputs["num_items_in_batch"]) / n_proc * scale
        seqs = self.args.per_device_train_batch_size * self.args.steps_per_generation * scale
        return max(tokens, 1.0), float(seqs)

    def _compute_loss(self, model, inputs):
        lc = self.loss_cfg
        rows = slice(0, inputs["completion_ids"].shape[0])
        gather = inputs["anchor_ids"] if lc.needs_anchors else None
        st, t = self._token_stats(model, inputs, rows, topk=lc.policy_topk, gather_ids=gather, want_entropy=True)
        mask = inputs["completion_mask"][:, :t]
        # TRL skips the old pass when the update is a single pass over fresh rollouts: pi_old = pi_theta
        skipped = inputs.get("old_per_token_logps") is None
        old = st.logp.detach() if skipped else inputs["old_per_token_logps"][:, :t]
        kw = loss_inputs(lc, st, inputs, lambda x: x[:, :t], old_is_current=skipped)
        if "importance_sampling_ratio" in inputs:  # vLLM sequence-level correction: one weight per completion
            kw["weights"] = inputs["importance_sampling_ratio"].reshape(-1)
        tokens, seqs = self._loss_normalisers(inputs)
        loss, metrics = policy_loss(lc, st.logp, old, inputs["advantages"], mask, global_tokens=tokens,
                                    global_seqs=seqs, **kw)
        extra = {"entropy": st.entropy.detach()}
        if "ref_logp" in inputs:  # KL(pi_old || pi_ref) on sampled tokens (k3): the native trainer's drift metric
            extra["kl"] = kl_estimate("k3", old, inputs["ref_logp"][:, :t], None)
        self._log_loss_metrics(metrics, extra, mask)
        return loss

    def _log_loss_metrics(self, metrics: dict, extra: dict, mask: torch.Tensor) -> None:
        """Token-weighted means over all processes, in one all-reduce, under the native trainer's names."""
        m = mask.bool()
        w = float(m.sum())
        names, values = [], []
        for k in sorted(metrics):
            if k in ("loss", "pg_loss", "num_tokens", "entropy"):  # entropy: from `extra`, always logged
                continue
            names.append("kl_loss_term" if k == "kl" else k)  # the loss's own KL term, as train.py names it
            values.append(metrics[k] * w)
        for k in sorted(extra):
            names.append(k)
            values.append(float(extra[k][m].double().sum()) if w else 0.0)
        stats = torch.tensor(values + [w], dtype=torch.float64, device=self.accelerator.device)
        totals = self.accelerator.reduce(stats, reduction="sum")
        if totals[-1] > 0:
            for k, v in zip(names, (totals[:-1] / totals[-1]).tolist()):
                self._metrics["train"][k].append(v)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def shard_fsdp2(model) -> None:
    """FSDP2 without accelerate: fully_shard each decoder layer, then the causal LM (embeddings, norm, head),
    as accelerate's FSDP2 TRANSFORMER_BASED_WRAP does, and mark the model prepared so accelerate
    leaves it alone (on CPU it would wrap it in DDP). For CPU tests (gloo); on GPUs use the
    accelerate config configs/accelerate/fsdp_8gpu.yaml. docs/trainer_engines.md says what differs."""
    from torch.distributed.fsdp import fully_shard

    lm = unwrap_causal_lm(model)
    for layer in getattr(lm, lm.base_model_prefix).layers:
        fully_shard(layer)
    fully_shard(lm)  # the transformers model, not the peft wrapper: generate() calls it directly
    for m in (model, lm):  # transformers' generate then runs synced (ranks finish at different lengths)
        m._is_fsdp_managed_module = True
    model._is_accelerate_prepared = True


def adapter_state_for_saving(model) -> Optional[dict]:
    """The LoRA state dict as plain full tensors when the parameters are sharded (FSDP2 DTensors,
    ZeRO-3 partitions; a collective: every process calls it), else None (save_pretrained reads the
    model itself; under ZeRO-3 it would write 0-element tensors)."""
    from peft import get_peft_model_state_dict

    params = list(model.parameters())
    if any(hasattr(p, "full_tensor") for p in params):
        return {k: _full(v).detach().cpu() for k, v in get_peft_model_state_dict(model).items()}
    lora = [p for p in params if p.requires_grad]
    if any(hasattr(p, "ds_id") for p in lora):
        import deepspeed

        with deepspeed.zero.GatheredParameters(lora):
            return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    return None


def build_trainer(cfg: RunConfig, *, fsdp2: bool = False) -> APOGRPOTrainer:
    """Model + LoRA + data + reward as the native trainer builds them, inside APOGRPOTrainer.
    The trainer carries `run_lock` (rank 0), `resume_from` and `guard` (RunGuard) for train_trl.

    fsdp2: shard the model with `shard_fsdp2` before TRL sees it (several processes, CPU tests)."""
    from accelerate import PartialState

    from apo_llm.provenance import save_resolved

    args = grpo_config(cfg, world_size())
    state = PartialState()
    lock, resume = _claim_run_dir(cfg, state)  # the native engine's run-dir guard, on rank 0 before any write
    try:
        problems, _, reward_name = load_data(cfg)  # data errors before the model loads
        window = context_window(cfg, resolve_model_path(cfg))
        check_window(cfg, window, cfg.model.name_or_path)
        # as the native trainer (train.load_base / add_lora): seeded after the build, so every process
        # starts from the same LoRA initialisation; gradient checkpointing is GRPOConfig's
        base, tokenizer, model_path = load_base(cfg, None)

        def inputs_checked():
            inputs = run_inputs(cfg, model_path, problems)
            check_inputs(cfg, resume, inputs, TRL)
            return inputs

        inputs = _on_main(state, inputs_checked)
        problems = drop_long_prompts(cfg, tokenizer, problems, window, cfg.rollout.max_new_tokens, "data")
        model = add_lora(cfg, base)
        if fsdp2:
            shard_fsdp2(model)
        set_vllm_stops(args, base)
        dataset = build_dataset(cfg, tokenizer, problems)
        if args.process_index == 0:
            start_run_dir(cfg, aside=cfg.logging.overwrite or requeued_afresh(cfg, resume))
            save_resolved(cfg, cfg.run_dir, {"model_path": model_path, "reward": reward_name, "engine": "trl",
                                             "world_size": world_size(), "resumed_from": str(resume) if resume else None})
            keep = read_trainer_state(resume, TRL)["metrics_lines"] if resume else None
            MetricsLog(cfg.run_dir, False, keep_lines=keep).close()  # resume: drop rows after the checkpoint
        state.wait_for_everyone()
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    guard = RunGuard(cfg, Preemption(), inputs)
    trainer = APOGRPOTrainer(cfg, model=model, args=args, reward_funcs=[make_reward_func(reward_name)],
                             train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[JsonlMetrics(cfg.run_dir), guard])
    guard.accelerator = trainer.accelerator
    trainer.run_lock, trainer.resume_from, trainer.guard = lock, resume, guard
    return trainer


def train_trl(cfg: RunConfig) -> dict:
    """Run `cfg` with the TRL engine; returns the summary (also summary.json), written by the main process.
    SIGTERM / SIGINT: the RL step under way is finished and checkpointed, then SystemExit(128 + signum)."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    fill_loss_norm_len(cfg)
    with Preemption() as stop:
        trainer = build_trainer(cfg)
        trainer.guard.stop = stop
        try:
            if _finished_before(cfg, trainer):
                result = _restore_finished(trainer)
            else:
                with peft_trl_deprecation_quiet():  # TRL reads the deprecated alias around every generation
                    resume = str(trainer.resume_from) if trainer.resume_from else None
                    result = trainer.train(resume_from_checkpoint=resume)
            if trainer.guard.preempted:
                _preempted(cfg, trainer, stop)
            return _finish(cfg, trainer, result)
        finally:
            if trainer.run_lock is not None:
                trainer.run_lock.release()


def _finished_before(cfg: RunConfig, trainer) -> bool:
    """A requeue of a run that already finished: its newest checkpoint is the last step. transformers'
    Trainer checks max_steps only after a step, so resuming there would train one step more whenever
    the run ends inside an epoch of TRL's sampler."""
    r = trainer.resume_from
    return r is not None and checkpoint_step(r) >= cfg.train.steps * cfg.train.ppo_epochs


def _restore_finished(trainer):
    """The finished run's weights and state from its last checkpoint, nothing trained (the native
    engine's resume of a finished run does the same)."""
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    ckpt = Path(trainer.resume_from)
    trainer._load_from_checkpoint(str(ckpt))
    trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
    log.info(f"the run already finished at {ckpt}: nothing to train")
    return TrainOutput(trainer.state.global_step, float("nan"), {})


def _preempted(cfg: RunConfig, trainer, stop: Preemption) -> None:
    """Every rank stopped after the same step (RunGuard); rank 0 says what was saved; all exit 128 + signum."""
    step = trainer.state.global_step // cfg.train.ppo_epochs
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        ckpt = latest_checkpoint(cfg.run_dir, TRL)
        if ckpt is not None and checkpoint_step(ckpt) == trainer.state.global_step:
            what = f"saved checkpoint {ckpt} (step {step} of {cfg.train.steps})"
        else:
            what = f"no checkpoint of step {step} (newest: {ckpt})"
        if stop.requested:
            stop.exit(what, resume_command())
    raise SystemExit(stop.exit_code if stop.requested else 128 + 15)  # a rank the signal did not reach


def _finish(cfg: RunConfig, trainer, result) -> dict:
    summary = {"steps": trainer.state.global_step // cfg.train.ppo_epochs, "finished": True, "engine": "trl",
               "run_dir": str(cfg.run_dir), "world_size": world_size(), "train_metrics": result.metrics, "eval": []}
    policy = trainer.accelerator.unwrap_model(trainer.model)
    adapter = adapter_state_for_saving(policy)  # on every process (FSDP2 gathers)
    if trainer.is_world_process_zero():
        policy.save_pretrained(cfg.run_dir / "adapter", state_dict=adapter)
        trainer.processing_class.save_pretrained(cfg.run_dir / "adapter")
        if cfg.logging.plots:
            from apo_llm.plots import plot_run

            summary["plots"] = [str(p) for p in plot_run(cfg.run_dir)]
        (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    trainer.accelerator.wait_for_everyone()
    return summary
