"""Top-K coverage: counting against brute force, and a Llama whose predictions are known by construction."""

from __future__ import annotations

import functools
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apo_llm.topk_coverage import (
    CoverageConfig,
    build_teacher_forcing_batch,
    bucket_names,
    coverage_counts,
    coverage_report,
    parse_buckets,
    topk_hits,
)

V = 32  # vocabulary of the hand-built model


def rank_model(vocab: int = V):
    """A real LlamaForCausalLM whose next-token ranking is known by construction.

    Attention and MLP outputs are zeroed, so the last hidden state at a position is
    RMSNorm(one_hot(a)) = sqrt(V) * e_a for input token a, and the logits are
    sqrt(V) * lm_head[:, a]. With lm_head[b, a] = -((b - a - 1) mod V) the token b has rank
    (b - a - 1) mod V after a (rank 0 = the argmax), with no ties.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=vocab, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        a = torch.arange(vocab)
        model.lm_head.weight.copy_(-((a[:, None] - a[None, :] - 1) % vocab).float())  # [b, a]
    return model


@functools.lru_cache(maxsize=1)
def shared_rank_model():
    return rank_model()


def known_rank(prev: int, tok: int, vocab: int = V) -> int:
    return (tok - prev - 1) % vocab


def tokens_with_ranks(start: int, ranks: list[int], vocab: int = V) -> list[int]:
    """The token sequence after `start` whose true tokens have the given ranks."""
    out, prev = [], start
    for r in ranks:
        prev = (prev + 1 + r) % vocab
        out.append(prev)
    return out


def test_rank_model_is_what_it_claims():
    model = rank_model()
    ids = torch.arange(V)[None]  # every token once
    logits = model(input_ids=ids).logits[0]  # [V, V]
    for a in range(V):
        order = logits[a].argsort(descending=True).tolist()
        assert [known_rank(a, b) for b in order] == list(range(V))


def test_coverage_known_numbers_exactly():
    """20 solution tokens with designed ranks: 10 x rank 0, 5 x rank 2, 3 x rank 5, 2 x rank 10
    -> coverage@1 = 10/20, @4 = 15/20, @8 = 18/20, @16 = 20/20, spread over three problems of
    different lengths (padding, batching, chunking all exercised)."""
    ranks = [0] * 10 + [2] * 5 + [5] * 3 + [10] * 2
    random.Random(0).shuffle(ranks)
    split = [ranks[:3], ranks[3:11], ranks[11:]]
    prompts = [[5, 9], [7], [3, 4, 8, 2]]
    examples = [(p, tokens_with_ranks(p[-1], r)) for p, r in zip(prompts, split)]
    counts = coverage_counts(rank_model(), examples, [1, 4, 8, 16], [4], pad_id=0, batch_size=2, chunk_size=5,
                             progress=False)
    report = coverage_report(counts)
    assert report["tokens"] == 20 and report["problems"] == 3
    assert report["coverage"] == {"1": 10 / 20, "4": 15 / 20, "8": 18 / 20, "16": 1.0}
    assert report["miss_rate"]["1"] == pytest.approx(0.5)
    # position buckets 0-3 and 4+: recount from the designed ranks
    for b, (lo, hi) in enumerate([(0, 4), (4, 10**9)]):
        in_bucket = [r for seg in split for j, r in enumerate(seg) if lo <= j < hi]
        assert report["buckets"][b]["tokens"] == len(in_bucket)
        for k in (1, 4, 8, 16):
            assert report["buckets"][b]["coverage"][str(k)] == sum(r < k for r in in_bucket) / len(in_bucket)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, V - 1), min_size=1, max_size=4),
                          st.lists(st.integers(0, V - 1), min_size=0, max_size=9)), min_size=1, max_size=5),
       st.sampled_from([1, 2, 3]), st.sampled_from([1, 3, 64]))
def test_coverage_matches_construction_random(examples, batch_size, chunk_size):
    """Any prompts/solutions: counts equal the ranks known from the construction."""
    ks, edges = [1, 2, 8], [2, 5]
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead
    try:
        counts = coverage_counts(shared_rank_model(), examples, ks, edges, pad_id=0, batch_size=batch_size,
                                 chunk_size=chunk_size, progress=False)
    finally:
        torch.set_num_threads(saved)
    hits = torch.zeros(len(ks), len(edges) + 1, dtype=torch.long)
    totals = torch.zeros(len(edges) + 1, dtype=torch.long)
    for prompt, target in examples:
        prev = prompt[-1]
        for j, tok in enumerate(target):
            b = sum(j >= e for e in edges)
            totals[b] += 1
            for i, k in enumerate(ks):
                hits[i, b] += known_rank(prev, tok) < k
            prev = tok
    assert torch.equal(counts.totals, totals)
    assert torch.equal(counts.hits, hits)
    assert counts.problems == sum(len(t) > 0 for _, t in examples)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 6), st.integers(0, 10**6))
def test_topk_hits_brute_force(B, T, kmax, seed):
    g = torch.Generator().manual_seed(seed)
    vocab = 10
    topk_ids = torch.stack([torch.randperm(vocab, generator=g)[:kmax] for _ in range(B * T)]).view(B, T, kmax)
    targets = torch.randint(vocab, (B, T), generator=g)
    mask = torch.randint(2, (B, T), generator=g)
    ks, edges = sorted({1, kmax, max(1, kmax // 2)}), [3, 7]
    hits, totals = topk_hits(topk_ids, targets, mask, ks, edges)
    for b_idx in range(len(edges) + 1):
        lo, hi = ([0] + edges)[b_idx], (edges + [10**9])[b_idx]
        cells = [(b, t) for b in range(B) for t in range(lo, min(hi, T)) if mask[b, t]]
        assert totals[b_idx] == len(cells)
        for i, k in enumerate(ks):
            assert hits[i, b_idx] == sum(int(targets[b, t]) in topk_ids[b, t, :k].tolist() for b, t in cells)


def test_topk_hits_needs_enough_ids():
    with pytest.raises(ValueError, match="topk_ids"):
        topk_hits(torch.zeros(1, 2, 4, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                  torch.ones(1, 2), [8], [])


def test_teacher_forcing_layout():
    ids, mask, tmask, n_prompt = build_teacher_forcing_batch([[5, 6], [7, 8, 9]], [[1], [2, 3, 4]], pad_id=0)
    assert n_prompt == 3
    assert ids.tolist() == [[0, 5, 6, 1, 0, 0], [7, 8, 9, 2, 3, 4]]
    assert mask.tolist() == [[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert tmask.tolist() == [[1, 0, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match="prompt_ids"):
        build_teacher_forcing_batch([[]], [[1]], pad_id=0)


def test_buckets_and_config_validation():
    assert parse_buckets("16,64,256") == [16, 64, 256]
    assert bucket_names([16, 64, 256]) == ["0-15", "16-63", "64-255", "256+"]
    assert bucket_names([]) == ["0+"]
    for bad in ("64,16", "0,4", "a,b"):
        with pytest.raises(ValueError, match="buckets"):
            parse_buckets(bad)
    with pytest.raises(ValueError, match="k"):
        CoverageConfig(k="0,4").validate()
    with pytest.raises(ValueError, match="batch_size"):
        CoverageConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="solution_prefix"):
        CoverageConfig(solution_prefix="tab").validate()


def test_cli_on_tiny_model(tiny_model_dir, one_thread, tmp_path):
    """End to end on the tiny model; the counts are checked against full-logit ranks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apo_llm.data import load_problems
    from apo_llm.topk_coverage import main, tokenize_examples

    out = tmp_path / "cov"
    report = main(["--model", str(tiny_model_dir), "--dataset", "synthetic", "--limit", "6", "--k", "1,2,4,8",
                   "--buckets", "8,16", "--batch_size", "4", "--chunk_size", "32", "--out", str(out)])
    saved = json.loads((out / "topk_coverage.json").read_text())
    assert saved["coverage"] == report["coverage"]
    assert (out / "topk_coverage.md").read_text().count("\n|") >= 5
    assert (out / "topk_coverage.png").stat().st_size > 0
    cov = [saved["coverage"][k] for k in ("1", "2", "4", "8")]
    assert all(0 <= a <= b <= 1 for a, b in zip(cov, cov[1:]))
    assert sum(b["tokens"] for b in saved["buckets"]) == saved["tokens"]

    # independent check: rank of the true token from the model's full logits
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    problems, _ = load_problems("synthetic", "test", limit=6)
    examples, _ = tokenize_examples(tok, problems, "auto", 1024, False)
    hits = {k: 0 for k in (1, 2, 4, 8)}
    total = 0
    for prompt, target in examples:
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]  # [T, V] predicting target
        true = logits.gather(-1, torch.tensor(target)[:, None])
        rank = (logits > true).sum(-1)
        total += len(target)
        for k in hits:
            hits[k] += int((rank < k).sum())
    assert saved["tokens"] == total
    for k in hits:
        assert saved["coverage"][str(k)] == pytest.approx(hits[k] / total, abs=1e-12)


def test_prompts_and_targets_as_in_training(tiny_model_dir):
    """Raw prompt: the tiny model's newline prefix before the solution; chat template: the
    templated prompt and no prefix; 'on' without a template is an error."""
    from transformers import AutoTokenizer

    from apo_llm.data import synthetic_problems
    from apo_llm.prompts import format_prompts
    from apo_llm.topk_coverage import tokenize_examples

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    problems = synthetic_problems(2, 0, "test")
    problems[1].solution = None
    examples, stats = tokenize_examples(tok, problems, "auto", 1024, append_eos=True)
    assert stats["skipped_no_solution"] == 1 and len(examples) == 1
    prompt_ids, target = examples[0]
    assert prompt_ids == tok(problems[0].prompt, add_special_tokens=False)["input_ids"]
    assert target == tok("\n" + problems[0].solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with pytest.raises(ValueError, match="chat_template"):
        format_prompts(tok, ["x"], "on")

    tok.chat_template = ("{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}"
                         "{% if add_generation_prompt %}<bot>{% endif %}")
    examples, stats = tokenize_examples(tok, problems[:1], "auto", 5, append_eos=False)
    assert tok.decode(examples[0][0]) == f"<user>{problems[0].prompt}</user><bot>"
    assert examples[0][1] == tok(problems[0].solution, add_special_tokens=False)["input_ids"][:5]
    assert stats["cut_to_max_target_tokens"] == 1 and stats["solution_prefix"] == ""
    assert format_prompts(tok, ["x"], "off") == ["x"]
