"""The per-token losses: every policy loss whose row loss sees the logits only through log p_i, through one
vocabulary kernel, and exact token log-probs.

Every loss takes ``(logits, labels, ...)``: ``logits`` (..., V) float32, bfloat16 or float16
(float64 with ``backend="torch"``), any strides for the leading dimensions; ``labels`` (...) int64 or
int32, the sampled tokens. Losses that take advantages take them per token (labels' shape), per
sequence ((B, 1) for (B, T) labels) or as a 0-dim tensor / a number: advantages with fewer dimensions
than the labels (TRL's (B,)) are an error, never broadcast along the tokens. These keyword-only
options are shared by every loss (described here once; each function's own options are in its own
docstring):

- ``temperature`` (1.0): the sampling temperature τ; the loss, gradients, statistics and log-probs
  are those of softmax(logits / τ), formed inside both sweeps without a scaled copy. Gradients are
  w.r.t. the unscaled logits. Must be positive and finite.
- ``entropy_coef`` (0.0): per token, loss −= entropy_coef·H(π_t), with its exact gradient
  ∂H/∂z_k = −p_k(log p_k + H) added in the same backward sweep.
- ``ignore_index`` (−100): labels equal to it are padding: loss 0, gradient 0, not counted.
- ``reduction`` ("mean"; "seq-mean-token-mean" for ``sapo_loss``): "mean" (alias "token-mean"; over
  valid tokens, 0.0 when none) | "sum" | "none" (labels' shape) | "seq-mean-token-mean" (GRPO) |
  "seq-mean-token-sum" | "seq-mean-token-sum-norm" (Dr. GRPO: the total over sequences ×
  ``max_length``) | "sign-mean" (mean over Ψ > 0 tokens + mean over Ψ < 0 tokens). Sequences are
  the last dimension of ``labels``; a sequence without valid tokens contributes 0. Applied as
  per-token weights on each token's gradient, so every reduction is exact.
- ``loss_mask`` (None): labels-shaped; tokens where it is 0 / False count as ignored.
- ``max_length`` (None): the "seq-mean-token-sum-norm" divisor per sequence (default
  ``labels.shape[-1]``, as verl's ``loss_scale_factor`` default and Liger's ``dr_grpo``).
- ``token_count``, ``seq_count`` (None): global normalisers, a number or a 0-dim tensor, never read
  on the host: "mean" divides by ``token_count`` and the "seq-*" reductions by ``seq_count`` instead
  of this call's own counts, so that micro-batches add up to the optimizer step's loss and gradient
  (HF's ``num_items_in_batch``, verl's global batch info). "sign-mean" takes neither.
- ``inplace_backward`` (False): the backward writes the gradient into the logits' storage (no N×V
  buffer). Only when nothing else reads those logits after this loss: their values are gone after
  backward, the graph cannot be differentiated twice, and logits whose elements share memory are refused.
- ``backend`` ("auto"): "auto" (Triton for CUDA tensors; for CPU tensors the PyTorch backend, or the
  Triton interpreter when ``TRITON_INTERPRET=1``), "triton" or "torch".
- ``return_stats`` (False): also return a ``TokenStats`` (per-token log-probs, entropy,
  logit-gradient norm and, per loss, target probability / clamped / clipped flags) from the same
  sweep: ``(loss, stats)``.
- ``process_group``, ``vocab_start_index`` (None): vocabulary parallelism (docs/guides/tensor-parallel.md):
  ``logits`` are this rank's columns [vocab_start_index, vocab_start_index + V_r) of the vocabulary,
  labels are global ids; every rank gets the same loss and the gradient of its shard. One all-gather
  of O(N) per forward, none in the backward. ``vocab_start_index`` defaults to rank × V_r. Logits that
  are a DTensor sharded Shard(-1) on a 1-D mesh take this path by themselves (the results are then
  DTensors replicated over the mesh, as with ``loss_parallel``).

Losses that take advantages also take a KL penalty to a reference policy, loss += β·KL per token:
``ref_logprobs`` (None; the reference policy's log-probs of the labels, labels' shape), ``beta``
(0.0; ≥ 0) and verl's estimator ``kl_type`` ("k3"): with x = log p_i − log p_ref, "k3" =
"low_var_kl" is e^(−x) + x − 1 with x clamped to ±20 and the result to ±10 (no gradient where a
clamp binds), "k1" = "kl" is x, "k2" = "mse" is x²/2, "abs" is |x|. Those that take
``old_logprobs`` also take ``bias_correction_kl`` (False): True gives TRL's
``use_bias_correction_kl`` (Liger's too), loss += β·KL·r with r = p_i / p_old unclamped and
differentiable (∂/∂log p_i = β·(∂KL/∂log p_i + KL)·r). TRL's k3 is unclamped; ours is verl's, so the
two differ only where k3 > 10, i.e. log p_ref − log p_i > 2.6 (or < −20). TRL applies the ratio of
its ``importance_sampling_level``; the per-token losses use the token ratio.

Each public function's keyword options are the shared ones above plus ``registry.LOSSES[name].options``
(its hyperparameters and these KL options); tests/test_losses.py checks every signature against that
table, so the explicit signatures cannot drift from the registry.

Losses are float32 (float64 for float64 logits with backend="torch"), a scalar or labels' shape for
"none"; the gradient has the logits' dtype. Bad input raises ``ValueError`` / ``TypeError`` naming
the argument before any kernel runs. Second derivatives are not supported (differentiating a
gradient raises).
"""
import torch

from .. import ops, tensor_parallel
from .._plumbing import advantages_or_ones, flat, loss_spec, prepare_tokens, resolve_backend
from .._validation import check_logits_labels, check_no_self_overlap, check_options
from ..autograd import Call, LossFunction
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
    eager = ops.runs_eagerly(logits)
    # an eager call on the whole vocabulary checks its labels here (a shard's are checked against every
    # shard after the gather: tensor_parallel.check_ownership; a traced call's inside the op)
    tokens = prepare_tokens(spec, labels, advantages, old_logprobs, ref_logprobs, ignore_index=ignore_index,
                            reduction=reduction, loss_mask=loss_mask, max_length=max_length, token_count=token_count,
                            seq_count=seq_count, vocab_size=logits.shape[-1] if eager and tp is None else None,
                            dtype=ops.compute_dtype(logits.dtype))
    if tp is None and not eager:
        # traced: the custom op, with the reduction around it traced with the model; the labels are checked
        # against the vocabulary inside the op (on CPU tensors only: ops.py)
        dtype = ops.compute_dtype(logits.dtype)
        read_advantages = advantages_or_ones(tokens.advantages, tokens.labels, dtype)
        inputs = (logits, flat(tokens.labels, torch.int64), flat(read_advantages, dtype),
                  flat(tokens.old_logprobs, dtype), flat(tokens.ref_logprobs, dtype), int(ignore_index))
        options = (spec, return_entropy or spec.has_entropy_term, return_stats, inplace_backward,
                   ops.backend_name(impl))
        rows, entropy, _, stats = ops.policy_forward(*inputs, *ops.policy_args(*options))
        loss = rows.reshape(labels.shape) if tokens.weights is None else (rows * tokens.weights).sum()
    else:
        # eager (ops.runs_eagerly), or a vocabulary shard: the same forward and gradient as an autograd Function
        call = Call(spec, int(ignore_index), inplace_backward, impl, return_stats, return_entropy, tp)
        out = LossFunction.apply(logits, tokens, call)
        loss, entropy, stats = out if return_entropy or return_stats else (out, None, None)
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
    """Cross-entropy −log p_i per token (supervised fine-tuning), fused and exact.

    Args:
        logits: (..., V) floating.
        labels: (...) integer target tokens; ``ignore_index`` marks padding.

    Returns:
        The loss (scalar, or labels' shape for "none"); with ``return_stats``, ``(loss, TokenStats)``.
        The other keyword options are shared by every loss (see ``lco_kernels.losses.per_token``).
    """
    spec = loss_spec("sft", temperature=temperature, entropy_coef=entropy_coef)
    return _fused(spec, logits, labels, ignore_index=ignore_index, reduction=reduction, loss_mask=loss_mask,
                  max_length=max_length, token_count=token_count, seq_count=seq_count,
                  inplace_backward=inplace_backward, backend=backend, return_stats=return_stats,
                  process_group=process_group, vocab_start_index=vocab_start_index)


def pg_loss(logits, labels, advantages, *, ref_logprobs=None, beta=0.0, kl_type="k3", temperature=1.0,
            entropy_coef=0.0, ignore_index=-100, reduction="mean", loss_mask=None, max_length=None, token_count=None,
            seq_count=None, inplace_backward=False, backend="auto", return_stats=False, process_group=None,
            vocab_start_index=None):
    """REINFORCE: −Ψ·log p_i per token, fused and exact.

    The peers have no separate name for it: their PPO surrogate on-policy has this gradient, not
    this value.

    Args:
        logits: (..., V) floating.
        labels: (...) integer sampled tokens; ``ignore_index`` marks padding.
        advantages: Ψ, per token (labels' shape), per sequence ((B, 1)) or 0-dim.

    Returns:
        The loss (scalar, or labels' shape for "none"); with ``return_stats``, ``(loss, TokenStats)``.
        ``ref_logprobs`` / ``beta`` / ``kl_type`` and the other keyword options are shared by every
        loss (see ``lco_kernels.losses.per_token``).
    """
    spec = loss_spec("pg", ref_logprobs=ref_logprobs, beta=beta, kl_type=kl_type, temperature=temperature,
                     entropy_coef=entropy_coef)
    return _fused(spec, logits, labels, advantages, None, ref_logprobs, ignore_index=ignore_index,
                  reduction=reduction, loss_mask=loss_mask, max_length=max_length, token_count=token_count,
                  seq_count=seq_count, inplace_backward=inplace_backward, backend=backend,
                  return_stats=return_stats, process_group=process_group,
                  vocab_start_index=vocab_start_index)


def ppo_loss(logits, labels, advantages, old_logprobs, *, epsilon_low=EPSILON, epsilon_high=EPSILON, dual_clip=None,
             ref_logprobs=None, beta=0.0, kl_type="k3", bias_correction_kl=False, temperature=1.0, entropy_coef=0.0,
             ignore_index=-100, reduction="mean", loss_mask=None, max_length=None, token_count=None, seq_count=None,
             inplace_backward=False, backend="auto", return_stats=False, process_group=None, vocab_start_index=None):
    """PPO / GRPO clipped surrogate (PG-IS), as verl's ``compute_policy_loss`` writes it.

    r = exp(clamp(log p_i − old_logprobs, ±20)); L = max(−Ψ·r, −Ψ·clip(r, 1 − ε_low, 1 + ε_high))
    per token (DAPO's clip-higher: ε_high > ε_low); with ``dual_clip`` = c, Ψ < 0 tokens are capped
    at −Ψ·c. With ``ref_logprobs`` and ``beta`` > 0, GRPO's KL penalty β·KL (``kl_type``, and
    ``bias_correction_kl``) is added per token. Peer names: verl ``loss_mode="vanilla"``; TRL / Liger
    ``loss_type`` "grpo", "bnpo", "dr_grpo", "dapo", "luspo" at ``importance_sampling_level="token"``
    (their ``loss_type`` also picks the reduction). Differences: verl's vanilla loss always applies
    its dual clip (``clip_ratio_c`` 3.0): pass ``dual_clip=3.0`` to match it; TRL does not clamp log r;
    TRL's ``delta`` is ``dual_clip`` where δ ≥ 1 + ε_high.

    Args:
        logits: (..., V) floating.
        labels: (...) integer sampled tokens; ``ignore_index`` marks padding.
        advantages: Ψ, per token (labels' shape), per sequence ((B, 1)) or 0-dim.
        old_logprobs: the sampling (behaviour) policy's log-probs of the labels, labels' shape.
        epsilon_low: lower clip, r ≥ 1 − ε_low; in [0, 1), default 0.2 (verl ``clip_ratio_low``, TRL
            ``epsilon``).
        epsilon_high: upper clip, r ≤ 1 + ε_high; ≥ 0, default 0.2 (verl ``clip_ratio_high``, TRL
            ``epsilon_high``).
        dual_clip: None (off) or c > 1: Ψ < 0 tokens' loss is at most −Ψ·c (verl ``clip_ratio_c``).

    Returns:
        The loss (scalar, or labels' shape for "none"); with ``return_stats``, ``(loss, TokenStats)``
        whose ``clipped`` marks the tokens a clip took the gradient from.
        The other keyword options are shared by every loss (see ``lco_kernels.losses.per_token``).
    """
    spec = loss_spec("ppo", old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, epsilon_low=epsilon_low,
                     epsilon_high=epsilon_high, dual_clip=dual_clip, beta=beta, kl_type=kl_type,
                     bias_correction_kl=bias_correction_kl, temperature=temperature, entropy_coef=entropy_coef)
    return _fused(spec, logits, labels, advantages, old_logprobs, ref_logprobs, ignore_index=ignore_index,
                  reduction=reduction, loss_mask=loss_mask, max_length=max_length, token_count=token_count,
                  seq_count=seq_count, inplace_backward=inplace_backward, backend=backend,
                  return_stats=return_stats, process_group=process_group,
                  vocab_start_index=vocab_start_index)


def cispo_loss(logits, labels, advantages, old_logprobs, *, epsilon_low=None, epsilon_high=EPSILON, ref_logprobs=None,
               beta=0.0, kl_type="k3", bias_correction_kl=False, temperature=1.0, entropy_coef=0.0, ignore_index=-100,
               reduction="mean", loss_mask=None, max_length=None, token_count=None, seq_count=None,
               inplace_backward=False, backend="auto", return_stats=False, process_group=None, vocab_start_index=None):
    """CISPO: −sg(w)·Ψ·log p_i, r = p_i / p_old: the weight is clipped, never the gradient.

    ``epsilon_low=None`` (default): w = min(r, 1 + ε_high), the CISPO paper's one-sided cap. A number:
    verl's two-sided w = clip(r, 1 − ε_low, 1 + ε_high) (verl ``loss_mode="cispo"``, defaults 0.2 /
    0.2; verl also clamps log r to ±20 first, which changes nothing unless ε_high > e^20 − 1). TRL and
    Liger (``loss_type="cispo"``) cap at their ``epsilon_high`` itself, min(r, ε): pass
    ``epsilon_high=ε − 1`` to match them (their recommended 5.0 is 4.0 here).

    Args:
        logits: (..., V) floating.
        labels: (...) integer sampled tokens; ``ignore_index`` marks padding.
        advantages: Ψ, per token (labels' shape), per sequence ((B, 1)) or 0-dim.
        old_logprobs: the sampling (behaviour) policy's log-probs of the labels, labels' shape.
        epsilon_low: None (one-sided cap) or verl's lower bound 1 − ε_low; in [0, 1).
        epsilon_high: the weight's upper bound 1 + ε_high; ≥ 0 (default 0.2).

    Returns:
        The loss (scalar, or labels' shape for "none"); with ``return_stats``, ``(loss, TokenStats)``
        whose ``clipped`` marks the tokens whose r left the interval.
        The other keyword options are shared by every loss (see ``lco_kernels.losses.per_token``).
    """
    spec = loss_spec("cispo", old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, epsilon_low=epsilon_low,
                     epsilon_high=epsilon_high, beta=beta, kl_type=kl_type, bias_correction_kl=bias_correction_kl,
                     temperature=temperature, entropy_coef=entropy_coef)
    return _fused(spec, logits, labels, advantages, old_logprobs, ref_logprobs, ignore_index=ignore_index,
                  reduction=reduction, loss_mask=loss_mask, max_length=max_length, token_count=token_count,
                  seq_count=seq_count, inplace_backward=inplace_backward, backend=backend,
                  return_stats=return_stats, process_group=process_group,
                  vocab_start_index=vocab_start_index)


def lco_loss(logits, labels, advantages, *, rho_pos=RHO_POS, rho_neg=RHO_NEG, old_logprobs=None, epsilon_low=EPSILON,
             epsilon_high=EPSILON, ref_logprobs=None, beta=0.0, kl_type="k3", bias_correction_kl=False,
             temperature=1.0, entropy_coef=0.0,
             ignore_index=-100, reduction="mean", loss_mask=None, max_length=None, token_count=None,
             seq_count=None, inplace_backward=False, backend="auto", return_stats=False, process_group=None,
             vocab_start_index=None) -> torch.Tensor:
    """Logits Convex Optimization loss (paper §4.2): |Ψ|·KL(π' ‖ π) per token, fused.

    The target π' moves only the sampled token's logit, so that its probability becomes
    t = min(ρ·p_i, 1) (ρ = ``rho_pos`` for Ψ > 0, ``rho_neg`` for Ψ < 0) and the other tokens keep
    their proportions: L = |Ψ|·[t·log(t / p_i) + (1 − t)·log((1 − t) / (1 − p_i))], with gradient
    |Ψ|·(p − π') (π' held constant). Where ρ·p_i ≥ 1 the target is one-hot and the loss is
    |Ψ|·(−log p_i), continuous across ρ·p_i = 1. Not in verl, TRL or Liger: the library registers it
    in verl as ``loss_mode="lco"`` (``lco_kernels.integrations.verl``) and in TRL as
    ``LCOGRPOTrainer(policy_loss="lco")``.

    Args:
        logits: (..., V) floating.
        labels: (...) integer sampled tokens; ``ignore_index`` marks padding.
        advantages: Ψ, per token (labels' shape), per sequence ((B, 1)) or 0-dim.
        rho_pos: target ratio π'_i / p_i for Ψ > 0; ≥ 1 (default 1.8).
        rho_neg: target ratio for Ψ < 0; in [0, 1] (default 0.9).
        old_logprobs: None, or the sampling policy's log-probs of the labels (labels' shape): PPO+LCO.
            A token whose ratio r = p_i / p_old has already left the trust region in the direction its
            advantage pushes (r > 1 + ε_high with Ψ > 0, r < 1 − ε_low with Ψ < 0) gets zero loss and
            gradient, as PPO's clipped tokens, and still counts in the reduction's denominators.
        epsilon_low: PPO+LCO's lower trust-region bound 1 − ε_low; in [0, 1) (default 0.2). Used only
            with ``old_logprobs``.
        epsilon_high: PPO+LCO's upper bound 1 + ε_high; ≥ 0 (default 0.2). Used only with ``old_logprobs``.

    Returns:
        The loss (a scalar, or labels' shape for "none"); with ``return_stats``, ``(loss, TokenStats)``
        with ``target_prob`` (t) and ``clamped`` (ρ·p_i ≥ 1), and ``clipped`` with ``old_logprobs``.
        The other keyword options (``ref_logprobs`` / ``beta`` / ``kl_type`` / ``bias_correction_kl``,
        ``temperature``, ``entropy_coef``, reductions and counts, ...) are shared by every loss (see
        ``lco_kernels.losses.per_token``).
    """
    spec = loss_spec("lco", old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, rho_pos=rho_pos, rho_neg=rho_neg,
                     epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta, kl_type=kl_type,
                     bias_correction_kl=bias_correction_kl, temperature=temperature, entropy_coef=entropy_coef)
    return _fused(spec, logits, labels, advantages, old_logprobs, ref_logprobs, ignore_index=ignore_index,
                  reduction=reduction, loss_mask=loss_mask, max_length=max_length, token_count=token_count,
                  seq_count=seq_count, inplace_backward=inplace_backward, backend=backend,
                  return_stats=return_stats, process_group=process_group,
                  vocab_start_index=vocab_start_index)


def sapo_loss(logits, labels, advantages, old_logprobs, *, tau_pos=1.0, tau_neg=1.05, ref_logprobs=None, beta=0.0,
              kl_type="k3", bias_correction_kl=False, temperature=1.0, entropy_coef=0.0, ignore_index=-100,
              reduction="seq-mean-token-mean", loss_mask=None, max_length=None, token_count=None, seq_count=None,
              inplace_backward=False, backend="auto", return_stats=False, process_group=None, vocab_start_index=None):
    """SAPO (soft adaptive policy optimization): −(4/τ)·σ(τ(r − 1))·Ψ per token, a smooth gate in place
    of PPO's clip, with τ = ``tau_pos`` where Ψ > 0 and ``tau_neg`` elsewhere, r = p_i / p_old.

    Peers: verl ``loss_mode="sapo"`` (``tau_pos`` / ``tau_neg``), TRL and Liger ``loss_type="sapo"``
    (``sapo_temperature_pos`` / ``_neg``); defaults 1.0 / 1.05 as all three. ∂L/∂log p_i =
    −4·σ(1 − σ)·r·Ψ.

    Differences between the peers, and which one this follows:

    - r = exp(clamp(log p_i − log p_old, ±20)) as verl (no gradient where the clamp binds); TRL and
      Liger do not clamp. The two differ only for |log r| > 20, by under 3e-9·|Ψ| in α; without the
      clamp an fp32 log r > 88 makes r = inf and the gate's gradient σ(1 − σ)·r = 0·inf = NaN.
    - reduction: both peers always aggregate "seq-mean-token-mean" (verl ignores its loss_agg_mode
      for SAPO), so that is the default here. verl divides by the sequences with at least one valid
      token, TRL and Liger by all B (ours, as for every "seq-*" reduction): they differ only when a
      sequence is fully padded; pass ``seq_count`` = the non-empty sequences for verl's.

    Args:
        logits: (..., V) floating.
        labels: (...) integer sampled tokens; ``ignore_index`` marks padding.
        advantages: Ψ, per token (labels' shape), per sequence ((B, 1)) or 0-dim.
        old_logprobs: the sampling (behaviour) policy's log-probs of the labels, labels' shape.
        tau_pos: the gate's temperature τ for Ψ > 0; > 0 (default 1.0).
        tau_neg: τ for Ψ ≤ 0; > 0 (default 1.05).

    Returns:
        The loss; with ``return_stats``, ``(loss, TokenStats)``.
        The other keyword options are shared by every loss (see ``lco_kernels.losses.per_token``).
    """
    spec = loss_spec("sapo", old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, tau_pos=tau_pos, tau_neg=tau_neg,
                     beta=beta, kl_type=kl_type, bias_correction_kl=bias_correction_kl, temperature=temperature,
                     entropy_coef=entropy_coef)
    return _fused(spec, logits, labels, advantages, old_logprobs, ref_logprobs, ignore_index=ignore_index,
                  reduction=reduction, loss_mask=loss_mask, max_length=max_length, token_count=token_count,
                  seq_count=seq_count, inplace_backward=inplace_backward, backend=backend,
                  return_stats=return_stats, process_group=process_group,
                  vocab_start_index=vocab_start_index)


def dppo_loss(logits, labels, advantages, old_logprobs, *, divergence="tv", delta_low=0.2, delta_high=0.2,
              clip_ratio_c=3.0, ref_logprobs=None, beta=0.0, kl_type="k3", bias_correction_kl=False, temperature=1.0,
              entropy_coef=0.0, ignore_index=-100, reduction="mean", loss_mask=None, max_length=None,
              token_count=None, seq_count=None, inplace_backward=False, backend="auto", return_stats=False,
              process_group=None, vocab_start_index=None):
    """DPPO (divergence PPO, verl ``loss_mode="dppo_tv"`` / ``"dppo_kl"``): −sg(min(r, C))·Ψ·log p_i
    on the tokens inside a divergence trust region, 0 (and no gradient) on the others.

    r = exp(clamp(log p_i − log p_old, ±20)), C = ``clip_ratio_c`` (verl reuses ActorConfig's
    ``clip_ratio_c``, default 3.0, although its code comment recommends a large C). The region, by
    the direction Ψ pushes (a detached mask), with δ_low / δ_high = verl's clip_ratio_low / _high:

    - ``divergence="tv"``: Ψ > 0 needs p_i − p_old ≤ δ_high, Ψ ≤ 0 needs p_i − p_old ≥ −δ_low;
    - ``divergence="kl"``: D = KL(Bernoulli(p_old) ‖ Bernoulli(p_i)) = p_old·log(p_old / p_i) +
      (1 − p_old)·log((1 − p_old) / (1 − p_i)); Ψ > 0 needs D ≤ δ_high or p_i ≤ p_old, Ψ ≤ 0 needs
      D ≤ δ_low or p_i ≥ p_old. log(1 − p_i) is the kernel's exact one and log(1 − p_old) is
      log(1 − e^{log p_old}) to full precision; verl computes log((1 − p_old + 1e-8) / (1 − p_i + 1e-8)),
      which differs where 1 − p_i or 1 − p_old is not large against 1e-8, and there can flip the mask:
      p_old = 0.988, p_i = 1 − 1e-12 has D = 0.267 here (outside δ = 0.2 for Ψ > 0) and 0.156 in
      verl's formula (inside); in fp32, verl's 1 − p_i is also rounded to a multiple of 6e-8.

    Args:
        logits: (..., V) floating.
        labels: (...) integer sampled tokens; ``ignore_index`` marks padding.
        advantages: Ψ, per token (labels' shape), per sequence ((B, 1)) or 0-dim.
        old_logprobs: the sampling (behaviour) policy's log-probs of the labels, labels' shape.
        divergence: "tv" (verl ``dppo_tv``) or "kl" (verl ``dppo_kl``).
        delta_low: the region's bound for Ψ ≤ 0; ≥ 0 (default 0.2, verl ``clip_ratio_low``).
        delta_high: the region's bound for Ψ > 0; ≥ 0 (default 0.2, verl ``clip_ratio_high``).
        clip_ratio_c: C, the truncation of the importance weight; > 0 (default 3.0, verl ``clip_ratio_c``).

    Returns:
        The loss; with ``return_stats``, ``(loss, TokenStats)`` whose ``clipped`` marks the tokens
        outside the region (verl's pg_clipfrac).
        The other keyword options are shared by every loss (see ``lco_kernels.losses.per_token``).
    """
    spec = loss_spec("dppo", old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, divergence=divergence,
                     delta_low=delta_low, delta_high=delta_high, clip_ratio_c=clip_ratio_c, beta=beta, kl_type=kl_type,
                     bias_correction_kl=bias_correction_kl, temperature=temperature, entropy_coef=entropy_coef)
    return _fused(spec, logits, labels, advantages, old_logprobs, ref_logprobs, ignore_index=ignore_index,
                  reduction=reduction, loss_mask=loss_mask, max_length=max_length, token_count=token_count,
                  seq_count=seq_count, inplace_backward=inplace_backward, backend=backend,
                  return_stats=return_stats, process_group=process_group,
                  vocab_start_index=vocab_start_index)


def dro_loss(logits, labels, advantages, old_logprobs, *, dro_beta, ref_logprobs=None, beta=0.0, kl_type="k3",
             bias_correction_kl=False, temperature=1.0, entropy_coef=0.0, ignore_index=-100, reduction="mean",
             loss_mask=None, max_length=None, token_count=None, seq_count=None, inplace_backward=False,
             backend="auto", return_stats=False, process_group=None, vocab_start_index=None):
    """DRO (verl ``loss_mode="dro"``, ``policy_loss.dro_beta``): −Ψ·log p_i + (β/2)·(log p_i − log p_old)²
    per token, β = ``dro_beta`` > 0 (required, as in verl). No clamp of the log-ratio (verl has none).

    Args:
        logits: (..., V) floating.
        labels: (...) integer sampled tokens; ``ignore_index`` marks padding.
        advantages: Ψ, per token (labels' shape), per sequence ((B, 1)) or 0-dim.
        old_logprobs: the sampling (behaviour) policy's log-probs of the labels, labels' shape.
        dro_beta: β of the quadratic penalty; > 0, required (verl ``policy_loss.dro_beta``).

    Returns:
        The loss; with ``return_stats``, ``(loss, TokenStats)``.
        The other keyword options are shared by every loss (see ``lco_kernels.losses.per_token``).
    """
    spec = loss_spec("dro", old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, dro_beta=dro_beta, beta=beta,
                     kl_type=kl_type, bias_correction_kl=bias_correction_kl, temperature=temperature,
                     entropy_coef=entropy_coef)
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
    Any loss written on these log-probs in PyTorch is fused and exact (docs/token-logprobs.md).

    Args:
        logits: (..., V) floating.
        labels: (...) integer tokens; ``ignore_index`` marks positions whose log-prob is 0 and
            receives no gradient.
        temperature: τ > 0: the log-probs of softmax(logits / τ); gradients w.r.t. the unscaled logits.
        ignore_index: the padding label.
        return_entropy: also return the per-token entropy H(softmax(logits / τ)), differentiable.
        inplace_backward: the backward writes the gradient into the logits' storage (as for the losses).
        backend: "auto", "triton" or "torch" (as for the losses).
        process_group: a vocabulary shard's group (as for the losses).
        vocab_start_index: the shard's first vocabulary id (default rank × V_r).

    Returns:
        ``logprobs`` (fp32, labels' shape), or ``(logprobs, entropy)`` with ``return_entropy``.
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
