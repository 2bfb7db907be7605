"""torch.autograd glue: one backend launch in forward (sweep 1), one in backward (sweep 2).

The forward keeps O(N) per-row state (alpha, lse_excl) beside the caller's logits; the backward
folds the upstream gradient (a scalar for "mean"/"sum", one value per token for "none") into
``coef = alpha × upstream`` per row, so it is applied exactly, without another N×V pass and
without reading the upstream value on the host.
"""
import torch


def as_rows3d(x):
    """A (B, T, V) view of (..., V) logits with unit last stride (a copy only where no view exists)."""
    V = x.shape[-1]
    if x.stride(-1) != 1 and x.numel() > 0:
        x = x.contiguous()
    if x.numel() == 0:
        return x.reshape(1, 0, V)
    if x.dim() == 1:
        return x.view(1, 1, V)
    if x.dim() == 2:
        return x.unsqueeze(0)
    try:
        return x.view(-1, x.shape[-2], V)
    except RuntimeError:  # leading dims that no single stride describes
        return x.contiguous().view(-1, x.shape[-2], V)


def reduce_rows(per_row, labels_shape, n_valid, reduction):
    if reduction == "none":
        return per_row.view(labels_shape)
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / n_valid.clamp(min=1)  # "mean": over non-ignored tokens, 0.0 when none


class LCOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, advantages, rho_pos, rho_neg, ignore_index, reduction,
                inplace_backward, backend):
        logits3d = as_rows3d(logits)
        labels_flat = labels.reshape(-1).to(torch.int64).contiguous()
        adv_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        adv_flat = advantages.reshape(-1).to(adv_dtype).contiguous()
        loss, alpha, lse_excl = backend.forward_rows(logits3d, labels_flat, adv_flat, rho_pos, rho_neg, ignore_index)
        n_valid = (labels_flat != ignore_index).sum()
        ctx.save_for_backward(logits, labels_flat, alpha, lse_excl, n_valid)
        ctx.reduction = reduction
        ctx.inplace_backward = inplace_backward
        ctx.backend = backend
        ctx.gradient_written = False
        return reduce_rows(loss, labels.shape, n_valid, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.inplace_backward and ctx.gradient_written:
            raise RuntimeError("lco_loss(inplace_backward=True): the first backward overwrote the logits "
                               "with their gradient, so this graph cannot be differentiated again")
        logits, labels_flat, alpha, lse_excl, n_valid = ctx.saved_tensors
        if ctx.reduction == "none":
            weight = grad_output.reshape(-1)
        elif ctx.reduction == "sum":
            weight = grad_output
        else:
            weight = grad_output / n_valid.clamp(min=1)
        coef = (alpha * weight).to(alpha.dtype).contiguous()

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
        return grad3d.view(logits.shape), None, None, None, None, None, None, None, None
