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

Peak extra memory: one chunk of logits (chunk_size × V) + grad_hidden (N × H) + the fp32 grad_weight
accumulator (V × H) + O(N), independent of N × V.
"""
import math

import torch
from torch import nn

from ._validation import check_common
from .autograd import flat, outputs
from .functional import loss_spec, prepare_tokens, resolve_backend
from .stats import N_STATS, TokenStats

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
                ignore_index, chunk_size, accum_dtype, backend, with_stats):
        H = hidden.shape[-1]
        V = weight.shape[0]
        x = hidden.reshape(-1, H)
        n = x.shape[0]
        labels = flat(labels, torch.int64)
        advantages, old_logprobs, ref_logprobs = (flat(t, torch.float32) for t in (advantages, old_logprobs, ref_logprobs))
        dev = x.device
        loss = torch.empty(n, dtype=torch.float32, device=dev)
        alpha = torch.empty(n, dtype=torch.float32, device=dev)
        lse_excl = torch.empty(n, dtype=torch.float32, device=dev)
        stats = torch.empty(N_STATS, n, dtype=torch.float32, device=dev) if with_stats else None
        needs_grad = any(ctx.needs_input_grad[:3])
        eager = needs_grad and weights is not None
        grads = _Grads(x, weight, bias, accum_dtype) if eager else None
        buf = torch.empty(min(chunk_size, max(n, 1)), V, dtype=x.dtype, device=dev)

        for r0 in range(0, n, chunk_size):
            rows = slice(r0, min(n, r0 + chunk_size))
            logits = _project(x[rows], weight, bias, buf)
            out = backend.forward_rows(logits[None], labels[rows], advantages[rows],
                                       None if old_logprobs is None else old_logprobs[rows],
                                       None if ref_logprobs is None else ref_logprobs[rows], spec, ignore_index,
                                       with_stats)
            loss[rows], alpha[rows], lse_excl[rows] = out[0], out[1], out[2]
            if with_stats:
                stats[:, rows] = out[3]
            if eager:
                backend.backward_rows(logits[None], labels[rows], alpha[rows] * weights[rows], lse_excl[rows],
                                      logits[None])
                grads.add(rows, logits)

        ctx.hidden_shape = hidden.shape
        ctx.has_bias = bias is not None
        ctx.eager = eager
        ctx.gradients_returned = False
        ctx.backend = backend
        ctx.chunk_size = chunk_size
        ctx.accum_dtype = accum_dtype
        if eager:
            ctx.save_for_backward(*grads.finish())
        else:
            ctx.save_for_backward(x, weight, bias, labels, alpha, lse_excl)
        return outputs(ctx, loss, weights, hidden.shape[:-1], stats)

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        hidden_shape, has_bias = ctx.hidden_shape, ctx.has_bias
        if ctx.eager:
            if ctx.gradients_returned:
                raise RuntimeError("fused linear loss: its gradients were formed in the forward pass and handed "
                                   "out by the first backward; this graph cannot be differentiated again")
            ctx.gradients_returned = True
            grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
            # one upstream scalar: scaling the finished gradients (in place: no second V×H buffer) is exact
            grad_hidden.mul_(grad_loss)
            grad_weight.mul_(grad_loss)
            if has_bias:
                grad_bias.mul_(grad_loss)
        else:
            x, weight, bias, labels, alpha, lse_excl = ctx.saved_tensors
            upstream = grad_loss.reshape(-1)
            grads = _Grads(x, weight, bias, ctx.accum_dtype)
            buf = torch.empty(min(ctx.chunk_size, max(x.shape[0], 1)), weight.shape[0], dtype=x.dtype,
                              device=x.device)
            for r0 in range(0, x.shape[0], ctx.chunk_size):
                rows = slice(r0, min(x.shape[0], r0 + ctx.chunk_size))
                logits = _project(x[rows], weight, bias, buf)
                ctx.backend.backward_rows(logits[None], labels[rows], alpha[rows] * upstream[rows], lse_excl[rows],
                                          logits[None])
                grads.add(rows, logits)
            grad_hidden, grad_weight, grad_bias = grads.finish()
        return (grad_hidden.view(hidden_shape), grad_weight, grad_bias if has_bias else None) + (None,) * 11


def _project(x_rows, weight, bias, buf):
    logits = buf[: x_rows.shape[0]]
    torch.matmul(x_rows, weight.t(), out=logits)
    if bias is not None:
        logits += bias
    return logits


class _Grads:
    """grad_hidden (input dtype) and grad_weight / grad_bias accumulated in ``accum_dtype`` across chunks."""

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

    def finish(self):
        grad_bias = None if self.bias_acc is None else self.bias_acc.to(self.bias.dtype)
        return self.hidden, self.weight_acc.to(self.weight.dtype), grad_bias


def fused_linear_policy_loss(hidden, weight, labels, advantages=None, *, loss="lco", bias=None, old_logprobs=None,
                             ref_logprobs=None, rho_pos=1.8, rho_neg=0.9, epsilon_low=0.2, epsilon_high=0.2,
                             dual_clip=None, beta=0.0, ignore_index=-100, reduction="mean", loss_mask=None,
                             max_length=None, chunk_size=None, accum_dtype=torch.float32, return_stats=False,
                             backend="auto"):
    """``loss`` ("lco" | "sft" | "pg" | "ppo" | "cispo") of ``hidden @ weight.T (+ bias)`` without the N×V logits.

    hidden: (..., H); weight: (V, H); bias: (V,) or None, all of one floating dtype and device;
    labels and the per-token inputs as for the matching logits-level loss (``lco_loss``, ...).
    chunk_size: tokens per chunk (default ``default_chunk_size``). accum_dtype: grad_weight /
    grad_bias accumulation dtype across chunks.
    """
    spec = loss_spec(loss, rho_pos=rho_pos, rho_neg=rho_neg, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                     dual_clip=dual_clip, beta=beta, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    check_common(ignore_index=ignore_index, reduction=reduction, inplace_backward=False, backend=backend,
                 return_stats=return_stats, max_length=max_length)
    _check_linear(hidden, weight, bias, labels, chunk_size, accum_dtype)
    V = weight.shape[0]
    # the vocabulary kernels see chunks of logits of the hidden states' dtype and device
    impl = resolve_backend(backend, hidden)
    labels, advantages, old_logprobs, ref_logprobs, weights = prepare_tokens(
        spec, labels, V, advantages, old_logprobs, ref_logprobs, ignore_index=ignore_index, reduction=reduction,
        loss_mask=loss_mask, max_length=max_length)
    n = labels.numel()
    if chunk_size is None:
        chunk_size = default_chunk_size(n, hidden.shape[-1], V, hidden.element_size())
    out, stats = FusedLinearPolicyLoss.apply(hidden, weight, bias, labels, advantages, old_logprobs, ref_logprobs,
                                             weights, spec, int(ignore_index), int(chunk_size), accum_dtype, impl,
                                             return_stats)
    if return_stats:
        return out, TokenStats.from_rows(stats, labels.shape, spec)
    return out


def fused_linear_lco_loss(hidden, weight, labels, advantages, *, bias=None, rho_pos=1.8, rho_neg=0.9,
                          ignore_index=-100, reduction="mean", chunk_size=None, accum_dtype=torch.float32,
                          return_stats=False, backend="auto", **options):
    """LCO from hidden states and the LM-head weight: ``lco_loss(hidden @ weight.T + bias, ...)``, fused.

    ``options``: the other keyword options of ``lco_loss`` (old_logprobs, epsilon_low, epsilon_high,
    loss_mask, max_length).
    """
    return fused_linear_policy_loss(hidden, weight, labels, advantages, loss="lco", bias=bias, rho_pos=rho_pos,
                                    rho_neg=rho_neg, ignore_index=ignore_index, reduction=reduction,
                                    chunk_size=chunk_size, accum_dtype=accum_dtype, return_stats=return_stats,
                                    backend=backend, **options)


def _check_linear(hidden, weight, bias, labels, chunk_size, accum_dtype):
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must match hidden ({hidden.dtype}, {hidden.device})")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)
                             or bias.dtype != hidden.dtype or bias.device != hidden.device):
        raise ValueError(f"bias must be a ({weight.shape[0]},) tensor of hidden's dtype and device")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer tensor")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]) or labels.device != hidden.device:
        raise ValueError(f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])} on hidden's device, "
                         f"got {tuple(labels.shape)} on {labels.device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not (isinstance(accum_dtype, torch.dtype) and accum_dtype.is_floating_point):
        raise TypeError(f"accum_dtype must be a floating torch.dtype, got {accum_dtype!r}")


class LinearLCOLoss(nn.Module):
    """``fused_linear_lco_loss`` as a module: forward(hidden, weight, labels, advantages, bias=None)."""

    def __init__(self, rho_pos=1.8, rho_neg=0.9, ignore_index=-100, reduction="mean", chunk_size=None,
                 accum_dtype=torch.float32, backend="auto"):
        super().__init__()
        loss_spec("lco", rho_pos=rho_pos, rho_neg=rho_neg)
        check_common(ignore_index=ignore_index, reduction=reduction, inplace_backward=False, backend=backend,
                     return_stats=False, max_length=None)
        self.options = dict(rho_pos=rho_pos, rho_neg=rho_neg, ignore_index=ignore_index, reduction=reduction,
                            chunk_size=chunk_size, accum_dtype=accum_dtype, backend=backend)

    def forward(self, hidden, weight, labels, advantages, bias=None):
        return fused_linear_lco_loss(hidden, weight, labels, advantages, bias=bias, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
