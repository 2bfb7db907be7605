"""Float64 references of the policy-loss family, written the way verl / TRL write them:
per-token log-probs from log_softmax, the loss formula on them, autograd for the gradient.

``policy_loss_reference(kind, logits, labels, ...)`` returns (per-token loss, aggregated loss),
aggregated by ``reductions.aggregate``.
"""
import math

import torch

from .lco import lco_loss_reference
from .reductions import aggregate


def token_logprobs(logits, labels, ignore_index):
    z = logits.double()
    safe = torch.where(labels == ignore_index, 0, labels)
    return torch.log_softmax(z, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)


def entropy(logits):
    """H = −Σ p·log p with 0·log 0 = 0, differentiable (log p is zeroed where p = 0 before the product,
    so no 0·(−inf) reaches autograd)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, 0.0)).sum(-1)


def ppo_token_loss(logp, old_logp, adv, epsilon_low, epsilon_high, dual_clip=None):
    """verl's compute_policy_loss ("vanilla"), per token; also returns the clipped mask."""
    negative_approx_kl = torch.clamp(logp - old_logp, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    clipped = pg_losses2 > pg_losses1
    if dual_clip is None:
        return clip_pg_losses1, clipped
    pg_losses3 = -adv * dual_clip
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    dual = (adv < 0) & (pg_losses3 < clip_pg_losses1)
    return torch.where(adv < 0, clip_pg_losses2, clip_pg_losses1), clipped | dual


def sapo_token_loss(logp, old_logp, adv, tau_pos, tau_neg):
    """verl's compute_policy_loss_sapo per token: the gate (4/τ)·σ(τ(r − 1)) of r = exp(clamp(log r, ±20))."""
    ratio = torch.exp(torch.clamp(logp - old_logp, min=-20.0, max=20.0))
    taus = torch.where(adv > 0, tau_pos, tau_neg).double()
    return -torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus) * adv


def log1mexp(x):
    """log(1 − e^x), x ≤ 0, to full precision."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def dppo_token_loss(logp, old_logp, adv, divergence, delta_low, delta_high, clip_ratio_c):
    """verl's dppo_tv / dppo_kl per token, with log(1 − p) exact (verl: log((1 − p_old + 1e-8) / (1 − p + 1e-8)));
    also returns the mask of tokens outside the trust region."""
    ratio = torch.exp(torch.clamp(logp - old_logp, min=-20.0, max=20.0))
    weight = torch.clamp(ratio, max=clip_ratio_c).detach()
    prob, old_prob = logp.exp(), old_logp.exp()
    if divergence == "tv":
        inside_pos = prob - old_prob <= delta_high
        inside_neg = prob - old_prob >= -delta_low
    else:
        log_1mp, log_1mp_old = log1mexp(logp), log1mexp(old_logp)
        binary_kl = (torch.where(old_prob > 0, old_prob * (old_logp - logp), 0.0)
                     + torch.where(log_1mp_old > -math.inf, log_1mp_old.exp() * (log_1mp_old - log_1mp), 0.0))
        inside_pos = (binary_kl <= delta_high) | (prob <= old_prob)
        inside_neg = (binary_kl <= delta_low) | (prob >= old_prob)
    inside = torch.where(adv > 0, inside_pos, inside_neg).detach()
    w = torch.where(inside, weight, 0.0) * adv
    return torch.where(w == 0, 0.0, -w * logp), ~inside


def kl_penalty(logp, ref_logp, kl_type="k3"):
    """verl's kl_penalty (core_algos.kl_penalty_forward) for ``kl_type`` in k1/kl, k2/mse, k3/low_var_kl, abs."""
    if kl_type in ("k1", "kl"):
        return logp - ref_logp
    if kl_type in ("k2", "mse"):
        return 0.5 * (logp - ref_logp).square()
    if kl_type == "abs":
        return (logp - ref_logp).abs()
    kl = torch.clamp(ref_logp - logp, min=-20, max=20)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def policy_loss_reference(kind, logits, labels, advantages=None, old_logprobs=None, *, ref_logprobs=None,
                          ignore_index=-100, reduction="mean", loss_mask=None, max_length=None, rho_pos=1.8,
                          rho_neg=0.9, epsilon_low=None, epsilon_high=0.2, dual_clip=None, beta=0.0, kl_type="k3",
                          bias_correction_kl=False, tau_pos=1.0, tau_neg=1.05, divergence="tv", delta_low=0.2,
                          delta_high=0.2, clip_ratio_c=3.0, dro_beta=None, temperature=1.0, entropy_coef=0.0,
                          token_count=None, seq_count=None):
    """(per-token loss, aggregated loss) in float64; differentiable w.r.t. ``logits``.

    kind: "sft" | "pg" | "ppo" | "cispo" | "lco" ("lco" with ``old_logprobs`` is PPO+LCO) | "sapo" |
    "dppo" | "dro". ``epsilon_low=None``: the one-sided cap for "cispo", 0.2 for the others (as the
    library). ``bias_correction_kl``: the KL term times the differentiable ratio p_i / p_old (TRL's
    use_bias_correction_kl).
    """
    if epsilon_low is None and kind != "cispo":
        epsilon_low = 0.2
    mask = labels != ignore_index
    if loss_mask is not None:
        mask = mask & (loss_mask != 0)
    logits = logits.double() / temperature
    # SFT has no advantage; for "sign-mean" every token then counts as positive.
    adv = torch.as_tensor(1.0 if advantages is None else advantages).double().expand(labels.shape)
    logp = token_logprobs(logits, labels, ignore_index)
    old = None if old_logprobs is None else old_logprobs.double()
    if kind == "sft":
        mat = -logp
    elif kind == "pg":
        mat = torch.where(adv == 0, 0.0, -adv * logp)  # 0·log 0 = 0 at p_i = 0
    elif kind == "ppo":
        mat, _ = ppo_token_loss(logp, old, adv, epsilon_low, epsilon_high, dual_clip)
    elif kind == "cispo":
        ratio = torch.exp(logp - old).detach()
        weight = torch.clamp(ratio, None if epsilon_low is None else 1 - epsilon_low, 1 + epsilon_high) * adv
        mat = torch.where(weight == 0, 0.0, -weight * logp)  # r·log p_i → 0 as p_i → 0
    elif kind == "sapo":
        mat = sapo_token_loss(logp, old, adv, tau_pos, tau_neg)
    elif kind == "dppo":
        mat = dppo_token_loss(logp, old, adv, divergence, delta_low, delta_high, clip_ratio_c)[0]
    elif kind == "dro":
        mat = torch.where(adv == 0, 0.0, -adv * logp) + 0.5 * dro_beta * (logp - old).square()
    elif kind == "lco":
        safe_labels = torch.where(mask, labels, ignore_index)
        mat = lco_loss_reference(logits, safe_labels, adv, rho_pos=rho_pos, rho_neg=rho_neg,
                                 ignore_index=ignore_index, reduction="none")
        if old is not None:
            ratio = torch.exp(logp - old).detach()
            outside = ((adv > 0) & (ratio > 1 + epsilon_high)) | ((adv < 0) & (ratio < 1 - epsilon_low))
            mat = torch.where(outside, 0.0, mat)
    else:
        raise ValueError(kind)
    if beta > 0:
        kl = kl_penalty(logp, ref_logprobs.double(), kl_type)
        mat = mat + beta * (kl * torch.exp(logp - old) if bias_correction_kl else kl)
    if entropy_coef:
        mat = mat - entropy_coef * entropy(logits)
    mat = torch.where(mask, mat, 0.0)
    return mat, aggregate(mat, mask, reduction, adv, max_length, token_count, seq_count)
