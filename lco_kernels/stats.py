"""Per-row buffers the forward sweeps fill, by name: the column layouts shared by both backends,
and ``TokenStats``, the per-token statistics handed to the user (``return_stats=True``).

Each buffer is (N, K) fp32, one row per token (a row's K values are contiguous and its offset is
row × K in 64-bit arithmetic).
"""
import dataclasses
from typing import Optional

import torch

from .registry import LossSpec


def _layout(*names):
    return names, {name: k for k, name in enumerate(names)}


# What the forward keeps per row for the backward and the outputs. log_p, log_1mp, ent_mask and
# entropy are zero unless the entropy is needed (an entropy term, the entropy output, or stats).
# The order groups what a head masks: NaN rows set loss..entropy, ignored rows zero all but m, log_s.
ROW_STATE, ROW = _layout("m", "log_s", "log_p", "log_1mp", "loss", "alpha", "ent_mask", "entropy")
# Raw sweep quantities of one vocabulary shard (vocabulary-parallel use): combined across shards,
# they are all a head needs. ``owned``: 1 where the sampled label lies in this shard.
PARTIALS, PART = _layout("m", "s", "z_i", "owned", "u", "q")
# The user-facing statistics (``TokenStats`` fields, in this order).
STAT_ROWS, STAT = _layout("logprobs", "entropy", "logit_grad_norm", "target_prob", "clamped", "clipped")


@dataclasses.dataclass
class TokenStats:
    """Per-token statistics of a loss call (``return_stats=True``), from the loss's own sweep.

    fp32 tensors shaped like ``labels``, without gradient; 0 at ignored tokens, NaN on NaN rows.

    Attributes:
        logprobs: log p_i of the sampled token (of softmax(z/τ)).
        entropy: H(π) per token.
        logit_grad_norm: ‖∂L_t/∂z‖₂ of the token's own (unreduced) policy and KL terms.
        target_prob: LCO only (else None): the target probability t = min(ρ·p_i, 1).
        clamped: LCO only (else None): 1 where ρ·p_i ≥ 1 (one-hot target).
        clipped: with old log-probs (PPO, CISPO, PPO+LCO, GSPO; else None): 1 where a clip took the
            token's gradient away (CISPO: where its weight was capped).
    """
    logprobs: torch.Tensor
    entropy: torch.Tensor
    logit_grad_norm: torch.Tensor
    target_prob: Optional[torch.Tensor] = None
    clamped: Optional[torch.Tensor] = None
    clipped: Optional[torch.Tensor] = None

    @classmethod
    def from_rows(cls, stats, shape, spec: LossSpec):
        named = {name: stats[:, k].reshape(shape) for k, name in enumerate(STAT_ROWS)}
        if not spec.has_target:
            named["target_prob"] = named["clamped"] = None
        if not spec.can_clip:
            named["clipped"] = None
        return cls(**named)
