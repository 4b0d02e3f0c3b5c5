"""Helper of tests/llm/test_multiprocess.py (not a test): runs `apo_llm.train.main` with the TRL engine and

    MP_MODE=dump    (under torchrun) saves each rank's LoRA weights after every optimizer step and
                    each rank's generation batch (tokens, masks, advantages, reference stats);
    MP_MODE=replay  (one process) trains on the union of the dumped batches of all ranks instead of
                    generating, saving its LoRA weights after every step.

Both use plain SGD instead of AdamW, so that equal weights mean equal gradients. MP_FSDP2=1 (dump)
shards the model with trl_engine.shard_fsdp2; MP_ZERO=2|3 (dump) runs it under DeepSpeed ZeRO-2/3 (the
config `accelerate launch` would pass, given to GRPOConfig); dump writes what wraps the model to
wrap_r<rank>.json.

Usage: MP_MODE=dump MP_DIR=DIR torchrun --standalone --nproc_per_node 2 tests/llm/mp_driver.py --config-args...
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

import apo_llm.trl_engine as te
from apo_llm import train as train_mod

MODE, DIR = os.environ["MP_MODE"], Path(os.environ["MP_DIR"])
FSDP2 = os.environ.get("MP_FSDP2") == "1"
ZERO = int(os.environ.get("MP_ZERO", "0")) if MODE == "dump" else 0
PAD_VALUE = {"prompt_ids": 0, "prompt_mask": 0, "completion_ids": 0, "completion_mask": 0, "ref_logp": 0.0,
             "anchor_ids": 0, "anchor_ref_logp": float("-inf"), "anchor_is_sampled": False}


def lora_state(trainer) -> dict:
    model = trainer.accelerator.unwrap_model(trainer.model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for _, p in named):  # ZeRO-3 partitions: gather (a collective; every rank saves)
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().cpu().clone() for n, p in named}
    # full_tensor(): FSDP2 shards (a collective; every rank saves)
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone() for n, p in named}


def wrap_report(trainer) -> dict:
    """What really holds the model: the test asserts FSDP2, not a silent DDP or undistributed run."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from apo_llm.modeling import unwrap_causal_lm

    model = trainer.model_wrapped
    params = list(model.parameters())
    return {"wrapper": type(model).__name__, "fsdp_module": isinstance(unwrap_causal_lm(model), FSDPModule),
            "ddp": isinstance(model, torch.nn.parallel.DistributedDataParallel),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "rank": trainer.accelerator.process_index, "n_params": len(params),
            "n_dtensor": sum(isinstance(p, DTensor) for p in params),
            "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
            "full_numel": sum(p.numel() for p in params)}


class SaveWeights(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def _save(self, step: int) -> None:
        rank = self.trainer.accelerator.process_index
        torch.save(lora_state(self.trainer), DIR / f"{MODE}_w_r{rank}_s{step}.pt")

    def on_train_begin(self, args, state, control, **kw):
        if MODE == "dump":
            rank = self.trainer.accelerator.process_index
            (DIR / f"wrap_r{rank}.json").write_text(json.dumps(wrap_report(self.trainer)))
        self._save(0)

    def on_step_end(self, args, state, control, **kw):
        self._save(state.global_step)


def merge(parts: list[dict]) -> dict:
    """Concatenate ranks' batches: prompts left-padded, completions right-padded to common widths."""
    out = {}
    for key, pad in PAD_VALUE.items():
        if key not in parts[0]:
            continue
        width = max(p[key].shape[1] for p in parts)
        padded = []
        for p in parts:
            x = p[key]
            extra = list(x.shape)
            extra[1] = width - x.shape[1]
            fill = torch.full(extra, pad, dtype=x.dtype)
            padded.append(torch.cat([fill, x] if key.startswith("prompt") else [x, fill], dim=1))
        out[key] = torch.cat(padded, 0)
    out["advantages"] = torch.cat([p["advantages"] for p in parts], 0)
    out["num_items_in_batch"] = parts[0]["num_items_in_batch"]  # already the count over all ranks
    return out


def patched_generate(original):
    def run(self, inputs):
        step = self.state.global_step
        if MODE == "replay":
            ranks = sorted(DIR.glob(f"dump_b_r*_s{step}.pt"))
            return merge([torch.load(p) for p in ranks])
        out = original(self, inputs)
        rank = self.accelerator.process_index
        cpu = {k: v.cpu() if torch.is_tensor(v) else v for k, v in out.items()}
        torch.save(cpu, DIR / f"dump_b_r{rank}_s{step}.pt")
        return out
    return run


def use_deepspeed(stage: int) -> None:
    """GRPOConfig(deepspeed=...) with ZeRO `stage`, batch sizes from TRL ("auto"); deepspeed's own
    process group first (accelerate launch does this; ZeRO-3 partitions already while loading)."""
    import deepspeed
    import trl

    deepspeed.init_distributed(dist_backend="gloo")
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": stage},
          "zero_allow_untested_optimizer": True}  # plain SGD (see build_with_dump)

    class WithDeepSpeed(trl.GRPOConfig):  # te.grpo_config imports trl.GRPOConfig when called
        def __init__(self, *args, **kw):
            super().__init__(*args, deepspeed=ds, **kw)

    trl.GRPOConfig = WithDeepSpeed


def main() -> None:
    build = te.build_trainer

    def build_with_dump(cfg):
        trainer = build(cfg, fsdp2=FSDP2 and MODE == "dump")
        trainer.add_callback(SaveWeights(trainer))
        # plain SGD: weights then differ only by the gradients' rounding (Adam divides by sqrt(v) and
        # blows rounding on near-zero gradients up to the learning rate)
        trainer.args.optim = "sgd"
        return trainer

    te.build_trainer = build_with_dump
    if ZERO:
        use_deepspeed(ZERO)
    te.APOGRPOTrainer._generate_and_score_completions = patched_generate(
        te.APOGRPOTrainer._generate_and_score_completions)
    train_mod.main(sys.argv[1:])


if __name__ == "__main__":
    main()
