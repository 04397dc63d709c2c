"""ALiBi: Press, Smith & Lewis 2022, "Train Short, Test Long: Attention with Linear Biases
Enables Input Length Extrapolation" (ICLR 2022).

Scores get a static, head-specific linear penalty on distance: -m_h * (i - j) for a causal
decoder (only j <= i is attended), -m_h * |i - j| for a bidirectional encoder. Slopes are the
geometric sequence 2^(-8h/n), h = 1..n, for n a power of two; otherwise the paper's rule:
the slopes of the closest power of two p < n, then every other slope of 2p, until n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import Variant, register_variant


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head slopes m_h (float32, shape (num_heads,)) as in Press et al. 2022."""
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(closest)
    if closest != num_heads:
        slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


@register_variant
@dataclass
class Alibi(Variant):
    name = "alibi"
    heads_from_config = True
    axis = "scores"
    flag = True
    description = "Linear distance penalty per head on the attention scores; parameter-free (works by flag)."
    paper = "Press, Smith & Lewis 2022, Train Short, Test Long (ALiBi), ICLR"
    limits = (
        "A model pretrained with RoPE or learned positions needs continued training before ALiBi helps; "
        "the additive bias rules out the fused causal SDPA kernel (slower attention on CPU)."
    )

    def score_bias(
        self, module: nn.Module, num_heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool
    ) -> torch.Tensor:
        slopes = alibi_slopes(num_heads).to(q_pos.device)
        distance = (q_pos[:, None] - k_pos[None, :]).float()
        if not causal:
            distance = distance.abs()
        return -slopes[:, None, None] * distance
