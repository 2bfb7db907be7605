"""The per-loss scalar heads in torch: the twin of triton_heads.py, used by the PyTorch backend.

Same inputs, same outputs, same formulas, vectorised over rows.
"""
import torch

from .losses import Loss, LossSpec


def softplus(x):
    # log(1 + e^x) without overflow and with e^x's digits for very negative x (as in the kernel).
    return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))


def _lco_head(d, log_p, log_1mp, adv, rho_pos, rho_neg):
    p = torch.exp(log_p)
    rho = torch.where(adv > 0, rho_pos, rho_neg).to(d.dtype)
    abs_adv = adv.abs()
    log_rho = torch.log(rho)
    clamped = (rho > 1) & (log_rho + log_p >= 0)
    delta = torch.where(rho > 1, torch.log1p((1 - rho) * torch.exp(d)), softplus(torch.log(1 - rho) + d))
    t = torch.where(clamped, 1.0, rho * p)
    kl_sampled = torch.where(clamped, -log_p, torch.where(t > 0, t * log_rho, 0.0))
    kl_rest = torch.where(clamped, 0.0, torch.exp(log_1mp + delta) * delta)
    alpha = abs_adv * torch.where(clamped, torch.exp(log_1mp), (rho - 1) * p)
    return abs_adv * (kl_sampled + kl_rest), alpha, t, clamped


def policy_head(d, adv, old_logp, ref_logp, spec: LossSpec):
    """(loss, alpha, target_prob, clamped, clipped) per row; see triton_heads.policy_head."""
    log_p = -softplus(-d)
    log_1mp = -softplus(d)
    one_minus_p = torch.exp(log_1mp)
    target = torch.zeros_like(d)
    clamped = torch.zeros_like(d, dtype=torch.bool)
    clipped = torch.zeros_like(d, dtype=torch.bool)
    if spec.kind == Loss.SFT:
        loss, alpha = -log_p, one_minus_p
    elif spec.kind == Loss.PG:
        loss, alpha = -adv * log_p, adv * one_minus_p
    elif spec.kind == Loss.PPO:
        log_ratio = log_p - old_logp
        ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
        pg_unclipped = -adv * ratio
        pg_clipped = -adv * ratio.clamp(1 - spec.epsilon_low, 1 + spec.epsilon_high)
        loss = torch.maximum(pg_unclipped, pg_clipped)
        clipped = pg_clipped > pg_unclipped
        if spec.dual_clip is not None:
            pg_dual = -adv * spec.dual_clip
            dual = (adv < 0) & (pg_dual < loss)
            loss = torch.where(dual, pg_dual, loss)
            clipped = clipped | dual
        live = ~clipped & (log_ratio.abs() <= 20.0)
        alpha = torch.where(live, adv * ratio * one_minus_p, 0.0)
        if spec.has_ref:
            x = ref_logp - log_p
            e_x = torch.exp(x)
            k3 = e_x - x - 1
            loss = loss + spec.beta * k3.clamp(max=10.0)
            alpha = alpha + torch.where(k3 <= 10.0, spec.beta * (e_x - 1) * one_minus_p, 0.0)
    elif spec.kind == Loss.CISPO:
        ratio = torch.exp(log_p - old_logp)
        weight = ratio.clamp(max=1 + spec.epsilon_high)
        loss, alpha = -weight * adv * log_p, weight * adv * one_minus_p
        clipped = ratio > 1 + spec.epsilon_high
    else:
        loss, alpha, target, clamped = _lco_head(d, log_p, log_1mp, adv, spec.rho_pos, spec.rho_neg)
        if spec.has_old:
            ratio = torch.exp(log_p - old_logp)
            clipped = ((adv > 0) & (ratio > 1 + spec.epsilon_high)) | ((adv < 0) & (ratio < 1 - spec.epsilon_low))
            loss = torch.where(clipped, 0.0, loss)
            alpha = torch.where(clipped, 0.0, alpha)
    return loss, alpha, target, clamped, clipped
