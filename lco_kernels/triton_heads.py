"""The per-loss scalar heads of the vocabulary kernel, in Triton.

Each head maps one row's d = log p_i − log(1 − p_i), advantage Ψ and old/reference log-probs to
(loss, alpha, target_prob, clamped, clipped), where alpha is the coefficient of the logit gradient
α·(p̃ − e_i). For a loss that sees the logits only through log p_i, α = −(∂L/∂log p_i)·(1 − p_i);
LCO's α = |Ψ|·(t − p_i) comes from its stop-gradient target. 1 − p_i is always e^{log(1 − p_i)},
never a subtraction. The torch twin of this file is torch_heads.py.
"""
import triton
import triton.language as tl

from .losses import Loss

# The loss kinds as constexpr values the kernel branches on at compile time.
SFT: tl.constexpr = tl.constexpr(int(Loss.SFT))
PG: tl.constexpr = tl.constexpr(int(Loss.PG))
PPO: tl.constexpr = tl.constexpr(int(Loss.PPO))
CISPO: tl.constexpr = tl.constexpr(int(Loss.CISPO))
LCO: tl.constexpr = tl.constexpr(int(Loss.LCO))


@triton.jit
def _log1p(x):
    # log(1 + x) to full precision for tiny x (Goldberg's correction); avoids libdevice, which the
    # interpreter does not map on every Triton version.
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _softplus(x):
    # log(1 + e^x): no overflow for large x, and e^x (not 0) for very negative x.
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _lco_head(d, log_p, log_1mp, adv, rho_pos, rho_neg):
    """LCO (paper eq. 13-18) in the log domain: (loss, alpha, t, clamped)."""
    p = tl.exp(log_p)
    rho = tl.where(adv > 0, rho_pos, rho_neg)
    abs_adv = tl.abs(adv)
    log_rho = tl.log(rho)
    # ρ·p_i ≥ 1: no finite logit shift reaches ρ·p_i; the target is one-hot (t = 1), SPEC §1.
    clamped = (rho > 1.0) & (log_rho + log_p >= 0.0)
    # delta = log(1 − t) − log(1 − p_i) = log(1 + (1 − ρ)·e^d), the shift of the non-sampled mass.
    # For ρ ≤ 1 the softplus form cannot overflow; for ρ > 1 unclamped, (ρ − 1)·e^d < 1.
    delta = tl.where(rho > 1.0, _log1p((1.0 - rho) * tl.exp(d)), _softplus(tl.log(1.0 - rho) + d))
    t = tl.where(clamped, 1.0, rho * p)
    # KL(target ‖ policy) collapses to two outcomes (eq. 17): the sampled token and the rest.
    kl_sampled = tl.where(clamped, -log_p, tl.where(t > 0.0, t * log_rho, 0.0))
    kl_rest = tl.where(clamped, 0.0, tl.exp(log_1mp + delta) * delta)
    # t − p_i: (ρ − 1)·p_i unclamped, 1 − p_i = e^{log(1 − p_i)} clamped; neither subtracts.
    alpha = abs_adv * tl.where(clamped, tl.exp(log_1mp), (rho - 1.0) * p)
    return abs_adv * (kl_sampled + kl_rest), alpha, t, clamped


@triton.jit
def policy_head(d, adv, old_logp, ref_logp,
                rho_pos, rho_neg, eps_low, eps_high, clip_c, beta,
                LOSS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, DUAL_CLIP: tl.constexpr):
    """(loss, alpha, target_prob, clamped, clipped) of one row; see the module docstring."""
    log_p = -_softplus(-d)
    log_1mp = -_softplus(d)
    one_minus_p = tl.exp(log_1mp)
    target = tl.full([], 0.0, tl.float32)
    clamped = d < -float("inf")  # False (also for a NaN row), as a tensor
    clipped = d < -float("inf")
    if LOSS == SFT:
        loss = -log_p
        alpha = one_minus_p
    elif LOSS == PG:
        loss = -adv * log_p
        alpha = adv * one_minus_p
    elif LOSS == PPO:
        # verl's clipped surrogate: r = exp(clamp(log p_i − log p_old, ±20)).
        log_ratio = log_p - old_logp
        ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
        pg_unclipped = -adv * ratio
        pg_clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
        loss = tl.maximum(pg_unclipped, pg_clipped)
        # The gradient flows through r only where the unclipped term is the max (and |log r| ≤ 20).
        clipped = pg_clipped > pg_unclipped
        if DUAL_CLIP:
            # Ψ < 0: the loss is also capped at −Ψ·c (dual clip).
            pg_dual = -adv * clip_c
            dual = (adv < 0) & (pg_dual < loss)
            loss = tl.where(dual, pg_dual, loss)
            clipped = clipped | dual
        live = (~clipped) & (tl.abs(log_ratio) <= 20.0)
        alpha = tl.where(live, adv * ratio * one_minus_p, 0.0)
        if HAS_REF:
            # GRPO's k3 KL to the reference policy, clamped at 10 as verl does.
            x = ref_logp - log_p
            e_x = tl.exp(x)
            k3 = e_x - x - 1.0
            loss += beta * tl.minimum(k3, 10.0)
            alpha += tl.where(k3 <= 10.0, beta * (e_x - 1.0) * one_minus_p, 0.0)
    elif LOSS == CISPO:
        ratio = tl.exp(log_p - old_logp)
        weight = tl.minimum(ratio, 1.0 + eps_high)  # a constant in the gradient (stop-gradient)
        loss = -weight * adv * log_p
        alpha = weight * adv * one_minus_p
        clipped = ratio > 1.0 + eps_high
    else:
        loss, alpha, target, clamped = _lco_head(d, log_p, log_1mp, adv, rho_pos, rho_neg)
        if HAS_OLD:
            # PPO+LCO: a token whose ratio already left the trust region in the direction its
            # advantage pushes gets no loss and no gradient, as PPO's clipped tokens.
            ratio = tl.exp(log_p - old_logp)
            clipped = ((adv > 0) & (ratio > 1.0 + eps_high)) | ((adv < 0) & (ratio < 1.0 - eps_low))
            loss = tl.where(clipped, 0.0, loss)
            alpha = tl.where(clipped, 0.0, alpha)
    return loss, alpha, target, clamped, clipped
