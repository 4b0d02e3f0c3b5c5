"""One decision node: the single-step dynamics that lesson 01 and the squeezing figure show.

docs/theory.md section 2: one descent step on log pi_ybar moves log pi_k by eta (pi_k - ||pi||^2 + pi_ybar)
to first order, so only tokens above ||pi||^2 - pi_ybar gain (negative squeezing).
"""

from __future__ import annotations

import torch

from apo_llm.objectives import LossConfig, policy_loss


def squeeze_step(pi: torch.Tensor, ybar: int, eta: float) -> torch.Tensor:
    """Logits after one SGD step of GRPO's policy_loss with A = -1 on the single token ybar.

    At theta = theta_old the ratio is 1 and unclipped, so the gradient of -A w is
    grad log pi_ybar = e_ybar - pi: the step is one descent step on log pi_ybar.
    """
    z = pi.log().clone().requires_grad_(True)  # logits whose softmax is pi
    logp = torch.log_softmax(z, -1)[ybar].view(1, 1)  # [B=1, T=1]
    loss, _ = policy_loss(LossConfig(name="grpo"), logp, logp.detach(), torch.tensor([-1.0], dtype=pi.dtype),
                          torch.ones(1, 1, dtype=torch.bool))
    loss.backward()
    return (z - eta * z.grad).detach()
