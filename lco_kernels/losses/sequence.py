"""Sequence-level losses on ``token_logprobs``: GSPO, GMPO (``geo_mean_loss``) and VESPO, whose weight or
ratio is a statistic over each sequence of the current log-probs, which no per-token head can form.

Each is a few lines of PyTorch on the exact, differentiable log-probs of one vocabulary sweep
(``token_logprobs``, or ``fused_linear_token_logprobs``' chunks without N×V logits): the N×V work stays
one sweep forward and one backward (3.0·N·V of traffic, 2 launches); everything here is O(N).

The shared machinery (also used by ``batch_selected`` and ``rollout_correction``): ``_run`` checks every
argument, runs the one sweep and hands a policy *head* the log-probs, the old log-probs (the current
ones, detached, where none are given or a token is masked: the ratio is then exactly 1), the advantages
and the valid-token mask; the head returns its per-token policy loss ``Policy``. ``_finish`` then adds,
per token and as verl's actor does, β·KL(log p_t, ref_t) (the per-token heads' ``kl_type`` estimators;
with ``bias_correction_kl``, TRL's importance-sampling-corrected KL, the KL times the differentiable
ratio) and −c·H_t, applies the reduction and forms the statistics: ``logit_grad_norm`` is
|∂ℓ_t/∂log p_t|·‖e_i − p‖/τ, the second factor being the SFT head's own gradient norm from the sweep.
"""
import dataclasses
import math
from typing import Optional

import torch

from .._plumbing import loss_spec, prepare_tokens
from .._validation import check_linear, check_logits_labels, check_options, per_token, real
from ..fused_linear import _token_sweep as fused_linear_token_sweep
from ..reductions import token_weights
from ..registry import EPSILON
from ..stats import TokenStats
from ..torch_heads import _kl_term
from .per_token import _token_sweep

LOG_RATIO_CLAMP = 20.0  # verl's and TRL's clamp of a log-ratio before exp (ratios in [e^−20, e^20])


@dataclasses.dataclass
class Policy:
    """A head's policy term, labels-shaped (masked tokens may hold anything: they are zeroed after).

    loss: differentiable per-token policy loss. dloss: its detached derivative w.r.t. the token's own
    log p_t (for ``logit_grad_norm``). clipped: where a clip or selection took the token's gradient
    away (None: the loss has no such notion). weights: (N,) weights of the policy term when they are not
    the reduction's (GMPO's mean over sequences, a rejection mask's counts). kl_ratio: (ratio, its
    derivative w.r.t. the token's own log p_t) for ``bias_correction_kl`` when it is not the token's
    ratio exp(log p_t − old_t).
    """
    loss: torch.Tensor
    dloss: torch.Tensor
    clipped: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None
    kl_ratio: Optional[tuple] = None


def positive(name, value, upper=None):
    """A real ``value`` > 0 (and <= ``upper`` when given)."""
    real(name, value)
    if value <= 0 or (upper is not None and value > upper):
        bound = f"in (0, {upper}]" if upper is not None else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")


def check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def token_ratio(logprobs, old):
    """The token's ratio exp(log p_t − old_t), unclamped as TRL's coef_1 and the per-token heads'
    bias-corrected KL, and its derivative w.r.t. log p_t (itself)."""
    r = torch.exp(logprobs - old)
    return r, r.detach()


def masked_mean(values, mask, dim=None):
    """Mean of ``values`` over ``mask`` (float, labels-shaped); 0 where the mask is empty."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim, keepdim=True) / mask.sum(dim, keepdim=True).clamp(min=1)


def _run(head, inputs, labels, advantages, old_logprobs, *, linear=None, epsilon_low=EPSILON, epsilon_high=EPSILON,
         ref_logprobs, beta, kl_type, bias_correction_kl, temperature, entropy_coef, ignore_index,
         loss_mask, reduction, max_length, token_count, seq_count, backend, return_stats):
    """The loss of ``head`` on the log-probs of ``inputs``: logits, or hidden states with ``linear`` =
    (weight, bias, chunk_size, accum_dtype). Every argument is checked before the sweep."""
    if linear is None:
        check_logits_labels(inputs, labels)
    else:
        check_linear(inputs, linear[0], linear[1], labels, *linear[2:])
    check_flag("bias_correction_kl", bias_correction_kl)
    if old_logprobs is not None and not isinstance(old_logprobs, torch.Tensor):
        raise TypeError(f"old_logprobs must be a tensor (the behaviour policy's log-probs of the labels) or None "
                        f"(on-policy), got {type(old_logprobs).__name__}")
    # these losses take PPO's per-token inputs (advantages, old log-probs, an optional reference) and its
    # ε / KL / temperature options: PPO's spec (PG's on-policy) checks them
    spec = loss_spec("pg" if old_logprobs is None else "ppo", old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                     epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta, kl_type=kl_type,
                     temperature=temperature, entropy_coef=entropy_coef)
    check_options(ignore_index=ignore_index, reduction=reduction, backend=backend, return_stats=return_stats,
                  max_length=max_length, temperature=temperature, entropy_coef=entropy_coef, token_count=token_count,
                  seq_count=seq_count, device=getattr(inputs, "device", None))
    tokens = prepare_tokens(spec, labels, advantages, old_logprobs, ref_logprobs, ignore_index=ignore_index,
                            reduction=reduction, loss_mask=loss_mask, max_length=max_length, token_count=token_count,
                            seq_count=seq_count)
    if linear is None:
        sweep = _token_sweep(inputs, tokens.labels, temperature=temperature, ignore_index=ignore_index,
                             backend=backend, return_entropy=entropy_coef != 0, return_stats=return_stats)
    else:
        sweep = fused_linear_token_sweep(inputs, *linear[:2], tokens.labels, temperature, ignore_index, *linear[2:],
                                         backend, entropy_coef != 0, return_stats)
    return _finish(head, *sweep, tokens, spec, ignore_index, bias_correction_kl)


def _finish(head, logprobs, entropy, sweep_stats, tokens, spec, ignore_index, bias_correction_kl):
    valid = tokens.labels != ignore_index
    adv = tokens.advantages.to(logprobs.dtype)
    # the ratio is exactly 1 on-policy and at masked tokens (whose old log-probs may hold anything, NaN too)
    old = logprobs.detach() if tokens.old_logprobs is None else tokens.old_logprobs.to(logprobs.dtype)
    old = torch.where(valid, old, logprobs.detach())
    policy = head(logprobs, old, adv, valid)
    extra, dloss = None, policy.dloss
    if spec.has_ref:
        # a harmless value where masked: a NaN there would reach the gradient through exp's backward (0·NaN)
        ref = torch.where(valid, tokens.ref_logprobs.to(logprobs.dtype), logprobs.detach())
        kl, dkl = _kl_term(logprobs, ref, spec.kl_type)
        if bias_correction_kl:
            ratio, dratio = policy.kl_ratio or token_ratio(logprobs, old)
            dkl = dkl * ratio.detach() + kl.detach() * dratio
            kl = kl * ratio
        extra = spec.beta * kl
        dloss = dloss + spec.beta * dkl.detach()
    if spec.entropy_coef != 0:
        extra = -spec.entropy_coef * entropy if extra is None else extra - spec.entropy_coef * entropy
    if tokens.weights is None:  # "none"
        loss = torch.where(valid, policy.loss if extra is None else policy.loss + extra, 0.0)
    elif policy.weights is None:
        loss = (torch.where(valid, policy.loss if extra is None else policy.loss + extra, 0.0).reshape(-1)
                * tokens.weights).sum()
    else:
        loss = (torch.where(valid, policy.loss, 0.0).reshape(-1) * policy.weights).sum()
        if extra is not None:
            loss = loss + (torch.where(valid, extra, 0.0).reshape(-1) * tokens.weights).sum()
    if sweep_stats is None:
        return loss
    norm = sweep_stats.logit_grad_norm  # ‖e_i − p‖/τ: the SFT head's gradient norm
    clipped = None if policy.clipped is None else (valid & policy.clipped).to(norm.dtype)
    stats = TokenStats(logprobs=sweep_stats.logprobs, entropy=sweep_stats.entropy,
                       logit_grad_norm=torch.where(valid, dloss.abs().to(norm.dtype) * norm, 0.0), clipped=clipped)
    return loss, stats


def _gspo_head(epsilon_low, epsilon_high):
    def head(logprobs, old, adv, valid):
        mask = valid.to(logprobs.dtype)
        # log s = mean over the sequence's valid tokens of log p_t − log p_old,t (0 at masked tokens)
        log_seq_ratio = masked_mean(logprobs - old, mask, -1)
        # straight-through: the value is the sequence's ratio, the gradient that of log p_t
        s = torch.exp(torch.clamp(logprobs - logprobs.detach() + log_seq_ratio.detach(), max=10.0))
        pg_unclipped = -adv * s
        pg_clipped = -adv * torch.clamp(s, 1 - epsilon_low, 1 + epsilon_high)
        # ∂(per-token loss)/∂log p_t: −Ψ·s unless the clip or the clamp at 10 binds
        clipped = pg_clipped.detach() > pg_unclipped.detach()
        dloss = torch.where(clipped | (log_seq_ratio.detach() > 10.0), 0.0, -adv * s.detach())
        # bias_correction_kl: TRL's sequence-level coef_1 = exp(log s) (unclamped), differentiable through
        # every token of the sequence
        seq_ratio = torch.exp(log_seq_ratio)
        dratio = seq_ratio.detach() / mask.sum(-1, keepdim=True).clamp(min=1)
        return Policy(torch.maximum(pg_unclipped, pg_clipped), dloss, clipped,
                      kl_ratio=(seq_ratio.expand_as(logprobs), dratio.expand_as(logprobs)))
    return head


def gspo_loss(logits, labels, advantages, old_logprobs, *, epsilon_low=3e-4, epsilon_high=4e-4, ref_logprobs=None,
              beta=0.0, kl_type="k3", bias_correction_kl=False, temperature=1.0, entropy_coef=0.0, ignore_index=-100,
              loss_mask=None, reduction="seq-mean-token-mean", max_length=None, token_count=None, seq_count=None,
              backend="auto", return_stats=False):
    """GSPO (Zheng et al. 2025, arXiv:2507.18071): the clipped sequence-ratio surrogate.

    As verl 0.9.1's ``compute_policy_loss_gspo``: s = exp(mean_t(log p_t − log p_old,t)) over the
    sequence's valid tokens, the token-level straight-through ratio s_t = sg(s)·p_t / sg(p_t) (value s,
    gradient s·∇log p_t), log s_t clamped at 10, and the clipped surrogate max(−Ψ·s_t, −Ψ·clip(s_t,
    1 − ε_low, 1 + ε_high)) per token; sequences are the last dimension of ``labels``. TRL's
    ``importance_sampling_level="sequence"`` with ``loss_type="grpo"`` is the same loss without the
    clamp at 10.

    advantages: per sequence (B, 1) or per token (B, T), as the other losses; old_logprobs: (B, T),
    the behaviour policy's log-probs of the labels, or None on-policy (the ratio is then exactly 1: the
    current log-probs, detached, from the same sweep; no second pass to compute them). Defaults: the GSPO
    paper's ε (3e-4, 4e-4) and its aggregation, "seq-mean-token-mean" (any reduction of ``lco_loss`` is
    accepted, with its ``token_count`` / ``seq_count``). ``ref_logprobs``, ``beta``, ``kl_type``,
    ``entropy_coef`` and the other options as ``lco_loss``. bias_correction_kl: TRL's
    ``use_bias_correction_kl``: the KL term times TRL's sequence-level coef_1 = exp(log s), differentiable
    (unclamped, as TRL's; TRL's k3 is not clamped as verl's and ours: see ``losses.per_token``).
    With ``return_stats``, ``(loss, TokenStats)`` with logprobs, entropy, logit_grad_norm (of the token's
    own GSPO and KL terms) and clipped (1 where the sequence's clip took the token's gradient away).
    """
    return _run(_gspo_head(epsilon_low, epsilon_high), logits, labels, advantages, old_logprobs,
                epsilon_low=epsilon_low, epsilon_high=epsilon_high, ref_logprobs=ref_logprobs, beta=beta,
                kl_type=kl_type, bias_correction_kl=bias_correction_kl, temperature=temperature,
                entropy_coef=entropy_coef, ignore_index=ignore_index, loss_mask=loss_mask, reduction=reduction,
                max_length=max_length, token_count=token_count, seq_count=seq_count, backend=backend,
                return_stats=return_stats)


def fused_linear_gspo_loss(hidden, weight, labels, advantages, old_logprobs, *, bias=None, epsilon_low=3e-4,
                           epsilon_high=4e-4, ref_logprobs=None, beta=0.0, kl_type="k3", bias_correction_kl=False,
                           temperature=1.0, entropy_coef=0.0, ignore_index=-100, loss_mask=None,
                           reduction="seq-mean-token-mean", max_length=None, token_count=None, seq_count=None,
                           chunk_size=None, accum_dtype=torch.float32, backend="auto", return_stats=False):
    """``gspo_loss(hidden @ weight.T + bias, ...)`` without the N×V logits (``fused_linear_token_logprobs``)."""
    return _run(_gspo_head(epsilon_low, epsilon_high), hidden, labels, advantages, old_logprobs,
                linear=(weight, bias, chunk_size, accum_dtype), epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                ref_logprobs=ref_logprobs, beta=beta, kl_type=kl_type, bias_correction_kl=bias_correction_kl,
                temperature=temperature, entropy_coef=entropy_coef, ignore_index=ignore_index, loss_mask=loss_mask,
                reduction=reduction, max_length=max_length, token_count=token_count, seq_count=seq_count,
                backend=backend, return_stats=return_stats)


def _geo_mean_head(epsilon_low, epsilon_high, seq_count):
    def head(logprobs, old, adv, valid):
        mask = valid.to(logprobs.dtype)
        log_ratio = logprobs - old
        # the sign-clipped log-ratio: clamped to [−ε_low, ε_high] only in the direction Ψ pushes
        sign = torch.sign(adv)
        clipped_log_ratio = sign * torch.minimum(sign * log_ratio, sign * log_ratio.clamp(-epsilon_low, epsilon_high))
        ratio = torch.exp(masked_mean(clipped_log_ratio, mask, -1))
        seq_adv = masked_mean(adv, mask, -1)
        n = mask.sum(-1, keepdim=True).clamp(min=1)
        # the sequence's loss −Ā·ratio, spread evenly over its valid tokens; summed back by the weights
        # 1/seq_count (verl's torch.mean over the micro-batch's rows, empty ones included)
        seq_loss = -seq_adv * ratio / n
        clipped = (sign * log_ratio.detach()) > (sign * log_ratio.detach().clamp(-epsilon_low, epsilon_high))
        dloss = torch.where(clipped, 0.0, seq_loss.detach()).expand_as(logprobs)
        weights = token_weights(valid, adv, "seq-mean-token-sum", seq_count=seq_count)
        return Policy(seq_loss.expand_as(logprobs), dloss, clipped, weights=weights)
    return head


def _check_log_clip(epsilon_low, epsilon_high):
    for name, value in (("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high)):
        real(name, value)
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (a bound of the log-ratio), got {value}")


def geo_mean_loss(logits, labels, advantages, old_logprobs, *, epsilon_low=EPSILON, epsilon_high=EPSILON,
                  ref_logprobs=None, beta=0.0, kl_type="k3", bias_correction_kl=False, temperature=1.0,
                  entropy_coef=0.0, ignore_index=-100, loss_mask=None, reduction="mean", max_length=None,
                  token_count=None, seq_count=None, backend="auto", return_stats=False):
    """GMPO (Zhao et al. 2025, arXiv:2507.20673), verl 0.9.1's ``geo_mean`` (``compute_policy_loss_geo_mean``).

    Per sequence b (the last dimension of ``labels``), with x_t = log p_t − log p_old,t over its valid
    tokens and σ_t = sign(Ψ_t): x̃_t = σ_t·min(σ_t·x_t, σ_t·clip(x_t, −ε_low, ε_high)) (the clip acts in
    log space, ratio bounds [e^−ε_low, e^ε_high], and only in the direction Ψ pushes), and

        L = (1 / B) Σ_b −Ā_b·exp(mean_t x̃_t),    Ā_b = the mean of Ψ over the sequence's valid tokens,

    B = ``seq_count`` if given (the optimizer step's number of sequences, so that micro-batches add up),
    else the number of rows of ``labels`` — verl's ``torch.mean`` over the micro-batch's sequences,
    fully masked ones included (their term is 0), bypassing its ``loss_agg_mode`` and global batch info.
    No ±20 clamp of x (as verl). ``reduction`` (default "mean", verl's "token-mean"), ``token_count`` and
    ``seq_count`` aggregate the KL and entropy terms as verl's actor does; with "none" the result is
    labels-shaped: each sequence's policy loss spread evenly over its valid tokens (the sum over a row
    is its term −Ā·exp(mean x̃)), plus the per-token KL and entropy terms.

    old_logprobs: (B, T) or None (on-policy: ratio exactly 1). ``ref_logprobs``, ``beta``, ``kl_type``,
    ``bias_correction_kl`` (the KL times the token's ratio exp(x_t), TRL's token-level form),
    ``entropy_coef`` and the other options as ``gspo_loss``. epsilon_low, epsilon_high: >= 0 (log-space
    bounds; verl's clip_ratio_low / clip_ratio_high, 0.2 by default; the GMPO paper uses 0.4).
    ``return_stats``: clipped is 1 where the token's log-ratio was clipped (its gradient taken away);
    logit_grad_norm is that of the token's share of its sequence's loss (before the 1/B) and its KL term.
    """
    _check_log_clip(epsilon_low, epsilon_high)
    return _run(_geo_mean_head(epsilon_low, epsilon_high, seq_count), logits, labels, advantages, old_logprobs,
                ref_logprobs=ref_logprobs, beta=beta, kl_type=kl_type, bias_correction_kl=bias_correction_kl,
                temperature=temperature, entropy_coef=entropy_coef, ignore_index=ignore_index, loss_mask=loss_mask,
                reduction=reduction, max_length=max_length, token_count=token_count, seq_count=seq_count,
                backend=backend, return_stats=return_stats)


def fused_linear_geo_mean_loss(hidden, weight, labels, advantages, old_logprobs, *, bias=None, epsilon_low=EPSILON,
                               epsilon_high=EPSILON, ref_logprobs=None, beta=0.0, kl_type="k3",
                               bias_correction_kl=False, temperature=1.0, entropy_coef=0.0, ignore_index=-100,
                               loss_mask=None, reduction="mean", max_length=None, token_count=None, seq_count=None,
                               chunk_size=None, accum_dtype=torch.float32, backend="auto", return_stats=False):
    """``geo_mean_loss(hidden @ weight.T + bias, ...)`` without the N×V logits (``fused_linear_token_logprobs``)."""
    _check_log_clip(epsilon_low, epsilon_high)
    return _run(_geo_mean_head(epsilon_low, epsilon_high, seq_count), hidden, labels, advantages, old_logprobs,
                linear=(weight, bias, chunk_size, accum_dtype), ref_logprobs=ref_logprobs, beta=beta,
                kl_type=kl_type, bias_correction_kl=bias_correction_kl, temperature=temperature,
                entropy_coef=entropy_coef, ignore_index=ignore_index, loss_mask=loss_mask, reduction=reduction,
                max_length=max_length, token_count=token_count, seq_count=seq_count, backend=backend,
                return_stats=return_stats)


def _vespo_head(k_pos, lambda_pos, k_neg, lambda_neg, sampler_ratio):
    lower = math.log(1e-8)  # TRL's lower clamp of log w

    def head(logprobs, old, adv, valid):
        # log w = Σ_t clamp(log p_t − log p_old,t, ±20) over the sequence's valid tokens (a sum, not a mean)
        log_ratio = torch.clamp(logprobs.detach() - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        log_w = torch.where(valid, log_ratio, 0.0).sum(-1, keepdim=True)
        if sampler_ratio is not None:  # TRL's vLLM folding: + Σ_t clamp(log(π_old / π_sampler), log 1e-8, 20)
            log_is = torch.clamp(torch.log(sampler_ratio.to(logprobs.dtype)), lower, LOG_RATIO_CLAMP)
            log_w = log_w + torch.where(valid, log_is, 0.0).sum(-1, keepdim=True)
        log_w = torch.clamp(log_w, lower, LOG_RATIO_CLAMP)
        nonneg = adv >= 0
        k = torch.where(nonneg, k_pos, k_neg)
        lam = torch.where(nonneg, lambda_pos, lambda_neg)
        # φ(w) = e^λ·w^k·e^{−λw} (φ(1) = 1), in log space
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        return Policy(-phi * adv * logprobs, -phi * adv)
    return head


def _check_vespo(k_pos, lambda_pos, k_neg, lambda_neg, sampler_ratio, labels):
    for name, value in (("k_pos", k_pos), ("lambda_pos", lambda_pos), ("k_neg", k_neg), ("lambda_neg", lambda_neg)):
        positive(name, value)
    if sampler_ratio is None:
        return None
    if not isinstance(sampler_ratio, torch.Tensor):
        raise TypeError(f"sampler_ratio must be a tensor (π_old / π_sampler per token) or None, got "
                        f"{type(sampler_ratio).__name__}")
    if not isinstance(labels, torch.Tensor):  # refused by the label check that follows
        return sampler_ratio
    return per_token("sampler_ratio", sampler_ratio, labels, allow_number=False)


def vespo_loss(logits, labels, advantages, old_logprobs, *, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0,
               sampler_ratio=None, ref_logprobs=None, beta=0.0, kl_type="k3", bias_correction_kl=False,
               temperature=1.0, entropy_coef=0.0, ignore_index=-100, loss_mask=None, reduction="mean",
               max_length=None, token_count=None, seq_count=None, backend="auto", return_stats=False):
    """VESPO, TRL 1.16's ``loss_type="vespo"`` (``GRPOTrainer.get_gamma_weights``) and Liger 0.8.5's.

    Per token −sg(φ(w))·Ψ·log p_t, with w the sequence's importance ratio and φ a gamma weighting:

        log w = clamp(Σ_t clamp(log p_t − log p_old,t, ±20) [+ Σ_t clamp(log sampler_ratio_t, log 1e-8, 20)],
                      log 1e-8, 20)
        φ(w) = exp(λ + k·log w − λ·w)  (φ(1) = 1; NaN / ±inf → 0),

    the sums over the sequence's valid tokens (sequences: the last dimension of ``labels``), (k, λ) =
    (k_pos, lambda_pos) where Ψ >= 0 and (k_neg, lambda_neg) where Ψ < 0 (Ψ ≥ 0, as TRL; SAPO and DPPO
    split at Ψ > 0). φ is detached: it only scales the gradient Ψ·∇log p_t.

    old_logprobs: (B, T), or None on-policy (w = 1, φ = 1: REINFORCE). sampler_ratio: TRL's vLLM
    importance-sampling ratio π_old / π_sampler per token (labels-shaped; TRL's ``token_truncate`` /
    ``token_mask`` ratios, 0 for a masked-out token), folded into w in log space as TRL does (not
    multiplied into the loss). TRL sums it over every position, padding included, where its own pipeline
    puts ratio 1 (log 0); here it is summed over valid tokens only, so padding may hold anything: the same
    loss whenever the padding's ratio is 1. Reduction default "mean" (TRL's and Liger's token mean; pass
    TRL's ``num_items_in_batch`` as ``token_count``). k_pos, lambda_pos, k_neg, lambda_neg: > 0 (TRL
    clamps λ at 1e-4; a λ ≤ 0 is refused here). bias_correction_kl: TRL's ``use_bias_correction_kl``, the
    KL term times the token's differentiable ratio exp(log p_t − log p_old,t), unclamped (verl's k3 is
    clamped, TRL's is not: see ``losses.per_token``). The other options as ``gspo_loss``; ``return_stats``:
    logprobs, entropy, logit_grad_norm (no clipped: nothing is clipped).
    """
    sampler_ratio = _check_vespo(k_pos, lambda_pos, k_neg, lambda_neg, sampler_ratio, labels)
    return _run(_vespo_head(k_pos, lambda_pos, k_neg, lambda_neg, sampler_ratio), logits, labels, advantages,
                old_logprobs, ref_logprobs=ref_logprobs, beta=beta, kl_type=kl_type,
                bias_correction_kl=bias_correction_kl, temperature=temperature, entropy_coef=entropy_coef,
                ignore_index=ignore_index, loss_mask=loss_mask, reduction=reduction, max_length=max_length,
                token_count=token_count, seq_count=seq_count, backend=backend, return_stats=return_stats)


def fused_linear_vespo_loss(hidden, weight, labels, advantages, old_logprobs, *, bias=None, k_pos=2.0, lambda_pos=3.0,
                            k_neg=3.0, lambda_neg=2.0, sampler_ratio=None, ref_logprobs=None, beta=0.0, kl_type="k3",
                            bias_correction_kl=False, temperature=1.0, entropy_coef=0.0, ignore_index=-100,
                            loss_mask=None, reduction="mean", max_length=None, token_count=None, seq_count=None,
                            chunk_size=None, accum_dtype=torch.float32, backend="auto", return_stats=False):
    """``vespo_loss(hidden @ weight.T + bias, ...)`` without the N×V logits (``fused_linear_token_logprobs``);
    Liger's ``LigerFusedLinearGRPOLoss(loss_type="vespo")`` computes the same loss from the same inputs."""
    sampler_ratio = _check_vespo(k_pos, lambda_pos, k_neg, lambda_neg, sampler_ratio, labels)
    return _run(_vespo_head(k_pos, lambda_pos, k_neg, lambda_neg, sampler_ratio), hidden, labels, advantages,
                old_logprobs, linear=(weight, bias, chunk_size, accum_dtype), ref_logprobs=ref_logprobs, beta=beta,
                kl_type=kl_type, bias_correction_kl=bias_correction_kl, temperature=temperature,
                entropy_coef=entropy_coef, ignore_index=ignore_index, loss_mask=loss_mask, reduction=reduction,
                max_length=max_length, token_count=token_count, seq_count=seq_count, backend=backend,
                return_stats=return_stats)
