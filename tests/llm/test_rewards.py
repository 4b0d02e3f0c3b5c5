"""Rewards on a table of tricky completions, number-format properties, math-verify timeouts."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apo_llm import rewards
from apo_llm.rewards import (REWARD_FNS, default_reward_for, gsm8k_flexible, gsm8k_strict, last_boxed, math_boxed,
                             score_completions)

FAR = "x" * 400  # pushes an earlier '#### N' out of the strict 300-character window

# (completion, gold, strict, flexible)
GSM8K_TABLE = [
    ("3 + 5 = 8\n#### 8", "8", 1, 1),
    ("#### 8.0", "8", 1, 1),
    ("#### 8.00", "8.0", 1, 1),
    ("#### 8", "8.5", 0, 0),
    ("#### -5", "-5", 1, 1),
    ("#### 5", "-5", 0, 0),
    ("#### -5", "5", 0, 0),
    ("#### 1,234", "1234", 1, 1),
    ("#### 1234", "1,234", 1, 1),
    ("#### $1,234", "1234", 1, 1),
    ("#### $ 12.50", "12.5", 1, 1),
    ("#### 8.", "8", 1, 1),  # trailing period
    ("#### 3\n#### 8", "8", 1, 1),  # the last '####' counts
    ("#### 8\n#### 3", "8", 0, 0),
    ("#### 8" + FAR, "8", 0, 1),  # '####' outside the last 300 chars; flexible finds 8
    ("#### 8 " + "y" * 280, "8", 1, 1),  # still inside the window
    ("the answer is 8", "8", 0, 1),  # no '####'
    ("the answer is 8.", "8", 0, 1),
    ("10 - 2 = 8 apples", "8", 0, 1),
    ("5-3 = 2", "2", 0, 1),
    ("It is -7.", "-7", 0, 1),
    ("it costs $1,000.50 total", "1000.5", 0, 1),
    ("#### 8 or maybe 9", "8", 1, 0),  # strict reads '#### 8'; flexible reads 9
    ("####8", "8", 1, 1),
    ("#### eight", "8", 0, 0),
    ("", "8", 0, 0),  # empty
    ("\x00@@## ### ####", "8", 0, 0),  # garbage
    ("#### 0", "0", 1, 1),
    ("#### 007", "7", 1, 1),
]


@pytest.mark.parametrize("completion,gold,strict,flexible", GSM8K_TABLE)
def test_gsm8k_table(completion, gold, strict, flexible):
    assert gsm8k_strict(completion, gold) == strict
    assert gsm8k_flexible(completion, gold) == flexible


# (completion, gold, expected)
MATH_TABLE = [
    (r"so \boxed{\frac{1}{2}}", "0.5", 1),
    (r"so \boxed{0.5}", r"\frac{1}{2}", 1),
    (r"\boxed{\frac{1}{2}}", r"\frac12", 1),
    (r"\boxed{\frac{1}{3}}", "0.5", 0),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}", 1),  # nested braces
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1),  # equivalent form
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{2}}{2}", 0),
    (r"\boxed{1} then \boxed{2}", "2", 1),  # the last box counts
    (r"\boxed{1} then \boxed{2}", "1", 0),
    (r"\fbox{3}", "3", 1),
    (r"\boxed 7", "7", 1),
    (r"$x = \boxed{7}$.", "7", 1),
    (r"the answer is 7", "7", 0),  # missing box
    (r"\boxed{7", "7", 0),  # unbalanced
    (r"\boxed{}", "7", 0),
    ("", "7", 0),
    ("#### 7", "7", 0),
    (r"\boxed{x^2+2x+1}", r"(x+1)^2", 1),
    (r"\boxed{\left(3, \frac{\pi}{2}\right)}", r"\left( 3, \frac{\pi}{2} \right)", 1),
    (r"\boxed{\text{(C)}}", r"\text{(C)}", 1),
    (r"\boxed{@@\frac{}{}}", r"\frac{1}{2}", 0),  # garbage inside the box: wrong, no crash
]


@pytest.mark.parametrize("completion,gold,expected", MATH_TABLE)
def test_math_table(completion, gold, expected):
    assert math_boxed(completion, gold) == expected


@pytest.mark.parametrize("text,expected", [
    (r"\boxed{a}", "a"),
    (r"\boxed{\frac{1}{2}} and \boxed{\frac{\sqrt{x}}{\{y\}}}", r"\frac{\sqrt{x}}{\{y\}}"),
    (r"\fbox{b}", "b"),
    (r"\boxed{a} \fbox{b}", "b"),
    (r"\boxed 12$", "12"),
    (r"no box", None),
    (r"\boxed{unclosed {", None),
    (r"\boxed", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def _fmt_with_commas(n: int) -> str:
    return f"{n:,}"


@settings(max_examples=60, deadline=None)
@given(n=st.integers(-10**9, 10**9), filler=st.text(alphabet="abc +=\n", max_size=40),
       style=st.sampled_from(["plain", "commas", "dollar", "dot0", "period"]))
def test_strict_reads_any_number_format(n, filler, style):
    shown = {"plain": str(n), "commas": _fmt_with_commas(n), "dollar": f"${n}", "dot0": f"{n}.00",
             "period": f"{n}."}[style]
    completion = f"{filler}\n#### {shown}"
    assert gsm8k_strict(completion, str(n)) == 1.0
    assert gsm8k_strict(completion, str(n + 1)) == 0.0
    assert gsm8k_flexible(completion, str(n)) == 1.0


@settings(max_examples=40, deadline=None)
@given(a=st.integers(0, 10**6), b=st.integers(0, 10**6))
def test_flexible_takes_the_last_number(a, b):
    assert gsm8k_flexible(f"first {a} then {b}", str(b)) == 1.0
    assert gsm8k_flexible(f"first {a} then {b}", str(a)) == float(a == b)


def test_registry_and_defaults():
    assert set(REWARD_FNS) == {"gsm8k_strict", "gsm8k_flexible", "math", "synthetic"}
    assert default_reward_for("gsm8k") == "gsm8k_strict"
    assert default_reward_for("synthetic") == "synthetic"
    assert default_reward_for("math") == default_reward_for("math500") == "math"
    assert default_reward_for("jsonl", prompt_style="math") == "math"
    assert default_reward_for("parquet", prompt_style="gsm8k") == "gsm8k_strict"
    with pytest.raises(ValueError, match="prompt_style"):
        default_reward_for("jsonl")
    with pytest.raises(ValueError, match="source"):
        default_reward_for("nope")


def test_score_completions_matches_single_calls_and_validates():
    comps = [r"\boxed{\frac{1}{2}}", r"\boxed{3}", "none", "#### 4"]
    golds = ["0.5", "4", "1", "4"]
    for name in REWARD_FNS:
        assert score_completions(name, comps, golds) == [REWARD_FNS[name](c, g) for c, g in zip(comps, golds)]
    with pytest.raises(ValueError, match="name"):
        score_completions("nope", comps, golds)
    with pytest.raises(ValueError, match="golds"):
        score_completions("math", comps, golds[:2])
    with pytest.raises(ValueError, match="timeout_s"):
        score_completions("math", comps, golds, timeout_s=0)
    assert score_completions("math", [], []) == []


def test_score_completions_from_a_worker_thread_uses_processes():
    """signal.alarm is unavailable off the main thread: scoring must still work (in processes)."""
    comps, golds = [r"\boxed{\frac{1}{2}}", r"\boxed{0.3}", r"\boxed{2}"], ["0.5", "0.5", "2"]
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", score_completions("math", comps, golds)))
    thread.start()
    thread.join(timeout=120)
    assert out.get("r") == [1.0, 0.0, 1.0]


def test_math_verify_timeout_cuts_a_hanging_comparison(monkeypatch):
    """A comparison that would hang is cut by the signal-based timeout and scored 0 (the hang never finishes)."""
    import math_verify.grader

    finished = []

    def hang(*args, **kwargs):
        time.sleep(30)
        finished.append(True)  # reached only if nothing cut the comparison
        return True

    monkeypatch.setattr(math_verify.grader, "sympy_expr_eq", hang)
    pred, gold = r"\boxed{(x+1)^2}", r"x^2+2x+1"  # equal only through sympy_expr_eq (no string match)
    assert math_boxed(pred, gold, timeout_s=1) == 0.0  # the hang would have returned True (1.0)
    assert not finished
    assert rewards.score_completions("math", [pred], [gold], timeout_s=1) == [0.0]
    monkeypatch.undo()
    assert math_boxed(pred, gold, timeout_s=1) == 1.0  # the control: without the hang it is correct
