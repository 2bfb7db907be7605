"""Fused linear + loss: every policy loss straight from hidden states, never materialising N×V logits.

For each chunk of tokens: logits = hidden_chunk @ weight.T (+ bias) into a chunk buffer of ours,
the vocabulary kernels turn them into the loss and, in place, into the logit gradient; then
grad_hidden[chunk] = grad_logits @ weight and grad_weight += grad_logits.T @ hidden_chunk (and the
bias), accumulated in ``accum_dtype`` (fp32 by default, also for bf16 weights).

Scalar reductions know each token's weight at forward time, so the gradients are formed during the
forward (three matmuls per chunk) and the backward only multiplies them by the scalar upstream
gradient — exact, because it is one number. For reduction="none" the upstream gradient is one
value per token: it must reach each token's α before the projection, so the backward recomputes
each chunk's logits (a fourth matmul) and runs the gradient sweep with coef = α × upstream.

``fused_linear_token_logprobs`` hands out per-token log-probs (and entropies): their upstream
gradient is always per token, so its backward recomputes each chunk as reduction="none" does.

Mixed precision follows autocast: ``hidden`` and ``weight`` (and ``bias``) may have different floating
dtypes; the chunk products run in the lower precision of the two (one cast of the other tensor, as
autocast caches it), ``grad_weight`` / ``grad_bias`` accumulate across chunks in ``accum_dtype``, and
every gradient is returned in its input's dtype.

Peak extra memory: one chunk of logits (chunk_size × V) + grad_hidden (N × H) + the fp32 grad_weight
accumulator (V × H) + O(N), independent of N × V (+ the cast copy of ``weight`` or ``hidden`` when
their dtypes differ).

One process: the work is the custom ops ``lco_kernels::fused_linear_forward`` / ``fused_linear_backward``
(as ops.py's, so torch.compile sees one node each, with shapes from ``register_fake``). A vocabulary
shard (``process_group``): the same ``_forward`` / ``_backward`` inside ``ShardedFusedLinear``, a
``torch.autograd.Function``, since a ProcessGroup cannot pass through an op schema.
"""
import math

import torch
from torch._subclasses.functional_tensor import FunctionalTensor

from . import ops, tensor_parallel
from ._plumbing import advantages_or_ones, flat, loss_spec, prepare_tokens, resolve_backend
from ._validation import check_labels_in_range, check_linear, check_options
from .autograd import refuse_double_backward, row_coefficients
from .registry import EPSILON, RHO_NEG, RHO_POS
from .stats import ROW, ROW_STATE, STAT_ROWS, TokenStats

# Default logits chunk: as many elements as the larger of ``hidden`` and a quarter of ``weight``,
# between 1 MiB and 256 MiB. Memory stays O(N·H + V·H); and since each chunk adds its V×H weight
# gradient into the accumulator (a V×H read-modify-write), chunks of at least V·H/4 logits keep that
# traffic within a small multiple of the logits' own.
_MIN_CHUNK_BYTES = 1 << 20
_MAX_CHUNK_BYTES = 1 << 28


def default_chunk_size(n_tokens, hidden_size, vocab, element_bytes):
    """Rows per chunk: ceil(max(N·H, V·H/4) / V), clamped so a chunk of logits is 1-256 MiB, and to [1, N]."""
    rows = math.ceil(max(n_tokens * hidden_size, vocab * hidden_size / 4) / vocab)
    rows = max(rows, _MIN_CHUNK_BYTES // (vocab * element_bytes))
    rows = min(rows, max(1, _MAX_CHUNK_BYTES // (vocab * element_bytes)))
    return max(1, min(rows, n_tokens))


def _forward(hidden, weight, bias, labels, advantages, old_logprobs, ref_logprobs, weights, spec, ignore_index,
             chunk_size, accum_dtype, impl, with_stats, need_entropy, grads_in_forward, tp):
    """The forward's work, shared by the op (one process) and ``ShardedFusedLinear``.

    Returns (row state (N, len(ROW_STATE)), statistics (N, len(STAT_ROWS)) or None, gradients or None).
    Where ``grads_in_forward`` (flags for hidden, weight, bias) holds any True, the chunks' logits are
    turned into their gradient as they go, for an upstream gradient of 1 on the loss reduced with
    ``weights``, and (grad_hidden, grad_weight, grad_bias) come back in the inputs' dtypes, None where
    the flag is False. ``tp`` = (process group, first row of this rank's vocabulary) or None.
    """
    x, weight_p, bias_p = _product_operands(hidden, weight, bias)
    n = x.shape[0]
    entropy_grad = spec.has_entropy_term or need_entropy
    rows_state = torch.empty(n, len(ROW_STATE), dtype=torch.float32, device=x.device)
    stats = torch.empty(n, len(STAT_ROWS), dtype=torch.float32, device=x.device) if with_stats else None
    with_grads = any(grads_in_forward)
    grads = _Grads(x, weight_p, bias_p, accum_dtype, grads_in_forward) if with_grads else None
    upstream = torch.ones((), device=x.device)  # the forward forms the gradients for an upstream gradient of 1

    def forward_chunk(rows, logits):
        per_token = (advantages[rows], None if old_logprobs is None else old_logprobs[rows],
                     None if ref_logprobs is None else ref_logprobs[rows], spec, ignore_index,
                     entropy_grad or with_stats, with_stats)
        if tp is None:
            state, chunk_stats = impl.forward_rows(logits, labels[rows], *per_token)
        else:  # one all-gather of the chunk's partials
            state, chunk_stats = tensor_parallel.forward_rows(impl, tp, logits, labels[rows], *per_token)
        rows_state[rows] = state
        if with_stats:
            stats[rows] = chunk_stats
        if with_grads:  # the upstream gradient will be one scalar: form the gradients now with upstream 1
            return row_coefficients(spec, state, weights[rows], upstream, None, entropy_grad) + (state,)
        return None

    _chunk_loop(x, weight_p, bias_p, labels, chunk_size, impl, spec, 0 if tp is None else tp[1], grads,
                forward_chunk)
    return rows_state, stats, None if grads is None else grads.finish(*_dtypes(hidden, weight, bias))


def _backward(hidden, weight, bias, labels, rows_state, coef, ent_coef, chunk_size, accum_dtype, impl, spec,
              vocab_start, needs_grad):
    """(grad_hidden (N, H), grad_weight, grad_bias) from per-token ``coef`` (and ``ent_coef``), each None
    where ``needs_grad`` (hidden, weight, bias) is False: each chunk's logits are projected again and
    turned into their gradient."""
    x, weight_p, bias_p = _product_operands(hidden, weight, bias)
    grads = _Grads(x, weight_p, bias_p, accum_dtype, needs_grad)

    def backward_chunk(rows, logits):
        return coef[rows], None if ent_coef is None else ent_coef[rows], rows_state[rows]

    _chunk_loop(x, weight_p, bias_p, labels, chunk_size, impl, spec, vocab_start, grads, backward_chunk)
    return grads.finish(*_dtypes(hidden, weight, bias))


def _product_operands(hidden, weight, bias):
    """(hidden as (N, H), weight, bias) in the products' dtype: autocast's rule, the lowest precision."""
    dtype = product_dtype(hidden, weight, bias)
    return hidden.reshape(-1, hidden.shape[-1]).to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _dtypes(hidden, weight, bias):
    return hidden.dtype, weight.dtype, None if bias is None else bias.dtype


def _outputs(rows_state, weights, need_entropy):
    """(loss, entropy): the loss reduced with ``weights`` (0-dim), or per token (N,) when they are None;
    the per-token entropy with ``need_entropy``, else empty."""
    loss = rows_state[:, ROW["loss"]]
    loss = loss.clone() if weights is None else (loss * weights).sum()
    entropy = rows_state[:, ROW["entropy"]].clone() if need_entropy else rows_state.new_empty(0)
    return loss, entropy


# ---- one process: custom ops (torch.compile sees one node with a shape function and a gradient) ----

def _fused_forward(hidden, weight, bias, labels, advantages, old_logprobs, ref_logprobs, weights, ignore_index,
                   chunk_size, accum_dtype, with_stats, need_entropy, grads_in_forward, backend, *spec_fields):
    """(loss, entropy, row state, stats, grad_hidden, grad_weight, grad_bias); the last four are empty
    when not formed (see ``_forward``; ``grads_in_forward`` needs ``weights``)."""
    check_labels_in_range(labels, weight.shape[0], ignore_index)  # CPU tensors only (ops.py)
    rows_state, stats, grads = _forward(hidden, weight, bias, labels, advantages, old_logprobs, ref_logprobs, weights,
                                        ops.spec_from_args(spec_fields), ignore_index, chunk_size, accum_dtype,
                                        ops.IMPLS[backend], with_stats, need_entropy, grads_in_forward, None)
    empty = rows_state.new_empty(0)
    return _outputs(rows_state, weights, need_entropy) + (rows_state, empty.clone() if stats is None else stats) + (
        _op_grads(hidden, (None,) * 3 if grads is None else grads))


def _op_grads(hidden, grads):
    """An op's three gradient outputs: grad_hidden in hidden's shape; an empty fp32 tensor for each None."""
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is not None:
        grad_hidden = grad_hidden.view(hidden.shape)
    return tuple(hidden.new_empty(0, dtype=torch.float32) if g is None else g
                 for g in (grad_hidden, grad_weight, grad_bias))


def _fused_forward_fake(hidden, weight, bias, labels, advantages, old_logprobs, ref_logprobs, weights, ignore_index,
                        chunk_size, accum_dtype, with_stats, need_entropy, grads_in_forward, *_):
    n = labels.numel()

    def new(present, shape):
        return hidden.new_empty(shape if present else (0,), dtype=torch.float32)
    return (new(True, () if weights is not None else (n,)), new(need_entropy, (n,)),
            new(True, (n, len(ROW_STATE))), new(with_stats, (n, len(STAT_ROWS)))) + _fake_grads(
        hidden, weight, bias, grads_in_forward)


def _fake_grads(hidden, weight, bias, present):
    """``_op_grads``' shapes and dtypes: each gradient like its input where ``present``, else empty fp32."""
    return tuple(t.new_empty(t.shape) if flag and t is not None else hidden.new_empty(0, dtype=torch.float32)
                 for t, flag in zip((hidden, weight, bias), present))


fused_linear_forward = ops.define(
    "fused_linear_forward",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor advantages, Tensor? old_logprobs, "
    "Tensor? ref_logprobs, Tensor? weights, int ignore_index, int chunk_size, ScalarType accum_dtype, "
    f"bool with_stats, bool need_entropy, bool[] grads_in_forward, str backend, {ops.SPEC_SCHEMA}) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _fused_forward, _fused_forward_fake)


def _fused_backward(hidden, weight, bias, labels, rows_state, coef, ent_coef, chunk_size, accum_dtype, needs_grad,
                    backend, *spec_fields):
    """(grad_hidden, grad_weight, grad_bias) in the inputs' shapes and dtypes; empty where ``needs_grad``
    (hidden, weight, bias) is False."""
    return _op_grads(hidden, _backward(hidden, weight, bias, labels, rows_state, coef, ent_coef, chunk_size,
                                       accum_dtype, ops.IMPLS[backend], ops.spec_from_args(spec_fields), 0,
                                       needs_grad))


def _fused_backward_fake(hidden, weight, bias, labels, rows_state, coef, ent_coef, chunk_size, accum_dtype,
                         needs_grad, *_):
    return _fake_grads(hidden, weight, bias, needs_grad)


fused_linear_backward = ops.define(
    "fused_linear_backward",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor rows_state, Tensor coef, Tensor? ent_coef, "
    f"int chunk_size, ScalarType accum_dtype, bool[] needs_grad, str backend, {ops.SPEC_SCHEMA}) "
    "-> (Tensor, Tensor, Tensor)",
    _fused_backward, _fused_backward_fake)


def _fused_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels = inputs[:4]
    weights = inputs[7]
    ctx.chunk_size, ctx.accum_dtype, _, ctx.need_entropy, ctx.grads_in_forward, ctx.backend = inputs[9:15]
    ctx.spec = inputs[15:]
    ctx.with_grads = any(ctx.grads_in_forward)
    ctx.gradients_returned = False
    ctx.mark_non_differentiable(*output[2:] if ctx.need_entropy else (output[1],) + output[2:])
    ctx.set_materialize_grads(False)  # else autograd allocates zero gradients for them (V×H for grad_weight)
    if ctx.with_grads:
        ctx.save_for_backward(*output[4:])
    else:
        ctx.save_for_backward(hidden, weight, bias, labels, output[2], weights)


def _fused_gradient(ctx, grad_loss, grad_entropy, *_):
    refuse_double_backward()
    needs_grad = ctx.needs_input_grad[:3]
    if ctx.with_grads:
        grads = _scale_formed_gradients(ctx, grad_loss)
    else:
        hidden, weight, bias, labels, rows_state, weights = ctx.saved_tensors
        spec = ops.spec_from_args(ctx.spec)
        if grad_loss is None:  # only the entropy output was used
            grad_loss = torch.zeros_like(rows_state[:, ROW["loss"]])
        coef, ent_coef = row_coefficients(spec, rows_state, weights, grad_loss, grad_entropy,
                                          spec.has_entropy_term or ctx.need_entropy)
        grads = fused_linear_backward(hidden, weight, bias, labels, rows_state, coef, ent_coef, ctx.chunk_size,
                                      ctx.accum_dtype, list(needs_grad), ctx.backend, *ctx.spec)
    # the outputs for gradients nobody needs are empty placeholders
    return tuple(g if need else None for g, need in zip(grads, needs_grad)) + (None,) * (len(ctx.needs_input_grad) - 3)


def _grads_in_forward(needs_grad, weights, need_entropy):
    """Which gradients the forward forms: with a scalar reduction and no per-token output the upstream
    gradient will be one number, so the forward forms those needed (three matmuls per chunk at most) and
    the backward only scales them; otherwise none."""
    return [bool(need) and weights is not None and not need_entropy for need in needs_grad]


def _scale_formed_gradients(ctx, grad_loss):
    """The gradients the forward formed for an upstream gradient of 1, times the actual one (a scalar:
    exact). Eager: in place (no second V×H buffer), so only once. Traced by AOT autograd (functional
    tensors): out of place, since a functional graph must not rewrite the forward's outputs; the
    compiler plans that memory."""
    if ctx.gradients_returned:
        raise RuntimeError("fused linear loss: its gradients were formed in the forward pass and handed "
                           "out by the first backward; this graph cannot be differentiated again")
    ctx.gradients_returned = True
    grads = ctx.saved_tensors  # those not formed are empty placeholders (or None in ShardedFusedLinear)
    if any(isinstance(g, FunctionalTensor) for g in grads):
        return tuple(None if g is None else g * grad_loss for g in grads)
    return tuple(None if g is None else g.mul_(grad_loss) for g in grads)


fused_linear_forward.register_autograd(_fused_gradient, setup_context=_fused_setup_context)


# ---- a vocabulary shard: a ProcessGroup cannot pass through an op schema ----

class ShardedFusedLinear(torch.autograd.Function):
    """The fused-linear loss on one rank's rows of a vocabulary-parallel LM head; outputs and gradients
    as ``fused_linear_forward``'s. ``tp`` = (process group, first row, all_reduce_grad_hidden)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, advantages, old_logprobs, ref_logprobs, weights, spec,
                ignore_index, chunk_size, accum_dtype, impl, with_stats, need_entropy, tp):
        # a shard's labels are checked against every shard after the gather (tensor_parallel.check_ownership)
        grads_in_forward = _grads_in_forward(ctx.needs_input_grad[:3], weights, need_entropy)
        with_grads = any(grads_in_forward)
        rows_state, stats, grads = _forward(hidden, weight, bias, labels, advantages, old_logprobs, ref_logprobs,
                                            weights, spec, ignore_index, chunk_size, accum_dtype, impl, with_stats,
                                            need_entropy, grads_in_forward, tp[:2])
        ctx.hidden_shape, ctx.has_bias, ctx.need_entropy = hidden.shape, bias is not None, need_entropy
        ctx.spec, ctx.impl, ctx.chunk_size, ctx.accum_dtype, ctx.tp = spec, impl, chunk_size, accum_dtype, tp
        ctx.with_grads, ctx.gradients_returned = with_grads, False
        if with_grads:
            ctx.save_for_backward(*grads)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, rows_state, weights)
        loss, entropy = _outputs(rows_state, weights, need_entropy)
        stats = rows_state.new_empty(0) if stats is None else stats
        ctx.mark_non_differentiable(*((stats,) if need_entropy else (stats, entropy)))
        return loss, entropy, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy, grad_stats):
        refuse_double_backward()
        if ctx.with_grads:
            grad_hidden, grad_weight, grad_bias = _scale_formed_gradients(ctx, grad_loss)
        else:
            hidden, weight, bias, labels, rows_state, weights = ctx.saved_tensors
            coef, ent_coef = row_coefficients(ctx.spec, rows_state, weights, grad_loss, grad_entropy,
                                              ctx.spec.has_entropy_term or ctx.need_entropy)
            grad_hidden, grad_weight, grad_bias = _backward(hidden, weight, bias, labels, rows_state, coef, ent_coef,
                                                            ctx.chunk_size, ctx.accum_dtype, ctx.impl, ctx.spec,
                                                            ctx.tp[1], ctx.needs_input_grad[:3])
        group, _, all_reduce_grad_hidden = ctx.tp
        if all_reduce_grad_hidden and grad_hidden is not None:
            # each rank's grad_hidden covers its vocabulary rows only: the gradient of the replicated
            # hidden states is the sum over the group (what Megatron's copy_to_tensor_model_parallel_region
            # does in its backward when all_reduce_grad_hidden is left False)
            torch.distributed.all_reduce(grad_hidden, group=group)
        n_others = ShardedFusedLinear.forward.__code__.co_argcount - 4  # the inputs after ctx, hidden, weight, bias
        grad_hidden = None if grad_hidden is None else grad_hidden.view(ctx.hidden_shape)
        return (grad_hidden, grad_weight, grad_bias if ctx.has_bias else None) + (None,) * n_others


def _chunk_loop(x, weight, bias, labels, chunk_size, backend, spec, vocab_start, grads, per_chunk):
    """The one loop over token chunks: project a chunk into our buffer, call ``per_chunk(rows, logits)``
    and, when it returns the chunk's (coef, ent_coef, row state), overwrite the logits with their
    gradient in place and add the chunk's share to ``grads``."""
    n = x.shape[0]
    buf = torch.empty(min(chunk_size, max(n, 1)), weight.shape[0], dtype=x.dtype, device=x.device)
    for r0 in range(0, n, chunk_size):
        rows = slice(r0, min(n, r0 + chunk_size))
        logits = _project(x[rows], weight, bias, buf)[None]
        coefficients = per_chunk(rows, logits)
        if coefficients is not None:
            coef, ent_coef, state = coefficients
            backend.backward_rows(logits, labels[rows], coef, ent_coef, state, logits, spec, vocab_start)
            grads.add(rows, logits[0])


def _project(x_rows, weight, bias, buf):
    logits = buf[: x_rows.shape[0]]
    if bias is None:
        torch.matmul(x_rows, weight.t(), out=logits)
    else:  # the bias inside the GEMM: one rounding to the logits' dtype, as F.linear (and autocast) do
        torch.addmm(bias, x_rows, weight.t(), out=logits)
    return logits


def product_dtype(hidden, weight, bias):
    """The dtype of the chunk products: the lowest precision among the inputs, as autocast would pick.
    bfloat16 with float16 has no lower one (checked by check_linear)."""
    dtypes = [t.dtype for t in (hidden, weight, bias) if t is not None]
    return min(dtypes, key=lambda d: torch.finfo(d).bits)


class _Grads:
    """grad_hidden and grad_weight / grad_bias accumulated in ``accum_dtype`` across chunks, each only
    where ``need`` (hidden, weight, bias) says so: a frozen LM head gets no V×H accumulator. ``x``,
    ``weight``, ``bias`` are those of the products (the lower precision when the inputs' dtypes differ)."""

    def __init__(self, x, weight, bias, accum_dtype, need):
        self.weight = weight
        self.x = x
        self.hidden = torch.empty_like(x) if need[0] else None
        self.weight_acc = torch.zeros(weight.shape, dtype=accum_dtype, device=weight.device) if need[1] else None
        self.bias_acc = (torch.zeros(bias.shape, dtype=accum_dtype, device=bias.device)
                         if need[2] and bias is not None else None)
        self.scratch = None  # one V×H product in the input dtype, when it differs from accum_dtype

    def add(self, rows, grad_logits):
        if self.hidden is not None:
            torch.matmul(grad_logits, self.weight, out=self.hidden[rows])
        if self.weight_acc is None:
            pass
        elif self.weight_acc.dtype == grad_logits.dtype:
            self.weight_acc.addmm_(grad_logits.t(), self.x[rows])
        else:
            # each chunk's product is formed in the input dtype (fp32 accumulation inside the GEMM),
            # the sum across chunks in accum_dtype: bf16 sums across chunks drift (Liger #512)
            if self.scratch is None:
                self.scratch = torch.empty(self.weight.shape, dtype=grad_logits.dtype, device=grad_logits.device)
            torch.mm(grad_logits.t(), self.x[rows], out=self.scratch)
            self.weight_acc += self.scratch
        if self.bias_acc is not None:
            self.bias_acc += grad_logits.sum(dim=0, dtype=self.bias_acc.dtype)

    def finish(self, hidden_dtype, weight_dtype, bias_dtype):
        """The gradients in the inputs' own dtypes (the accumulators cast once, never via the product
        dtype); None where not needed."""
        return tuple(None if t is None else t.to(dtype) for t, dtype in (
            (self.hidden, hidden_dtype), (self.weight_acc, weight_dtype), (self.bias_acc, bias_dtype)))


def fused_linear_policy_loss(hidden, weight, labels, advantages=None, *, loss="lco", bias=None, old_logprobs=None,
                             ref_logprobs=None, rho_pos=RHO_POS, rho_neg=RHO_NEG, epsilon_low=None,
                             epsilon_high=EPSILON, dual_clip=None, beta=0.0, kl_type="k3", bias_correction_kl=False,
                             tau_pos=1.0, tau_neg=1.05, divergence="tv", delta_low=0.2, delta_high=0.2,
                             clip_ratio_c=3.0, dro_beta=None, temperature=1.0,
                             entropy_coef=0.0, ignore_index=-100, reduction="mean", loss_mask=None, max_length=None,
                             token_count=None, seq_count=None, chunk_size=None, accum_dtype=torch.float32,
                             return_stats=False, backend="auto", process_group=None, vocab_start_index=None,
                             all_reduce_grad_hidden=False):
    """Any per-token loss of ``hidden @ weight.T (+ bias)``, fused, without the N×V logits.

    For each chunk of tokens: the chunk's logits are projected into one buffer, the vocabulary
    kernels turn them into the loss and the logit gradient in place, then grad_hidden[chunk] =
    grad_logits @ weight and grad_weight += grad_logits.T @ hidden_chunk. Peak extra memory:
    O(chunk × V + N × H + V × H). Scalar reductions form the gradients during the forward (3 matmuls
    per chunk; the graph can be differentiated once); ``reduction="none"`` recomputes each chunk in
    the backward (one more matmul). Only the gradients of inputs that require one are formed (a
    frozen LM head costs no V × H accumulator).

    Args:
        hidden: (..., H) last hidden states.
        weight: (V, H) LM-head weight (this rank's rows with ``process_group``). Under FSDP2 it may be the
            head's sharded parameter itself, a DTensor with Shard(0) / Replicate placements (``bias`` too):
            it is all-gathered and its gradient reduce-scattered as the mean over the mesh, as FSDP2
            reduces every other parameter (``tensor_parallel.gather_sharded_head``); never pass
            ``weight.full_tensor()``, whose gradient is not reduced over the ranks. Data parallelism:
            pass the global ``token_count`` / ``seq_count`` and multiply the loss by the world size.
        labels: (...) integer sampled tokens, hidden's leading shape; ``ignore_index`` marks padding.
        advantages: Ψ as for the logits-level loss; None for "sft".
        loss: a name of the loss registry (``lco_kernels.registry.LOSSES``: "sft", "pg", "ppo", "cispo",
            "lco", "sapo", "dppo", "dro"). The options below that the chosen loss does not take are
            ignored; each is described at the logits-level loss (``lco_loss``, ``sapo_loss``, ...).
            The losses on token log-probs ("gspo", "geo_mean", "vespo", "clip_cov", "kl_cov",
            "bypass_mode") are not served here: each name is a ``ValueError`` pointing to that loss's own
            ``fused_linear_<name>_loss``.
        bias: (V,) LM-head bias, or None.
        old_logprobs: as the chosen loss (required by every loss but "sft", "pg" and "lco").
        ref_logprobs: as the logits-level losses (KL penalty, with ``beta``, ``kl_type``,
            ``bias_correction_kl``).
        rho_pos: "lco", as ``lco_loss``.
        rho_neg: "lco", as ``lco_loss``.
        epsilon_low: "ppo", "lco" and "cispo"; None is 0.2 except for "cispo", where it is the
            one-sided cap (as ``cispo_loss``).
        epsilon_high: "ppo", "cispo" and "lco", as those losses.
        dual_clip: "ppo", as ``ppo_loss``.
        tau_pos: "sapo", as ``sapo_loss``.
        tau_neg: "sapo", as ``sapo_loss``.
        divergence: "dppo", as ``dppo_loss``.
        delta_low: "dppo", as ``dppo_loss``.
        delta_high: "dppo", as ``dppo_loss``.
        clip_ratio_c: "dppo", as ``dppo_loss``.
        dro_beta: "dro", as ``dro_loss`` (required there).
        reduction: as every loss; "mean" for every loss here, SAPO's included (pass
            "seq-mean-token-mean" for SAPO's own default).
        chunk_size: tokens per chunk (default ``ceil(max(N·H, V·H/4) / V)`` tokens: a chunk of logits
            as large as ``hidden`` or a quarter of ``weight``, kept between 1 MiB and 256 MiB).
        accum_dtype: dtype of the grad_weight / grad_bias accumulation across chunks (fp32 by
            default, also for bf16 weights).
        process_group: ``weight`` (and ``bias``) are this rank's rows [vocab_start_index,
            vocab_start_index + V_r) of a vocabulary-parallel LM head and ``hidden`` is the same on
            every rank (docs/guides/tensor-parallel.md); one all-gather per chunk of tokens, and
            grad_weight is this rank's rows. Each rank's grad_hidden is then its rows' share, a partial
            sum over the group, as Megatron's ColumnParallelLinear leaves it for the all-reduce in the
            backward of copy_to_tensor_model_parallel_region. A given chunk_size must be the same on
            every rank; without one the ranks agree on the smallest default (one all-reduce of an int,
            a host synchronisation on GPUs: pass chunk_size to avoid it).
        vocab_start_index: the shard's first vocabulary id (default rank × V_r).
        all_reduce_grad_hidden: with ``process_group``, all-reduce grad_hidden here (one all-reduce of
            N × H in the backward), for hidden states that pass through no such region.

    ``hidden``, ``weight`` and ``bias`` may have different floating dtypes (autocast's rule): the chunk
    products run in the lower precision, and each gradient is returned in its own input's dtype;
    bfloat16 with float16 is a ``ValueError``. ``beta``, ``kl_type``, ``bias_correction_kl``,
    ``temperature``, ``entropy_coef``, ``ignore_index``, ``loss_mask``, ``max_length``, the counts,
    ``return_stats`` and ``backend`` are the options shared by every loss (see
    ``lco_kernels.losses.per_token``).

    Returns:
        The loss (scalar, or labels' shape for "none"); with ``return_stats``, ``(loss, TokenStats)``.
    """
    spec = loss_spec(loss, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, rho_pos=rho_pos, rho_neg=rho_neg,
                     epsilon_low=epsilon_low, epsilon_high=epsilon_high, dual_clip=dual_clip, beta=beta,
                     kl_type=kl_type, bias_correction_kl=bias_correction_kl, tau_pos=tau_pos, tau_neg=tau_neg,
                     divergence=divergence, delta_low=delta_low, delta_high=delta_high, clip_ratio_c=clip_ratio_c,
                     dro_beta=dro_beta, entropy_coef=entropy_coef, temperature=temperature)
    check_options(ignore_index=ignore_index, reduction=reduction, backend=backend, return_stats=return_stats,
                  max_length=max_length, temperature=temperature, entropy_coef=entropy_coef, token_count=token_count,
                  seq_count=seq_count, device=getattr(hidden, "device", None))
    check_linear(hidden, weight, bias, labels, chunk_size, accum_dtype)
    if not isinstance(all_reduce_grad_hidden, bool):
        raise TypeError(f"all_reduce_grad_hidden must be a bool, got {type(all_reduce_grad_hidden).__name__}")
    if all_reduce_grad_hidden and process_group is None:
        raise ValueError("all_reduce_grad_hidden is only meaningful with process_group")
    tp = tensor_parallel.resolve_shard(process_group, vocab_start_index, weight.shape[0])
    # a shard's labels are checked against every shard after the gather (tensor_parallel.check_ownership)
    tokens = prepare_tokens(spec, labels, advantages, old_logprobs, ref_logprobs,
                            ignore_index=ignore_index, reduction=reduction, loss_mask=loss_mask, max_length=max_length,
                            token_count=token_count, seq_count=seq_count)
    out, _, stats = _apply(hidden, weight, bias, tokens, spec, ignore_index, chunk_size, accum_dtype, backend,
                           return_stats, need_entropy=False,
                           tp=None if tp is None else tp + (all_reduce_grad_hidden,))
    if return_stats:
        return out, TokenStats.from_rows(stats, labels.shape, spec)
    return out


def fused_linear_token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                                return_entropy=False, chunk_size=None, accum_dtype=torch.float32, backend="auto"):
    """``token_logprobs(hidden @ weight.T + bias, labels, ...)`` without the N×V logits.

    fp32 log p_i of softmax(logits / τ) in labels' shape (0 at ignored positions), differentiable
    w.r.t. hidden, weight and bias: the drop-in for verl's fused log-prob / entropy path and TRL's
    chunked log-prob head. The backward recomputes each chunk's logits (the upstream gradient is per
    token: 4 matmuls per chunk in all) and takes 1 − p_i from the log domain, as ``token_logprobs``.

    Args:
        hidden: (..., H) last hidden states.
        weight: (V, H) LM-head weight (an FSDP2 DTensor is gathered as by ``fused_linear_policy_loss``).
        labels: (...) integer tokens, hidden's leading shape; ``ignore_index`` marks padding.
        bias: (V,) LM-head bias, or None.
        temperature: τ > 0: the log-probs of softmax(logits / τ).
        ignore_index: the padding label.
        return_entropy: also return the per-token entropy, differentiable.
        chunk_size: tokens per chunk (as ``fused_linear_policy_loss``).
        accum_dtype: dtype of the weight / bias gradient accumulation (as ``fused_linear_policy_loss``).
        backend: "auto", "triton" or "torch".

    Returns:
        ``logprobs``, or ``(logprobs, entropy)`` with ``return_entropy``. Mixed dtypes as
        ``fused_linear_policy_loss``.
    """
    check_options(ignore_index=ignore_index, reduction="none", backend=backend, return_stats=False, max_length=None,
                  temperature=temperature, device=getattr(hidden, "device", None))
    check_linear(hidden, weight, bias, labels, chunk_size, accum_dtype)
    logprobs, entropy, _ = _token_sweep(hidden, weight, bias, labels, temperature, ignore_index, chunk_size,
                                        accum_dtype, backend, return_entropy, return_stats=False)
    return (logprobs, entropy) if return_entropy else logprobs


def _token_sweep(hidden, weight, bias, labels, temperature, ignore_index, chunk_size, accum_dtype, backend,
                 return_entropy, return_stats):
    """``fused_linear_token_logprobs``' pass (arguments checked) as ``(logprobs, entropy or None, stats or
    None)``; ``stats`` are the SFT head's, as ``losses.per_token._token_sweep`` hands them out."""
    spec = loss_spec("sft", temperature=temperature)
    tokens = prepare_tokens(spec, labels, None, None, None, ignore_index=ignore_index,
                            reduction="none", loss_mask=None, max_length=None, token_count=None, seq_count=None)
    loss, entropy, stats = _apply(hidden, weight, bias, tokens, spec, ignore_index, chunk_size, accum_dtype, backend,
                                  return_stats, return_entropy)
    # the SFT head's loss is −log p_i, exactly (a negation rounds nothing)
    return (-loss, entropy if return_entropy else None,
            TokenStats.from_rows(stats, labels.shape, spec) if return_stats else None)


def _apply(hidden, weight, bias, tokens, spec, ignore_index, chunk_size, accum_dtype, backend, with_stats,
           need_entropy, tp=None):
    """(loss, entropy, stats) through the op, or ``ShardedFusedLinear`` for a vocabulary shard; an LM head
    given as DTensors (FSDP2) is gathered first (``tensor_parallel.gather_sharded_head``)."""
    if tensor_parallel.is_dtensor(weight) or tensor_parallel.is_dtensor(bias) or tensor_parallel.is_dtensor(hidden):
        if tp is not None:
            raise ValueError("hidden / weight / bias given as DTensors carry their own sharding: leave process_group "
                             "and vocab_start_index as None")
        weight, bias = tensor_parallel.gather_sharded_head(hidden, weight, bias)
    dtype = product_dtype(hidden, weight, bias)
    # the vocabulary kernels see chunks of logits of the product dtype on the inputs' device
    impl = resolve_backend(backend, hidden.device, dtype)
    if chunk_size is None:
        chunk_size = default_chunk_size(tokens.labels.numel(), hidden.shape[-1], weight.shape[0],
                                        torch.finfo(dtype).bits // 8)
        if tp is not None:  # uneven shards may choose differently: every rank must run the same chunks
            chunk_size = tensor_parallel.agree_on_min(chunk_size, tp[0], hidden.device)
    labels = flat(tokens.labels, torch.int64)
    advantages = advantages_or_ones(tokens.advantages, tokens.labels)
    per_token = tuple(flat(t, torch.float32) for t in (advantages, tokens.old_logprobs, tokens.ref_logprobs))
    if tp is not None:
        loss, entropy, stats = ShardedFusedLinear.apply(hidden, weight, bias, labels, *per_token, tokens.weights, spec,
                                                        int(ignore_index), int(chunk_size), accum_dtype, impl,
                                                        with_stats, need_entropy, tp)
    else:
        needs_grad = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias)]
        loss, entropy, _, stats, _, _, _ = fused_linear_forward(
            hidden, weight, bias, labels, *per_token, tokens.weights, int(ignore_index), int(chunk_size), accum_dtype,
            with_stats, need_entropy, _grads_in_forward(needs_grad, tokens.weights, need_entropy),
            ops.backend_name(impl), *ops.spec_args(spec))
    if tokens.weights is None:
        loss = loss.view(tokens.labels.shape)
    return loss, entropy.view(tokens.labels.shape) if need_entropy else entropy, stats


def fused_linear_lco_loss(hidden, weight, labels, advantages, *, bias=None, rho_pos=RHO_POS, rho_neg=RHO_NEG,
                          ignore_index=-100, reduction="mean", chunk_size=None, accum_dtype=torch.float32,
                          return_stats=False, backend="auto", **options):
    """LCO from hidden states and the LM-head weight: ``lco_loss(hidden @ weight.T + bias, ...)``, fused.

    ``fused_linear_policy_loss(..., loss="lco")``: see it for ``hidden``, ``weight``, ``bias``,
    ``chunk_size``, ``accum_dtype`` and the memory, and ``lco_loss`` for the loss.

    Args:
        hidden: (..., H) last hidden states.
        weight: (V, H) LM-head weight (an FSDP2 DTensor is gathered as by ``fused_linear_policy_loss``).
        labels: (...) integer sampled tokens.
        advantages: Ψ, per token, per sequence ((B, 1)) or 0-dim.
        bias: (V,) LM-head bias, or None.
        rho_pos: as ``lco_loss``.
        rho_neg: as ``lco_loss``.
        ignore_index: the padding label.
        reduction: as every loss.
        chunk_size: tokens per chunk.
        accum_dtype: dtype of the weight / bias gradient accumulation.
        return_stats: also return ``TokenStats``.
        backend: "auto", "triton" or "torch".
        **options: the other keyword options of ``lco_loss`` and ``fused_linear_policy_loss``
            (old_logprobs, epsilon_low, epsilon_high, ref_logprobs, beta, kl_type, bias_correction_kl,
            temperature, entropy_coef, loss_mask, max_length, token_count, seq_count, process_group, ...).

    Returns:
        The loss; with ``return_stats``, ``(loss, TokenStats)``.
    """
    return fused_linear_policy_loss(hidden, weight, labels, advantages, loss="lco", bias=bias, rho_pos=rho_pos,
                                    rho_neg=rho_neg, ignore_index=ignore_index, reduction=reduction,
                                    chunk_size=chunk_size, accum_dtype=accum_dtype, return_stats=return_stats,
                                    backend=backend, **options)
