"""Estimators shared by the simulator and the LLM side: unbiased pass@k (docs/theory.md section 9)."""

from __future__ import annotations

import math
from typing import Union

import numpy as np

ArrayLike = Union[int, float, np.ndarray, list]


def _pass_at_k_scalar(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    # 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i), stable for large n
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k(n: ArrayLike, c: ArrayLike, k: int) -> Union[float, np.ndarray]:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021).

        pass@k = 1 - C(n-c, k) / C(n, k),  = 1 when n - c < k;  defined for 1 <= k <= n.

    n and c may be integers or broadcastable arrays (one entry per problem); returns a float
    or an array of floats. Raises ValueError for k > n, c > n, or negative counts.
    """
    n_arr, c_arr = np.broadcast_arrays(np.asarray(n), np.asarray(c))
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k: must be an integer >= 1, got {k!r}")
    for name, arr in (("n", n_arr), ("c", c_arr)):
        if arr.size and (np.any(arr < 0) or np.any(np.asarray(arr, dtype=float) % 1 != 0)):
            raise ValueError(f"{name}: counts must be non-negative integers, got {arr.tolist()}")
    if n_arr.size and np.any(c_arr > n_arr):
        raise ValueError(f"c: more correct samples than samples (c={c_arr.tolist()}, n={n_arr.tolist()})")
    if n_arr.size and np.any(k > n_arr):
        raise ValueError(f"k: pass@{k} is undefined with only n={int(n_arr.min())} samples (need k <= n)")
    out = np.array([_pass_at_k_scalar(int(a), int(b), int(k)) for a, b in zip(n_arr.ravel(), c_arr.ravel())])
    out = out.reshape(n_arr.shape)
    return float(out) if out.ndim == 0 else out


def pass_at_k_exact(p: ArrayLike, k: int) -> Union[float, np.ndarray]:
    """pass@k of a policy with exact success probability p: 1 - (1 - p)^k."""
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k: must be an integer >= 1, got {k!r}")
    p_arr = np.asarray(p, dtype=float)
    if not np.all((p_arr >= 0) & (p_arr <= 1)):  # written this way so NaN is rejected too
        raise ValueError(f"p: success probabilities must lie in [0, 1], got {p_arr.tolist()}")
    out = 1.0 - (1.0 - p_arr) ** k
    return float(out) if out.ndim == 0 else out
