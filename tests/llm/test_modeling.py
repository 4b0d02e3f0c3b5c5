"""completion_token_stats against full-softmax computations; reference context; LoRA wrapping.

The models here are tiny random Llamas with a character-level tokenizer built by the tests
(about a second); the SFT-trained tiny model of apo_llm.tiny is exercised by the trainer tests.
"""

from __future__ import annotations

import copy

import pytest
import torch

# one intra-op thread per test process: with pytest-xdist workers on 2 shared cores, OpenMP
# spin-waiting of several threads makes tiny matmuls 20-50x slower
torch.set_num_threads(1)

from apo_llm.modeling import (
    REF_ADAPTER, TokenStats, completion_token_stats, has_ref_adapter, load_model_and_tokenizer,
    position_ids_from_mask, reference_context, wrap_lora,
)

CHARS = list("0123456789+-*=#?. abcdefghijklmnopqrstuvwxyz")


def build_char_llama(path, seed: int = 0, hidden: int = 32, layers: int = 2):
    """Save a random LlamaConfig model + character-level tokenizer (pad=0, eos=1, bos=2) at path."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger logits than the 0.02 init, so distributions are far from uniform
        model.get_output_embeddings().weight.mul_(25.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def char_model_dir(tmp_path_factory):
    return build_char_llama(tmp_path_factory.mktemp("char_llama"))


def _batch(tokenizer, prompts, completions):
    """Left-padded prompt block + right-padded completion block, as Completions lays it out."""
    tokenizer.padding_side = "left"
    p = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = "right"
    c = tokenizer(completions, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = torch.cat([p["input_ids"], c["input_ids"]], 1)
    mask = torch.cat([p["attention_mask"], c["attention_mask"]], 1)
    return ids, mask, p["input_ids"].shape[1], c["attention_mask"]


def _full_logprobs(model, ids, mask, n_prompt, temperature):
    """Independent computation: full [B, L, V] logits in float64, log-softmax, slice."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    return torch.log_softmax(logits.double()[:, n_prompt - 1: -1] / temperature, -1)  # [B, T, V]


PROMPTS = ["what is 3+4?", "7*8=?", "a long prompt about 12-5 ="]
COMPLETIONS = ["7#", "56 is it", "7"]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_stats_match_full_softmax(char_model_dir, temperature):
    model, tok = load_model_and_tokenizer(str(char_model_dir))
    ids, mask, n_prompt, cmask = _batch(tok, PROMPTS, COMPLETIONS)
    gather = torch.randint(0, model.config.vocab_size, (ids.shape[0], ids.shape[1] - n_prompt, 3))
    with torch.no_grad():
        st = completion_token_stats(model, ids, mask, n_prompt, temperature=temperature, topk=5,
                                    gather_ids=gather, want_entropy=True, chunk_size=4)
    full = _full_logprobs(model, ids, mask, n_prompt, temperature)
    m = cmask.bool()
    ref_logp = full.gather(-1, ids[:, n_prompt:, None]).squeeze(-1)
    torch.testing.assert_close(st.logp.double()[m], ref_logp[m], atol=2e-5, rtol=0)
    top_vals, top_ids = full.topk(5, dim=-1)
    assert torch.equal(st.topk_ids[m], top_ids[m])
    torch.testing.assert_close(st.topk_logp.double()[m], top_vals[m], atol=2e-5, rtol=0)
    torch.testing.assert_close(st.gathered_logp.double()[m], full.gather(-1, gather)[m], atol=2e-5, rtol=0)
    ent = -(full.exp() * full).sum(-1)
    torch.testing.assert_close(st.entropy.double()[m], ent[m], atol=2e-5, rtol=0)


def test_left_padding_does_not_change_logp(char_model_dir):
    """A prompt scored alone equals the same prompt scored left-padded next to a longer one."""
    model, tok = load_model_and_tokenizer(str(char_model_dir))
    ids, mask, n_prompt, cmask = _batch(tok, PROMPTS, COMPLETIONS)
    ids1, mask1, n1, cmask1 = _batch(tok, PROMPTS[:1], COMPLETIONS[:1])
    with torch.no_grad():
        both = completion_token_stats(model, ids, mask, n_prompt).logp
        alone = completion_token_stats(model, ids1, mask1, n1).logp
    k = int(cmask1.sum())
    torch.testing.assert_close(both[0, :k], alone[0, :k], atol=1e-5, rtol=0)


def test_chunking_and_fallback_equal_unchunked(char_model_dir):
    model, tok = load_model_and_tokenizer(str(char_model_dir))
    ids, mask, n_prompt, _ = _batch(tok, PROMPTS, COMPLETIONS)

    class LogitsOnly(torch.nn.Module):  # no backbone / output embedding: the fallback path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            return self.inner(**kw)

    with torch.no_grad():
        outs = [completion_token_stats(m, ids, mask, n_prompt, topk=4, want_entropy=True, chunk_size=c)
                for m, c in [(model, 10_000), (model, 1), (model, 7), (LogitsOnly(model), 5)]]
    for o in outs[1:]:
        torch.testing.assert_close(o.logp, outs[0].logp, atol=1e-5, rtol=0)
        assert torch.equal(o.topk_ids, outs[0].topk_ids)
        torch.testing.assert_close(o.entropy, outs[0].entropy, atol=1e-5, rtol=0)


def test_gradient_of_chunked_logp_matches_full(char_model_dir):
    """Chunks are recomputed in backward (checkpointed head); the gradient must not change."""
    model, tok = load_model_and_tokenizer(str(char_model_dir))
    model = model.double()
    ids, mask, n_prompt, cmask = _batch(tok, PROMPTS, COMPLETIONS)
    w = torch.randn(ids.shape[0], ids.shape[1] - n_prompt, dtype=torch.float64) * cmask
    gather = torch.randint(0, model.config.vocab_size, (ids.shape[0], ids.shape[1] - n_prompt, 2))

    def grads(fn):
        model.zero_grad()
        fn().backward()
        return [p.grad.clone() for p in model.parameters()]

    def chunked():
        st = completion_token_stats(model, ids, mask, n_prompt, temperature=0.8, gather_ids=gather, chunk_size=3)
        return (w * st.logp).sum() + st.gathered_logp.exp().sum()

    def full():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        lp = torch.log_softmax(logits[:, n_prompt - 1: -1] / 0.8, -1)
        return (w * lp.gather(-1, ids[:, n_prompt:, None]).squeeze(-1)).sum() + lp.gather(-1, gather).exp().sum()

    for a, b in zip(grads(chunked), grads(full)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_bad_inputs_raise(char_model_dir):
    model, tok = load_model_and_tokenizer(str(char_model_dir))
    ids, mask, n_prompt, _ = _batch(tok, PROMPTS, COMPLETIONS)
    with pytest.raises(ValueError, match="n_prompt"):
        completion_token_stats(model, ids, mask, 0)
    with pytest.raises(ValueError, match="temperature"):
        completion_token_stats(model, ids, mask, n_prompt, temperature=0.0)
    with pytest.raises(ValueError, match="gather_ids"):
        completion_token_stats(model, ids, mask, n_prompt, gather_ids=torch.zeros(1, 1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        completion_token_stats(model, ids, mask[:, 1:], n_prompt)
    with pytest.raises(ValueError, match="dtype"):
        load_model_and_tokenizer(str(char_model_dir), dtype="fp8")


def _perturb_lora(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and f".{REF_ADAPTER}." not in n:
                p.add_(0.3 * torch.randn_like(p))


def test_reference_is_base_model_with_adapter_disabled(char_model_dir):
    base, tok = load_model_and_tokenizer(str(char_model_dir))
    ids, mask, n_prompt, cmask = _batch(tok, PROMPTS, COMPLETIONS)
    with torch.no_grad():
        base_st = completion_token_stats(base, ids, mask, n_prompt, topk=8)
    model = wrap_lora(copy.deepcopy(base), r=4, alpha=8)
    assert not has_ref_adapter(model)
    _perturb_lora(model)  # the policy moves away from the base ...
    m = cmask.bool()
    with torch.no_grad():
        pol = completion_token_stats(model, ids, mask, n_prompt)
    assert (pol.logp[m] - base_st.logp[m]).abs().max() > 1e-3
    with reference_context(model):  # ... but the reference stays the base model
        ref = completion_token_stats(model, ids, mask, n_prompt, topk=8)
    torch.testing.assert_close(ref.logp[m], base_st.logp[m], atol=1e-6, rtol=0)
    assert torch.equal(ref.topk_ids[m], base_st.topk_ids[m])
    assert not ref.logp.requires_grad
    # the adapter is active again afterwards and still trainable
    with torch.no_grad():
        again = completion_token_stats(model, ids, mask, n_prompt)
    torch.testing.assert_close(again.logp, pol.logp)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_reference_is_frozen_copy_of_starting_adapter(char_model_dir, tmp_path):
    base, tok = load_model_and_tokenizer(str(char_model_dir))
    ids, mask, n_prompt, cmask = _batch(tok, PROMPTS, COMPLETIONS)
    trained = wrap_lora(copy.deepcopy(base), r=4, alpha=8)
    _perturb_lora(trained, seed=2)
    trained.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        start_st = completion_token_stats(trained, ids, mask, n_prompt, topk=8)

    model = wrap_lora(copy.deepcopy(base), adapter_path=str(tmp_path / "adapter"))
    assert has_ref_adapter(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{REF_ADAPTER}." not in n for n in trainable)
    m = cmask.bool()
    with torch.no_grad():
        torch.testing.assert_close(completion_token_stats(model, ids, mask, n_prompt).logp[m], start_st.logp[m],
                                   atol=1e-6, rtol=0)
    _perturb_lora(model, seed=3)  # train the policy adapter only
    with reference_context(model):
        ref = completion_token_stats(model, ids, mask, n_prompt, topk=8)
    torch.testing.assert_close(ref.logp[m], start_st.logp[m], atol=1e-6, rtol=0)
    assert torch.equal(ref.topk_ids[m], start_st.topk_ids[m])
    with torch.no_grad():
        pol = completion_token_stats(model, ids, mask, n_prompt)
    assert (pol.logp[m] - start_st.logp[m]).abs().max() > 1e-3
    trainable_after = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_after == trainable


def test_tokenstats_is_a_plain_dataclass():
    st = TokenStats(logp=torch.zeros(2, 3))
    assert st.topk_ids is None and st.entropy is None
