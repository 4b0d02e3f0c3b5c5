"""The README's loss example is code a reader will paste: it must run as printed."""

import math
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text.split("## The loss in twenty lines", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_loss_example_runs_and_backpropagates(capsys):
    code = _example()
    assert len(code.strip().splitlines()) <= 20
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own snippet
    loss, logp, anchor_logp = scope["loss"], scope["logp"], scope["anchor_logp"]
    assert math.isfinite(loss.item())
    assert logp.grad is not None and torch.isfinite(logp.grad).all() and logp.grad.abs().sum() > 0
    # the pull reaches the anchors: APO's reason to exist
    assert anchor_logp.grad is not None and anchor_logp.grad.abs().sum() > 0
    assert "pull share" in capsys.readouterr().out
