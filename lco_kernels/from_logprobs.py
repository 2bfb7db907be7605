"""LCO from per-token log-probs, for policy-loss hooks that only see those (verl's
``register_policy_loss``, TRL's ``per_token_logps``).

The loss is the fused kernel's own head (torch_heads.py) applied to the given log-probs: it maps
d = log p_i − log(1 − p_i) to (loss, α) with α = −(∂L/∂log p_i)·(1 − p_i), so ∂L/∂log p_i is
−α / (1 − p_i) (+ β·∂KL/∂log p_i), and the backward of whatever produced log p_i multiplies it by
(e_i − p). log(1 − p_i) is log(−expm1(log p_i)) (log1p(−p_i) for small p_i), never 1 − p_i by
subtraction. Fed by ``token_logprobs`` — which keeps log p_i's digits for confident tokens and takes
1 − p_i from the log domain in its backward — this equals ``lco_loss`` to rounding; fed by
``log_softmax``, it inherits log_softmax's rounding (docs/logprob-form.md measures both).
"""
import math

import torch

from ._plumbing import loss_spec
from ._validation import check_options, label_check_reads_device, per_token
from .autograd import compute_dtype, refuse_double_backward
from .reductions import token_weights
from .registry import EPSILON, RHO_NEG, RHO_POS
from .stats import TokenStats
from .torch_heads import _kl_term, _policy_term


def log1mexp(x):
    """log(1 − e^x) for x ≤ 0 to full precision (Mächler 2012): expm1 near 0, log1p below −log 2."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class _HeadOnLogprobs(torch.autograd.Function):
    """Per-token loss of ``spec`` from log p_i; backward: upstream × ∂L/∂log p_i."""

    @staticmethod
    def forward(ctx, log_p, advantages, old_logprobs, ref_logprobs, spec):
        log_1mp = log1mexp(log_p)
        loss, alpha, target, clamped, clipped = _policy_term(log_p - log_1mp, log_p, log_1mp, advantages,
                                                             old_logprobs, spec)
        if clipped is None:  # no old log-probs: nothing is clipped
            clipped = torch.zeros_like(clamped)
        # the policy term's α is −(∂L/∂log p_i)·(1 − p_i); where α = 0 so is the derivative (also at p_i = 1)
        dloss = torch.where(alpha == 0, 0.0, -alpha / log_1mp.exp())
        if spec.has_ref:
            kl, dkl = _kl_term(log_p, ref_logprobs, spec.kl_type)
            loss = loss + spec.beta * kl
            dloss = dloss + spec.beta * dkl
        # log p_i = 0 is p_i = 1: no mass elsewhere to move (SPEC §1): LCO's loss and gradient are 0
        only_option = log_p == 0
        loss = torch.where(only_option, 0.0, loss)
        dloss = torch.where(only_option, 0.0, dloss)
        # a NaN or infinite input makes its own row NaN (SPEC §1), never another's
        nan_row = log_p.isnan() | ~advantages.isfinite()
        for t in (old_logprobs, ref_logprobs):
            if t is not None:
                nan_row = nan_row | t.isnan()
        loss = torch.where(nan_row, torch.nan, loss)
        ctx.save_for_backward(torch.where(nan_row, torch.nan, dloss))
        ctx.mark_non_differentiable(target, clamped, clipped)
        return loss, target, clamped, clipped

    @staticmethod
    def backward(ctx, grad_loss, *_):
        refuse_double_backward()  # the saved derivative carries no graph: no second-order term
        (dloss,) = ctx.saved_tensors
        return grad_loss * dloss, None, None, None, None


def lco_loss_from_logprobs(logprobs, advantages, *, rho_pos=RHO_POS, rho_neg=RHO_NEG, loss_mask=None,
                           old_logprobs=None, epsilon_low=EPSILON, epsilon_high=EPSILON, ref_logprobs=None, beta=0.0,
                           kl_type="k3", reduction="mean", max_length=None, token_count=None, seq_count=None,
                           return_stats=False):
    """``lco_loss`` from per-token log-probs ``logprobs`` (differentiable, ≤ 0) instead of logits.

    For policy-loss hooks that only see per-token log-probs (verl's ``register_policy_loss``, TRL's
    ``per_token_logps``). It runs the fused kernel's own scalar head on the given log p_i, with
    log(1 − p_i) = log(−expm1(log p_i)) and ∂L/∂log p_i = −α / (1 − p_i), so it is exactly as good as
    the log-probs it is fed: fed by ``token_logprobs`` it equals ``lco_loss`` to rounding; fed by
    ``log_softmax(logits).gather(...)`` it has lost 1 − p_i for confident tokens (docs/logprob-form.md
    measures both). A log-prob of exactly 0 reads as p_i = 1 (loss and gradient 0).

    Args:
        logprobs: (...) log p_i of the sampled tokens, e.g. ``token_logprobs(logits, labels)``; > 0 is
            a ``ValueError``.
        advantages: Ψ, per token (logprobs' shape), per sequence ((B, 1)) or 0-dim.
        rho_pos: as ``lco_loss``.
        rho_neg: as ``lco_loss``.
        loss_mask: logprobs' shape; 0 / False = not counted (in place of ``ignore_index``).
        old_logprobs: PPO+LCO, as ``lco_loss``.
        epsilon_low: as ``lco_loss``.
        epsilon_high: as ``lco_loss``.
        ref_logprobs: KL penalty, as every loss with advantages.
        beta: KL coefficient.
        kl_type: KL estimator.
        reduction: as every loss.
        max_length: as every loss.
        token_count: as every loss.
        seq_count: as every loss.
        return_stats: also return ``TokenStats``.

    Returns:
        The loss; with ``return_stats``, ``(loss, TokenStats)`` with logprobs, target_prob, clamped and
        clipped (entropy and logit_grad_norm need the logits: None).
    """
    spec = loss_spec("lco", old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, rho_pos=rho_pos, rho_neg=rho_neg,
                     epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta, kl_type=kl_type)
    if not isinstance(logprobs, torch.Tensor) or not logprobs.is_floating_point():
        raise TypeError("logprobs must be a floating-point tensor of per-token log-probabilities")
    check_options(ignore_index=0, reduction=reduction, backend="torch", return_stats=return_stats,
                  max_length=max_length, token_count=token_count, seq_count=seq_count, device=logprobs.device)
    # as the label check: read only where that costs no host synchronisation; elsewhere the row is NaN
    if label_check_reads_device(logprobs) and bool((logprobs > 0).any()):
        raise ValueError("logprobs must be <= 0 (log-probabilities); found a positive value")
    cdt = compute_dtype(logprobs.dtype)
    adv = per_token("advantages", advantages, logprobs).to(cdt)
    old = per_token("old_logprobs", old_logprobs, logprobs, allow_number=False).to(cdt) if spec.has_old else None
    ref = per_token("ref_logprobs", ref_logprobs, logprobs, allow_number=False).to(cdt) if spec.has_ref else None
    valid = (torch.ones_like(logprobs, dtype=torch.bool) if loss_mask is None
             else per_token("loss_mask", loss_mask, logprobs, allow_number=False, allow_bool=True) != 0)
    # masked positions may hold anything (padding often holds 0, garbage or NaN): feed the head a harmless row
    log_p, adv, old, ref = (None if t is None else torch.where(valid, t, v)
                            for t, v in ((logprobs.to(cdt), -1.0), (adv, 0.0), (old, -1.0), (ref, -1.0)))
    loss, target, clamped, clipped = _HeadOnLogprobs.apply(log_p, adv, old, ref, spec)
    per_token_loss = torch.where(valid, loss, 0.0)
    weights = token_weights(valid, adv, reduction, max_length, token_count, seq_count, cdt)  # as lco_loss's
    out = per_token_loss if weights is None else (per_token_loss.reshape(-1) * weights).sum()
    if not return_stats:
        return out
    zero = torch.zeros((), dtype=torch.float32, device=log_p.device)
    stats = TokenStats(logprobs=torch.where(valid, log_p.detach(), zero).float(), entropy=None,
                       logit_grad_norm=None, target_prob=torch.where(valid, target, zero).float(),
                       clamped=(valid & clamped).float(), clipped=(valid & clipped).float() if spec.can_clip else None)
    return out, stats
