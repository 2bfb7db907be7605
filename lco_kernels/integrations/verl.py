"""verl: importing this module registers the library's LCO with verl's ``register_policy_loss``.

    # in the process that builds verl's actor (or every Ray worker: VERL_USE_EXTERNAL_MODULES, below)
    import lco_kernels.integrations.verl
    # config: actor_rollout_ref.actor.policy_loss.loss_mode=lco

Registered names:
- ``"lco"``: |Ψ|·KL(π' ‖ π) per token, with the PPO+LCO trust region from ``old_log_prob`` (a token
  whose ratio p/p_old has left [1 − clip_ratio_low, 1 + clip_ratio_high] in the direction of its
  advantage gets no loss and no gradient; on-policy, old == current, it is plain LCO).
  ``rollout_is_weights`` (positive) scale |Ψ|; ``loss_agg_mode`` and ``config.global_batch_info``
  are applied by verl's own ``agg_loss``. verl adds its entropy bonus and KL loss itself.

ρ: verl's ``PolicyLossConfig`` is a frozen dataclass with no room for it, so the loss reads
``rho_pos`` / ``rho_neg`` from ``config.policy_loss`` when present (a plain DictConfig), else from the
environment variables ``LCO_RHO_POS`` / ``LCO_RHO_NEG`` (set them in the Ray runtime env), else
1.8 / 0.9. ``register_lco_policy_loss(name, rho_pos=..., rho_neg=...)`` registers more variants.

Ray workers import this module when verl is imported with
``VERL_USE_EXTERNAL_MODULES=lco_kernels.integrations.verl`` in their environment.

Log-probs: verl's hook sees per-token log-probs, not logits, so LCO runs in its log-prob form, exact only
as far as those log-probs are. verl's own (``gather − logsumexp`` in fp32 on CPU, flash-attn's
cross-entropy on GPU) round log p_i to 0 once 1 − p_i is below the logits' spacing (~1e-6 for logits
of magnitude ~16): the log-prob form then sees p_i = 1, and the confident token's loss and gradient
are lost (for Ψ < 0 LCO's gradient there is |Ψ|·(1 − ρ)·p_i, not small), and a log-prob rounded above 0
(as a GPU cross-entropy may give) makes its row NaN. So importing this module
makes verl compute its log-probs with ``lco_kernels.token_logprobs`` (``use_exact_logprobs()``), which
keeps log p_i's digits and takes 1 − p_i from the log domain in its backward: the hook's gradient is
then the fused loss's. This replaces verl's ``logprobs_from_logits`` for every policy loss of the
process (the values are verl's to rounding). Opt out with ``LCO_VERL_EXACT_LOGPROBS=0`` in the
workers' environment; ``VERL_LOGPROBS_FROM_LOGITS`` is verl's own function. verl's
``use_fused_kernels=True`` path computes log-probs inside its own fused linear kernel, which this does
not replace.
"""
import os
import sys

import torch
import verl.utils.torch_functional as verl_functional
from verl.trainer.ppo.core_algos import agg_loss, register_policy_loss

import lco_kernels

_DEFAULT_RHO = (1.8, 0.9)
VERL_LOGPROBS_FROM_LOGITS = verl_functional.logprobs_from_logits  # verl's own (before use_exact_logprobs)


def lco_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                    rollout_is_weights=None, *, rho=None):
    """verl policy loss (the signature of ``core_algos.compute_policy_loss_vanilla``): LCO with the PPO
    trust region. ``rho`` = (rho_pos, rho_neg) fixes ρ (``register_lco_policy_loss``); None reads it
    from the config or the environment (module docstring)."""
    if config is None:
        raise ValueError("config (verl's ActorConfig) is required: it carries the clip ratios and global_batch_info")
    rho_pos, rho_neg = _rho(config) if rho is None else rho
    clip = config.clip_ratio
    epsilon_low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    epsilon_high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    if rollout_is_weights is not None:
        # A positive per-token weight w: w·|Ψ|·KL = |w·Ψ|·KL with Ψ's sign (hence ρ) unchanged.
        advantages = advantages * rollout_is_weights
    # PPO+LCO's trust region (tokens that left it in their advantage's direction have no loss) and the
    # statistics, from the same head as lco_loss(old_logprobs=...)
    per_token, token_stats = lco_kernels.lco_loss_from_logprobs(
        log_prob, advantages, rho_pos=rho_pos, rho_neg=rho_neg, old_logprobs=old_log_prob, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, loss_mask=response_mask, reduction="none", return_stats=True)
    loss = agg_loss(loss_mat=per_token, loss_mask=response_mask, loss_agg_mode=loss_agg_mode,
                    **config.global_batch_info)
    with torch.no_grad():
        mask = response_mask.float()
        stats = {"actor/pg_clipfrac": token_stats.clipped, "actor/ppo_kl": old_log_prob - log_prob,
                 "actor/lco_clamped_frac": token_stats.clamped, "actor/lco_target_prob": token_stats.target_prob,
                 "actor/lco_token_prob": token_stats.logprobs.exp()}
        means = torch.stack([(value.float() * mask).sum() for value in stats.values()]) / mask.sum().clamp(min=1.0)
        metrics = dict(zip(stats, means.tolist()))  # one host read for all of them
    return loss, metrics


def register_lco_policy_loss(name, *, rho_pos, rho_neg):
    """Register LCO with fixed ρ under ``name`` (e.g. "lco_r2" for rho_pos=2.0); ρ is checked on each call."""
    rho = (float(rho_pos), float(rho_neg))

    def loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
             rollout_is_weights=None):
        return lco_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                               rollout_is_weights, rho=rho)

    register_policy_loss(name)(loss)
    return loss


def _rho(config):
    policy = config.get("policy_loss") or {}
    values = []
    for key, env, default in (("rho_pos", "LCO_RHO_POS", _DEFAULT_RHO[0]), ("rho_neg", "LCO_RHO_NEG", _DEFAULT_RHO[1])):
        value = policy.get(key) if hasattr(policy, "get") else None
        if value is None:
            value = os.environ.get(env, default)
        try:
            values.append(float(value))
        except ValueError:
            raise ValueError(f"{env} must be a number, got {value!r}") from None
    return tuple(values)


def exact_logprobs_from_logits(logits, labels, inplace_backward=True):
    """Drop-in for verl's ``logprobs_from_logits``: ``lco_kernels.token_logprobs`` (fp32 log p(label))."""
    return lco_kernels.token_logprobs(logits, labels, inplace_backward=inplace_backward)


def use_exact_logprobs():
    """Make verl compute per-token log-probs with ``lco_kernels.token_logprobs``.

    Patches ``verl.utils.torch_functional.logprobs_from_logits`` and every already imported verl module
    that imported it by name (the engines do, at import); call it before the actor runs.
    """
    original = verl_functional.logprobs_from_logits
    if original is exact_logprobs_from_logits:
        return
    for name, module in list(sys.modules.items()):
        if name.startswith("verl") and getattr(module, "logprobs_from_logits", None) is original:
            module.logprobs_from_logits = exact_logprobs_from_logits


def _logprobs_from_environment():
    """At import: verl's log-probs from ``token_logprobs`` unless ``LCO_VERL_EXACT_LOGPROBS=0``."""
    value = os.environ.get("LCO_VERL_EXACT_LOGPROBS", "1")
    if value not in ("0", "1"):
        raise ValueError(f"LCO_VERL_EXACT_LOGPROBS must be 1 (the default: verl's log-probs from token_logprobs) "
                         f"or 0 (verl's own), got {value!r}")
    if value == "1":
        use_exact_logprobs()


register_policy_loss("lco")(lco_policy_loss)
_logprobs_from_environment()
