"""Everything the Triton forward kernel computes per row after its sweep: the twin of torch_heads.py.

``row_head`` takes the row's raw sweep quantities (SPEC §1 symbols, all of z/τ):
    z_i       the sampled logit,
    m, s      the running max and Σ e^{z_k − m} over the non-sampled logits (lse₋ᵢ = m + log s),
    u, q      Σ e·(z − m) and Σ e² over them (e = e^{z − m}; only for the entropy and ‖∂L/∂z‖),
and maps them, with the advantage Ψ and the old / reference log-probs, to the row's loss, the
coefficient α of the logit gradient α·(p̃ − e_i), the entropy and the per-token statistics,
applying the rules of SPEC §1 (ignored rows, degenerate rows, NaN rows) in one place.

The loss heads see d = z_i − lse₋ᵢ = log p_i − log(1 − p_i) and its two log-probabilities,
log p_i = −softplus(−d) and log(1 − p_i) = −softplus(d): 1 − p_i is never formed by subtraction.
For a loss that sees the logits only through log p_i, α = −(∂L/∂log p_i)·(1 − p_i).
"""
import triton
import triton.language as tl

from .registry import DIVERGENCES, KL, Kind

SFT: tl.constexpr = tl.constexpr(int(Kind.SFT))
PG: tl.constexpr = tl.constexpr(int(Kind.PG))
PPO: tl.constexpr = tl.constexpr(int(Kind.PPO))
CISPO: tl.constexpr = tl.constexpr(int(Kind.CISPO))
LCO: tl.constexpr = tl.constexpr(int(Kind.LCO))
SAPO: tl.constexpr = tl.constexpr(int(Kind.SAPO))
DPPO: tl.constexpr = tl.constexpr(int(Kind.DPPO))
DRO: tl.constexpr = tl.constexpr(int(Kind.DRO))
TV: tl.constexpr = tl.constexpr(DIVERGENCES["tv"])
K1: tl.constexpr = tl.constexpr(int(KL.K1))
K2: tl.constexpr = tl.constexpr(int(KL.K2))
K3: tl.constexpr = tl.constexpr(int(KL.K3))

_INF: tl.constexpr = tl.constexpr(float("inf"))


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
def _logaddexp(a, b):
    # log(e^a + e^b) = max + log(1 + e^{−|a − b|}); both terms keep their digits.
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return tl.where(lo == -_INF, hi, hi + _log1p(tl.exp(lo - hi)))


@triton.jit
def _two_diff(a, b):
    # (r, err) with r + err = a − b exactly (Knuth's TwoSum), so a later sum keeps a − b's lost digits.
    r = a - b
    b_virtual = a - r
    err = (a - (r + b_virtual)) + (b_virtual - b)
    return r, tl.where(tl.abs(r) < _INF, err, 0.0)  # an infinite difference has no rounding error


@triton.jit
def _log1mexp(x):
    # log(1 − e^x) for x ≤ 0 to full precision: log(−expm1(x)) near 0, log1p(−e^x) below −log 2;
    # expm1 as (u − 1)·x / log u, u = e^x (Kahan), which keeps x's digits where u rounds near 1.
    u = tl.exp(x)
    expm1 = tl.where(u == 1.0, x, (u - 1.0) * x / tl.log(u))
    return tl.where(x > -0.6931471805599453, tl.log(-expm1), _log1p(-u))


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def _lco_head(d, log_p, log_1mp, adv, rho_pos, rho_neg):
    """LCO (paper eq. 13-18) in the log domain: (loss, alpha, t, clamped)."""
    p = tl.exp(log_p)
    rho = tl.where(adv > 0, rho_pos, rho_neg)
    abs_adv = tl.abs(adv)
    log_rho = tl.log(rho)
    # ρ·p_i ≥ 1: no finite logit shift reaches ρ·p_i; the target is one-hot (t = 1), SPEC §1.
    clamped = (rho > 1.0) & (log_rho + log_p >= 0.0)
    # log(1 − t), t = ρ·p_i. ρ > 1 (unclamped, so (ρ − 1)·e^d < 1):
    # 1 − t = (1 − p_i)(1 − (ρ − 1)·e^d).
    # ρ ≤ 1: 1 − t = (1 − p_i) + (1 − ρ)·p_i, a sum of two positive terms, so no cancellation even
    # when the sampled logit leads by thousands (then log(1 − p_i) ≈ −d and log(1 − t) ≈ log(1 − ρ)).
    log_1mt = tl.where(rho > 1.0, log_1mp + _log1p((1.0 - rho) * tl.exp(d)),
                       _logaddexp(log_1mp, tl.log(1.0 - rho) + log_p))
    t = tl.where(clamped, 1.0, rho * p)
    # KL(target ‖ policy) collapses to two outcomes (eq. 17): the sampled token and the rest.
    kl_sampled = tl.where(clamped, -log_p, tl.where(t > 0.0, t * log_rho, 0.0))
    kl_rest = tl.where(clamped | (t >= 1.0), 0.0, tl.exp(log_1mt) * (log_1mt - log_1mp))
    # t − p_i: (ρ − 1)·p_i unclamped, 1 − p_i = e^{log(1 − p_i)} clamped; neither subtracts.
    alpha = abs_adv * tl.where(clamped, tl.exp(log_1mp), (rho - 1.0) * p)
    return abs_adv * (kl_sampled + kl_rest), alpha, t, clamped


@triton.jit
def _kl_term(log_p, ref_logp, KL_TYPE: tl.constexpr):
    """(kl, ∂kl/∂log p_i) of verl's estimator ``KL_TYPE`` with x = log p_i − log p_ref."""
    x = log_p - ref_logp
    if KL_TYPE == K1:
        kl = x
        dkl = tl.full([], 1.0, tl.float32)
    elif KL_TYPE == K2:
        kl = 0.5 * x * x
        dkl = x
    elif KL_TYPE == K3:
        # verl's low_var_kl: y = clamp(−x, ±20), k3 = e^y − y − 1, clamped to ±10; no gradient
        # where a clamp binds (k3 ≤ 10 implies |y| < 20: the first clamp only keeps an infinite
        # x, a p_i or p_ref of 0, from making k3 NaN).
        y = _clamp(-x, -20.0, 20.0)
        k3 = tl.exp(y) - y - 1.0
        kl = _clamp(k3, -10.0, 10.0)
        dkl = tl.where(k3 <= 10.0, 1.0 - tl.exp(y), 0.0)
    else:
        kl = tl.abs(x)
        dkl = tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))
    return kl, dkl


@triton.jit
def _policy_term(d, log_p, log_1mp, adv, old_logp, rho_pos, rho_neg, eps_low, eps_high, clip_c, tau_pos, tau_neg,
                 delta_low, delta_high, trunc_c, dro_beta,
                 LOSS: tl.constexpr, HAS_OLD: tl.constexpr, DUAL_CLIP: tl.constexpr, DIVERGENCE: tl.constexpr):
    """(loss, alpha, target_prob, clamped, clipped) of the policy loss ``LOSS`` for one row."""
    one_minus_p = tl.exp(log_1mp)
    target = tl.full([], 0.0, tl.float32)
    clamped = d < -_INF  # False (also for a NaN row), as a tensor
    clipped = d < -_INF
    if LOSS == SFT:
        loss = -log_p
        alpha = one_minus_p
    elif LOSS == PG:
        loss = tl.where(adv == 0.0, 0.0, -adv * log_p)  # 0·log 0 = 0 when p_i = 0 and Ψ = 0
        alpha = adv * one_minus_p
    elif LOSS == PPO:
        # verl's clipped surrogate: r = exp(clamp(log p_i − log p_old, ±20)).
        log_ratio = log_p - old_logp
        ratio = tl.exp(_clamp(log_ratio, -20.0, 20.0))
        pg_unclipped = -adv * ratio
        pg_clipped = -adv * _clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
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
    elif LOSS == CISPO:
        ratio = tl.exp(log_p - old_logp)
        # [1 − ε_low, 1 + ε_high]; the launcher passes ε_low = 1 for the one-sided cap (r ≥ 0 = 1 − 1)
        lower = 1.0 - eps_low
        weight = _clamp(ratio, lower, 1.0 + eps_high)  # a constant in the gradient (stop-gradient)
        # p_i = 0 gives weight 0 and log p_i = −inf: r·log p_i → 0 as p_i → 0 (and 0 when Ψ = 0)
        loss = tl.where(weight * adv == 0.0, 0.0, -weight * adv * log_p)
        alpha = weight * adv * one_minus_p
        clipped = (ratio > 1.0 + eps_high) | (ratio < lower)
    elif LOSS == SAPO:
        # verl's gate: r = exp(clamp(log r, ±20)), L = −(4/τ)·σ(τ(r − 1))·Ψ, τ = τ_pos if Ψ > 0;
        # ∂L/∂log p_i = −4·σ(1 − σ)·r·Ψ (0 where the clamp binds),
        # σ(1 − σ) = e/(1 + e)², e = e^{−|x|}
        log_ratio = log_p - old_logp
        ratio = tl.exp(_clamp(log_ratio, -20.0, 20.0))
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        x = tau * (ratio - 1.0)
        e = tl.exp(-tl.abs(x))
        sigmoid = tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
        loss = -(4.0 / tau) * sigmoid * adv
        alpha = tl.where(tl.abs(log_ratio) <= 20.0, 4.0 * (e / ((1.0 + e) * (1.0 + e))) * ratio * adv * one_minus_p,
                         0.0)
    elif LOSS == DPPO:
        # verl's dppo_tv / dppo_kl: −sg(min(r, C))·Ψ·log p_i where the token stays inside the
        # divergence trust region in the direction Ψ pushes (a detached mask), 0 elsewhere
        ratio = tl.exp(_clamp(log_p - old_logp, -20.0, 20.0))
        p = tl.exp(log_p)
        p_old = tl.exp(old_logp)
        if DIVERGENCE == TV:
            inside_pos = p - p_old <= delta_high
            inside_neg = p - p_old >= -delta_low
        else:
            # KL(Bernoulli(p_old) ‖ Bernoulli(p_i)), with log(1 − p_i) from the head (exact as p_i → 1)
            log_1mp_old = _log1mexp(old_logp)
            q_old = tl.exp(log_1mp_old)
            bkl = (tl.where(p_old > 0.0, p_old * (old_logp - log_p), 0.0)
                   + tl.where(q_old > 0.0, q_old * (log_1mp_old - log_1mp), 0.0))
            inside_pos = (bkl <= delta_high) | (p <= p_old)
            inside_neg = (bkl <= delta_low) | (p >= p_old)
        inside = tl.where(adv > 0, inside_pos, inside_neg)
        weight = tl.where(inside, tl.minimum(ratio, trunc_c), 0.0)
        loss = tl.where(weight * adv == 0.0, 0.0, -weight * adv * log_p)
        alpha = weight * adv * one_minus_p
        clipped = ~inside
    elif LOSS == DRO:
        # −Ψ·log p_i + (β/2)·x², x = log p_i − log p_old; ∂L/∂log p_i = −Ψ + β·x
        x = log_p - old_logp
        loss = tl.where(adv == 0.0, 0.0, -adv * log_p) + 0.5 * dro_beta * x * x
        alpha = (adv - dro_beta * x) * one_minus_p
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


@triton.jit
def row_head(z_i, m, s, u, q, valid, owned, adv, old_logp, ref_logp,
             inv_temp, rho_pos, rho_neg, eps_low, eps_high, clip_c, beta, entropy_coef,
             tau_pos, tau_neg, delta_low, delta_high, trunc_c, dro_beta,
             LOSS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, KL_TYPE: tl.constexpr,
             DUAL_CLIP: tl.constexpr, NEED_ENTROPY: tl.constexpr, DIVERGENCE: tl.constexpr, BIAS_KL: tl.constexpr):
    """One row, after the sweep. Returns
    (loss, alpha, ent_mask, log_p, log_1mp, entropy, grad_norm, target, clamped, clipped):
    ``ent_mask`` is 1 where the entropy has a gradient (0 on ignored / one-option rows, NaN on NaN
    rows); ``entropy`` and ``grad_norm`` are computed when NEED_ENTROPY, else 0."""
    # Only one option (every other logit −inf): p_i = 1 by definition, even if z_i is −inf too.
    only_option = s == 0.0
    log_s = tl.log(s)
    # d = (z_i − m) − log s, not z_i − (m + log s): with a large common offset in the logits
    # (|z| ~ 1e4) the rounded lse₋ᵢ would cost d all its low digits; z_i − m is kept exact (its
    # rounding error carried separately), so d is correct to about one rounding at any offset.
    z_rel, z_rel_err = _two_diff(z_i, m)
    d = tl.where(only_option, _INF, (z_rel - log_s) + z_rel_err)
    log_p = -_softplus(-d)
    log_1mp = -_softplus(d)
    loss, alpha, target, clamped, clipped = _policy_term(
        d, log_p, log_1mp, adv, old_logp, rho_pos, rho_neg, eps_low, eps_high, clip_c, tau_pos, tau_neg,
        delta_low, delta_high, trunc_c, dro_beta, LOSS, HAS_OLD, DUAL_CLIP, DIVERGENCE)
    if HAS_REF:
        kl, dkl = _kl_term(log_p, ref_logp, KL_TYPE)
        if BIAS_KL:
            # TRL's use_bias_correction_kl: kl·r with r = p_i / p_old (unclamped, as TRL) differentiable,
            # so ∂(kl·r)/∂log p_i = (∂kl/∂log p_i + kl)·r
            ratio = tl.exp(log_p - old_logp)
            dkl = (dkl + kl) * ratio
            kl = kl * ratio
        loss += beta * kl
        alpha -= beta * dkl * tl.exp(log_1mp)
    entropy = tl.zeros([], tl.float32)
    grad_norm = tl.zeros([], tl.float32)
    if NEED_ENTROPY:
        p = tl.exp(log_p)
        one_minus_p = tl.exp(log_1mp)
        # H(π) = h(p_i) + (1 − p_i)·H(p̃), H(p̃) = log s − u/s; 0·log 0 = 0 for p_i ∈ {0, 1}.
        h_excl = tl.where(only_option, 0.0, log_s - u / s)
        entropy = (tl.where(p > 0.0, -p * log_p, 0.0) + tl.where(one_minus_p > 0.0, -one_minus_p * log_1mp, 0.0)
                   + one_minus_p * h_excl)
        loss -= entropy_coef * entropy
        # ‖∂L/∂z‖₂ of the policy and KL terms: |α|·sqrt(1 + Σ_{j≠i} p̃_j²)/τ
        grad_norm = tl.abs(alpha) * tl.sqrt(1.0 + tl.where(only_option, 0.0, q / (s * s))) * inv_temp
    # A one-option row has nothing to move (π' = π for LCO, SPEC §1) and no gradient for any loss.
    alpha = tl.where(only_option, 0.0, alpha)
    if LOSS == LCO:
        loss = tl.where(only_option, 0.0, loss)
    target = tl.where(only_option & valid, 1.0, target)
    # NaN rows (SPEC §1): NaN (or +inf) in the logits, a non-finite advantage, NaN old / reference
    # log-probs, or a label outside the vocabulary: NaN loss and gradient, and no other row changes.
    # So is a ratio 0/0 (p_i = 0 and an old / reference log-prob of −inf): log p_i − log p_old is
    # NaN there, and the clamps (tl.minimum/maximum drop NaN) would otherwise hide it.
    nan_row = (s != s) | (z_i != z_i) | (z_i == _INF) | (tl.abs(adv) == _INF) | (adv != adv) | (~owned)
    if HAS_OLD:
        nan_row = nan_row | (old_logp != old_logp) | ((log_p == -_INF) & (old_logp == -_INF))
    if HAS_REF:
        nan_row = nan_row | (ref_logp != ref_logp) | ((log_p == -_INF) & (ref_logp == -_INF))
    nan = float("nan")
    loss = tl.where(nan_row, nan, loss)
    alpha = tl.where(nan_row, nan, alpha)
    entropy = tl.where(nan_row, nan, entropy)
    grad_norm = tl.where(nan_row, nan, grad_norm)
    ent_mask = tl.where(nan_row, nan, tl.where(only_option, 0.0, 1.0))
    # Ignored rows are exact zeros whatever their inputs.
    return (tl.where(valid, loss, 0.0), tl.where(valid, alpha, 0.0), tl.where(valid, ent_mask, 0.0),
            tl.where(valid, log_p, 0.0), tl.where(valid, log_1mp, 0.0), tl.where(valid, entropy, 0.0),
            tl.where(valid, grad_norm, 0.0), tl.where(valid, target, 0.0), valid & clamped, valid & clipped)
