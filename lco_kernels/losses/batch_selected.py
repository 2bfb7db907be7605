"""Batch-selected losses: verl's entropy-mechanism losses Clip-Cov and KL-Cov (Cui et al. 2025,
arXiv:2505.22617), whose token selection is a statistic of the micro-batch's current log-probs.

The selection is taken from the forward sweep's own log-probs (detached), then the policy term runs in
PyTorch on the same differentiable log-probs (``sequence._run``): one vocabulary sweep forward, one
backward, no second sweep. Host synchronisation: ``kl_cov_loss`` needs none (its top-k is a rank
comparison against a count that stays on the device); ``clip_cov_loss`` reads two integers from the
device once (the number of candidates, the length of the random permutation that must be drawn on the
host generator to select verl's tokens, and the number of valid tokens), where verl reads three times
(``.item()``, ``nonzero`` and its length).
"""
import math

import torch

from .._validation import real
from ..registry import EPSILON
from .sequence import Policy, _run, masked_mean, positive


def _covariance(logprobs, adv, valid):
    """verl's per-token covariance (Ψ − mean Ψ)·(log p − mean log p), the means over the micro-batch's
    valid tokens, of the detached log-probs; −inf at masked tokens."""
    mask = valid.to(logprobs.dtype)
    logprobs = logprobs.detach()
    cov = (adv - masked_mean(adv, mask)) * (logprobs - masked_mean(logprobs, mask))
    return torch.where(valid, cov, -math.inf)


def _clip_cov_head(epsilon_low, epsilon_high, clip_cov_ratio, clip_cov_lb, clip_cov_ub, generator):
    def head(logprobs, old, adv, valid):
        ratio = torch.exp(logprobs - old)  # no ±20 clamp, as verl's clip_cov
        pg_unclipped = -adv * ratio
        pg_clipped = -adv * torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        clip_by_origin = valid & (pg_clipped.detach() > pg_unclipped.detach())
        cov = _covariance(logprobs, adv, valid)
        candidates = valid & ~clip_by_origin & (cov > clip_cov_lb) & (cov < clip_cov_ub)
        flat = candidates.reshape(-1)
        # the one host read: randperm's length must be known on the host
        n_candidates, n_valid = torch.stack([flat.sum(), valid.sum()]).tolist()
        selected = torch.zeros_like(flat)
        if n_candidates > 0:
            # verl: torch.randperm(n) on the CPU default generator over the candidates in row-major order,
            # the first max(int(ratio·n_valid), 1) of the permutation are detached from the loss
            clip_num = max(int(clip_cov_ratio * n_valid), 1)
            device = "cpu" if generator is None else generator.device
            chosen = torch.randperm(n_candidates, generator=generator, device=device)[:clip_num]
            picked = torch.zeros(n_candidates, dtype=torch.bool, device=device)
            picked[chosen] = True
            rank = torch.cumsum(flat, 0) - 1  # each candidate's position among the candidates
            selected = flat & picked.to(flat.device, non_blocking=True)[rank.clamp(min=0)]
        selected = selected.reshape(valid.shape)
        loss = torch.where(selected, 0.0, torch.maximum(pg_unclipped, pg_clipped))
        clipped = clip_by_origin | selected
        return Policy(loss, torch.where(clipped, 0.0, -adv * ratio.detach()), clipped)
    return head


def clip_cov_loss(logits, labels, advantages, old_logprobs, *, epsilon_low=EPSILON, epsilon_high=EPSILON,
                  clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0, generator=None, ref_logprobs=None, beta=0.0,
                  kl_type="k3", bias_correction_kl=False, temperature=1.0, entropy_coef=0.0, ignore_index=-100,
                  loss_mask=None, reduction="mean", max_length=None, token_count=None, seq_count=None,
                  backend="auto", return_stats=False):
    """Clip-Cov, verl 0.9.1's ``clip_cov`` (``compute_policy_loss_clip_cov``).

    PPO's clipped surrogate max(−Ψ·r, −Ψ·clip(r, 1 − ε_low, 1 + ε_high)), r = exp(log p − old) (no ±20
    clamp, no dual clip, as verl), except that a few tokens get loss and gradient 0: among the valid
    tokens PPO's clip left alone whose covariance (Ψ − mean Ψ)·(log p − mean log p) (means over the
    micro-batch's valid tokens, of the current log-probs of this call's sweep) lies in (clip_cov_lb,
    clip_cov_ub), max(int(clip_cov_ratio·n_valid), 1) are chosen at random.

    generator: None draws as verl does, ``torch.randperm(n)`` over the candidates in row-major order on
    torch's default CPU generator, so that under the same seed the same tokens are chosen as verl's (the
    draw advances that generator as verl's does); a ``torch.Generator`` draws from it instead (on its
    device). One host synchronisation per call (the number of candidates; see the module docstring).
    The selection is a discontinuous function of the log-probs: a covariance within rounding of
    clip_cov_lb / clip_cov_ub, or of an ε bound, may fall on the other side than in verl's float64.

    clip_cov_ratio: in (0, 1]; clip_cov_lb < clip_cov_ub. The other options as ``ppo_loss`` /
    ``gspo_loss`` (``reduction`` default "mean", verl's "token-mean"; ``bias_correction_kl``: the KL times
    the token's ratio, TRL's form). ``return_stats``: clipped is 1 where PPO's clip or the selection took
    the token's gradient away.
    """
    _check_clip_cov(clip_cov_ratio, clip_cov_lb, clip_cov_ub, generator)
    return _run(_clip_cov_head(epsilon_low, epsilon_high, clip_cov_ratio, clip_cov_lb, clip_cov_ub, generator), logits,
                labels, advantages, old_logprobs, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                ref_logprobs=ref_logprobs, beta=beta, kl_type=kl_type, bias_correction_kl=bias_correction_kl,
                temperature=temperature, entropy_coef=entropy_coef, ignore_index=ignore_index, loss_mask=loss_mask,
                reduction=reduction, max_length=max_length, token_count=token_count, seq_count=seq_count,
                backend=backend, return_stats=return_stats)


def fused_linear_clip_cov_loss(hidden, weight, labels, advantages, old_logprobs, *, bias=None, epsilon_low=EPSILON,
                               epsilon_high=EPSILON, clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0,
                               generator=None, ref_logprobs=None, beta=0.0, kl_type="k3", bias_correction_kl=False,
                               temperature=1.0, entropy_coef=0.0, ignore_index=-100, loss_mask=None, reduction="mean",
                               max_length=None, token_count=None, seq_count=None, chunk_size=None,
                               accum_dtype=torch.float32, backend="auto", return_stats=False):
    """``clip_cov_loss(hidden @ weight.T + bias, ...)`` without the N×V logits (``fused_linear_token_logprobs``)."""
    _check_clip_cov(clip_cov_ratio, clip_cov_lb, clip_cov_ub, generator)
    return _run(_clip_cov_head(epsilon_low, epsilon_high, clip_cov_ratio, clip_cov_lb, clip_cov_ub, generator), hidden,
                labels, advantages, old_logprobs, linear=(weight, bias, chunk_size, accum_dtype),
                epsilon_low=epsilon_low, epsilon_high=epsilon_high, ref_logprobs=ref_logprobs, beta=beta,
                kl_type=kl_type, bias_correction_kl=bias_correction_kl, temperature=temperature,
                entropy_coef=entropy_coef, ignore_index=ignore_index, loss_mask=loss_mask, reduction=reduction,
                max_length=max_length, token_count=token_count, seq_count=seq_count, backend=backend,
                return_stats=return_stats)


def _check_clip_cov(clip_cov_ratio, clip_cov_lb, clip_cov_ub, generator):
    positive("clip_cov_ratio", clip_cov_ratio, upper=1.0)
    real("clip_cov_lb", clip_cov_lb)
    real("clip_cov_ub", clip_cov_ub)
    if not clip_cov_lb < clip_cov_ub:
        raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got {clip_cov_lb} >= {clip_cov_ub}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _kl_cov_head(kl_cov_ratio, ppo_kl_coef):
    def head(logprobs, old, adv, valid):
        log_ratio = logprobs - old
        ratio = torch.exp(log_ratio)  # no ±20 clamp and no clip, as verl's kl_cov
        cov = _covariance(logprobs, adv, valid).reshape(-1)
        # verl's topk of the covariance: the k = max(1, int(ratio·n_valid)) largest, as ranks below a count
        # that stays on the device (no host read)
        k = torch.floor(valid.sum().to(torch.float64) * kl_cov_ratio).clamp(min=1)
        rank = torch.empty_like(cov, dtype=torch.int64)
        rank[torch.argsort(cov, descending=True, stable=True)] = torch.arange(cov.numel(), device=cov.device)
        selected = valid & (rank < k).reshape(valid.shape)
        loss = -adv * ratio + torch.where(selected, ppo_kl_coef * log_ratio.abs(), 0.0)
        dloss = -adv * ratio.detach() + torch.where(selected, ppo_kl_coef * torch.sign(log_ratio.detach()), 0.0)
        return Policy(loss, dloss)
    return head


def kl_cov_loss(logits, labels, advantages, old_logprobs, *, kl_cov_ratio=2e-4, ppo_kl_coef=0.1, ref_logprobs=None,
                beta=0.0, kl_type="k3", bias_correction_kl=False, temperature=1.0, entropy_coef=0.0, ignore_index=-100,
                loss_mask=None, reduction="mean", max_length=None, token_count=None, seq_count=None, backend="auto",
                return_stats=False):
    """KL-Cov, verl 0.9.1's ``kl_cov`` (``compute_policy_loss_kl_cov``).

    −Ψ·r per token, r = exp(log p − old) (no clip, no ±20 clamp, as verl), plus ppo_kl_coef·|log p − old|
    on the k = max(int(kl_cov_ratio·n_valid), 1) valid tokens of largest covariance (Ψ − mean Ψ)·(log p −
    mean log p) (means over the micro-batch's valid tokens, of this call's current log-probs): at least
    one token is always penalised. Ties are broken by position (verl's ``torch.topk`` leaves them
    unspecified); a covariance within rounding of the k-th may rank differently than in verl's float64.
    No host synchronisation (verl moves the selection to the CPU).

    kl_cov_ratio: in (0, 1]; ppo_kl_coef: >= 0 (verl's PolicyLossConfig default 0.1; its function's own
    fallback is 1.0). The other options as ``clip_cov_loss``. ``return_stats``: logprobs, entropy,
    logit_grad_norm (no clipped).
    """
    _check_kl_cov(kl_cov_ratio, ppo_kl_coef)
    return _run(_kl_cov_head(kl_cov_ratio, ppo_kl_coef), logits, labels, advantages, old_logprobs,
                ref_logprobs=ref_logprobs, beta=beta, kl_type=kl_type, bias_correction_kl=bias_correction_kl,
                temperature=temperature, entropy_coef=entropy_coef, ignore_index=ignore_index, loss_mask=loss_mask,
                reduction=reduction, max_length=max_length, token_count=token_count, seq_count=seq_count,
                backend=backend, return_stats=return_stats)


def fused_linear_kl_cov_loss(hidden, weight, labels, advantages, old_logprobs, *, bias=None, kl_cov_ratio=2e-4,
                             ppo_kl_coef=0.1, ref_logprobs=None, beta=0.0, kl_type="k3", bias_correction_kl=False,
                             temperature=1.0, entropy_coef=0.0, ignore_index=-100, loss_mask=None, reduction="mean",
                             max_length=None, token_count=None, seq_count=None, chunk_size=None,
                             accum_dtype=torch.float32, backend="auto", return_stats=False):
    """``kl_cov_loss(hidden @ weight.T + bias, ...)`` without the N×V logits (``fused_linear_token_logprobs``)."""
    _check_kl_cov(kl_cov_ratio, ppo_kl_coef)
    return _run(_kl_cov_head(kl_cov_ratio, ppo_kl_coef), hidden, labels, advantages, old_logprobs,
                linear=(weight, bias, chunk_size, accum_dtype), ref_logprobs=ref_logprobs, beta=beta,
                kl_type=kl_type, bias_correction_kl=bias_correction_kl, temperature=temperature,
                entropy_coef=entropy_coef, ignore_index=ignore_index, loss_mask=loss_mask, reduction=reduction,
                max_length=max_length, token_count=token_count, seq_count=seq_count, backend=backend,
                return_stats=return_stats)


def _check_kl_cov(kl_cov_ratio, ppo_kl_coef):
    positive("kl_cov_ratio", kl_cov_ratio, upper=1.0)
    real("ppo_kl_coef", ppo_kl_coef)
    if ppo_kl_coef < 0:
        raise ValueError(f"ppo_kl_coef must be >= 0, got {ppo_kl_coef}")
