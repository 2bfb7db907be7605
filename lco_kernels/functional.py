"""The functional API: every policy loss through one vocabulary kernel (SPEC §2, issue "loss family").

All losses share the conventions of ``lco_loss``: ``(logits, labels, ...)`` with logits (..., V)
and labels (...); keyword-only options ``ignore_index``, ``reduction``, ``loss_mask``,
``max_length``, ``inplace_backward``, ``backend`` and ``return_stats``:

    reduction: "mean" (over valid tokens, 0.0 when none) | "sum" | "none" (labels' shape) |
        "seq-mean-token-mean" (GRPO) | "seq-mean-token-sum" | "seq-mean-token-sum-norm" (Dr. GRPO:
        the sum over ``max_length``, default labels.shape[-1]) | "sign-mean" (mean over Ψ > 0
        tokens + mean over Ψ < 0 tokens). Sequences are the last dimension of ``labels``.
    loss_mask: labels-shaped; tokens where it is 0/False count as ignored (as ``ignore_index``).
    inplace_backward: the backward writes the gradient into the logits' storage (no N×V buffer).
        Only when nothing else reads those logits after this loss: their values are gone after
        backward, and the graph cannot be differentiated twice.
    backend: "auto" (Triton for CUDA; for CPU the PyTorch backend, or the Triton interpreter when
        TRITON_INTERPRET=1), "triton" or "torch".
    return_stats: also return a ``TokenStats`` of per-token log-probs, entropy, logit-gradient
        norm, and (per loss) target probability / clamped / clipped flags, from the same sweep.

Losses are float32 (float64 for float64 logits with backend="torch").
"""
import torch

from . import torch_backend, triton_kernels
from ._validation import (TRITON_DTYPES, check_backend_dtype, check_clip, check_common, check_labels_in_range,
                          check_logits_labels, check_rho, per_token)
from .autograd import PolicyLossFunction
from .losses import Loss, LossSpec
from .reductions import token_weights
from .stats import TokenStats


def triton_runs_on_cpu() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1: its kernels then run on CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(triton_kernels._policy_forward_kernel, InterpretedFunction)


def resolve_backend(backend, logits):
    """The backend module for ``backend`` ("auto" | "triton" | "torch") and these logits."""
    triton_ok = logits.is_cuda or (logits.device.type == "cpu" and triton_runs_on_cpu())
    if backend == "auto":
        backend = "triton" if triton_ok and logits.dtype in TRITON_DTYPES else "torch"
    if backend == "torch":
        return torch_backend
    check_backend_dtype(backend, logits.dtype)
    if not triton_ok:
        raise ValueError(f"backend='triton' needs CUDA tensors (logits are on {logits.device}), or "
                         "TRITON_INTERPRET=1 set before triton is imported to run on the CPU")
    return triton_kernels


def prepare_tokens(spec, labels, vocab, advantages, old_logprobs, ref_logprobs, *, ignore_index, reduction,
                   loss_mask, max_length):
    """Per-token inputs checked and broadcast to labels' shape, the loss mask folded into the labels
    (masked tokens become ``ignore_index``), and the reduction's per-token weights (None for "none")."""
    if advantages is None:
        advantages = torch.ones(labels.shape, device=labels.device)
    advantages = per_token("advantages", advantages, labels)
    if spec.has_old:
        old_logprobs = per_token("old_logprobs", old_logprobs, labels, allow_number=False)
    if spec.has_ref:
        ref_logprobs = per_token("ref_logprobs", ref_logprobs, labels, allow_number=False)
    if loss_mask is not None:
        labels = labels.masked_fill(per_token("loss_mask", loss_mask, labels, allow_number=False) == 0, ignore_index)
    check_labels_in_range(labels, vocab, ignore_index)
    if max_length is None:
        max_length = labels.shape[-1] if labels.dim() else 1
    weights = token_weights(labels != ignore_index, advantages, reduction, max_length)
    return labels, advantages, old_logprobs, ref_logprobs, weights


def _policy_loss(spec, logits, labels, advantages=None, old_logprobs=None, ref_logprobs=None, *, ignore_index,
                 reduction, loss_mask, max_length, inplace_backward, backend, return_stats):
    check_common(ignore_index=ignore_index, reduction=reduction, inplace_backward=inplace_backward,
                 backend=backend, return_stats=return_stats, max_length=max_length)
    check_logits_labels(logits, labels)
    impl = resolve_backend(backend, logits)
    labels, advantages, old_logprobs, ref_logprobs, weights = prepare_tokens(
        spec, labels, logits.shape[-1], advantages, old_logprobs, ref_logprobs, ignore_index=ignore_index,
        reduction=reduction, loss_mask=loss_mask, max_length=max_length)
    loss, stats = PolicyLossFunction.apply(logits, labels, advantages, old_logprobs, ref_logprobs, weights, spec,
                                           int(ignore_index), inplace_backward, impl, return_stats)
    if return_stats:
        return loss, TokenStats.from_rows(stats, labels.shape, spec)
    return loss


def loss_spec(loss, *, rho_pos=1.8, rho_neg=0.9, epsilon_low=0.2, epsilon_high=0.2, dual_clip=None, beta=0.0,
              old_logprobs=None, ref_logprobs=None):
    """The checked ``LossSpec`` of a loss named "sft" | "pg" | "ppo" | "cispo" | "lco" and its options."""
    kind = {"sft": Loss.SFT, "pg": Loss.PG, "ppo": Loss.PPO, "cispo": Loss.CISPO, "lco": Loss.LCO}.get(loss)
    if kind is None:
        raise ValueError(f"loss must be one of 'sft', 'pg', 'ppo', 'cispo', 'lco', got {loss!r}")
    check_clip(epsilon_low, epsilon_high, dual_clip, beta)
    if kind == Loss.LCO:
        check_rho(rho_pos, rho_neg)
    if kind in (Loss.PPO, Loss.CISPO) and old_logprobs is None:
        raise ValueError(f"loss={loss!r} needs old_logprobs (the behaviour policy's log-probs of the labels)")
    if kind == Loss.PPO and beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the reference policy's log-probs of the labels)")
    return LossSpec(kind, rho_pos=float(rho_pos), rho_neg=float(rho_neg), epsilon_low=float(epsilon_low),
                    epsilon_high=float(epsilon_high), dual_clip=None if dual_clip is None else float(dual_clip),
                    beta=float(beta), has_old=old_logprobs is not None and kind in (Loss.PPO, Loss.CISPO, Loss.LCO),
                    has_ref=ref_logprobs is not None and beta > 0 and kind == Loss.PPO)


def sft_loss(logits, labels, *, ignore_index=-100, reduction="mean", loss_mask=None, max_length=None,
             inplace_backward=False, backend="auto", return_stats=False):
    """Cross-entropy −log p_i per token."""
    return _policy_loss(loss_spec("sft"), logits, labels, ignore_index=ignore_index, reduction=reduction,
                        loss_mask=loss_mask, max_length=max_length, inplace_backward=inplace_backward,
                        backend=backend, return_stats=return_stats)


def pg_loss(logits, labels, advantages, *, ignore_index=-100, reduction="mean", loss_mask=None, max_length=None,
            inplace_backward=False, backend="auto", return_stats=False):
    """REINFORCE: −Ψ·log p_i per token."""
    return _policy_loss(loss_spec("pg"), logits, labels, advantages, ignore_index=ignore_index,
                        reduction=reduction, loss_mask=loss_mask, max_length=max_length,
                        inplace_backward=inplace_backward, backend=backend, return_stats=return_stats)


def ppo_loss(logits, labels, advantages, old_logprobs, *, epsilon_low=0.2, epsilon_high=0.2, dual_clip=None,
             ref_logprobs=None, beta=0.0, ignore_index=-100, reduction="mean", loss_mask=None, max_length=None,
             inplace_backward=False, backend="auto", return_stats=False):
    """PPO / GRPO clipped surrogate (PG-IS), as verl writes it.

    r = exp(clamp(log p_i − old_logprobs, ±20)); L = max(−Ψ·r, −Ψ·clip(r, 1 − ε_low, 1 + ε_high))
    (DAPO's clip-higher: ε_high > ε_low); with ``dual_clip`` = c, Ψ < 0 tokens are capped at −Ψ·c.
    With ``ref_logprobs`` and ``beta`` > 0, GRPO's k3 KL β·(e^x − x − 1), x = ref − log p_i
    (clamped at 10), is added per token.
    """
    spec = loss_spec("ppo", epsilon_low=epsilon_low, epsilon_high=epsilon_high, dual_clip=dual_clip, beta=beta,
                     old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    return _policy_loss(spec, logits, labels, advantages, old_logprobs, ref_logprobs, ignore_index=ignore_index,
                        reduction=reduction, loss_mask=loss_mask, max_length=max_length,
                        inplace_backward=inplace_backward, backend=backend, return_stats=return_stats)


def cispo_loss(logits, labels, advantages, old_logprobs, *, epsilon_high=0.2, ignore_index=-100, reduction="mean",
               loss_mask=None, max_length=None, inplace_backward=False, backend="auto", return_stats=False):
    """CISPO: −sg(min(r, 1 + ε_high))·Ψ·log p_i, r = p_i / p_old: the weight is capped, never the gradient."""
    spec = loss_spec("cispo", epsilon_high=epsilon_high, old_logprobs=old_logprobs)
    return _policy_loss(spec, logits, labels, advantages, old_logprobs, ignore_index=ignore_index,
                        reduction=reduction, loss_mask=loss_mask, max_length=max_length,
                        inplace_backward=inplace_backward, backend=backend, return_stats=return_stats)


def lco_loss(logits, labels, advantages, *, rho_pos=1.8, rho_neg=0.9, old_logprobs=None, epsilon_low=0.2,
             epsilon_high=0.2, ignore_index=-100, reduction="mean", loss_mask=None, max_length=None,
             inplace_backward=False, backend="auto", return_stats=False) -> torch.Tensor:
    """Logits Convex Optimization loss (paper §4.2): |Ψ|·KL(π' ‖ π) per token, fused.

    Args:
        logits: (..., V) float32 | bfloat16 | float16 (float64 with backend="torch").
        labels: (...) integer sampled tokens; ``ignore_index`` marks padding.
        advantages: Ψ, broadcastable to ``labels.shape`` (per token, or (B, 1) per sequence).
        rho_pos: target ratio π'_i / p_i for Ψ > 0 (≥ 1); where ρ·p_i ≥ 1 the target is one-hot.
        rho_neg: target ratio for Ψ < 0, in [0, 1].
        old_logprobs: PPO+LCO. A token whose ratio r = p_i / p_old has already left the trust
            region in the direction its advantage pushes (r > 1 + ε_high with Ψ > 0,
            r < 1 − ε_low with Ψ < 0) gets zero loss and gradient, as PPO's clipped tokens.
        (the other options: see this module's docstring)

    Returns:
        the loss (a scalar, or labels' shape for "none"); with return_stats, (loss, TokenStats).
    """
    spec = loss_spec("lco", rho_pos=rho_pos, rho_neg=rho_neg, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                     old_logprobs=old_logprobs)
    return _policy_loss(spec, logits, labels, advantages, old_logprobs, ignore_index=ignore_index,
                        reduction=reduction, loss_mask=loss_mask, max_length=max_length,
                        inplace_backward=inplace_backward, backend=backend, return_stats=return_stats)
