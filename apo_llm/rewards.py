"""Verifiable rewards r(y) in {0, 1}: GSM8K strict / flexible, MATH \\boxed{} + math-verify.

    gsm8k_strict   last '#### <number>' in the last 300 characters (verl's rule), commas and $ stripped
    gsm8k_flexible last number anywhere in the completion
    math           last \\boxed{} (or \\fbox{}) content, checked by math-verify as verify(gold, pred)
    synthetic      the synthetic arithmetic task answers GSM8K-style: gsm8k_strict

Numbers compare exactly as decimals, so 8, 8.0 and 8.00 are the same answer. math-verify times out
with signal.alarm, which works only in a main thread: `score_completions` scores in the calling
thread when it is the main one, and otherwise in worker processes (each a main thread), never threads.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import threading
from concurrent.futures import ProcessPoolExecutor
from decimal import Decimal, InvalidOperation
from typing import Callable

STRICT_WINDOW = 300  # characters at the end of the completion searched by gsm8k_strict
# A number: optional sign (not a subtraction "5-3"), digits with thousands commas, optional decimals.
_NUM = r"(?:(?<![\w)\]])-)?\d[\d,]*(?:\.\d+)?"
_STRICT = re.compile(r"####\s*\$?\s*(" + _NUM + r")")
_ANY_NUM = re.compile(_NUM)


def _to_decimal(s: str) -> Decimal | None:
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def numbers_equal(pred: str | None, gold: str) -> bool:
    """True when pred and gold are the same number (8 == 8.0 == 8.00, commas/$ ignored);
    non-numeric golds fall back to exact string comparison after stripping."""
    if pred is None:
        return False
    p, g = _to_decimal(pred), _to_decimal(gold)
    if p is None or g is None:
        return pred.strip() == gold.strip()
    return p == g


def extract_strict(completion: str) -> str | None:
    """The number of the last '#### N' within the last STRICT_WINDOW characters, or None."""
    found = _STRICT.findall(completion[-STRICT_WINDOW:])
    return found[-1].rstrip(",") if found else None


def extract_flexible(completion: str) -> str | None:
    """The last number anywhere in the completion, or None."""
    found = _ANY_NUM.findall(completion)
    return found[-1].rstrip(",") if found else None


def gsm8k_strict(completion: str, gold: str) -> float:
    """1.0 iff the last '#### N' in the last 300 characters equals the gold number."""
    return float(numbers_equal(extract_strict(completion), gold))


def gsm8k_flexible(completion: str, gold: str) -> float:
    """1.0 iff the last number of the completion equals the gold number."""
    return float(numbers_equal(extract_flexible(completion), gold))


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (nested braces balanced), or of a final
    '\\boxed N' without braces; None when there is no box or its braces never close."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if i < len(text) and text[i] == " ":  # "\boxed 5": up to the next space or '$'
        m = re.match(r" +([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None  # unbalanced


FIRST_CALL_TIMEOUT_S = 30  # per process: one-time math-verify initialisation took ~7 s on a loaded CPU
_MV_WARM = False


def _math_verify_equal(gold: str, pred: str, timeout_s: float | None) -> bool:
    """math-verify: parse both as LaTeX inside $...$, then verify(gold, pred) (gold first)."""
    from math_verify import parse, verify  # lazy: pulls sympy

    global _MV_WARM
    t = None if timeout_s is None else max(1, math.ceil(timeout_s))  # signal.alarm takes whole seconds
    if not _MV_WARM and t is not None:
        t = max(t, FIRST_CALL_TIMEOUT_S)  # the first call pays sympy/ANTLR set-up: don't time it out
    _MV_WARM = True
    gold_p = parse(f"${gold}$", parsing_timeout=t)
    pred_p = parse(f"${pred}$", parsing_timeout=t)
    if not gold_p or not pred_p:
        return False
    return bool(verify(gold_p, pred_p, timeout_seconds=t))


def math_boxed(completion: str, gold: str, *, timeout_s: float | None = 5.0) -> float:
    """1.0 iff the last \\boxed{} of the completion is equivalent to gold under math-verify.

    Must run in a main thread when timeout_s is set (math-verify uses signal.alarm);
    `score_completions` arranges that. Any math-verify error counts as wrong (0.0).
    """
    pred = last_boxed(completion)
    if pred is None or not pred.strip():
        return 0.0
    if pred.strip() == gold.strip():
        return 1.0  # identical strings: skip the ~2.5 ms parse
    try:
        return float(_math_verify_equal(gold, pred, timeout_s))
    except Exception:  # parse/verify errors and timeouts are wrong answers, not crashes
        return 0.0


REWARD_FNS: dict[str, Callable[[str, str], float]] = {
    "gsm8k_strict": gsm8k_strict,
    "gsm8k_flexible": gsm8k_flexible,
    "math": math_boxed,
    "synthetic": gsm8k_strict,
}


def default_reward_for(source: str, *, prompt_style: str | None = None) -> str:
    """Reward name matching a data source's prompt suffix.

    gsm8k/synthetic -> '####' answers, math/math500 -> \\boxed{} answers. Local files
    (jsonl/parquet) need prompt_style ("gsm8k" or "math", as in DataStats.prompt_style).
    """
    table = {"gsm8k": "gsm8k_strict", "synthetic": "synthetic", "math": "math", "math500": "math"}
    if source in ("jsonl", "parquet"):
        if prompt_style not in ("gsm8k", "math"):
            raise ValueError(f"prompt_style: source={source!r} needs prompt_style 'gsm8k' or 'math' "
                             f"(DataStats.prompt_style), got {prompt_style!r}")
        return "math" if prompt_style == "math" else "gsm8k_strict"
    if source not in table:
        raise ValueError(f"source: no default reward for {source!r}; expected one of "
                         f"{sorted(table) + ['jsonl', 'parquet']}")
    return table[source]


def _score_chunk(args: tuple[str, list[str], list[str], float | None]) -> list[float]:
    name, completions, golds, timeout_s = args
    return [_score_one(name, c, g, timeout_s) for c, g in zip(completions, golds)]


def _score_one(name: str, completion: str, gold: str, timeout_s: float | None) -> float:
    if name == "math":
        return math_boxed(completion, gold, timeout_s=timeout_s)
    return REWARD_FNS[name](completion, gold)


def score_completions(name: str, completions: list[str], golds: list[str], *, timeout_s: float = 5.0,
                      num_workers: int = 2) -> list[float]:
    """Rewards for a batch: [REWARD_FNS[name](c, g) for c, g in zip(completions, golds)].

    math-verify runs with signal-based timeouts of `timeout_s` (rounded up to whole seconds): in this
    thread when it is the main thread, otherwise in `num_workers` worker processes.
    """
    if name not in REWARD_FNS:
        raise ValueError(f"name: unknown reward {name!r}; expected one of {sorted(REWARD_FNS)}")
    if len(completions) != len(golds):
        raise ValueError(f"golds: {len(golds)} golds for {len(completions)} completions")
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"timeout_s: must be > 0 or None, got {timeout_s}")
    completions, golds = [c if isinstance(c, str) else "" for c in completions], [str(g) for g in golds]
    if name != "math" or threading.current_thread() is threading.main_thread() or not completions:
        return _score_chunk((name, completions, golds, timeout_s))
    # Not the main thread: signal.alarm is unavailable here, so score in processes.
    step = math.ceil(len(completions) / num_workers)
    chunks = [(name, completions[i : i + step], golds[i : i + step], timeout_s)
              for i in range(0, len(completions), step)]
    # spawn, not fork: forking a process whose other threads (torch, tokenizers) hold locks can hang.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(num_workers, len(chunks)), mp_context=ctx) as pool:
        return [r for part in pool.map(_score_chunk, chunks) for r in part]
