"""Per-token statistics computed by the forward sweep (``return_stats=True``); they carry no gradient."""
import dataclasses
from typing import Optional

import torch

from .losses import LossSpec

# Rows of the (N_STATS, N) buffer the forward kernels fill.
STAT_ROWS = ("logprobs", "entropy", "logit_grad_norm", "target_prob", "clamped", "clipped")
N_STATS = len(STAT_ROWS)


@dataclasses.dataclass
class TokenStats:
    """fp32 tensors shaped like ``labels``; 0 at ignored tokens.

    logprobs: log p_i of the sampled token. entropy: H(π) = lse − Σ p·z. logit_grad_norm:
    ‖∂L_t/∂z‖₂ of the token's own (unreduced) loss. target_prob, clamped (LCO only): the target
    probability t = min(ρ·p_i, 1) and whether ρ·p_i ≥ 1. clipped (PPO, CISPO, PPO+LCO): 1 where a
    clip took the token's gradient away (CISPO: where its weight was capped).
    """
    logprobs: torch.Tensor
    entropy: torch.Tensor
    logit_grad_norm: torch.Tensor
    target_prob: Optional[torch.Tensor] = None
    clamped: Optional[torch.Tensor] = None
    clipped: Optional[torch.Tensor] = None

    @classmethod
    def from_rows(cls, rows, shape, spec: LossSpec):
        named = {name: rows[k].view(shape) for k, name in enumerate(STAT_ROWS)}
        if not spec.has_target:
            named["target_prob"] = named["clamped"] = None
        if not spec.can_clip:
            named["clipped"] = None
        return cls(**named)
