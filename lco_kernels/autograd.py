"""torch.autograd glue: one backend launch in forward (sweep 1 + head), one in backward (sweep 2).

The forward keeps O(N) per-row state (alpha, lse_excl) beside the caller's logits; the backward
folds the reduction weight and the upstream gradient (a scalar, or one value per token for
"none") into ``coef = alpha × weight × upstream`` per row, so both are applied exactly, without
another N×V pass and without reading the upstream value on the host.
"""
import torch


def as_rows3d(x):
    """A (B, T, V) view of (..., V) logits with unit last stride (a copy only where no view exists)."""
    V = x.shape[-1]
    if x.numel() == 0:
        return x.reshape(1, 0, V)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        return x.view(1, 1, V)
    if x.dim() == 2:
        return x.unsqueeze(0)
    try:
        return x.view(-1, x.shape[-2], V)
    except RuntimeError:  # leading dims that no single stride describes
        return x.contiguous().view(-1, x.shape[-2], V)


def flat(t, dtype):
    """A per-token tensor as one contiguous row vector of ``dtype`` (None stays None)."""
    return None if t is None else t.reshape(-1).to(dtype).contiguous()


def outputs(ctx, loss, weights, shape, stats):
    """A Function's outputs: the per-token ``loss`` reduced with ``weights`` (or kept per token, in
    ``shape``, when None) and the stats buffer (empty when not requested), which has no gradient."""
    reduced = loss.view(shape) if weights is None else (loss * weights).sum()
    if stats is None:
        stats = loss.new_zeros(0)
    ctx.mark_non_differentiable(stats)
    return reduced, stats


class PolicyLossFunction(torch.autograd.Function):
    """Outputs (loss, stats): loss reduced with ``weights`` (or per token when None); stats is the
    (N_STATS, N) buffer of the forward sweep, or an empty tensor when not requested."""

    @staticmethod
    def forward(ctx, logits, labels, advantages, old_logprobs, ref_logprobs, weights, spec, ignore_index,
                inplace_backward, backend, with_stats):
        logits3d = as_rows3d(logits)
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        labels_flat = flat(labels, torch.int64)
        loss, alpha, lse_excl, stats = backend.forward_rows(
            logits3d, labels_flat, flat(advantages, dtype), flat(old_logprobs, dtype), flat(ref_logprobs, dtype), spec,
            ignore_index, with_stats)
        ctx.save_for_backward(logits, labels_flat, alpha, lse_excl, weights)
        ctx.inplace_backward = inplace_backward
        ctx.backend = backend
        ctx.gradient_written = False
        return outputs(ctx, loss, weights, labels.shape, stats)

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        if ctx.inplace_backward and ctx.gradient_written:
            raise RuntimeError("inplace_backward=True: the first backward overwrote the logits with their "
                               "gradient, so this graph cannot be differentiated again")
        logits, labels_flat, alpha, lse_excl, weights = ctx.saved_tensors
        upstream = grad_loss.reshape(-1) if weights is None else weights * grad_loss
        coef = (alpha * upstream).to(alpha.dtype).contiguous()

        logits3d = as_rows3d(logits)
        if ctx.inplace_backward:
            grad3d = logits3d  # the gradient overwrites the logits' storage
        else:
            grad3d = torch.empty(logits3d.shape, dtype=logits.dtype, device=logits.device)
        ctx.backend.backward_rows(logits3d, labels_flat, coef, lse_excl, grad3d)
        if ctx.inplace_backward:
            ctx.gradient_written = True
            # Anything else that saved these logits now fails its version check instead of
            # silently reading the gradient.
            torch.autograd.graph.increment_version(logits)
        return (grad3d.view(logits.shape),) + (None,) * 10
