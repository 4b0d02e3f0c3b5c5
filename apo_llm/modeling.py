"""Model side of the trainer: loading, LoRA wrapping, the reference context and chunked token stats.

The one expensive primitive is `completion_token_stats`: for each completion position it returns
log pi(y_t), and optionally the Top-K of the distribution (the safe manifold M = TopK(pi_ref) when
called on the reference), the log-probs at caller-given ids (the policy at the anchors), and the
entropy. Logits are divided by the sampling temperature before the log-softmax and are formed in
chunks of positions from the backbone's last hidden states and the output embedding, so no full
[B, L, V] float32 tensor ever exists; with grad enabled each chunk is recomputed in backward
(activation checkpointing of the head) so the autograd graph does not keep them either.

The reference of a fresh adapter is the base model with the adapter switched off
(`disable_adapter()`, no second copy). When training starts from an already trained adapter, that
adapter is loaded a second time, frozen, under the name "ref" (as TRL does) and the reference pass
activates it instead.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

REF_ADAPTER = "ref"  # name of the frozen reference adapter when starting from a trained adapter
POLICY_ADAPTER = "default"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TokenStats:
    """Per-position statistics of a model on the completion block (T = L - n_prompt positions)."""

    logp: Tensor  # [B, T] log pi(target token)
    topk_ids: Optional[Tensor] = None  # [B, T, K] ids of the K most likely tokens
    topk_logp: Optional[Tensor] = None  # [B, T, K] their log-probs
    gathered_logp: Optional[Tensor] = None  # [B, T, K'] log-probs at the caller's gather_ids
    entropy: Optional[Tensor] = None  # [B, T] H(pi(. | context))


# --------------------------------------------------------------------------------------------
# Chunked log-probs / Top-K / entropy
# --------------------------------------------------------------------------------------------


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that start at 0 on the first real token of each left-padded row."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def unwrap_causal_lm(model):
    """The transformers *ForCausalLM under peft / accelerate wrappers (LoRA layers stay injected)."""
    m = model
    if hasattr(m, "module") and not hasattr(m, "get_output_embeddings"):  # DDP wrapper
        m = m.module
    if hasattr(m, "get_base_model"):  # peft PeftModel -> the injected transformers model
        m = m.get_base_model()
    return m


def _backbone_and_head(model):
    """(decoder backbone returning last_hidden_state, output embedding) or (None, None)."""
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    prefix = getattr(lm, "base_model_prefix", None)
    backbone = getattr(lm, prefix, None) if prefix else None
    if head is None or backbone is None or backbone is lm:
        return None, None
    return backbone, head


def _upcast(logits: Tensor) -> Tensor:
    """bf16/fp16 logits -> float32 for the softmax; float32/float64 stay as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunk_stats(logits: Tensor, targets: Tensor, topk: int, gather_ids: Optional[Tensor],
                 want_entropy: bool) -> tuple[Tensor, ...]:
    """Stats of one chunk of rows. logits [n, V] already divided by temperature, float32."""
    lse = torch.logsumexp(logits, dim=-1)  # [n]
    out = [logits.gather(-1, targets[:, None]).squeeze(-1) - lse]
    if topk:
        top_vals, top_ids = logits.detach().topk(topk, dim=-1)  # ids are data, not differentiated
        out += [top_ids, logits.gather(-1, top_ids) - lse[:, None]]
    if gather_ids is not None:
        out.append(logits.gather(-1, gather_ids) - lse[:, None])
    if want_entropy:
        p = torch.softmax(logits, dim=-1)
        out.append(lse - (p * logits).sum(-1))  # H = log Z - E_p[z]
    return tuple(out)


def completion_token_stats(
    model, input_ids: Tensor, attention_mask: Tensor, n_prompt: int, *, temperature: float = 1.0,
    topk: int = 0, gather_ids: Optional[Tensor] = None, want_entropy: bool = False, chunk_size: int = 1024,
) -> TokenStats:
    """Token statistics of the completion block input_ids[:, n_prompt:].

    Target y_t = input_ids[:, n_prompt + t] is scored by the logits at position n_prompt - 1 + t:
        logp_t = log softmax(z / temperature)[y_t]
    Shapes: input_ids, attention_mask [B, L]; gather_ids [B, T, K']; T = L - n_prompt.
    chunk_size = number of (row, position) pairs whose [chunk, V] logits exist at once.
    Differentiable when grad is enabled.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids/attention_mask: expected equal [B, L] shapes, got "
                         f"{list(input_ids.shape)} and {list(attention_mask.shape)}")
    B, L = input_ids.shape
    T = L - n_prompt
    if not (1 <= n_prompt <= L):
        raise ValueError(f"n_prompt: must lie in [1, L={L}], got {n_prompt}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if topk < 0 or chunk_size < 1:
        raise ValueError(f"topk/chunk_size: need topk >= 0 and chunk_size >= 1, got {topk}, {chunk_size}")
    if gather_ids is not None and (gather_ids.dim() != 3 or tuple(gather_ids.shape[:2]) != (B, T)):
        raise ValueError(f"gather_ids: expected shape [B, T, K]=[{B}, {T}, K], got {list(gather_ids.shape)}")
    targets = input_ids[:, n_prompt:]  # [B, T]
    empty = input_ids.new_zeros((B, 0))
    if T == 0:
        z = torch.zeros(B, 0, device=input_ids.device)
        return TokenStats(logp=z, topk_ids=empty[..., None].expand(B, 0, topk) if topk else None,
                          topk_logp=z[..., None].expand(B, 0, topk) if topk else None,
                          gathered_logp=z[..., None].expand(B, 0, gather_ids.shape[-1]) if gather_ids is not None
                          else None, entropy=z if want_entropy else None)

    pos = position_ids_from_mask(attention_mask)
    backbone, head = _backbone_and_head(model)
    if backbone is not None:
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                          use_cache=False).last_hidden_state  # [B, L, H]
        feats = hidden[:, n_prompt - 1: L - 1].reshape(B * T, -1)  # [B*T, H] states that predict y_t

        def to_logits(x: Tensor) -> Tensor:
            return _upcast(head(x.to(head.weight.dtype))) / temperature  # float32 head: model.lm_head_fp32
    else:  # no separable head: the model's full logits (kept in its own dtype), chunked afterwards
        logits_full = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                            use_cache=False).logits
        feats = logits_full[:, n_prompt - 1: L - 1].reshape(B * T, -1)  # [B*T, V]

        def to_logits(x: Tensor) -> Tensor:
            return _upcast(x) / temperature

    return chunked_token_stats(feats, to_logits, targets, topk=topk, gather_ids=gather_ids,
                               want_entropy=want_entropy, chunk_size=chunk_size)


def chunked_token_stats(feats: Tensor, to_logits, targets: Tensor, *, topk: int = 0,
                        gather_ids: Optional[Tensor] = None, want_entropy: bool = False,
                        chunk_size: int = 1024) -> TokenStats:
    """TokenStats from per-position features: the chunk loop shared by every forward path.

    feats [B*T, H] (hidden states that predict targets [B, T], row-major); `to_logits` maps a chunk
    [n, H] to float logits [n, V] already divided by the temperature. The TRL engine calls this
    with hidden states captured from the wrapped model's forward (apo_llm/trl_engine.py).
    """
    B, T = targets.shape
    flat_t = targets.reshape(B * T)
    flat_g = gather_ids.reshape(B * T, -1) if gather_ids is not None else None

    def run_chunk(x: Tensor, t: Tensor, g: Optional[Tensor]) -> tuple[Tensor, ...]:
        return _chunk_stats(to_logits(x), t, topk, g, want_entropy)

    pieces = []
    use_ckpt = torch.is_grad_enabled()
    for s in range(0, B * T, chunk_size):
        args = (feats[s: s + chunk_size], flat_t[s: s + chunk_size],
                flat_g[s: s + chunk_size] if flat_g is not None else None)
        # recompute the chunk's logits in backward instead of saving [chunk, V] float32 for it
        pieces.append(checkpoint(run_chunk, *args, use_reentrant=False) if use_ckpt else run_chunk(*args))
    cols = [torch.cat(c, dim=0) for c in zip(*pieces)]
    it = iter(cols)
    stats = TokenStats(logp=next(it).view(B, T))
    if topk:
        stats.topk_ids = next(it).view(B, T, topk)
        stats.topk_logp = next(it).view(B, T, topk)
    if gather_ids is not None:
        stats.gathered_logp = next(it).view(B, T, -1)
    if want_entropy:
        stats.entropy = next(it).view(B, T)
    return stats


# --------------------------------------------------------------------------------------------
# Loading and LoRA
# --------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unknown {dtype!r}; choose from {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model_and_tokenizer(
    model_name_or_path: str, *, dtype: str = "float32", device: Optional[str] = None,
    trust_remote_code: bool = False, gradient_checkpointing: bool = False,
    attn_implementation: Optional[str] = None, lm_head_fp32: bool = False,
    stop_token_ids: Sequence[int] = (), stop_on_template_eot: bool = False,
):
    """(model, tokenizer) from a hub id or local directory; pad token set (eos when missing).

    lm_head_fp32: keep the output projection in float32 (see `cast_lm_head_fp32`).
    stop_token_ids / stop_on_template_eot: extra ids that end a completion, added to the model's
    generation_config.eos_token_id (which both engines read): e.g. Qwen2.5-Math-7B lists only
    <|endoftext|> there, so without <|im_end|> a chat-formatted answer never stops.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(model_name_or_path).expanduser()
    name = str(local) if local.exists() else model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = dict(dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if device is not None:
        model.to(device)
    extra_stops = list(stop_token_ids) + (template_stop_ids(tokenizer) if stop_on_template_eot else [])
    if extra_stops:
        add_stop_ids(model, extra_stops)
    if lm_head_fp32:
        cast_lm_head_fp32(model)
    if gradient_checkpointing:
        # non-reentrant checkpointing works with a frozen base and LoRA inputs without input grads
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tokenizer


def template_stop_ids(tokenizer) -> list[int]:
    """Ids of end-of-turn special tokens that the chat template emits (<|im_end|>, <|eot_id|>, ...)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return []
    names = set(getattr(tokenizer, "all_special_tokens", [])) | set(getattr(tokenizer, "get_added_vocab", dict)())
    out = []
    for name in sorted(names):
        low = name.lower()
        if name in template and ("end" in low or "eot" in low) and "endoftext" not in low:
            out.append(int(tokenizer.convert_tokens_to_ids(name)))
    return out


def add_stop_ids(model, ids: Sequence[int]) -> None:
    """Add ids to generation_config.eos_token_id (kept as a list)."""
    gc = model.generation_config
    cur = gc.eos_token_id
    cur = [] if cur is None else [cur] if isinstance(cur, int) else list(cur)
    gc.eos_token_id = cur + [int(i) for i in ids if int(i) not in cur]


def want_lm_head_fp32(cfg) -> bool:
    """model.lm_head_fp32, where None means: on for losses with anchors (APO) under bf16/fp16.

    r_anchor divides by Z_ref, the reference mass of the safe manifold, which can be tiny: bf16
    rounding noise in the logits is amplified by 1/Z_ref (docs/method.md).
    """
    setting = cfg.model.lm_head_fp32
    if setting is None:
        return cfg.loss.needs_anchors and cfg.model.dtype != "float32"
    return bool(setting)


def cast_lm_head_fp32(model) -> None:
    """Output projection in float32: its weight is cast, and its input is cast on the way in.

    With tied embeddings the input embedding shares the weight, so its output is cast back to
    the model's dtype to keep the backbone in bf16/fp16.
    """
    head = model.get_output_embeddings()
    dtype = head.weight.dtype
    if dtype == torch.float32:
        return
    head.float()
    head.register_forward_pre_hook(lambda mod, args: (args[0].to(mod.weight.dtype), *args[1:]))
    emb = model.get_input_embeddings()
    if emb.weight is head.weight:
        emb.register_forward_hook(lambda mod, args, out: out.to(dtype))


@contextlib.contextmanager
def peft_trl_deprecation_quiet():
    """Silence the one FutureWarning that peft (PeftModel.__init__) and TRL (around generation) raise by
    reading transformers' deprecated `is_gradient_checkpointing` alias: our code uses the current API
    (`gradient_checkpointing_enable`, `is_activation_checkpointing`), the warning is theirs and would be
    printed on every run. Scoped, so no other warning is hidden and no global filter is left behind."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def wrap_lora(model, *, r: int = 16, alpha: int = 32, dropout: float = 0.0,
              target_modules: str | Sequence[str] = "all-linear", adapter_path: Optional[str] = None):
    """Add a trainable LoRA adapter ("default").

    adapter_path: start from a trained adapter; it is loaded twice, once trainable ("default") and
    once frozen ("ref") as the reference policy.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_path:
        with peft_trl_deprecation_quiet():
            peft_model = PeftModel.from_pretrained(model, adapter_path, adapter_name=POLICY_ADAPTER, is_trainable=True)
        peft_model.load_adapter(adapter_path, adapter_name=REF_ADAPTER, is_trainable=False)
        peft_model.set_adapter(POLICY_ADAPTER)
        _freeze_ref(peft_model)
        return peft_model
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    with peft_trl_deprecation_quiet():
        return get_peft_model(model, cfg)


def _freeze_ref(peft_model) -> None:
    for name, p in peft_model.named_parameters():
        if f".{REF_ADAPTER}." in name:
            p.requires_grad_(False)


def has_ref_adapter(model) -> bool:
    return REF_ADAPTER in getattr(model, "peft_config", {})


@contextlib.contextmanager
def reference_context(model) -> Iterator[None]:
    """Run the reference policy pi_ref inside this block (always under no_grad).

    Fresh adapter: the base model, `disable_adapter()`. Started from a trained adapter: the frozen
    "ref" copy of it is activated, and the trainable adapter restored afterwards.
    """
    with torch.no_grad():
        if has_ref_adapter(model):
            active = model.active_adapter
            model.set_adapter(REF_ADAPTER, inference_mode=True)
            try:
                yield
            finally:
                model.set_adapter(active)
                _freeze_ref(model)
        elif hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                yield
        else:  # a plain model is its own reference (only for tests / full fine-tuning)
            yield


def peak_memory_mb(device: Optional[torch.device] = None) -> float:
    """Peak accelerator memory (MB) when on GPU, else the process's peak resident set (MB)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    except Exception:  # pragma: no cover - non-POSIX
        return float("nan")


def git_sha(path: str | os.PathLike = ".") -> Optional[str]:
    """The repository's HEAD commit, or None outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def load_base_model(cfg) -> tuple:
    """(model, tokenizer, path) for the evaluator and Top-K coverage configs: threads, device and
    dtype defaults (bf16 on GPU, float32 on CPU), the embedded tiny model when no model is given."""
    import torch

    from apo_llm.tiny import ensure_tiny_model

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model_path = cfg.model if cfg.model is not None else str(ensure_tiny_model())
    model, tokenizer = load_model_and_tokenizer(model_path, dtype=dtype, device=device)
    return model, tokenizer, model_path
