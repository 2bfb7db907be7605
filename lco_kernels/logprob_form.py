"""LCO from per-token log-probs, for frameworks whose policy-loss hook only sees those
(verl's ``register_policy_loss``, TRL's ``per_token_logps``).

With t = min(ρ·p_i, 1) built from detached log-probs,
    L = |Ψ|·[t·(log t − log p_i) + (1 − t)·(log(1 − t) − log(1 − p_i))],
and autograd through the caller's log_softmax gives ∂L/∂z = |Ψ|·(p − π'), LCO's gradient, exactly
in real arithmetic. In floating point it rounds worse than the fused kernel for confident tokens:
the caller's log p_i = z_i − lse has already lost 1 − p_i once p_i rounds to 1 (README, "The
log-prob form", gives the measured error).
"""
import torch

from ._validation import check_options, check_rho, per_token
from .reductions import token_weights


def lco_loss_from_logprobs(logprobs, advantages, *, rho_pos=1.8, rho_neg=0.9, mask=None, reduction="mean",
                           max_length=None):
    """LCO loss from per-token log-probs ``logprobs`` (differentiable), shaped like ``advantages`` after
    broadcasting; ``mask`` (same shape, optional) marks the tokens that count. Reductions as ``lco_loss``."""
    check_rho(rho_pos, rho_neg)
    check_options(ignore_index=0, reduction=reduction, backend="torch", return_stats=False,
                 max_length=max_length)
    if not isinstance(logprobs, torch.Tensor) or not logprobs.is_floating_point():
        raise TypeError("logprobs must be a floating-point tensor of per-token log-probabilities")
    adv = per_token("advantages", advantages, logprobs).to(torch.float32 if logprobs.dtype != torch.float64
                                                             else torch.float64)
    valid = torch.ones_like(logprobs, dtype=torch.bool) if mask is None else per_token("mask", mask, logprobs, allow_number=False, allow_bool=True) != 0
    cdt = adv.dtype
    # Masked positions may hold anything (padding often holds 0 = log 1): replace them before any log.
    log_p = torch.where(valid, logprobs.to(cdt), -1.0)
    with torch.no_grad():
        p = log_p.exp()
        rho = torch.where(adv > 0, rho_pos, rho_neg).to(cdt)
        clamped = rho * p >= 1
        t = torch.where(clamped, 1.0, rho * p)
        log_t = torch.log(t)
        log_1mt = torch.log1p(-t)
    # log(1 − p_i) is only needed (and only finite) where t < 1; elsewhere feed it a harmless value.
    log_1mp = torch.log(-torch.expm1(torch.where(clamped, -1.0, log_p)))
    kl = (torch.where(t > 0, t * (log_t - log_p), 0.0)
          + torch.where(clamped, 0.0, (1 - t) * (log_1mt - log_1mp)))
    per_token_loss = torch.where(valid, adv.abs() * kl, 0.0)
    if max_length is None:
        max_length = logprobs.shape[-1] if logprobs.dim() else 1
    weights = token_weights(valid, adv, reduction, max_length)
    if weights is None:
        return per_token_loss
    return (per_token_loss.reshape(-1) * weights).sum()
