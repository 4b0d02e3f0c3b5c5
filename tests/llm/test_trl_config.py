"""apo_llm.trl_config.EpochRepeatSampler: TRL's RepeatSampler order, and the same order at epoch e
for a fresh sampler told set_epoch(e) (what a resumed run builds)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

pytest.importorskip("trl")
from trl.trainer.utils import RepeatSampler  # noqa: E402

from apo_llm.trl_config import EpochRepeatSampler  # noqa: E402


def epochs(sampler, n: int) -> list[list[int]]:
    return [list(sampler) for _ in range(n)]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 12), repeat=st.integers(1, 3), batch=st.integers(1, 4), seed=st.integers(0, 10**6),
       resume_at=st.integers(0, 5))
def test_a_fresh_sampler_at_epoch_e_continues_the_uninterrupted_order(n, repeat, batch, seed, resume_at):
    kw = dict(mini_repeat_count=repeat, batch_size=batch, repeat_count=2, seed=seed)
    trl_order = epochs(RepeatSampler(list(range(n)), **kw), 6)
    ours = EpochRepeatSampler(list(range(n)), **kw)
    assert epochs(ours, 6) == trl_order  # without set_epoch it counts its own epochs, as TRL's does
    resumed = EpochRepeatSampler(list(range(n)), **kw)
    for e in range(resume_at, 6):
        resumed.set_epoch(e)  # what transformers does before each epoch
        assert list(resumed) == trl_order[e]
    fresh_trl = RepeatSampler(list(range(n)), **kw)
    if resume_at and n > 3 and trl_order[resume_at] != trl_order[0]:
        assert list(fresh_trl) != trl_order[resume_at]  # TRL's own sampler restarts at the first shuffle
