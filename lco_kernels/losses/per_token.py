"""The per-token losses: every policy loss whose row loss sees the logits only through log p_i, through one vocabulary kernel, and exact token log-probs.

All losses share the conventions of ``lco_loss``: ``(logits, labels, ...)`` with logits (..., V)
and labels (...), and these keyword-only options:

    temperature: the sampling temperature τ; the loss is that of softmax(logits / τ), computed
        without a scaled copy of the logits. Gradients are w.r.t. the unscaled logits.
    ignore_index: labels equal to it are padding (loss 0, gradient 0, not counted).
    reduction: "mean" (alias "token-mean": over valid tokens, 0.0 when none) | "sum" | "none"
        (labels' shape) | "seq-mean-token-mean" (GRPO) | "seq-mean-token-sum" |
        "seq-mean-token-sum-norm" (Dr. GRPO: the total over sequences × ``max_length``, default
        labels.shape[-1]) | "sign-mean" (mean over Ψ > 0 tokens + mean over Ψ < 0 tokens).
        Sequences are the last dimension of ``labels``.
    token_count, seq_count: global normalisers (a number or a 0-dim tensor, never read on the
        host): "mean" divides by ``token_count`` and the "seq-*" reductions by ``seq_count``
        instead of this call's own counts, so that micro-batches add up to the optimizer step's
        loss (HF's ``num_items_in_batch``, verl's global batch size). "sign-mean" takes neither.
    loss_mask: labels-shaped; tokens where it is 0/False count as ignored (as ``ignore_index``).
    entropy_coef: per token, loss −= entropy_coef·H(π_t), with its exact gradient (in the same
        backward sweep).
    inplace_backward: the backward writes the gradient into the logits' storage (no N×V buffer).
        Only when nothing else reads those logits after this loss: their values are gone after
        backward, and the graph cannot be differentiated twice.
    backend: "auto" (Triton for CUDA; for CPU the PyTorch backend, or the Triton interpreter when
        TRITON_INTERPRET=1), "triton" or "torch".
    return_stats: also return a ``TokenStats`` of per-token log-probs, entropy, logit-gradient
        norm, and (per loss) target probability / clamped / clipped flags, from the same sweep.
    process_group: vocabulary parallelism (README "Tensor parallel"): ``logits`` are this rank's
        columns [vocab_start_index, vocab_start_index + V_r) of the vocabulary, labels are global
        ids; every rank gets the same loss and the gradient of its shard. One all-gather of O(N)
        per forward, none in the backward. ``vocab_start_index`` defaults to rank × V_r.
        Logits that are a DTensor sharded Shard(-1) on a 1-D mesh take this path by themselves
        (the results are then DTensors replicated over the mesh, as with ``loss_parallel``).

Losses that take advantages also take ``ref_logprobs`` and ``beta`` (a KL penalty to a reference
policy, loss += β·KL per token) with verl's estimator ``kl_type``: "k3" = "low_var_kl" (default,
clamped as verl), "k1" = "kl", "k2" = "mse", "abs". Advantages must have labels' number of
dimensions (per token (B, T), per sequence (B, 1)) or be a 0-dim tensor / a number.

Losses are float32 (float64 for float64 logits with backend="torch"). Second derivatives are not
supported (differentiating a gradient raises).
"""
import torch

from .. import ops, tensor_parallel
from .._plumbing import flat, loss_spec, prepare_tokens, resolve_backend
from .._validation import check_logits_labels, check_no_self_overlap, check_options
from ..autograd import ShardedLossFunction
from ..registry import EPSILON, RHO_NEG, RHO_POS
from ..stats import TokenStats


def _fused(spec, logits, labels, advantages=None, old_logprobs=None, ref_logprobs=None, *, ignore_index, reduction,
           loss_mask, max_length, token_count, seq_count, inplace_backward, backend, return_stats,
           process_group, vocab_start_index, return_entropy=False):
    tp = mesh = None
    if tensor_parallel.is_dtensor(logits):
        logits, tp, mesh = tensor_parallel.unwrap_dtensor(logits, process_group, vocab_start_index)
        labels, advantages, old_logprobs, ref_logprobs, loss_mask = (tensor_parallel.local_value(x) for x in (
            labels, advantages, old_logprobs, ref_logprobs, loss_mask))
    check_options(ignore_index=ignore_index, reduction=reduction, backend=backend, return_stats=return_stats,
                  max_length=max_length, temperature=spec.temperature, entropy_coef=spec.entropy_coef,
                  inplace_backward=inplace_backward, token_count=token_count, seq_count=seq_count,
                  device=getattr(logits, "device", None))
    check_logits_labels(logits, labels)
    if mesh is None:
        tp = tensor_parallel.resolve_shard(process_group, vocab_start_index, logits.shape[-1])
    impl = resolve_backend(backend, logits.device, logits.dtype)
    if inplace_backward:
        check_no_self_overlap(ops.as_rows3d(logits))
    tokens = prepare_tokens(spec, labels, advantages, old_logprobs, ref_logprobs, ignore_index=ignore_index,
                            reduction=reduction, loss_mask=loss_mask, max_length=max_length, token_count=token_count,
                            seq_count=seq_count)
    if tp is None:
        # the labels are checked against the vocabulary inside the op (on CPU tensors only: ops.py)
        dtype = ops.compute_dtype(logits.dtype)
        rows, entropy, _, stats = ops.policy_forward(
            logits, flat(tokens.labels, torch.int64), flat(tokens.advantages, dtype),
            flat(tokens.old_logprobs, dtype), flat(tokens.ref_logprobs, dtype), int(ignore_index),
            *ops.policy_args(spec, return_entropy or spec.has_entropy_term, return_stats, inplace_backward,
                             ops.backend_name(impl)))
        loss = rows.reshape(labels.shape) if tokens.weights is None else (rows * tokens.weights).sum()
    else:
        # a shard's labels are checked against every shard after the gather (tensor_parallel.check_ownership)
        loss, entropy, stats = ShardedLossFunction.apply(
            logits, tokens.labels, tokens.advantages, tokens.old_logprobs, tokens.ref_logprobs, tokens.weights, spec,
            int(ignore_index), inplace_backward, impl, return_stats, return_entropy, tp)
    if mesh is not None:
        loss, entropy = (tensor_parallel.wrap_replicated(x, mesh) for x in (loss, entropy))
    extra = ()
    if return_entropy:
        extra += (entropy.reshape(labels.shape),)
    if return_stats:
        extra += (TokenStats.from_rows(stats, labels.shape, spec),)
    return (loss, *extra) if extra else loss


def sft_loss(logits, labels, *, temperature=1.0, entropy_coef=0.0, ignore_index=-100, reduction="mean",
             loss_mask=None, max_length=None, token_count=None, seq_count=None, inplace_backward=False,
             backend="auto", return_stats=False, process_group=None, vocab_start_index=None):
    """Cross-entropy −log p_i per token."""
    spec = loss_spec("sft", temperature=temperature, entropy_coef=entropy_coef)
    return _fused(spec, logits, labels, ignore_index=ignore_index, reduction=reduction, loss_mask=loss_mask,
                  max_length=max_length, token_count=token_count, seq_count=seq_count,
                  inplace_backward=inplace_backward, backend=backend, return_stats=return_stats,
                  process_group=process_group, vocab_start_index=vocab_start_index)


def pg_loss(logits, labels, advantages, *, ref_logprobs=None, beta=0.0, kl_type="k3", temperature=1.0,
            entropy_coef=0.0, ignore_index=-100, reduction="mean", loss_mask=None, max_length=None, token_count=None,
            seq_count=None, inplace_backward=False, backend="auto", return_stats=False, process_group=None,
            vocab_start_index=None):
    """REINFORCE: −Ψ·log p_i per token."""
    spec = loss_spec("pg", ref_logprobs=ref_logprobs, beta=beta, kl_type=kl_type, temperature=temperature,
                     entropy_coef=entropy_coef)
    return _fused(spec, logits, labels, advantages, None, ref_logprobs, ignore_index=ignore_index,
                  reduction=reduction, loss_mask=loss_mask, max_length=max_length, token_count=token_count,
                  seq_count=seq_count, inplace_backward=inplace_backward, backend=backend,
                  return_stats=return_stats, process_group=process_group,
                  vocab_start_index=vocab_start_index)


def ppo_loss(logits, labels, advantages, old_logprobs, *, epsilon_low=EPSILON, epsilon_high=EPSILON, dual_clip=None,
             ref_logprobs=None, beta=0.0, kl_type="k3", temperature=1.0, entropy_coef=0.0, ignore_index=-100,
             reduction="mean", loss_mask=None, max_length=None, token_count=None, seq_count=None,
             inplace_backward=False, backend="auto", return_stats=False, process_group=None, vocab_start_index=None):
    """PPO / GRPO clipped surrogate (PG-IS), as verl writes it.

    r = exp(clamp(log p_i − old_logprobs, ±20)); L = max(−Ψ·r, −Ψ·clip(r, 1 − ε_low, 1 + ε_high))
    (DAPO's clip-higher: ε_high > ε_low); with ``dual_clip`` = c, Ψ < 0 tokens are capped at −Ψ·c.
    With ``ref_logprobs`` and ``beta`` > 0, GRPO's KL penalty β·KL (``kl_type``) is added per token.
    """
    spec = loss_spec("ppo", old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, epsilon_low=epsilon_low,
                     epsilon_high=epsilon_high, dual_clip=dual_clip, beta=beta, kl_type=kl_type,
                     temperature=temperature, entropy_coef=entropy_coef)
    return _fused(spec, logits, labels, advantages, old_logprobs, ref_logprobs, ignore_index=ignore_index,
                  reduction=reduction, loss_mask=loss_mask, max_length=max_length, token_count=token_count,
                  seq_count=seq_count, inplace_backward=inplace_backward, backend=backend,
                  return_stats=return_stats, process_group=process_group,
                  vocab_start_index=vocab_start_index)


def cispo_loss(logits, labels, advantages, old_logprobs, *, epsilon_high=EPSILON, ref_logprobs=None, beta=0.0,
               kl_type="k3", temperature=1.0, entropy_coef=0.0, ignore_index=-100, reduction="mean", loss_mask=None,
               max_length=None, token_count=None, seq_count=None, inplace_backward=False, backend="auto",
               return_stats=False, process_group=None, vocab_start_index=None):
    """CISPO: −sg(min(r, 1 + ε_high))·Ψ·log p_i, r = p_i / p_old: the weight is capped, never the gradient."""
    spec = loss_spec("cispo", old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, epsilon_high=epsilon_high,
                     beta=beta, kl_type=kl_type, temperature=temperature, entropy_coef=entropy_coef)
    return _fused(spec, logits, labels, advantages, old_logprobs, ref_logprobs, ignore_index=ignore_index,
                  reduction=reduction, loss_mask=loss_mask, max_length=max_length, token_count=token_count,
                  seq_count=seq_count, inplace_backward=inplace_backward, backend=backend,
                  return_stats=return_stats, process_group=process_group,
                  vocab_start_index=vocab_start_index)


def lco_loss(logits, labels, advantages, *, rho_pos=RHO_POS, rho_neg=RHO_NEG, old_logprobs=None, epsilon_low=EPSILON,
             epsilon_high=EPSILON, ref_logprobs=None, beta=0.0, kl_type="k3", temperature=1.0, entropy_coef=0.0,
             ignore_index=-100, reduction="mean", loss_mask=None, max_length=None, token_count=None,
             seq_count=None, inplace_backward=False, backend="auto", return_stats=False, process_group=None,
             vocab_start_index=None) -> torch.Tensor:
    """Logits Convex Optimization loss (paper §4.2): |Ψ|·KL(π' ‖ π) per token, fused.

    Args:
        logits: (..., V) float32 | bfloat16 | float16 (float64 with backend="torch").
        labels: (...) integer sampled tokens; ``ignore_index`` marks padding.
        advantages: Ψ with labels' number of dims (per token, or (B, 1) per sequence) or 0-dim.
        rho_pos: target ratio π'_i / p_i for Ψ > 0 (≥ 1); where ρ·p_i ≥ 1 the target is one-hot.
        rho_neg: target ratio for Ψ < 0, in [0, 1].
        old_logprobs: PPO+LCO. A token whose ratio r = p_i / p_old has already left the trust
            region in the direction its advantage pushes (r > 1 + ε_high with Ψ > 0,
            r < 1 − ε_low with Ψ < 0) gets zero loss and gradient, as PPO's clipped tokens.
        (the other options: see this module's docstring)

    Returns:
        the loss (a scalar, or labels' shape for "none"); with return_stats, (loss, TokenStats).
    """
    spec = loss_spec("lco", old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, rho_pos=rho_pos, rho_neg=rho_neg,
                     epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta, kl_type=kl_type,
                     temperature=temperature, entropy_coef=entropy_coef)
    return _fused(spec, logits, labels, advantages, old_logprobs, ref_logprobs, ignore_index=ignore_index,
                  reduction=reduction, loss_mask=loss_mask, max_length=max_length, token_count=token_count,
                  seq_count=seq_count, inplace_backward=inplace_backward, backend=backend,
                  return_stats=return_stats, process_group=process_group,
                  vocab_start_index=vocab_start_index)


def token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                   inplace_backward=False, backend="auto", process_group=None, vocab_start_index=None):
    """Differentiable fp32 log p_i of softmax(logits / τ) at ``labels`` (labels' shape, 0 at ignored
    positions); with ``return_entropy``, ``(logprobs, entropy)``, both differentiable.

    One sweep forward, one backward (g·(e_i − p), + the entropy's term), with 1 − p_i taken from the
    log domain: exact for confident tokens, where log_softmax(z).gather(...) has lost 1 − p_i.
    Any loss written on these log-probs in PyTorch is fused and exact (README, "Your own loss").
    """
    logprobs, entropy, _ = _token_sweep(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                        return_entropy=return_entropy, inplace_backward=inplace_backward,
                                        backend=backend, process_group=process_group,
                                        vocab_start_index=vocab_start_index)
    return (logprobs, entropy) if return_entropy else logprobs


def _token_sweep(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False, return_stats=False,
                 inplace_backward=False, backend="auto", process_group=None, vocab_start_index=None):
    """``token_logprobs``' one sweep as ``(logprobs, entropy or None, stats or None)``.

    ``stats`` are the SFT head's (−log p_i), from the same sweep: besides log-probs and entropy, their
    ``logit_grad_norm`` is ‖∂log p_i/∂z‖₂ = ‖e_i − p‖/τ, so a loss ℓ written on the log-probs has
    ‖∂ℓ_t/∂z‖₂ = |∂ℓ_t/∂log p_t| times it (losses/sequence.py).
    """
    spec = loss_spec("sft", temperature=temperature)
    out = _fused(spec, logits, labels, ignore_index=ignore_index, reduction="none", loss_mask=None, max_length=None,
                 token_count=None, seq_count=None, inplace_backward=inplace_backward, backend=backend,
                 return_stats=return_stats, process_group=process_group, vocab_start_index=vocab_start_index,
                 return_entropy=return_entropy)
    neg_logprobs, *extra = out if isinstance(out, tuple) else (out,)
    entropy = extra.pop(0) if return_entropy else None
    stats = extra.pop(0) if return_stats else None
    # the SFT head's loss is −log p_i, exactly (a negation rounds nothing)
    return -neg_logprobs, entropy, stats
