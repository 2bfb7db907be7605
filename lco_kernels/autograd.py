"""Autograd helpers shared by the custom ops (ops.py) and the fused-linear Function, and ``LossFunction``,
the losses of eager calls: one backend launch in forward (sweep 1 + head), one in backward (sweep 2).

The forward keeps O(N) per-row state (stats.ROW_STATE) beside the caller's logits; the backward
folds the reduction weight, the upstream gradient (a scalar, or one value per token for "none")
and 1/τ into ``coef = alpha × weight × upstream / τ`` per row (and the entropy's ``ent_coef`` the
same way), so all are applied exactly, without another N×V pass and without reading the upstream
value on the host. Second derivatives are not supported: backward(create_graph=True) raises.
"""
import types
import typing

import torch

from . import tensor_parallel, torch_backend
from ._plumbing import advantages_or_ones, flat
from .registry import LossSpec
from .stats import ROW
from .torch_backend import compute_dtype


def as_rows3d(x):
    """A (B, T, V) view of (..., V) logits with unit last stride (a copy only where no view exists):
    (1, N, V) where one stride steps through every row, so the PyTorch backend takes all rows in the
    fewest chunks; else (B, T, V) over the last two dimensions."""
    V = x.shape[-1]
    if x.numel() == 0:
        return x.reshape(1, 0, V)
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(1, -1, V)
    except RuntimeError:  # rows that no single stride steps through (x has 3 or more dims)
        pass
    try:
        return x.view(-1, x.shape[-2], V)
    except RuntimeError:  # leading dims that no single stride describes
        return x.contiguous().view(1, -1, V)


def reduce_rows(ctx, rows, weights, shape, stats, return_entropy):
    """A Function's outputs (loss, entropy, stats): the per-token loss reduced with ``weights`` (or per
    token, in ``shape``, when None); the entropy per token when requested (differentiable), else an
    empty tensor; the statistics (empty when not requested), which have no gradient."""
    reduced = reduce_loss(rows[:, ROW["loss"]], weights, shape)
    entropy = rows[:, ROW["entropy"]].reshape(shape) if return_entropy else rows.new_zeros(0)
    if stats is None:
        stats = rows.new_zeros(0)
    ctx.mark_non_differentiable(*((stats,) if return_entropy else (stats, entropy)))  # one call: each replaces
    return reduced, entropy, stats


def reduce_loss(loss, weights, shape):
    """The per-token loss reduced with ``weights``, or per token in ``shape`` when None."""
    return loss.reshape(shape) if weights is None else (loss * weights).sum()


def loss_coefficient(alpha, upstream, inv_temp):
    """coef = α × upstream / τ per row (``upstream``: the reduction weight × the upstream gradient)."""
    coef = alpha * upstream
    coef = coef if inv_temp == 1.0 else coef * inv_temp
    return (coef if coef.dtype == alpha.dtype else coef.to(alpha.dtype)).contiguous()


def row_coefficients(spec, rows, weights, grad_loss, grad_entropy, entropy_grad):
    """(coef, ent_coef or None) per row for the backward sweep."""
    upstream = grad_loss.reshape(-1) if weights is None else weights * grad_loss
    inv_temp = 1.0 / spec.temperature
    coef = loss_coefficient(rows[:, ROW["alpha"]], upstream, inv_temp)
    if not entropy_grad:
        return coef, None
    d_entropy = -spec.entropy_coef * upstream  # the loss holds −entropy_coef·H
    if grad_entropy is not None and grad_entropy.numel():
        d_entropy = d_entropy + grad_entropy.reshape(-1)
    ent_coef = (rows[:, ROW["ent_mask"]] * d_entropy * inv_temp).to(rows.dtype).contiguous()
    return coef, ent_coef


def save(ctx, weights, *tensors):
    """save_for_backward(*tensors) and the reduction's ``weights`` (a tensor or None), saved last."""
    ctx.save_for_backward(*tensors, weights)


def saved(ctx):
    """(weights, tensors) as ``save`` kept them."""
    *tensors, weights = ctx.saved_tensors
    return weights, tensors


def refuse_double_backward():
    """Grad mode is on inside a backward only under create_graph=True: a graph of our gradient would
    miss its second-order term (a Hessian-vector product would silently drop H·v), so refuse."""
    if torch.is_grad_enabled():
        raise RuntimeError("lco_kernels losses have no second derivative: backward with create_graph=True "
                           "(a Hessian-vector product, a gradient penalty) through them is not supported")


class Call(typing.NamedTuple):
    """What a ``LossFunction`` call takes besides the logits and its ``Tokens`` (one argument: each one costs the
    call)."""
    spec: LossSpec
    ignore_index: int
    inplace_backward: bool
    backend: types.ModuleType  # torch_backend | triton_backend
    with_stats: bool
    return_entropy: bool
    tp: tuple | None           # (process group, first column) of a vocabulary shard


class LossFunction(torch.autograd.Function):
    """A loss of an eager call (ops.runs_eagerly) on the whole vocabulary (``call.tp`` None) or on one
    rank's vocabulary shard: the reduced loss alone, or (loss, entropy, stats) with ``return_entropy`` or
    ``with_stats`` (see ``reduce_rows``). The reduction's weights are applied inside: no autograd nodes of
    their own, the same products as the custom ops' traced reduction, bit for bit. ``tp`` (tensor_parallel.py):
    the forward combines the shards' partials in one all-gather; the backward is the same local sweep,
    shifted to the shard's columns. Traced calls (torch.compile, export, fake and meta tensors) take the
    custom ops of ops.py instead; a ProcessGroup cannot pass through an op schema, so sharded calls always
    come here. Ordinary CPU calls take the PyTorch backend's one-pass forward and backward
    (torch_backend.ordinary_forward)."""

    @staticmethod
    def forward(ctx, logits, tokens, call):
        spec = call.spec
        labels, advantages, old_logprobs, ref_logprobs, weights = (
            tokens.labels, tokens.advantages, tokens.old_logprobs, tokens.ref_logprobs, tokens.weights)
        dtype = compute_dtype(logits.dtype)
        labels_flat = flat(labels, torch.int64)
        entropy_grad = call.return_entropy or spec.has_entropy_term
        per_token = (flat(advantages, dtype), flat(old_logprobs, dtype), flat(ref_logprobs, dtype))
        ctx.call = call
        ctx.ordinary = False
        # the one-pass path needs the labels checked; padding only where the reduction weighs it (by 0)
        checked = tokens.every_label or (tokens.labels_in_range and weights is not None)
        if checked and call.tp is None and call.backend is torch_backend and not (
                entropy_grad or call.with_stats or call.inplace_backward):
            logits2d = torch_backend.ordinary_view(logits)
            ordinary = None
            if logits2d is not None:
                # a padding token's weight is 0: it may take any column's values, which its weight then zeroes
                columns = labels_flat if tokens.every_label else labels_flat.clamp(0, logits2d.shape[1] - 1)
                ordinary = torch_backend.ordinary_forward(logits2d, columns, *per_token, spec)
            if ordinary is not None:  # no row needs the row table, masks or chunks
                loss, alpha, state, ctx.exp_buffer = ordinary
                save(ctx, weights, logits2d, alpha, *state)
                ctx.ordinary = True
                ctx.logits_shape = logits.shape
                return reduce_loss(loss, weights, labels.shape)
        logits3d = as_rows3d(logits)
        per_token = (advantages_or_ones(per_token[0], labels_flat, dtype),) + per_token[1:]
        if call.tp is None:
            rows, stats = call.backend.forward_rows(logits3d, labels_flat, *per_token, spec, call.ignore_index,
                                                    entropy_grad or call.with_stats, call.with_stats)
        else:  # a shard's labels are checked against every shard after the gather (tensor_parallel.check_ownership)
            rows, stats = tensor_parallel.forward_rows(call.backend, call.tp, logits3d, labels_flat, *per_token, spec,
                                                       call.ignore_index, entropy_grad or call.with_stats,
                                                       call.with_stats)
        save(ctx, weights, logits, labels_flat, rows)
        ctx.entropy_grad = entropy_grad
        ctx.gradient_written = False
        if not (call.return_entropy or call.with_stats):
            return reduce_loss(rows[:, ROW["loss"]], weights, labels.shape)
        return reduce_rows(ctx, rows, weights, labels.shape, stats, call.return_entropy)

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy=None, grad_stats=None):
        refuse_double_backward()
        call = ctx.call
        inv_temp = 1.0 / call.spec.temperature
        if ctx.ordinary:
            weights, (logits2d, alpha, *state) = saved(ctx)
            upstream = grad_loss.reshape(-1) if weights is None else weights * grad_loss
            coef = loss_coefficient(alpha, upstream, inv_temp)
            # the forward's e^{z/τ} becomes the gradient; a second backward (retain_graph) forms it again
            e, ctx.exp_buffer = ctx.exp_buffer, None
            grad = torch_backend.ordinary_backward(logits2d, coef, state, inv_temp, e)
            if grad.dim() != len(ctx.logits_shape):
                grad = grad.view(ctx.logits_shape)
            return grad, None, None
        if call.inplace_backward and ctx.gradient_written:
            raise RuntimeError("inplace_backward=True: the first backward overwrote the logits with their "
                               "gradient, so this graph cannot be differentiated again")
        weights, (logits, labels_flat, rows) = saved(ctx)
        coef, ent_coef = row_coefficients(call.spec, rows, weights, grad_loss, grad_entropy, ctx.entropy_grad)
        logits3d = as_rows3d(logits)
        if call.inplace_backward:
            grad3d = logits3d  # the gradient overwrites the logits' storage
        else:
            grad3d = torch.empty(logits3d.shape, dtype=logits.dtype, device=logits.device)
        vocab_start = 0 if call.tp is None else call.tp[1]
        call.backend.backward_rows(logits3d, labels_flat, coef, ent_coef, rows, grad3d, call.spec, vocab_start)
        if call.inplace_backward:
            ctx.gradient_written = True
            # Anything else that saved these logits now fails its version check instead of
            # silently reading the gradient.
            torch.autograd.graph.increment_version(logits)
        return grad3d.view(logits.shape), None, None
