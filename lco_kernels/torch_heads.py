"""Everything the PyTorch backend computes per row after its sweep: the twin of triton_heads.py.

Same inputs, same outputs, same formulas and rules, vectorised over rows (see triton_heads.py for
the symbols and the derivations). tests/test_heads.py runs both on the same rows.
"""
import math

import torch
import torch.nn.functional as F

from .registry import DIVERGENCES, KL, Kind, LossSpec


def _two_diff(a, b):
    r = a - b
    b_virtual = a - r
    err = (a - (r + b_virtual)) + (b_virtual - b)
    return r, torch.where(r.isinf(), 0.0, err)


def _log1mexp(x):
    # log(1 − e^x) for x ≤ 0, to full precision on both sides of x = −log 2
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _lco_head(d, log_p, log_1mp, one_minus_p, adv, rho_pos, rho_neg):
    p = torch.exp(log_p)
    rho = torch.where(adv > 0, rho_pos, rho_neg)
    rho = rho if rho.dtype == d.dtype else rho.to(d.dtype)
    abs_adv = adv.abs()
    raises = rho > 1
    clamped = raises & (torch.log(rho) + log_p >= 0)
    one_minus_rho = 1 - rho
    # log(1 − t) = log(1 − ρ·p_i): (1 − p_i)(1 + (1 − ρ)e^d) above ρ = 1, (1 − p_i) + (1 − ρ)p_i below
    log_1mt = torch.where(raises, log_1mp + torch.log1p(one_minus_rho * torch.exp(d)),
                          torch.logaddexp(log_1mp, torch.log(one_minus_rho) + log_p))
    t = torch.where(clamped, 1.0, rho * p)
    kl_sampled = torch.where(clamped, -log_p, torch.xlogy(t, rho))  # t·log ρ, 0 where t = 0 (also for ρ = 0)
    kl_rest = torch.where(t >= 1, 0.0, torch.exp(log_1mt) * (log_1mt - log_1mp))  # t ≥ 1 wherever clamped
    alpha = abs_adv * torch.where(clamped, one_minus_p, (rho - 1) * p)
    return abs_adv * (kl_sampled + kl_rest), alpha, t, clamped


def _kl_term(log_p, ref_logp, kl_type):
    x = log_p - ref_logp
    if kl_type == KL.K1:
        return x, torch.ones_like(x)
    if kl_type == KL.K2:
        return 0.5 * x * x, x
    if kl_type == KL.K3:
        y = (-x).clamp(-20.0, 20.0)
        k3 = torch.exp(y) - y - 1
        dkl = torch.where(k3 <= 10.0, 1 - torch.exp(y), 0.0)
        return k3.clamp(-10.0, 10.0), dkl
    return x.abs(), torch.sign(x)


def sft_terms(nd):
    """SFT's (loss, alpha) per row at nd = −d: −log p_i = softplus(nd) and 1 − p_i = σ(nd), two ops (the
    one-pass forward needs no log-p pair). Past ``threshold`` softplus returns nd itself: at 40, e^{−40} lies
    below float64's precision there (the default 20 would leave a relative error of 1e-10). The Triton twin
    forms the same two values from the log-p pair it computes anyway (−log p_i, e^{log(1 − p_i)}): they agree
    to rounding (tests/test_heads.py)."""
    return F.softplus(nd, threshold=40.0), torch.sigmoid(nd)


def _policy_term(d, log_p, log_1mp, adv, old_logp, spec: LossSpec):
    """(loss, alpha, target, clamped, clipped) per row; the last three None where the loss has none
    (only the statistics read them)."""
    if spec.kind == Kind.SFT:
        return (*sft_terms(-d), None, None, None)
    one_minus_p = torch.exp(log_1mp)
    target = clamped = clipped = None
    if spec.kind == Kind.PG:
        loss, alpha = torch.where(adv == 0, 0.0, -adv * log_p), adv * one_minus_p
    elif spec.kind == Kind.PPO:
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
    elif spec.kind == Kind.CISPO:
        ratio = torch.exp(log_p - old_logp)
        lower = 0.0 if spec.epsilon_low is None else 1 - spec.epsilon_low
        weight = ratio.clamp(lower, 1 + spec.epsilon_high)
        loss = torch.where(weight * adv == 0, 0.0, -weight * adv * log_p)
        alpha = weight * adv * one_minus_p
        clipped = (ratio > 1 + spec.epsilon_high) | (ratio < lower)
    elif spec.kind == Kind.SAPO:
        log_ratio = log_p - old_logp
        ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
        tau = torch.where(adv > 0, spec.tau_pos, spec.tau_neg).to(d.dtype)
        x = tau * (ratio - 1)
        e = torch.exp(-x.abs())
        sigmoid = torch.where(x >= 0, 1 / (1 + e), e / (1 + e))
        loss = -(4 / tau) * sigmoid * adv
        alpha = torch.where(log_ratio.abs() <= 20.0, 4 * (e / ((1 + e) * (1 + e))) * ratio * adv * one_minus_p, 0.0)
    elif spec.kind == Kind.DPPO:
        ratio = torch.exp((log_p - old_logp).clamp(-20.0, 20.0))
        p, p_old = torch.exp(log_p), torch.exp(old_logp)
        if spec.divergence == DIVERGENCES["tv"]:
            inside_pos = p - p_old <= spec.delta_high
            inside_neg = p - p_old >= -spec.delta_low
        else:
            log_1mp_old = _log1mexp(old_logp)
            q_old = torch.exp(log_1mp_old)
            bkl = (torch.where(p_old > 0, p_old * (old_logp - log_p), 0.0)
                   + torch.where(q_old > 0, q_old * (log_1mp_old - log_1mp), 0.0))
            inside_pos = (bkl <= spec.delta_high) | (p <= p_old)
            inside_neg = (bkl <= spec.delta_low) | (p >= p_old)
        inside = torch.where(adv > 0, inside_pos, inside_neg)
        weight = torch.where(inside, ratio.clamp(max=spec.clip_ratio_c), 0.0)
        loss = torch.where(weight * adv == 0, 0.0, -weight * adv * log_p)
        alpha = weight * adv * one_minus_p
        clipped = ~inside
    elif spec.kind == Kind.DRO:
        x = log_p - old_logp
        loss = torch.where(adv == 0, 0.0, -adv * log_p) + 0.5 * spec.dro_beta * x * x
        alpha = (adv - spec.dro_beta * x) * one_minus_p
    else:
        loss, alpha, target, clamped = _lco_head(d, log_p, log_1mp, one_minus_p, adv, spec.rho_pos,
                                                    spec.rho_neg)
        if spec.has_old:
            ratio = torch.exp(log_p - old_logp)
            clipped = ((adv > 0) & (ratio > 1 + spec.epsilon_high)) | ((adv < 0) & (ratio < 1 - spec.epsilon_low))
            loss = torch.where(clipped, 0.0, loss)
            alpha = torch.where(clipped, 0.0, alpha)
    return loss, alpha, target, clamped, clipped


def _log_p_pair(d):
    """(log p_i, log(1 − p_i)) = (−softplus(−d), −softplus(d)) as log σ(d) and log σ(−d) (three ops, not
    five): min(x, 0) − log1p(e^{−|x|}), the same form as triton_heads._softplus (no overflow, and e^x's
    digits for very negative x)."""
    return F.logsigmoid(d), F.logsigmoid(-d)


def loss_terms(d, adv, old_logp, ref_logp, spec: LossSpec):
    """(log p_i, log(1 − p_i), loss, alpha, target, clamped, clipped) per row at d = log p_i − log(1 − p_i):
    the policy term with its KL penalty (target, clamped, clipped None where the loss has none)."""
    log_p, log_1mp = _log_p_pair(d)
    loss, alpha, target, clamped, clipped = _policy_term(d, log_p, log_1mp, adv, old_logp, spec)
    if spec.has_ref:
        kl, dkl = _kl_term(log_p, ref_logp, spec.kl_type)
        if spec.bias_correction_kl:
            ratio = torch.exp(log_p - old_logp)
            kl, dkl = kl * ratio, (dkl + kl) * ratio
        loss = loss + spec.beta * kl
        alpha = alpha - spec.beta * dkl * torch.exp(log_1mp)
    return log_p, log_1mp, loss, alpha, target, clamped, clipped


def finite(*columns):
    """Whether every value of these columns is finite: one host read (CPU tensors only). A sum is finite
    when every term is (isfinite costs four ops); one that overflows only sends the call down the masked path."""
    total = columns[0]
    for c in columns[1:]:
        total = total + c
    return math.isfinite(float(total.sum()))


def row_head(z_i, m, s, u, q, valid, owned, adv, old_logp, ref_logp, spec: LossSpec, need_entropy, with_stats):
    """(table, clamped, clipped) per row; see triton_heads.row_head (``m`` None: a reference of 0 for every
    row). ``table`` is (N, 8) in stats.ROW_STATE
    order (m, log_s, log_p, log_1mp, loss, alpha, ent_mask, entropy; the last four's entropy columns
    zero without ``need_entropy``), with ``with_stats`` (N, 10) with grad_norm and target appended;
    ``clamped`` and ``clipped`` are None without ``with_stats`` (which needs ``need_entropy``: callers
    pass need_entropy or with_stats). One stack and two in-place masks
    instead of a masking op per output: the head runs as few, wide ops.

    ``valid`` and ``owned`` None (CPU tensors only, never with ``with_stats``): every row is valid and
    owns its label. If, besides, d and the per-token inputs are finite everywhere (one host read), no
    row is special (no NaN row, no row without another option), and the masks are left out."""
    log_s = torch.log(s)
    zero = None
    if m is None:  # the sweep's reference was 0 (torch_backend._sweep_cpu): z_i − m is z_i, exactly
        m = zero = torch.zeros_like(s)
        d = z_i - log_s
    else:
        z_rel, z_rel_err = _two_diff(z_i, m)
        d = (z_rel - log_s) + z_rel_err
    inputs = [x for x in (adv, old_logp, ref_logp) if x is not None]
    ordinary = owned is None and finite(d, *inputs)
    if not ordinary:
        only_option = s == 0
        d = torch.where(only_option, torch.inf, d)
    log_p, log_1mp, loss, alpha, target, clamped, clipped = loss_terms(d, adv, old_logp, ref_logp, spec)
    if not ordinary:
        alpha = torch.where(only_option, 0.0, alpha)
        if spec.kind == Kind.LCO:
            loss = torch.where(only_option, 0.0, loss)
    columns = [m, log_s, log_p, log_1mp, loss, alpha]
    if need_entropy:
        p, one_minus_p = log_p.exp(), log_1mp.exp()
        h_excl = log_s - u / s
        if not ordinary:
            h_excl = torch.where(only_option, 0.0, h_excl)
        entropy = (torch.where(p > 0, -p * log_p, 0.0) + torch.where(one_minus_p > 0, -one_minus_p * log_1mp, 0.0)
                   + one_minus_p * h_excl)
        columns[4] = loss - spec.entropy_coef * entropy
        columns += [torch.ones_like(d) if ordinary else (~only_option).to(d.dtype), entropy]
    else:
        zero = torch.zeros_like(d) if zero is None else zero
        columns[2:4] = [zero, zero]
        columns += [zero, zero]
    if with_stats:
        grad_norm = torch.zeros_like(d)
        if need_entropy:
            grad_norm = (alpha.abs() * torch.sqrt(1 + torch.where(only_option, 0.0, q / (s * s)))
                         * (1.0 / spec.temperature))
        target = torch.zeros_like(d) if target is None else target
        clamped, clipped = (torch.zeros_like(valid) if x is None else x for x in (clamped, clipped))
        columns += [grad_norm, torch.where(only_option & valid, 1.0, target)]
    table = torch.stack(columns, dim=1)
    if ordinary:
        return table, None, None
    nan_row = s.isnan() | z_i.isnan() | torch.isposinf(z_i) | ~adv.isfinite()
    if owned is not None:
        nan_row = nan_row | ~owned
    if spec.has_old:   # NaN, or a ratio 0/0 (p_i = 0 and old = −inf): see triton_heads.row_head
        nan_row = nan_row | old_logp.isnan() | (torch.isneginf(log_p) & torch.isneginf(old_logp))
    if spec.has_ref:
        nan_row = nan_row | ref_logp.isnan() | (torch.isneginf(log_p) & torch.isneginf(ref_logp))
    # NaN rows: loss, alpha (, ent_mask, entropy with the entropy) (, grad_norm with the stats)
    table[:, 4:table.shape[1] - 1 if with_stats else 8 if need_entropy else 6].masked_fill_(nan_row[:, None],
                                                                                             torch.nan)
    if valid is not None:
        table[:, 2:].masked_fill_(~valid[:, None], 0.0)           # all but m and log_s
    if not with_stats:
        return table, None, None
    return table, valid & clamped, valid & clipped
