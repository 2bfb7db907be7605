"""Rollout correction: verl 0.9.1's ``bypass_mode`` policy loss and its ``rollout_corr_helper`` weights and
rejection masks (``compute_rollout_correction_and_rejection_mask``), computed from the forward sweep's own
log-probs.

In bypass mode the old log-probs are the rollout engine's (vLLM's): there is no recomputation of the old
policy. Truncated (TIS) or masked (IcePop) importance weights π_current / π_rollout per token or per
sequence, and rejection masks from divergence estimators of the same log-ratio, are computed under
no_grad from the current log-probs of this call's sweep; then PPO's clipped surrogate against the
rollout log-probs (``loss_type="ppo_clip"``, the weights unused, as verl) or REINFORCE with the weights
(``loss_type="reinforce"``) runs on the same differentiable log-probs (``sequence._run``): one sweep
forward, one backward. No host synchronisation (verl reads several metrics and a normaliser to the host).

Left out: verl's metrics (``rollout_corr/*``: the statistics are the caller's to compute from the
returned weights and mask), and the cross-rank mean of ``rollout_is_batch_normalize`` under
torch.distributed (here the mean is this call's).
"""
import math

import torch

from .._validation import real
from ..reductions import token_weights
from ..registry import EPSILON
from .sequence import LOG_RATIO_CLAMP, Policy, _run, check_flag, masked_mean

RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
              "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")


def _bounds(name, spec):
    """(lower or None, upper) from a number, a (lower, upper) pair, or verl's string "upper" / "lower_upper"."""
    if isinstance(spec, str):
        try:
            parts = tuple(float(p) for p in spec.strip().split("_", 1))
        except ValueError:
            raise ValueError(f"{name} must be a number, a (lower, upper) pair or a 'lower_upper' string, got "
                             f"{spec!r}") from None
        spec = parts if len(parts) == 2 else parts[0]
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise ValueError(f"{name} must be a number or a (lower, upper) pair, got {spec!r}")
        lower, upper = spec
        real(name, lower)
    else:
        lower, upper = None, spec
    real(name, upper)
    if upper <= 0 or (lower is not None and not 0 < lower <= upper):
        raise ValueError(f"{name} must be positive with lower <= upper, got {spec!r}")
    return (None if lower is None else float(lower)), float(upper)


def _rs_thresholds(options, spec):
    """One (lower, upper) per rejection option, as verl's ``_parse_rollout_rs_thresholds``: one threshold
    shared by every option or one per option (a comma-separated string or a sequence); a k1 option takes a
    (lower, upper) pair (lower = 1 / upper when only the upper bound is given), the others an upper bound."""
    if spec is None:
        raise ValueError("rollout_rs_threshold is required with rollout_rs")
    if isinstance(spec, str):
        specs = [part.strip() for part in spec.split(",") if part.strip()]
    elif isinstance(spec, (tuple, list)) and len(options) > 1:
        specs = list(spec)
    else:
        specs = [spec]
    if len(specs) == 1:
        specs = specs * len(options)
    if len(specs) != len(options):
        raise ValueError(f"rollout_rs_threshold must give one threshold, or one per rollout_rs option "
                         f"({len(options)}), got {spec!r}")
    thresholds = []
    for option, one in zip(options, specs):
        lower, upper = _bounds("rollout_rs_threshold", one)
        if option.endswith("k1"):
            lower = 1.0 / upper if lower is None else lower
        elif lower is not None:
            raise ValueError(f"rollout_rs_threshold for {option!r} must be one upper bound, got {one!r}")
        thresholds.append((lower, upper))
    return thresholds


def _rs_options(rollout_rs):
    options = rollout_rs.split(",") if isinstance(rollout_rs, str) else rollout_rs
    if not isinstance(options, (tuple, list)):
        raise TypeError(f"rollout_rs must be a string (comma-separated options) or a sequence of options, got "
                        f"{type(rollout_rs).__name__}")
    options = list(dict.fromkeys(o.strip() for o in options if isinstance(o, str) and o.strip()))
    if not options or any(o not in RS_OPTIONS for o in options):
        raise ValueError(f"rollout_rs options must be among {RS_OPTIONS}, got {rollout_rs!r}")
    return options


def check_rollout_correction(rollout_is, rollout_is_threshold, rollout_is_batch_normalize, rollout_rs,
                             rollout_rs_threshold):
    """The parsed options: (IS bounds or None, [(rejection option, (lower, upper))])."""
    if rollout_is is not None and rollout_is not in ("token", "sequence"):
        raise ValueError(f"rollout_is must be None, 'token' or 'sequence', got {rollout_is!r}")
    check_flag("rollout_is_batch_normalize", rollout_is_batch_normalize)
    is_bounds = None
    if rollout_is is not None and rollout_is_threshold is not None:
        is_bounds = _bounds("rollout_is_threshold", rollout_is_threshold)
    rejections = []
    if rollout_rs is not None:
        options = _rs_options(rollout_rs)
        rejections = list(zip(options, _rs_thresholds(options, rollout_rs_threshold)))
    return is_bounds, rejections


@torch.no_grad()
def rollout_correction(logprobs, rollout_logprobs, mask, *, rollout_is=None, rollout_is_threshold=2.0,
                       rollout_is_batch_normalize=False, rollout_rs=None, rollout_rs_threshold=None):
    """verl's rollout importance weights and rejection mask (``compute_rollout_correction_and_rejection_mask``)
    from log-prob tensors, detached, without host synchronisation: ``(weights or None, kept)``.

    logprobs: the current policy's log-probs of the labels (e.g. ``token_logprobs``'); rollout_logprobs: the
    rollout engine's; mask: valid tokens (bool or 0/1), all (B, T), sequences along the last dimension.
    With x_t = log p_t − log p_rollout,t on valid tokens:

    - rollout_is: None (no weights) | "token": w_t = exp(clamp(x_t, ±20)) | "sequence": w = exp(clamp(Σ_t x_t,
      ±20)) for every token of the sequence; rollout_is_threshold: a number u (TIS: min(w, u)) or a
      (lower, upper) pair / verl's "lower_upper" string (IcePop: w where lower ≤ w ≤ upper, else 0); 0 at
      masked tokens. rollout_is_batch_normalize: divide by the mean weight over valid tokens ("token") or
      over the non-empty sequences' weights ("sequence") when that mean exceeds 1e-8 (this call's mean: verl
      averages across ranks under torch.distributed).
    - rollout_rs: rejection options (a comma-separated string as verl's, or a sequence), each a divergence
      estimator of x clamped at ±20 (k1 = −x, k2 = x²/2, k3 = eˣ − 1 − x) per token ("token_k1/2/3") or its
      sum / mean / max over the sequence's valid tokens ("seq_sum_k*", "seq_mean_k*", "seq_max_k2/3"); a
      token is kept where every option passes: k2 / k3 statistics ≤ the option's upper bound, k1 statistics
      within [log lower, log upper] (k1 thresholds are ratio bounds: a (lower, upper) pair, "lower_upper",
      or an upper u with lower 1/u). rollout_rs_threshold: one threshold for every option or one per option.

    kept: bool, the mask with the rejected tokens removed.
    """
    is_bounds, rejections = check_rollout_correction(rollout_is, rollout_is_threshold, rollout_is_batch_normalize,
                                                     rollout_rs, rollout_rs_threshold)
    valid = mask.bool() if mask.dtype != torch.bool else mask
    return _correct(logprobs.detach(), rollout_logprobs, valid, rollout_is, is_bounds, rollout_is_batch_normalize,
                    rejections)


def _correct(logprobs, rollout_logprobs, valid, rollout_is, is_bounds, batch_normalize, rejections):
    mask = valid.to(logprobs.dtype)
    log_ratio = torch.where(valid, logprobs - rollout_logprobs.to(logprobs.dtype), 0.0)
    safe = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    weights = None
    if is_bounds is not None:
        if rollout_is == "token":
            raw = torch.exp(safe) * mask
        else:
            raw = torch.exp(log_ratio.sum(-1, keepdim=True).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) * mask
        lower, upper = is_bounds
        weights = raw.clamp(max=upper) if lower is None else torch.where((raw >= lower) & (raw <= upper), raw, 0.0)
        if batch_normalize:
            if rollout_is == "token":
                mean = masked_mean(weights, mask)
            else:
                non_empty = (mask.sum(-1, keepdim=True) > 0).to(mask.dtype)
                mean = masked_mean(masked_mean(weights, mask, -1), non_empty)
            weights = torch.where(mean > 1e-8, weights / mean, weights)
    kept = valid
    estimators = {"k1": -safe, "k2": 0.5 * safe * safe, "k3": torch.exp(safe) - 1.0 - safe}
    for option, (lower, upper) in rejections:
        value = estimators[option[-2:]]
        if option.startswith("seq_sum"):
            value = (value * mask).sum(-1, keepdim=True)
        elif option.startswith("seq_mean"):
            value = masked_mean(value, mask, -1)
        elif option.startswith("seq_max"):
            value = torch.where(valid, value, -math.inf).amax(-1, keepdim=True)
            value = torch.where(value == -math.inf, 0.0, value)
        if option.endswith("k1"):
            keep = (value >= math.log(lower)) & (value <= math.log(upper))
        else:
            keep = value <= upper
        kept = kept & keep
    return weights, kept


def _bypass_head(loss_type, epsilon_low, epsilon_high, clip_ratio_c, correction, reduction, max_length, token_count,
                 seq_count):
    def head(logprobs, rollout, adv, valid):
        with torch.no_grad():
            weights, kept = _correct(logprobs.detach(), rollout, valid, *correction)
        if loss_type == "ppo_clip":
            # verl's vanilla PPO against the rollout log-probs (the weights are not applied: the ratio is the IS)
            ratio = torch.exp(torch.clamp(logprobs - rollout, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
            pg_unclipped = -adv * ratio
            pg_clipped = -adv * torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
            pg = torch.maximum(pg_unclipped, pg_clipped)
            capped = (adv < 0) & (pg.detach() > -adv * clip_ratio_c)
            pg = torch.where(adv < 0, torch.minimum(pg, -adv * clip_ratio_c), pg)
            clipped = (pg_clipped.detach() > pg_unclipped.detach()) | capped
            inside = (logprobs.detach() - rollout).abs() <= LOG_RATIO_CLAMP
            dloss = torch.where(clipped | ~inside, 0.0, -adv * ratio.detach())
        else:
            scale = adv if weights is None else adv * weights
            pg, dloss, clipped = -scale * logprobs, -scale, torch.zeros_like(valid)
        # the policy term's normalisers count the kept tokens (verl's modified response mask); a seq-* mode
        # without seq_count counts the sequences with a kept token, as verl's agg_loss
        if seq_count is None and reduction.startswith("seq-"):
            rows = kept.reshape(-1, kept.shape[-1] if kept.dim() else 1).any(-1)
            n_seqs = rows.sum().clamp(min=1)
        else:
            n_seqs = seq_count
        policy_weights = token_weights(kept, adv, reduction, max_length, token_count, n_seqs)
        return Policy(torch.where(kept, pg, 0.0), torch.where(kept, dloss, 0.0), clipped | (valid & ~kept),
                      weights=policy_weights)
    return head


def bypass_mode_loss(logits, labels, advantages, rollout_logprobs, *, loss_type="ppo_clip", rollout_is=None,
                     rollout_is_threshold=2.0, rollout_is_batch_normalize=False, rollout_rs=None,
                     rollout_rs_threshold=None, epsilon_low=EPSILON, epsilon_high=EPSILON, clip_ratio_c=3.0,
                     ref_logprobs=None, beta=0.0, kl_type="k3", bias_correction_kl=False, temperature=1.0,
                     entropy_coef=0.0, ignore_index=-100, loss_mask=None, reduction="mean", max_length=None,
                     token_count=None, seq_count=None, backend="auto", return_stats=False):
    """verl 0.9.1's ``bypass_mode`` policy loss (``compute_policy_loss_bypass_mode``): rollout correction with
    the rollout engine's log-probs as the old ones.

    rollout_logprobs: (B, T), the rollout policy's log-probs of the labels. The importance weights and the
    rejection mask (``rollout_is``, ``rollout_is_threshold``, ``rollout_is_batch_normalize``, ``rollout_rs``,
    ``rollout_rs_threshold``: see ``rollout_correction``, verl's RolloutCorrectionConfig fields and
    defaults) come from this call's own current log-probs, detached. Then:

    - loss_type "ppo_clip" (default): verl's vanilla PPO against the rollout log-probs, r = exp(clamp(log p −
      log p_rollout, ±20)), max(−Ψ·r, −Ψ·clip(r, 1 − ε_low, 1 + ε_high)), capped at −Ψ·clip_ratio_c for
      Ψ < 0 (verl's dual clip, clip_ratio_c = 3.0); the weights are not applied (the ratio is the
      correction), only the rejection mask;
    - "reinforce": −sg(w)·Ψ·log p (without ``rollout_is``: −Ψ·log p).

    Rejected tokens get loss and gradient 0, and the policy term's normalisers count the kept tokens only
    (verl's modified response mask; a "seq-*" ``reduction`` without ``seq_count`` counts the sequences
    with a kept token, as verl's agg_loss; pass ``token_count`` / ``seq_count`` as verl's global batch
    info). The KL and entropy terms (``ref_logprobs``, ``beta``, ``kl_type``, ``bias_correction_kl``: the
    KL times the token's ratio to the rollout policy; ``entropy_coef``) are aggregated over the valid
    tokens before rejection, as verl's actor does. clip_ratio_c: > 1. ``return_stats``: clipped is 1
    where PPO's clip or dual clip, or the rejection, took the token's gradient away.
    """
    head = _checked_bypass_head(rollout_logprobs, loss_type, rollout_is, rollout_is_threshold,
                                rollout_is_batch_normalize, rollout_rs, rollout_rs_threshold, epsilon_low, epsilon_high,
                                clip_ratio_c, reduction, max_length, token_count, seq_count)
    return _run(head, logits, labels, advantages, rollout_logprobs, epsilon_low=epsilon_low,
                epsilon_high=epsilon_high, ref_logprobs=ref_logprobs, beta=beta, kl_type=kl_type,
                bias_correction_kl=bias_correction_kl, temperature=temperature, entropy_coef=entropy_coef,
                ignore_index=ignore_index, loss_mask=loss_mask, reduction=reduction, max_length=max_length,
                token_count=token_count, seq_count=seq_count, backend=backend, return_stats=return_stats)


def fused_linear_bypass_mode_loss(hidden, weight, labels, advantages, rollout_logprobs, *, bias=None,
                                  loss_type="ppo_clip", rollout_is=None, rollout_is_threshold=2.0,
                                  rollout_is_batch_normalize=False, rollout_rs=None, rollout_rs_threshold=None,
                                  epsilon_low=EPSILON, epsilon_high=EPSILON, clip_ratio_c=3.0, ref_logprobs=None,
                                  beta=0.0, kl_type="k3", bias_correction_kl=False, temperature=1.0, entropy_coef=0.0,
                                  ignore_index=-100, loss_mask=None, reduction="mean", max_length=None,
                                  token_count=None, seq_count=None, chunk_size=None, accum_dtype=torch.float32,
                                  backend="auto", return_stats=False):
    """``bypass_mode_loss(hidden @ weight.T + bias, ...)`` without the N×V logits (``fused_linear_token_logprobs``)."""
    head = _checked_bypass_head(rollout_logprobs, loss_type, rollout_is, rollout_is_threshold,
                                rollout_is_batch_normalize, rollout_rs, rollout_rs_threshold, epsilon_low, epsilon_high,
                                clip_ratio_c, reduction, max_length, token_count, seq_count)
    return _run(head, hidden, labels, advantages, rollout_logprobs, linear=(weight, bias, chunk_size, accum_dtype),
                epsilon_low=epsilon_low, epsilon_high=epsilon_high, ref_logprobs=ref_logprobs, beta=beta,
                kl_type=kl_type, bias_correction_kl=bias_correction_kl, temperature=temperature,
                entropy_coef=entropy_coef, ignore_index=ignore_index, loss_mask=loss_mask, reduction=reduction,
                max_length=max_length, token_count=token_count, seq_count=seq_count, backend=backend,
                return_stats=return_stats)


def _checked_bypass_head(rollout_logprobs, loss_type, rollout_is, rollout_is_threshold, rollout_is_batch_normalize,
                         rollout_rs, rollout_rs_threshold, epsilon_low, epsilon_high, clip_ratio_c, reduction,
                         max_length, token_count, seq_count):
    """bypass_mode_loss's own options checked, and its head."""
    if not isinstance(rollout_logprobs, torch.Tensor):
        raise TypeError(f"rollout_logprobs must be a tensor (the rollout policy's log-probs of the labels), got "
                        f"{type(rollout_logprobs).__name__}")
    if loss_type not in ("ppo_clip", "reinforce"):
        raise ValueError(f"loss_type must be 'ppo_clip' or 'reinforce', got {loss_type!r}")
    real("clip_ratio_c", clip_ratio_c)
    if clip_ratio_c <= 1:
        raise ValueError(f"clip_ratio_c must be > 1 (verl's dual-clip bound), got {clip_ratio_c}")
    is_bounds, rejections = check_rollout_correction(rollout_is, rollout_is_threshold, rollout_is_batch_normalize,
                                                     rollout_rs, rollout_rs_threshold)
    correction = (rollout_is, is_bounds, rollout_is_batch_normalize, rejections)
    return _bypass_head(loss_type, epsilon_low, epsilon_high, clip_ratio_c, correction, reduction, max_length,
                        token_count, seq_count)
