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
"""
import math

import torch

from . import tensor_parallel
from ._plumbing import flat, loss_spec, prepare_tokens, resolve_backend
from ._validation import check_labels_in_range, check_linear, check_options
from .autograd import reduce_rows, refuse_double_backward, row_coefficients
from .registry import EPSILON, RHO_NEG, RHO_POS
from .stats import ROW_STATE, STAT_ROWS, TokenStats

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


class FusedLinearPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, advantages, old_logprobs, ref_logprobs, weights, spec,
                ignore_index, chunk_size, accum_dtype, backend, with_stats, return_entropy, tp):
        # tp = (process group, first row of the vocabulary, all_reduce_grad_hidden): ``weight`` holds
        # this rank's rows [v0, v0 + V_r) of the LM head (README "Tensor parallel")
        H = hidden.shape[-1]
        # autocast's rule: the products in the lower precision of hidden and weight
        dtype = product_dtype(hidden, weight, bias)
        x = hidden.reshape(-1, H).to(dtype)
        ctx.input_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        n = x.shape[0]
        labels = flat(labels, torch.int64)
        if tp is None:  # a shard's labels are checked against every shard after the gather
            check_labels_in_range(labels, weight.shape[0], ignore_index)
        advantages, old_logprobs, ref_logprobs = (flat(t, torch.float32)
                                                  for t in (advantages, old_logprobs, ref_logprobs))
        entropy_grad = spec.has_entropy_term or return_entropy
        rows_state = torch.empty(n, len(ROW_STATE), dtype=torch.float32, device=x.device)
        stats = torch.empty(n, len(STAT_ROWS), dtype=torch.float32, device=x.device) if with_stats else None
        # a scalar reduction and no per-token output: the upstream gradient will be one number
        eager = any(ctx.needs_input_grad[:3]) and weights is not None and not return_entropy
        grads = _Grads(x, weight, bias, accum_dtype) if eager else None

        def forward_chunk(rows, logits):
            per_token = (advantages[rows], None if old_logprobs is None else old_logprobs[rows],
                         None if ref_logprobs is None else ref_logprobs[rows], spec, ignore_index,
                         entropy_grad or with_stats, with_stats)
            if tp is None:
                state, chunk_stats = backend.forward_rows(logits, labels[rows], *per_token)
            else:  # one all-gather of the chunk's partials
                state, chunk_stats = tensor_parallel.forward_rows(backend, tp[:2], logits, labels[rows], *per_token)
            rows_state[rows] = state
            if with_stats:
                stats[rows] = chunk_stats
            if eager:  # the upstream gradient is one scalar: form the gradients now with upstream 1
                return row_coefficients(spec, state, weights[rows], torch.ones((), device=x.device), None,
                                        entropy_grad) + (state,)
            return None

        ctx.vocab_start = 0 if tp is None else tp[1]
        ctx.reduce_group = tp[0] if tp is not None and tp[2] else None
        _chunk_loop(x, weight, bias, labels, chunk_size, backend, spec, ctx.vocab_start, grads, forward_chunk)
        ctx.hidden_shape = hidden.shape
        ctx.has_bias = bias is not None
        ctx.eager = eager
        ctx.gradients_returned = False
        ctx.backend = backend
        ctx.spec = spec
        ctx.chunk_size = chunk_size
        ctx.accum_dtype = accum_dtype
        ctx.entropy_grad = entropy_grad
        if eager:
            ctx.save_for_backward(*grads.finish(*ctx.input_dtypes))
        else:
            ctx.save_for_backward(x, weight, bias, labels, rows_state, weights)
        return reduce_rows(ctx, rows_state, weights, hidden.shape[:-1], stats, return_entropy)

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy, grad_stats):
        refuse_double_backward()
        if ctx.eager:
            if ctx.gradients_returned:
                raise RuntimeError("fused linear loss: its gradients were formed in the forward pass and handed "
                                   "out by the first backward; this graph cannot be differentiated again")
            ctx.gradients_returned = True
            grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
            # one upstream scalar: scaling the finished gradients (in place: no second V×H buffer) is exact
            grad_hidden.mul_(grad_loss)
            grad_weight.mul_(grad_loss)
            if ctx.has_bias:
                grad_bias.mul_(grad_loss)
        else:
            x, weight, bias, labels, rows_state, weights = ctx.saved_tensors
            grads = _Grads(x, weight, bias, ctx.accum_dtype)
            coef, ent_coef = row_coefficients(ctx.spec, rows_state, weights, grad_loss, grad_entropy,
                                              ctx.entropy_grad)

            def backward_chunk(rows, logits):
                return coef[rows], None if ent_coef is None else ent_coef[rows], rows_state[rows]

            _chunk_loop(x, weight, bias, labels, ctx.chunk_size, ctx.backend, ctx.spec, ctx.vocab_start, grads,
                        backward_chunk)
            grad_hidden, grad_weight, grad_bias = grads.finish(*ctx.input_dtypes)
        if ctx.reduce_group is not None:
            # each rank's grad_hidden covers its vocabulary rows only: the gradient of the replicated
            # hidden states is the sum over the group (what Megatron's copy_to_tensor_model_parallel_region
            # does in its backward when all_reduce_grad_hidden is left False)
            torch.distributed.all_reduce(grad_hidden, group=ctx.reduce_group)
        n_others = FusedLinearPolicyLoss.forward.__code__.co_argcount - 4  # the inputs after ctx, hidden, weight, bias
        grads = (grad_hidden.view(ctx.hidden_shape), grad_weight, grad_bias if ctx.has_bias else None)
        return grads + (None,) * n_others


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
    """grad_hidden and grad_weight / grad_bias accumulated in ``accum_dtype`` across chunks; ``x``,
    ``weight``, ``bias`` are those of the products (the lower precision when the inputs' dtypes differ)."""

    def __init__(self, x, weight, bias, accum_dtype):
        self.weight = weight
        self.x = x
        self.bias = bias
        self.hidden = torch.empty_like(x)
        self.weight_acc = torch.zeros(weight.shape, dtype=accum_dtype, device=weight.device)
        self.bias_acc = None if bias is None else torch.zeros(bias.shape, dtype=accum_dtype, device=bias.device)
        self.scratch = None  # one V×H product in the input dtype, when it differs from accum_dtype

    def add(self, rows, grad_logits):
        torch.matmul(grad_logits, self.weight, out=self.hidden[rows])
        x_rows = self.x[rows]
        if self.weight_acc.dtype == grad_logits.dtype:
            self.weight_acc.addmm_(grad_logits.t(), x_rows)
        else:
            # each chunk's product is formed in the input dtype (fp32 accumulation inside the GEMM),
            # the sum across chunks in accum_dtype: bf16 sums across chunks drift (Liger #512)
            if self.scratch is None:
                self.scratch = torch.empty(self.weight.shape, dtype=grad_logits.dtype, device=grad_logits.device)
            torch.mm(grad_logits.t(), x_rows, out=self.scratch)
            self.weight_acc += self.scratch
        if self.bias_acc is not None:
            self.bias_acc += grad_logits.sum(dim=0, dtype=self.bias_acc.dtype)

    def finish(self, hidden_dtype, weight_dtype, bias_dtype):
        """The gradients in the inputs' own dtypes (the accumulators cast once, never via the product dtype)."""
        grad_bias = None if self.bias_acc is None else self.bias_acc.to(bias_dtype)
        return self.hidden.to(hidden_dtype), self.weight_acc.to(weight_dtype), grad_bias


def fused_linear_policy_loss(hidden, weight, labels, advantages=None, *, loss="lco", bias=None, old_logprobs=None,
                             ref_logprobs=None, rho_pos=RHO_POS, rho_neg=RHO_NEG, epsilon_low=EPSILON,
                             epsilon_high=EPSILON, dual_clip=None, beta=0.0, kl_type="k3", temperature=1.0,
                             entropy_coef=0.0, ignore_index=-100, reduction="mean", loss_mask=None, max_length=None,
                             token_count=None, seq_count=None, chunk_size=None, accum_dtype=torch.float32,
                             return_stats=False, backend="auto", process_group=None, vocab_start_index=None,
                             all_reduce_grad_hidden=False):
    """``loss`` (a name in registry.LOSSES) of ``hidden @ weight.T (+ bias)`` without the N×V logits.

    hidden: (..., H); weight: (V, H); bias: (V,) or None, floating, on one device (mixed dtypes: the
    products run in the lower precision, see the module docstring); labels and the per-token inputs
    and options as for the matching logits-level loss (``lco_loss``, ...). chunk_size: tokens per
    chunk (default ``default_chunk_size``). accum_dtype: grad_weight / grad_bias accumulation dtype
    across chunks.

    process_group: ``weight`` (and ``bias``) are this rank's rows [vocab_start_index,
    vocab_start_index + V_r) of a vocabulary-parallel LM head and ``hidden`` is the same on every rank
    (README "Tensor parallel"); one all-gather per chunk of tokens, and grad_weight is this rank's
    rows. Each rank's grad_hidden is then its rows' share, a partial sum over the group, as
    Megatron's ColumnParallelLinear leaves it for the all-reduce in the backward of
    copy_to_tensor_model_parallel_region; ``all_reduce_grad_hidden=True`` all-reduces it here
    instead, for hidden states that pass through no such region. A given chunk_size must be the
    same on every rank; without one the ranks agree on the smallest default (one all-reduce of an
    int, a host synchronisation on GPUs: pass chunk_size to avoid it).
    """
    spec = loss_spec(loss, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, rho_pos=rho_pos, rho_neg=rho_neg,
                     epsilon_low=epsilon_low, epsilon_high=epsilon_high, dual_clip=dual_clip, beta=beta,
                     kl_type=kl_type, entropy_coef=entropy_coef, temperature=temperature)
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
                           return_stats, return_entropy=False,
                           tp=None if tp is None else tp + (all_reduce_grad_hidden,))
    if return_stats:
        return out, TokenStats.from_rows(stats, labels.shape, spec)
    return out


def fused_linear_token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                                return_entropy=False, chunk_size=None, accum_dtype=torch.float32, backend="auto"):
    """``token_logprobs(hidden @ weight.T + bias, labels, ...)`` without the N×V logits.

    fp32 log p_i of softmax(logits / τ) in labels' shape (0 at ignored positions), differentiable
    w.r.t. hidden, weight and bias; with ``return_entropy``, ``(logprobs, entropy)``, both
    differentiable. The backward recomputes each chunk's logits (the upstream gradient is per token)
    and takes 1 − p_i from the log domain, as ``token_logprobs``. Shapes, dtypes (mixed allowed),
    ``chunk_size`` and ``accum_dtype`` as ``fused_linear_policy_loss``.
    """
    spec = loss_spec("sft", temperature=temperature)
    check_options(ignore_index=ignore_index, reduction="none", backend=backend, return_stats=False, max_length=None,
                  temperature=temperature, device=getattr(hidden, "device", None))
    check_linear(hidden, weight, bias, labels, chunk_size, accum_dtype)
    tokens = prepare_tokens(spec, labels, None, None, None, ignore_index=ignore_index,
                            reduction="none", loss_mask=None, max_length=None, token_count=None, seq_count=None)
    loss, entropy, _ = _apply(hidden, weight, bias, tokens, spec, ignore_index, chunk_size, accum_dtype, backend,
                              False, return_entropy)
    # the SFT head's loss is −log p_i, exactly (a negation rounds nothing)
    return (-loss, entropy) if return_entropy else -loss


def _apply(hidden, weight, bias, tokens, spec, ignore_index, chunk_size, accum_dtype, backend, with_stats,
           return_entropy, tp=None):
    dtype = product_dtype(hidden, weight, bias)
    # the vocabulary kernels see chunks of logits of the product dtype on the inputs' device
    impl = resolve_backend(backend, hidden.new_empty(0, dtype=dtype))
    if chunk_size is None:
        chunk_size = default_chunk_size(tokens.labels.numel(), hidden.shape[-1], weight.shape[0],
                                        torch.finfo(dtype).bits // 8)
        if tp is not None:  # uneven shards may choose differently: every rank must run the same chunks
            chunk_size = tensor_parallel.agree_on_min(chunk_size, tp[0], hidden.device)
    return FusedLinearPolicyLoss.apply(hidden, weight, bias, tokens.labels, tokens.advantages, tokens.old_logprobs,
                                       tokens.ref_logprobs, tokens.weights, spec, int(ignore_index), int(chunk_size),
                                       accum_dtype, impl, with_stats, return_entropy, tp)


def fused_linear_lco_loss(hidden, weight, labels, advantages, *, bias=None, rho_pos=RHO_POS, rho_neg=RHO_NEG,
                          ignore_index=-100, reduction="mean", chunk_size=None, accum_dtype=torch.float32,
                          return_stats=False, backend="auto", **options):
    """LCO from hidden states and the LM-head weight: ``lco_loss(hidden @ weight.T + bias, ...)``, fused.

    ``options``: the other keyword options of ``lco_loss`` (old_logprobs, epsilon_low, epsilon_high,
    ref_logprobs, beta, kl_type, temperature, entropy_coef, loss_mask, max_length, token_count, seq_count).
    """
    return fused_linear_policy_loss(hidden, weight, labels, advantages, loss="lco", bias=bias, rho_pos=rho_pos,
                                    rho_neg=rho_neg, ignore_index=ignore_index, reduction=reduction,
                                    chunk_size=chunk_size, accum_dtype=accum_dtype, return_stats=return_stats,
                                    backend=backend, **options)
