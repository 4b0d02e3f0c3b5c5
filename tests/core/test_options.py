"""apo_llm.options, the one command-line parser: values survive a round trip through their flag
spelling, every mistake is one line naming the flag, YAML sits under flags, dash spellings warn."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
from hypothesis import given, settings, strategies as st

from apo_llm.options import UserError, help_text, option, parse_argv, parse_command


@dataclass
class Section:
    lr: float = option(1e-3, "learning rate")
    betas: list[float] = option([0.9, 0.999], "two numbers")
    cap: Optional[float] = option(None, "may be inf", allow_inf=True)
    on: bool = option(False, "a switch")


@dataclass
class Nested:
    train: Section = field(default_factory=Section)
    other: Section = field(default_factory=Section)


@dataclass
class Flat:
    n: int = option(3, "a count")
    name: Optional[str] = option(None, "a name")
    items: list[str] = option([], "a list")
    mode: str = option("exact", "a choice", choices=("exact", "sampled"))
    kind: Literal["a", "b"] = option("a", "a Literal")
    quick: bool = option(False, "a switch")
    batch_size: int = option(8, "an underscored name")


def parse(cls, *argv):
    return parse_command(cls, list(argv), prog="prog")


@settings(max_examples=60, deadline=None)
@given(n=st.integers(-10**6, 10**6), items=st.lists(st.text("abcxyz_.", min_size=1, max_size=5), max_size=4),
       quick=st.booleans(), lr=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))
def test_values_survive_their_flag_spelling(n, items, quick, lr):
    args = ["--n", str(n), "--items", *items] + (["--quick"] if quick else [])
    got = parse(Flat, *args)
    assert (got.n, got.items, got.quick) == (n, items, quick)
    assert parse(Nested, "--train.lr", repr(lr)).train.lr == lr
    assert parse(Flat, f"--n={n}").n == n
    assert parse(Flat, "--items", ",".join(items)).items == items  # one token, comma separated


def test_sections_lists_and_inf():
    cfg = parse(Nested, "--train.betas", "0.8,0.9", "--other.on", "--train.cap", "inf")
    assert cfg.train.betas == [0.8, 0.9] and cfg.other.on and math.isinf(cfg.train.cap)
    assert cfg.other.lr == 1e-3 and cfg.train.on is False  # untouched fields keep their defaults
    assert parse(Nested, "--train.betas", "[0.5, 0.6]").train.betas == [0.5, 0.6]
    assert parse(Flat, "--items").items == []
    assert parse(Flat, "--name", "none").name is None and parse(Flat, "--quick", "false").quick is False


@pytest.mark.parametrize("argv, message", [
    (["--n", "x"], "n: expected an integer, got 'x'"),
    (["--n", "1.5"], "n: expected an integer"),
    (["--n"], "n: missing value"),
    (["--mode", "other"], "mode: choose from exact, sampled, got 'other'"),
    (["--kind", "c"], "kind: choose from a, b, got 'c'"),
    (["--quick", "maybe"], "quick: expected a boolean"),
    (["--nope", "1"], "nope: unknown option; choose from"),
    (["stray"], "stray: unexpected argument"),
])
def test_flat_mistakes_are_one_line_naming_the_flag(argv, message):
    with pytest.raises(UserError) as e:
        parse(Flat, *argv)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--train.lr", "nan"], "train.lr: expected a finite number"),
    (["--other.lr", "inf"], "other.lr: expected a finite number"),
    (["--train.nope", "1"], "train.nope: unknown field; choose from ['betas', 'cap', 'lr', 'on']"),
    (["--nope.lr", "1"], "nope: unknown config section (command line)"),
    (["--lr", "1"], "lr: expected --section.field"),
])
def test_nested_mistakes_name_section_and_field(argv, message):
    with pytest.raises(UserError, match=None) as e:
        parse(Nested, *argv)
    assert message in str(e.value)


def test_yaml_sits_under_flags_and_bases_chain(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  lr: 0.5\n  'on': true\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\ntrain:\n  lr: 0.25\n")
    cfg = parse(Nested, "--config", str(tmp_path / "run.yaml"))
    assert (cfg.train.lr, cfg.train.on) == (0.25, True)  # the file over its base, field by field
    assert parse(Nested, "--config", str(tmp_path / "run.yaml"), "--train.lr", "0.125").train.lr == 0.125
    (tmp_path / "yes.yaml").write_text("train:\n  on: true\n")  # YAML 1.1: the key `on` is the boolean True
    with pytest.raises(UserError, match="train.True: unknown field .YAML reads an unquoted on/off/yes/no key"):
        parse(Nested, "--config", str(tmp_path / "yes.yaml"))
    (tmp_path / "bad.yaml").write_text("train:\n  lr: [\n")
    with pytest.raises(UserError, match=r"bad.yaml: line \d+, column \d+: YAML syntax error"):
        parse(Nested, "--config", str(tmp_path / "bad.yaml"))


def test_dash_spelling_works_with_one_deprecation_line(capsys):
    assert parse(Flat, "--batch-size", "16").batch_size == 16
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: --batch-size is deprecated; use --batch_size (the dash spelling goes in the next release)"]
    assert parse(Flat, "--batch_size", "16").batch_size == 16 and capsys.readouterr().err == ""


def test_aliases_and_help(capsys):
    raw = parse_argv(Nested, ["--rate", "0.1"], aliases={"rate": "train.lr"})[1]
    assert raw == {"train": {"lr": "0.1"}}
    text = help_text(Flat, "prog", "what it does")
    for f in ("--n", "--items", "--mode", "--kind", "--quick", "--batch_size"):
        assert f"  {f} (default " in text
    assert "a choice" in text and "what it does" in text
    with pytest.raises(SystemExit) as e:
        parse(Flat, "--help")
    assert e.value.code == 0 and "--batch_size (default 8)" in capsys.readouterr().out
