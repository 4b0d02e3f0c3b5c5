"""generate_completions: layout, EOS masking, truncation, and that training log-probs are the
sampling distribution (compared with the scores `generate` itself reports)."""

from __future__ import annotations

import pytest
import torch

# one intra-op thread per test process: with pytest-xdist workers on 2 shared cores, OpenMP
# spin-waiting of several threads makes tiny matmuls 20-50x slower
torch.set_num_threads(1)

from apo_llm.modeling import completion_token_stats, load_model_and_tokenizer
from apo_llm.rollout import completion_mask_after_eos, generate_completions
from tests.llm.test_modeling import build_char_llama

PROMPTS = ["what is 3+4?", "7*8=?", "a long prompt about 12-5 ="]


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    path = build_char_llama(tmp_path_factory.mktemp("char_llama_rollout"), seed=4)
    return load_model_and_tokenizer(str(path))


def test_completion_mask_after_eos_table():
    eos = [1, 9]
    ids = torch.tensor([
        [5, 6, 1, 7, 1],  # EOS at 2: keep 0..2
        [1, 5, 5, 5, 5],  # EOS first
        [5, 6, 7, 8, 4],  # no EOS: truncated
        [5, 9, 0, 0, 0],  # second eos id
    ])
    valid = torch.tensor([[1] * 5, [1] * 5, [1] * 5, [1, 1, 0, 0, 0]])
    mask, trunc = completion_mask_after_eos(ids, eos, valid)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert trunc.tolist() == [False, False, True, False]
    # an EOS id on a padding position does not count
    mask2, trunc2 = completion_mask_after_eos(torch.tensor([[5, 1]]), eos, torch.tensor([[1, 0]]))
    assert mask2.tolist() == [[1, 0]] and trunc2.tolist() == [True]


def test_layout_masks_and_texts(char_model):
    model, tok = char_model
    G = 4
    c = generate_completions(model, tok, PROMPTS, G, max_new_tokens=24, temperature=1.0, batch_size=5, seed=0)
    N = len(PROMPTS) * G
    assert c.input_ids.shape[0] == N and c.prompt_index == [i for i in range(3) for _ in range(G)]
    T = c.input_ids.shape[1] - c.n_prompt
    assert c.completion_mask.shape == (N, T) and T <= 24
    # prompt block: left padded, the same prompt in each row of a group
    for r in range(N):
        p = PROMPTS[c.prompt_index[r]]
        row = c.input_ids[r, : c.n_prompt][c.attention_mask[r, : c.n_prompt].bool()]
        assert tok.decode(row.tolist()) == p
    assert torch.equal(c.attention_mask[:, c.n_prompt:], c.completion_mask)
    eos = tok.eos_token_id
    n_trunc = 0
    for r in range(N):
        m = c.completion_mask[r].bool()
        k = int(m.sum())
        assert m[:k].all() and not m[k:].any()  # mask is a prefix
        comp = c.input_ids[r, c.n_prompt:]
        if c.truncated[r]:
            n_trunc += 1
            assert k == 24 and eos not in comp[:k].tolist()
        else:
            assert comp[k - 1] == eos and eos not in comp[: k - 1].tolist()
            assert (comp[k:] == tok.pad_token_id).all()
        assert c.texts[r] == tok.decode(comp[:k].tolist(), skip_special_tokens=True)
    assert 0 < n_trunc < N, "the test model should produce both finished and truncated completions"


def test_seed_reproducible_and_global_rng_untouched(char_model):
    model, tok = char_model
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate_completions(model, tok, PROMPTS, 2, max_new_tokens=10, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate_completions(model, tok, PROMPTS, 2, max_new_tokens=10, seed=7, batch_size=64)
    assert torch.equal(a.input_ids, b.input_ids)
    # without a seed the global stream is used (and advanced): same state -> same samples
    torch.manual_seed(5)
    c1 = generate_completions(model, tok, PROMPTS, 2, max_new_tokens=10)
    assert not torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(5)
    c2 = generate_completions(model, tok, PROMPTS, 2, max_new_tokens=10)
    assert torch.equal(c1.input_ids, c2.input_ids)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_training_logp_equals_sampling_distribution(char_model, temperature):
    """log softmax(z / T) from completion_token_stats == the per-step log-probs generate reports.

    The model's own generation_config is poisoned with top_k / top_p / repetition penalty: the
    rollout must not inherit them.
    """
    from transformers import GenerationConfig

    model, tok = char_model
    saved = model.generation_config
    model.generation_config = GenerationConfig(top_k=3, top_p=0.5, repetition_penalty=1.5, eos_token_id=1,
                                               pad_token_id=0, bos_token_id=2)
    try:
        c = generate_completions(model, tok, PROMPTS, 3, max_new_tokens=16, temperature=temperature, seed=11)
        # the same call made by hand, asking generate for its (processed) scores
        with torch.random.fork_rng():
            torch.manual_seed(11)
            out = model.generate(input_ids=c.input_ids[:, : c.n_prompt], attention_mask=c.attention_mask[:, : c.n_prompt],
                                 generation_config=GenerationConfig(do_sample=True, temperature=temperature, top_k=0,
                                                                    top_p=1.0, repetition_penalty=1.0,
                                                                    max_new_tokens=16, eos_token_id=[1],
                                                                    pad_token_id=0),
                                 output_scores=True, return_dict_in_generate=True)
    finally:
        model.generation_config = saved
    T = out.sequences.shape[1] - c.n_prompt
    m = c.completion_mask.bool()
    assert torch.equal(out.sequences[:, c.n_prompt:][m[:, :T]], c.input_ids[:, c.n_prompt:][m])
    scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)  # [N, T]
    with torch.no_grad():
        st = completion_token_stats(model, c.input_ids, c.attention_mask, c.n_prompt, temperature=temperature)
    torch.testing.assert_close(st.logp[m], scores[m[:, :T]].to(st.logp.dtype), atol=1e-4, rtol=0)
    # and a wrong temperature is detectably different
    with torch.no_grad():
        other = completion_token_stats(model, c.input_ids, c.attention_mask, c.n_prompt, temperature=temperature + 0.5)
    assert (other.logp[m] - st.logp[m]).abs().max() > 1e-2


def test_bad_arguments(char_model):
    model, tok = char_model
    with pytest.raises(ValueError, match="prompts"):
        generate_completions(model, tok, [], 2, max_new_tokens=4)
    with pytest.raises(ValueError, match="num_samples"):
        generate_completions(model, tok, PROMPTS, 0, max_new_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        generate_completions(model, tok, PROMPTS, 2, max_new_tokens=4, temperature=0.0)


def test_select_subbatch(char_model):
    model, tok = char_model
    c = generate_completions(model, tok, PROMPTS, 2, max_new_tokens=6, seed=1)
    s = c.select([1, 4])
    assert torch.equal(s.input_ids, c.input_ids[[1, 4]]) and s.texts == [c.texts[1], c.texts[4]]
    assert s.prompt_index == [0, 2] and s.n_prompt == c.n_prompt
