"""Problems for RLVR: GSM8K, MATH, MATH-500, a synthetic arithmetic task, local jsonl/parquet files.

Every source becomes a list of `Problem(id, question, prompt, gold, solution)`:
`prompt` = question + the task's instruction suffix (raw text; the trainer applies a chat template
when configured), `gold` = the short answer the reward function compares with.
Malformed rows are skipped and counted per reason in `DataStats`, never a crash.

The hub loaders (`datasets.load_dataset`) need network access; the row parsers they call
(`gsm8k_row`, `math_row`, `local_row`) are plain functions tested on hand-made rows.
`datasets` is imported lazily so `import apo_llm.data` stays cheap.
"""

from __future__ import annotations

import functools
import json
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from apo_llm.rewards import last_boxed

# verl's instruction suffixes (examples/data_preprocess/gsm8k.py and math_dataset.py).
PROMPT_SUFFIX: dict[str, str] = {
    "gsm8k": 'Let\'s think step by step and output the final answer after "####".',
    "math": "Let's think step by step and output the final answer within \\boxed{}.",
}

HUB_IDS = {  # source -> (hub id, config name)
    "gsm8k": ("openai/gsm8k", "main"),
    "math": ("DigitalLearningGmbH/MATH-lighteval", None),
    "math500": ("HuggingFaceH4/MATH-500", None),
}
SOURCES = ("gsm8k", "math", "math500", "synthetic", "jsonl", "parquet")
# The splits each named source has (a local file's split is only a label): a typo is refused, never
# turned into a made-up split (the synthetic generator would draw any name's own problems).
KNOWN_SPLITS = {"gsm8k": ("train", "test"), "math": ("train", "test"), "math500": ("test",),
                "synthetic": ("train", "validation", "test", "test_hard")}
FILE_SOURCES = ("jsonl", "parquet")
DATASET_NAMES = ("gsm8k", "math500", "math", "synthetic")  # the named (not file) sources

_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")


@dataclass
class Problem:
    id: str
    question: str
    prompt: str  # question + " " + instruction suffix
    gold: str  # short reference answer (a number for GSM8K, LaTeX for MATH)
    solution: str | None = None  # reference worked solution, when the source has one
    line: int | None = None  # 1-based line (jsonl) / row (parquet) of a local file, for messages


@dataclass
class DataStats:
    """What `load_problems` read: counts of loaded and skipped rows, skips per reason."""

    source: str
    split: str
    rows: int = 0  # rows read from the source (before skipping and `limit`)
    loaded: int = 0  # problems returned
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    prompt_style: str = "gsm8k"  # which PROMPT_SUFFIX the prompts carry ("gsm8k" or "math")
    lines: dict = field(default_factory=dict)  # reason -> 1-based line (jsonl) / row (parquet) numbers
    path: str | None = None  # the local file read, if any

    def skip(self, reason: str, line: int | None) -> None:
        self.skipped[reason] += 1
        if line is not None:
            self.lines.setdefault(reason, []).append(line)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        def where(k: str) -> str:
            at = self.lines.get(k, [])
            unit = "line" if self.source == "jsonl" else "row"
            plural = "s" if len(at) > 1 else ""
            return f" at {unit}{plural} {', '.join(map(str, at[:5]))}{', ...' if len(at) > 5 else ''}" if at else ""

        reasons = ", ".join(f"{k}={v}{where(k)}" for k, v in sorted(self.skipped.items())) or "none"
        name = self.path or f"{self.source}/{self.split}"
        return f"{name}: {self.loaded} problems loaded from {self.rows} rows, {self.n_skipped} skipped ({reasons})"


class RowError(ValueError):
    """A malformed row; `reason` is the short counter key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def make_prompt(question: str, style: str) -> str:
    """Raw-text prompt: the question followed by verl's instruction suffix for `style`."""
    return f"{question.strip()} {PROMPT_SUFFIX[style]}"


def gsm8k_gold(answer: str) -> str:
    """GSM8K gold: the number after the last '#### ' of the reference solution, commas removed."""
    if "####" not in answer:
        raise RowError("no_####_in_answer")
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "").rstrip(".")
    if not _NUMBER.match(gold):
        raise RowError("gold_not_a_number")
    return gold


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"missing_{key}")
    return value


def _encodable(*texts: str | None) -> None:
    """Text a tokenizer can take: JSON accepts lone surrogates ("\\ud800"), UTF-8 and tokenizers do not."""
    for t in texts:
        if t is not None:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise RowError("unencodable_text") from None


def gsm8k_row(row: dict, index: int, split: str) -> Problem:
    """openai/gsm8k row {question, answer} -> Problem (gold from '#### N')."""
    question, answer = _text(row, "question"), _text(row, "answer")
    _encodable(question, answer)
    return Problem(f"gsm8k-{split}-{index}", question, make_prompt(question, "gsm8k"), gsm8k_gold(answer), answer)


def math_row(row: dict, index: int, split: str, source: str = "math") -> Problem:
    """MATH row {problem, solution[, answer]} -> Problem; gold = `answer` field (MATH-500) else the
    content of the solution's last \\boxed{} / \\fbox{}."""
    question, solution = _text(row, "problem"), _text(row, "solution")
    _encodable(question, solution, row.get("answer") if isinstance(row.get("answer"), str) else None)
    gold = row.get("answer") if isinstance(row.get("answer"), str) and row["answer"].strip() else last_boxed(solution)
    if gold is None or not gold.strip():
        raise RowError("no_boxed_in_solution")
    pid = row.get("unique_id") or f"{source}-{split}-{index}"
    return Problem(str(pid), question, make_prompt(question, "math"), gold.strip(), solution)


def local_row(row: dict, index: int, split: str) -> tuple[str, str, str | None]:
    """Local file row {question (or problem), gold or answer[, solution]} -> (question, gold, solution).

    `gold` is used as is; an `answer` holding a GSM8K solution ('#### N') or a LaTeX solution
    (\\boxed{}) gives its final answer, any other `answer` is the gold itself.
    """
    if not isinstance(row, dict):
        raise RowError("row_not_an_object")
    question = row.get("question", row.get("problem"))
    if not isinstance(question, str) or not question.strip():
        raise RowError("missing_question")
    solution = row.get("solution") if isinstance(row.get("solution"), str) else None
    gold = row.get("gold")
    if gold is None:
        answer = row.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise RowError("missing_answer_or_gold")
        if "####" in answer:
            gold, solution = gsm8k_gold(answer), solution or answer
        elif "\\boxed" in answer or "\\fbox" in answer:
            gold, solution = last_boxed(answer), solution or answer
            if gold is None:
                raise RowError("no_boxed_in_solution")
        else:
            gold = answer
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        gold = str(gold)
    if not isinstance(gold, str) or not gold.strip():
        raise RowError("missing_answer_or_gold")
    _encodable(question, gold, solution)
    return question, gold.strip(), solution


def _is_number(s: str) -> bool:
    return bool(_NUMBER.match(s.replace(",", "")))


# ---------------------------------------------------------------------------------------------
# Synthetic task: arithmetic word problems with GSM8K-style answers ("... \n#### N").
# Several solution paths are valid (story order, or all gains first then all losses), so the
# SFT'd tiny model spreads its mass over paths: RL has something to sharpen and something to lose.
# ---------------------------------------------------------------------------------------------

_NAMES = ["Tom", "Ann", "Sam", "Mia", "Leo", "Eva", "Ben", "Zoe", "Max", "Ivy", "Dan", "Amy"]
_ITEMS = ["apples", "pens", "cards", "coins", "books", "stamps", "shells", "marbles", "eggs", "cups"]
_GAINS = ["buys {n} more", "finds {n} more", "gets {n} more", "is given {n} more", "wins {n} more"]
_LOSSES = ["gives away {n}", "loses {n}", "sells {n}", "breaks {n}", "uses {n}"]
_GROUPS = ["buys {m} boxes of {k}", "gets {m} bags of {k}"]  # gain of m * k
HARD_EVENTS = 4


def _synthetic_one(rng: random.Random, index: int, split: str) -> Problem:
    """One problem: start amount, then 1-3 events (gain, loss, or m groups of k); answer = final amount.
    Split "test_hard": always HARD_EVENTS events, one more than any train/test problem has (a harder,
    length-shifted held-out set on which the base model's pass@256 stays below 1)."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    total = rng.randint(2, 15)
    events: list[tuple[str, int, str, str | None]] = []  # (kind, amount, story text, product step)
    for _ in range(HARD_EVENTS if split == "test_hard" else rng.choice((1, 1, 1, 2, 2, 3))):
        kind = rng.choice(("gain", "gain", "loss", "loss", "group"))
        if kind == "loss" and total < 2:
            kind = "gain"
        if kind == "gain":
            n = rng.randint(1, 9)
            events.append(("gain", n, rng.choice(_GAINS).format(n=n), None))
        elif kind == "loss":
            n = rng.randint(1, min(total, 9))
            events.append(("loss", n, rng.choice(_LOSSES).format(n=n), None))
        else:
            m, k = rng.randint(2, 3), rng.randint(2, 5)
            n = m * k
            events.append(("group", n, rng.choice(_GROUPS).format(m=m, k=k), f"{m} * {k} = {n}"))
        total += n if kind != "loss" else -n
    start = total - sum(n if kind != "loss" else -n for kind, n, *_ in events)
    sentences = [f"{name} has {start} {item}."] + [f"{name} {text}." for _, _, text, _ in events]
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    steps, answer = _solution_steps(start, events, gains_first=rng.random() < 0.5)
    assert answer == total, "synthetic solution does not reach the story's total"
    solution = "\n".join(steps + [f"#### {answer}"])
    return Problem(f"synthetic-{split}-{index}", question, make_prompt(question, "gsm8k"), str(answer), solution)


def _solution_steps(start: int, events: list, gains_first: bool) -> tuple[list[str], int]:
    """Worked solution lines 'a + b = c'; groups are multiplied out first ('m * k = n').
    gains_first=True adds every gain before subtracting losses (another valid path)."""
    steps = [tpl for kind, _, _, tpl in events if kind == "group"]  # products first, any path
    order = sorted(events, key=lambda e: e[0] == "loss") if gains_first else events
    acc = start
    for kind, n, _, _ in order:
        new = acc - n if kind == "loss" else acc + n
        steps.append(f"{acc} {'-' if kind == 'loss' else '+'} {n} = {new}")
        acc = new
    return steps, acc


# Split -> name of its random stream. The tiny model's SFT early stop reads "sft_validation", which
# keeps the stream once called "validation" (so cached tiny builds stay what they were); the RL
# validation split, which selects stopping steps and arms, has a stream of its own.
_STREAMS = {"sft_validation": "validation", "validation": "rl-validation"}
# What the validation split is disjoint from, by construction (a drawn problem whose question occurs
# in one of these pools is skipped): the training pools of seeds 0 .. VALIDATION_TRAIN_SEEDS - 1 at
# the trainer's default size (and so every smaller pool: a pool is a prefix of its stream), the
# test split at its default size, and the SFT's held-out problems. test_hard (4 events) never
# overlaps a 1-3 event problem.
VALIDATION_TRAIN_SEEDS, TRAIN_POOL, HELD_OUT_POOL = 10, 2000, 500


def synthetic_problems(n: int, seed: int, split: str = "train") -> list[Problem]:
    """n synthetic word problems; deterministic in (seed, split); splits use different streams.
    Split "validation" is drawn like "test" but skips any question of `_validation_excluded(seed)`."""
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    # str seeds hash deterministically (sha512)
    rng = random.Random(f"apo-synthetic-{seed}-{_STREAMS.get(split, split)}")
    if split != "validation":
        return [_synthetic_one(rng, i, split) for i in range(n)]
    excluded, out = _validation_excluded(seed), []
    while len(out) < n:
        p = _synthetic_one(rng, len(out), split)
        if p.question not in excluded:
            excluded.add(p.question)  # no repeated question inside the split either
            out.append(p)
    return out


def _validation_excluded(seed: int) -> set[str]:
    """Questions the validation split of `seed` must not contain (a fresh set: the caller adds to it)."""
    return set(_excluded_pools(seed))


@functools.lru_cache(maxsize=4)
def _excluded_pools(seed: int) -> frozenset[str]:
    pools = [synthetic_problems(TRAIN_POOL, s, "train") for s in range(VALIDATION_TRAIN_SEEDS)]
    pools += [synthetic_problems(HELD_OUT_POOL, seed, "test"), synthetic_problems(HELD_OUT_POOL, seed, "sft_validation")]
    return frozenset(p.question for pool in pools for p in pool)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _read_local(path: str, kind: str, stats: DataStats) -> list[tuple[int, object]]:
    """[(1-based line or row number, parsed row)]; undecodable jsonl lines are counted with their number."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"path: no such file {path!r} (source={kind!r})")
    if kind == "parquet":
        import pyarrow.parquet as pq  # shipped with `datasets`

        try:
            return list(enumerate(pq.read_table(p).to_pylist(), start=1))
        except Exception as e:  # pyarrow raises its own error types for a non-parquet file
            raise ValueError(f"path: {path!r} is not a readable parquet file ({type(e).__name__})") from None
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"path: {path!r} is not UTF-8 text (byte {e.start}); expected jsonl") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError:
            stats.skip("invalid_json", n)
            stats.rows += 1
    return rows


def _load_hub(source: str, split: str):
    from datasets import load_dataset  # lazy: heavy import, and needs the hub (or its cache)

    hub_id, config = HUB_IDS[source]
    try:
        return load_dataset(hub_id, config, split=split)
    except (OSError, ValueError) as e:  # offline and not cached, or unreachable (datasets raises OSError kinds)
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise ValueError(f"source: cannot load {hub_id!r} split {split!r} ({type(e).__name__}: {first}); "
                         f"offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) it must be in the datasets cache") from None


NUMERIC_REWARDS = ("gsm8k_strict", "gsm8k_flexible", "synthetic")  # rewards that compare numbers


def local_style(reward: str | None, prompt_style: str | None) -> str:
    """Prompt suffix of a local file: given explicitly, or the one the reward reads (never guessed from rows)."""
    if prompt_style is not None:
        return prompt_style
    if reward is None:
        raise ValueError("reward: a jsonl/parquet source needs an explicit reward (gsm8k_strict | "
                         "gsm8k_flexible | math) or prompt_style; it is not guessed from the rows")
    return "math" if reward == "math" else "gsm8k"


def _local_problems(source: str, path: str, split: str, stats: DataStats, reward: str | None,
                    prompt_style: str | None) -> list[Problem]:
    """Rows of a local file -> Problems; rows that do not fit `reward` are skipped with their line."""
    rows = _read_local(path, source, stats)  # a missing file is named before a missing reward
    style = local_style(reward, prompt_style)
    numeric = reward in NUMERIC_REWARDS  # without a reward (prompt_style only) every gold is kept
    stats.prompt_style, stats.path = style, path
    stem, problems = Path(path).stem, []
    for n, row in rows:
        stats.rows += 1
        try:
            q, g, sol = local_row(row, n - 1, split)
            if numeric and not _is_number(g):
                raise RowError("gold_not_a_number")  # a number-comparing reward could never score it
        except RowError as e:
            stats.skip(e.reason, n)
            continue
        problems.append(Problem(f"{stem}-{n - 1}", q, make_prompt(q, style), g, sol, line=n))
    return problems


def load_problems(source: str, split: str = "train", *, path: str | None = None, limit: int | None = None,
                  seed: int = 0, shuffle: bool = False, synthetic_n: int | None = None,
                  prompt_style: str | None = None, reward: str | None = None) -> tuple[list[Problem], DataStats]:
    """Load problems from `source` (one of SOURCES); malformed rows are skipped, counted, warned.

    shuffle uses `seed`; `limit` keeps the first `limit` valid problems (after shuffling).
    synthetic: `synthetic_n` problems (default: limit, else 2000 train / 500 otherwise).
    jsonl/parquet: the suffix is `prompt_style` ("gsm8k" or "math") or else the one `reward` reads
    (math -> math, the others -> gsm8k); with a number-comparing reward a non-numeric gold is a
    skipped row (counted with its line number). Raises ValueError for an unknown source, a missing
    path, a local file without reward/prompt_style, or when no valid problem remains.
    """
    if source not in SOURCES:
        raise ValueError(f"source: unknown {source!r}; expected one of {SOURCES}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit: must be >= 1 or None, got {limit}")
    if prompt_style is not None and prompt_style not in PROMPT_SUFFIX:
        raise ValueError(f"prompt_style: expected one of {tuple(PROMPT_SUFFIX)} or None, got {prompt_style!r}")
    if source in KNOWN_SPLITS and split not in KNOWN_SPLITS[source]:
        raise ValueError(f"split: {source} has the splits {', '.join(KNOWN_SPLITS[source])}, got {split!r}")
    stats = DataStats(source, split, prompt_style="math" if source in ("math", "math500") else "gsm8k")
    problems: list[Problem] = []
    if source == "synthetic":
        n = synthetic_n if synthetic_n is not None else (limit or (2000 if split == "train" else 500))
        problems = synthetic_problems(n, seed, split)
        stats.rows = len(problems)
    elif source in ("jsonl", "parquet"):
        if not path:
            raise ValueError(f"path: source={source!r} needs path= to a local file")
        problems = _local_problems(source, path, split, stats, reward, prompt_style)
    else:
        for i, row in enumerate(_load_hub(source, split)):
            stats.rows += 1
            try:
                problems.append(gsm8k_row(row, i, split) if source == "gsm8k" else math_row(row, i, split, source))
            except RowError as e:
                stats.skipped[e.reason] += 1
    if shuffle:
        random.Random(seed).shuffle(problems)
    if limit is not None:
        problems = problems[:limit]
    stats.loaded = len(problems)
    if stats.n_skipped:
        warnings.warn(f"load_problems: skipped malformed rows: {stats.summary()}", stacklevel=2)
    if not problems:
        key = "path" if stats.path else "source"
        raise ValueError(f"{key}: no valid problems in {stats.path or source!r} split={split!r} ({stats.summary()})")
    return problems, stats


# --------------------------------------------------------------------------------------------
# Dataset specs of the command-line tools (apo_llm.evaluate, apo_llm.topk_coverage)
# --------------------------------------------------------------------------------------------


def parse_dataset(spec: str) -> tuple[str, Optional[str]]:
    """'gsm8k' -> ('gsm8k', None); 'jsonl:data/x.jsonl' -> ('jsonl', 'data/x.jsonl')."""
    source, sep, path = spec.partition(":")
    if source in FILE_SOURCES:
        if not sep or not path:
            raise ValueError(f"dataset: {source} needs a path, as in '{source}:PATH'")
        return source, path
    if source in DATASET_NAMES and not sep:
        return source, None
    raise ValueError(f"dataset: {spec!r} is not one of {DATASET_NAMES} or jsonl:PATH / parquet:PATH")


def load_eval_problems(dataset: str, split: str, limit: Optional[int], reward: Optional[str] = None,
                       prompt_style: Optional[str] = None) -> tuple[list, Any]:
    """(problems, DataStats) of a dataset spec; an empty result or duplicate ids are clear errors.
    A jsonl/parquet file needs `reward`: it picks the prompt suffix and which rows fit."""
    source, path = parse_dataset(dataset)
    if path is not None and not Path(path).exists():
        raise ValueError(f"dataset: file {path!r} does not exist")
    if path is not None and reward is None and prompt_style is None:
        raise ValueError(f"reward: --dataset {source}:PATH needs --reward (gsm8k_strict | gsm8k_flexible | math)")
    try:
        problems, stats = load_problems(source, split, path=path, limit=limit, reward=reward,
                                       prompt_style=prompt_style)
    except ValueError as e:
        raise ValueError(f"dataset: {e}") from None
    if not problems:
        raise ValueError(f"dataset: {dataset!r} (split {split!r}) gave no problems")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError(f"dataset: {dataset!r} has duplicate problem ids; they are the resume key")
    return problems, stats
