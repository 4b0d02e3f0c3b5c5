"""Data loading: row parsers on hand-made rows, malformed-row counting, local files, synthetic task."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apo_llm import data
from apo_llm.data import (HARD_EVENTS, HELD_OUT_POOL, PROMPT_SUFFIX, TRAIN_POOL, VALIDATION_TRAIN_SEEDS, RowError,
                           gsm8k_row, load_problems, math_row, synthetic_problems)
from apo_llm.rewards import gsm8k_strict


def test_prompt_suffixes_are_verls():
    assert PROMPT_SUFFIX["gsm8k"] == 'Let\'s think step by step and output the final answer after "####".'
    assert PROMPT_SUFFIX["math"] == "Let's think step by step and output the final answer within \\boxed{}."


def test_gsm8k_row():
    row = {"question": "Tom has 1,000 pens. How many?", "answer": "He has 1,000 + 234 = <<1000+234=1234>>1234\n#### 1,234"}
    p = gsm8k_row(row, 7, "train")
    assert p.gold == "1234" and p.id == "gsm8k-train-7" and p.solution == row["answer"]
    assert p.prompt == row["question"] + " " + PROMPT_SUFFIX["gsm8k"]
    assert gsm8k_row({"question": "q", "answer": "x\n#### -3.5"}, 0, "test").gold == "-3.5"
    for bad, reason in [({"question": "q", "answer": "no marker"}, "no_####_in_answer"),
                        ({"question": "q", "answer": "#### many"}, "gold_not_a_number"),
                        ({"answer": "#### 3"}, "missing_question"),
                        ({"question": "q", "answer": None}, "missing_answer")]:
        with pytest.raises(RowError) as e:
            gsm8k_row(bad, 0, "train")
        assert e.value.reason == reason


def test_math_row_gold_is_last_box_with_nesting():
    sol = r"First \boxed{1}. Then $\boxed{\frac{\sqrt{2}}{2}}$ is the answer."
    p = math_row({"problem": "Compute.", "solution": sol}, 3, "test")
    assert p.gold == r"\frac{\sqrt{2}}{2}" and p.prompt.endswith(PROMPT_SUFFIX["math"]) and p.id == "math-test-3"
    assert math_row({"problem": "p", "solution": r"so \fbox{5}"}, 0, "train").gold == "5"
    # MATH-500 rows carry `answer` and `unique_id`
    p500 = math_row({"problem": "p", "solution": r"\boxed{2}", "answer": "2", "unique_id": "test/x/1.json"}, 0,
                    "test", "math500")
    assert p500.gold == "2" and p500.id == "test/x/1.json"
    with pytest.raises(RowError, match="no_boxed"):
        math_row({"problem": "p", "solution": "no box here"}, 0, "train")
    with pytest.raises(RowError, match="no_boxed"):
        math_row({"problem": "p", "solution": r"\boxed{unclosed"}, 0, "train")


def _fake_hub(rows):
    return lambda source, split: rows


def test_hub_sources_count_malformed_rows(monkeypatch):
    rows = [{"question": "a", "answer": "#### 1"}, {"question": "b", "answer": "oops"},
            {"question": "", "answer": "#### 2"}, {"question": "c", "answer": "#### 3"}]
    monkeypatch.setattr(data, "_load_hub", _fake_hub(rows))
    with pytest.warns(UserWarning, match="skipped"):
        problems, stats = load_problems("gsm8k", "train")
    assert [p.gold for p in problems] == ["1", "3"]
    assert stats.rows == 4 and stats.loaded == 2 and stats.n_skipped == 2
    assert stats.skipped == {"no_####_in_answer": 1, "missing_question": 1}
    assert "2 skipped" in stats.summary()


def test_hub_math_and_errors(monkeypatch):
    rows = [{"problem": "p1", "solution": r"\boxed{3}"}, {"problem": "p2", "solution": "none"}]
    monkeypatch.setattr(data, "_load_hub", _fake_hub(rows))
    with pytest.warns(UserWarning):
        problems, stats = load_problems("math", "test")
    assert len(problems) == 1 and stats.prompt_style == "math" and stats.skipped == {"no_boxed_in_solution": 1}
    monkeypatch.setattr(data, "_load_hub", _fake_hub([{"problem": "p", "solution": "none"}]))
    with pytest.raises(ValueError, match="no valid problems"), pytest.warns(UserWarning):
        load_problems("math", "test")
    monkeypatch.setattr(data, "_load_hub", _fake_hub([]))
    with pytest.raises(ValueError, match="no valid problems"):
        load_problems("gsm8k", "test")
    with pytest.raises(ValueError, match="split"):
        load_problems("math500", "train")
    with pytest.raises(ValueError, match="source"):
        load_problems("nope")
    with pytest.raises(ValueError, match="limit"):
        load_problems("synthetic", limit=0)


def test_hub_ids_are_the_real_ones():
    assert data.HUB_IDS == {"gsm8k": ("openai/gsm8k", "main"), "math": ("DigitalLearningGmbH/MATH-lighteval", None),
                            "math500": ("HuggingFaceH4/MATH-500", None)}


def test_jsonl_file_with_malformed_rows(tmp_path):
    lines = [json.dumps({"question": "q1", "answer": "work\n#### 1,500"}),
             "{not json",
             json.dumps({"question": "q2", "gold": 7}),
             json.dumps({"question": "q3", "answer": "12", "solution": "6+6"}),
             json.dumps({"answer": "4"}),
             json.dumps({"question": "q5"}),
             json.dumps([1, 2]),
             ""]
    f = tmp_path / "probs.jsonl"
    f.write_text("\n".join(lines))
    with pytest.warns(UserWarning, match="skipped"):
        problems, stats = load_problems("jsonl", path=str(f), reward="gsm8k_strict")
    assert [(p.question, p.gold) for p in problems] == [("q1", "1500"), ("q2", "7"), ("q3", "12")]
    assert problems[2].solution == "6+6" and problems[0].id == "probs-0"
    assert stats.skipped == {"invalid_json": 1, "missing_question": 1, "missing_answer_or_gold": 1,
                             "row_not_an_object": 1}
    # every skip carries its 1-based line number, and the summary shows it
    assert stats.lines == {"invalid_json": [2], "missing_question": [5], "missing_answer_or_gold": [6],
                           "row_not_an_object": [7]}
    assert "invalid_json=1 at line 2" in stats.summary() and str(f) in stats.summary()
    assert stats.rows == 7 and stats.loaded == 3
    assert stats.prompt_style == "gsm8k" and problems[0].prompt.endswith(PROMPT_SUFFIX["gsm8k"])


def test_local_math_style_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "a", "answer": r"so \boxed{\frac{1}{2}}"},
                                         {"question": "b", "answer": r"\sqrt{2}"}]), f)
    problems, stats = load_problems("parquet", path=str(f), reward="math")
    assert [p.gold for p in problems] == [r"\frac{1}{2}", r"\sqrt{2}"]
    assert stats.prompt_style == "math" and problems[0].prompt.endswith(PROMPT_SUFFIX["math"])
    forced, st2 = load_problems("parquet", path=str(f), prompt_style="gsm8k")
    assert st2.prompt_style == "gsm8k" and forced[0].prompt.endswith(PROMPT_SUFFIX["gsm8k"])
    with pytest.raises(ValueError, match="path"):
        load_problems("jsonl")
    with pytest.raises(ValueError, match="path"):
        load_problems("jsonl", path=str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no valid problems"):
        load_problems("jsonl", path=str(empty), reward="math")
    with pytest.raises(ValueError, match="prompt_style"):
        load_problems("jsonl", path=str(empty), prompt_style="chat")


def test_local_reward_is_explicit_and_misfit_rows_are_counted_by_line(tmp_path):
    """Issue 12 item 4: one non-numeric gold must not switch the file to MATH prompts and reward."""
    f = tmp_path / "g.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"q{i}", "gold": g})
                           for i, g in enumerate(["3", "5", "N/A", "8"])) + "\n")
    with pytest.raises(ValueError, match="reward"):
        load_problems("jsonl", path=str(f))  # no guess from the rows
    with pytest.warns(UserWarning, match="gold_not_a_number=1 at line 3"):
        probs, stats = load_problems("jsonl", path=str(f), reward="gsm8k_strict")
    assert [p.gold for p in probs] == ["3", "5", "8"] and stats.prompt_style == "gsm8k"
    assert all(p.prompt.endswith(PROMPT_SUFFIX["gsm8k"]) for p in probs)
    assert stats.lines == {"gold_not_a_number": [3]}
    probs, stats = load_problems("jsonl", path=str(f), reward="math")  # math compares any LaTeX: all kept
    assert len(probs) == 4 and stats.prompt_style == "math" and probs[2].prompt.endswith(PROMPT_SUFFIX["math"])


def test_shuffle_and_limit():
    base, _ = load_problems("synthetic", "train", synthetic_n=50)
    first, _ = load_problems("synthetic", "train", synthetic_n=50, limit=10)
    assert [p.id for p in first] == [p.id for p in base[:10]]
    sh1, _ = load_problems("synthetic", "train", synthetic_n=50, shuffle=True, seed=3, limit=10)
    sh2, _ = load_problems("synthetic", "train", synthetic_n=50, shuffle=True, seed=3, limit=10)
    assert [p.id for p in sh1] == [p.id for p in sh2] != [p.id for p in first]
    assert len(load_problems("synthetic", "test", limit=7)[0]) == 7


_EVENT = re.compile(r"(\w+) (buys|finds|gets|is given|wins|gives away|loses|sells|breaks|uses) "
                    r"(?:(\d+) (?:boxes|bags) of (\d+)|(\d+))")


def _answer_from_story(question: str) -> int:
    """Independent reading of the story text: start, then gains (+), losses (-), m groups of k (+m*k)."""
    total = int(re.match(r"\w+ has (\d+) ", question).group(1))
    for _, verb, m, k, n in _EVENT.findall(question):
        amount = int(m) * int(k) if m else int(n)
        total += -amount if verb in ("gives away", "loses", "sells", "breaks", "uses") else amount
    return total


@pytest.mark.parametrize("split", ["train", "validation", "test_hard"])
def test_synthetic_problems_are_consistent(split):
    problems = synthetic_problems(400, seed=1, split=split)
    orders = set()
    for p in problems:
        assert p.prompt == p.question + " " + PROMPT_SUFFIX["gsm8k"]
        assert int(p.gold) == _answer_from_story(p.question) >= 0
        lines = p.solution.split("\n")
        assert lines[-1] == f"#### {p.gold}" and gsm8k_strict(p.solution, p.gold) == 1.0
        for line in lines[:-1]:  # every worked step is correct arithmetic
            a, op, b, c = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)", line).groups()
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c) >= 0
        orders.add(tuple(line.split()[1] for line in lines[:-1] if "*" not in line))
    # several solution paths: both loss-before-gain and gain-before-loss orders occur
    def has(o, first, then):
        return first in o and then in o[o.index(first):]

    assert any(has(o, "-", "+") for o in orders) and any(has(o, "+", "-") for o in orders)
    assert len({p.gold for p in problems}) > 20  # a spread of answers, not a constant


def test_hard_split_has_one_event_more_than_any_training_problem():
    def events(p):
        return len(_EVENT.findall(p.question))

    assert max(map(events, synthetic_problems(400, 0, "train"))) == HARD_EVENTS - 1
    assert {events(p) for p in synthetic_problems(100, 0, "test_hard")} == {HARD_EVENTS}


def test_synthetic_is_deterministic_per_seed_and_split():
    a, b = synthetic_problems(20, 0, "train"), synthetic_problems(20, 0, "train")
    assert a == b
    assert [p.question for p in a] != [p.question for p in synthetic_problems(20, 0, "test")]
    assert [p.question for p in a] != [p.question for p in synthetic_problems(20, 1, "train")]
    with pytest.raises(ValueError, match="n"):
        synthetic_problems(-1, 0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_synthetic_any_seed_solutions_score_one(seed):
    for p in synthetic_problems(5, seed, "train"):
        assert int(p.gold) == _answer_from_story(p.question)
        assert gsm8k_strict(p.solution, p.gold) == 1.0


@pytest.mark.parametrize("seed", [0, 3])
def test_validation_split_is_disjoint_from_train_and_test(seed):
    """Selection reads validation, reports read test: no question may be in two of them, nor in a
    training pool the trainer draws (seeds 0 .. VALIDATION_TRAIN_SEEDS - 1, up to TRAIN_POOL problems)."""
    val = [p.question for p in synthetic_problems(HELD_OUT_POOL, seed, "validation")]
    assert len(set(val)) == len(val), "a validation question repeats"
    test = {p.question for p in synthetic_problems(HELD_OUT_POOL, seed, "test")}
    hard = {p.question for p in synthetic_problems(100, seed, "test_hard")}
    sft = {p.question for p in synthetic_problems(HELD_OUT_POOL, seed, "sft_validation")}
    assert not set(val) & (test | hard | sft)
    for s in range(VALIDATION_TRAIN_SEEDS):
        assert not set(val) & {p.question for p in synthetic_problems(TRAIN_POOL, s, "train")}, s
    # the exclusion is real: without it the stream would have drawn questions it now skips
    # (test and train share a few questions by chance: the pools overlap unless excluded)
    overlap = sum(len({p.question for p in synthetic_problems(TRAIN_POOL, s, "train")} & test)
                  for s in range(VALIDATION_TRAIN_SEEDS))
    assert overlap > 0, "no chance overlap between train and test: the test above could not fail"


def test_validation_split_is_deterministic_and_distributed_like_test():
    a, b = synthetic_problems(60, 0, "validation"), synthetic_problems(60, 0, "validation")
    assert a == b and a[:20] == synthetic_problems(20, 0, "validation")  # a smaller split is a prefix
    assert [p.id for p in a] == [f"synthetic-validation-{i}" for i in range(60)]
    loaded, _ = load_problems("synthetic", "validation", limit=60)
    assert loaded == a

    def events(ps):
        return Counter(len(_EVENT.findall(p.question)) for p in ps)

    val, test = events(synthetic_problems(400, 0, "validation")), events(synthetic_problems(400, 0, "test"))
    assert set(val) == set(test) == {1, 2, 3}  # 1-3 events like test (test_hard has 4)
    for e in (1, 2, 3):  # shares within sampling noise of the same distribution (1/2, 1/3, 1/6)
        assert abs(val[e] - test[e]) / 400 < 0.1, (e, val, test)
