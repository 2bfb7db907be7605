"""Private plumbing shared by the logits-level and fused-linear losses: backend resolution, the
checked ``LossSpec`` of a call, and the per-token inputs prepared for the sweeps."""
import dataclasses

import torch

from . import torch_backend, triton_backend
from ._validation import (TRITON_DTYPES, check_backend_dtype, check_clip, check_dppo, check_dro, check_kl,
                          check_labels_in_range, check_rho, check_sapo, flag, once_per_combination, per_token, real)
from .reductions import token_weights, uniform_weight
from .registry import DIVERGENCES, EPSILON, KL_NAMES, LOSSES, RHO_NEG, RHO_POS, LossSpec


def triton_runs_on_cpu() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1: its kernels then run on CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(triton_backend._forward_kernel, InterpretedFunction)


def resolve_backend(backend, device, dtype):
    """The backend module for ``backend`` ("auto" | "triton" | "torch") and logits of this device and dtype
    (resolved once per combination: the answer is fixed once triton is imported)."""
    return _resolve_backend_once(backend, device, dtype)


def _resolve_backend(backend, device, dtype):
    triton_ok = device.type == "cuda" or (device.type == "cpu" and triton_runs_on_cpu())
    if backend == "auto":
        backend = "triton" if triton_ok and dtype in TRITON_DTYPES else "torch"
    if backend == "torch":
        return torch_backend
    check_backend_dtype(backend, dtype)
    if not triton_ok:
        raise ValueError(f"backend='triton' needs CUDA tensors (the inputs are on {device}), or "
                         "TRITON_INTERPRET=1 set before triton is imported to run on the CPU")
    return triton_backend


_resolve_backend_once = once_per_combination(_resolve_backend, maxsize=64)


_SPEC_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LossSpec)}


def loss_spec(name, *, old_logprobs=None, ref_logprobs=None, rho_pos=RHO_POS, rho_neg=RHO_NEG, epsilon_low=EPSILON,
              epsilon_high=EPSILON, dual_clip=None, beta=0.0, kl_type="k3", entropy_coef=0.0, temperature=1.0,
              bias_correction_kl=False, tau_pos=_SPEC_DEFAULTS["tau_pos"], tau_neg=_SPEC_DEFAULTS["tau_neg"],
              divergence="tv", delta_low=_SPEC_DEFAULTS["delta_low"], delta_high=_SPEC_DEFAULTS["delta_high"],
              clip_ratio_c=_SPEC_DEFAULTS["clip_ratio_c"], dro_beta=None):
    """The checked ``LossSpec`` of loss ``name`` (a key of registry.LOSSES) with these options.

    ``epsilon_low=None`` is CISPO's one-sided cap (no lower clip); for the other losses it means
    their default 0.2. Options of other losses are ignored (``fused_linear_policy_loss`` passes all).
    Checked once per distinct configuration: the tensors count only as given or not."""
    args = (name, old_logprobs is not None, ref_logprobs is not None, rho_pos, rho_neg, epsilon_low, epsilon_high,
            dual_clip, beta, kl_type, entropy_coef, temperature, bias_correction_kl, tau_pos, tau_neg, divergence,
            delta_low, delta_high, clip_ratio_c, dro_beta)
    return _checked_spec_once(*args)


def _checked_spec(name, given_old, given_ref, rho_pos, rho_neg, epsilon_low, epsilon_high, dual_clip, beta, kl_type,
                  entropy_coef, temperature, bias_correction_kl, tau_pos, tau_neg, divergence, delta_low, delta_high,
                  clip_ratio_c, dro_beta):
    info = LOSSES.get(name)
    if info is None:
        own = _own_fused_linear_form(name)
        if own is not None:
            raise ValueError(f"loss={name!r} is not one of the registry's per-token losses {tuple(LOSSES)}: it has "
                             f"its own fused-linear form, lco_kernels.{own}(hidden, weight, ...)")
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {name!r}")
    real("temperature", temperature)
    real("entropy_coef", entropy_coef)
    if epsilon_low is None and name != "cispo":
        epsilon_low = EPSILON
    check_clip(epsilon_low, epsilon_high, dual_clip)
    check_kl(beta, kl_type)
    flag("bias_correction_kl", bias_correction_kl)
    if "rho_pos" in info.hyperparameters:
        check_rho(rho_pos, rho_neg)
    if "tau_pos" in info.hyperparameters:
        check_sapo(tau_pos, tau_neg)
    if "divergence" in info.hyperparameters:
        check_dppo(divergence, delta_low, delta_high, clip_ratio_c)
    if "dro_beta" in info.hyperparameters:
        if dro_beta is None:
            raise ValueError("loss='dro' needs dro_beta (> 0, the weight of the squared log-ratio)")
        check_dro(dro_beta)
    if info.old_logprobs == "required" and not given_old:
        raise ValueError(f"loss={name!r} needs old_logprobs (the behaviour policy's log-probs of the labels)")
    if beta > 0 and not given_ref:
        raise ValueError("beta > 0 needs ref_logprobs (the reference policy's log-probs of the labels)")
    if given_ref and not info.advantages:
        raise ValueError(f"loss={name!r} takes no ref_logprobs (a KL term belongs to the RL losses)")
    has_old = given_old and info.old_logprobs != "none"
    has_ref = given_ref and beta > 0
    if bias_correction_kl and has_ref and not has_old:
        raise ValueError("bias_correction_kl=True weighs the KL term by the ratio p_i / p_old: it needs old_logprobs")
    return LossSpec(name, rho_pos=float(rho_pos), rho_neg=float(rho_neg),
                    epsilon_low=None if epsilon_low is None else float(epsilon_low), epsilon_high=float(epsilon_high),
                    dual_clip=None if dual_clip is None else float(dual_clip), beta=float(beta),
                    kl_type=KL_NAMES[kl_type], entropy_coef=float(entropy_coef), temperature=float(temperature),
                    tau_pos=float(tau_pos), tau_neg=float(tau_neg), divergence=DIVERGENCES.get(divergence, 0),
                    delta_low=float(delta_low), delta_high=float(delta_high), clip_ratio_c=float(clip_ratio_c),
                    dro_beta=0.0 if dro_beta is None else float(dro_beta),
                    bias_correction_kl=bool(bias_correction_kl) and has_ref, has_old=has_old, has_ref=has_ref)


_checked_spec_once = once_per_combination(_checked_spec)


def _own_fused_linear_form(name):
    """The name of the ``fused_linear_<name>_loss`` that ``lco_kernels.losses`` defines for a loss outside the
    registry (sequence-level, batch-selected, rollout-corrected), or None."""
    from .losses import batch_selected, rollout_correction, sequence  # at call time: they import this module
    if not isinstance(name, str):
        return None
    fn = f"fused_linear_{name}_loss"
    return fn if any(hasattr(module, fn) for module in (sequence, batch_selected, rollout_correction)) else None


@dataclasses.dataclass
class Tokens:
    """Per-token inputs of a call, in labels' shape: the loss mask folded into the labels (masked
    tokens become ``ignore_index``), the advantages (None for SFT, where Ψ plays no part) and the
    reduction's per-token weights (None for "none"; a 0-dim tensor where every token has the same one,
    see ``prepare_tokens``). ``labels_in_range``: the labels were checked against the vocabulary, each
    one a column or ``ignore_index``; ``every_label``: and every one is a column, none padding."""
    labels: torch.Tensor
    advantages: torch.Tensor | None
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    weights: torch.Tensor | None
    every_label: bool = False
    labels_in_range: bool = False


def advantages_or_ones(advantages, labels, dtype=torch.float32):
    """The advantages as the kernels read them: SFT's (None, as Ψ plays no part) as ones in labels' shape."""
    return advantages if advantages is not None else torch.ones(labels.shape, dtype=dtype, device=labels.device)


def prepare_tokens(spec, labels, advantages, old_logprobs, ref_logprobs, *, ignore_index, reduction,
                   loss_mask, max_length, token_count, seq_count, vocab_size=None, dtype=torch.float32) -> Tokens:
    """The weights have ``dtype`` (the loss's compute dtype: float64 keeps float64 weights). ``vocab_size`` (the
    whole vocabulary's, for an eager call): the labels are checked against it here (``check_labels_in_range``:
    CPU tensors only), and where every label is a column and none is padding, "sum" and "mean" weigh every
    token by one number (``reductions.uniform_weight``) instead of a tensor."""
    # SFT: Ψ plays no part (and counts as positive for "sign-mean")
    advantages = per_token("advantages", advantages, labels) if spec.info.advantages else None
    old_logprobs = per_token("old_logprobs", old_logprobs, labels, allow_number=False) if spec.has_old else None
    ref_logprobs = per_token("ref_logprobs", ref_logprobs, labels, allow_number=False) if spec.has_ref else None
    if loss_mask is not None:
        mask = per_token("loss_mask", loss_mask, labels, allow_number=False, allow_bool=True)
        labels = labels.masked_fill(mask == 0, ignore_index)
    read = None if vocab_size is None else check_labels_in_range(labels, vocab_size, ignore_index)
    every_label = read is True
    weights = uniform_weight(reduction, labels.numel(), token_count, dtype) if every_label else None
    if weights is None:
        weights = token_weights(labels != ignore_index, advantages, reduction, max_length, token_count, seq_count,
                                dtype)
    return Tokens(labels, advantages, old_logprobs, ref_logprobs, weights, every_label, read is not None)


def flat(t, dtype):
    """A per-token tensor as one contiguous row vector of ``dtype`` (None stays None)."""
    if t is None:
        return None
    t = t if t.dim() == 1 else t.reshape(-1)
    return (t if t.dtype == dtype else t.to(dtype)).contiguous()
