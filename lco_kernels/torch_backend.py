"""The PyTorch backend: the same two sweeps as the Triton kernels, vectorised over chunks of rows.

It has the Triton launchers' interface (``forward_rows`` / ``backward_rows`` on a (B, T, V) view)
and the same scalar heads (torch_heads.py). Its extra memory is one chunk of about
``_CHUNK_ELEMENTS`` logits plus the temporaries of the reductions over it, never N×V.
Computation is in fp32, or fp64 for fp64 logits (used by gradcheck).
"""
import torch

from .losses import Loss, LossSpec
from .torch_heads import policy_head, softplus

_CHUNK_ELEMENTS = 1 << 20  # 4 MiB of fp32 per chunk of rows


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(logits3d):
    B, T, V = logits3d.shape
    return max(1, min(B * T, _CHUNK_ELEMENTS // V))


def _chunk_buffer(logits3d):
    return torch.empty(_rows_per_chunk(logits3d), logits3d.shape[-1], dtype=_compute_dtype(logits3d.dtype),
                       device=logits3d.device)


def _row_chunks(logits3d, rows_per_chunk):
    """Yield (rows, view): flat row indices ``rows`` (a slice) and the logits view holding them."""
    B, T, V = logits3d.shape
    for seq in range(B):
        for pos0 in range(0, T, rows_per_chunk):
            pos1 = min(T, pos0 + rows_per_chunk)
            yield slice(seq * T + pos0, seq * T + pos1), logits3d[seq, pos0:pos1]


def forward_rows(logits3d, labels, advantages, old_logprobs, ref_logprobs, spec: LossSpec, ignore_index,
                 with_stats):
    """Per-row (loss, alpha, lse_excl, stats or None); see triton_kernels.forward_rows."""
    B, T, V = logits3d.shape
    n = B * T
    cdt = _compute_dtype(logits3d.dtype)
    dev = logits3d.device
    z_i = torch.empty(n, dtype=cdt, device=dev)
    lse_excl = torch.empty(n, dtype=cdt, device=dev)
    h_excl = torch.empty(n, dtype=cdt, device=dev) if with_stats else None      # entropy of p̃
    sum_sq = torch.empty(n, dtype=cdt, device=dev) if with_stats else None      # Σ_{j≠i} p̃_j²
    valid = labels != ignore_index
    idx = labels.clamp(0, V - 1)[:, None]  # ignored rows: any column, their results are discarded
    buf = _chunk_buffer(logits3d)
    for rows, view in _row_chunks(logits3d, buf.shape[0]):
        z = buf[: view.shape[0]]
        z.copy_(view)
        z_i[rows] = z.gather(1, idx[rows])[:, 0]
        z.scatter_(1, idx[rows], -torch.inf)
        torch.logsumexp(z, dim=1, out=lse_excl[rows])
        if with_stats:
            log_pt = z - lse_excl[rows, None]                       # log p̃ (−inf where masked)
            pt = log_pt.exp()
            h_excl[rows] = -torch.where(pt > 0, pt * log_pt, 0.0).sum(dim=1)
            sum_sq[rows] = (pt * pt).sum(dim=1)

    d = z_i - lse_excl
    adv = advantages.to(cdt)
    old = old_logprobs.to(cdt) if spec.has_old else None
    ref = ref_logprobs.to(cdt) if spec.has_ref else None
    loss, alpha, target, clamped, clipped = policy_head(d, adv, old, ref, spec)
    only_option = torch.isneginf(lse_excl)
    zero = ~valid | (only_option if spec.kind == Loss.LCO else torch.zeros_like(valid))
    loss = torch.where(zero, 0.0, loss)
    alpha = torch.where(zero, 0.0, alpha)
    stats = None
    if with_stats:
        log_p, log_1mp = -softplus(-d), -softplus(d)
        p, one_minus_p = log_p.exp(), log_1mp.exp()
        h = torch.where(only_option, 0.0, h_excl)
        entropy = (torch.where(p > 0, -p * log_p, 0.0) + torch.where(one_minus_p > 0, -one_minus_p * log_1mp, 0.0)
                   + one_minus_p * h)
        grad_norm = alpha.abs() * torch.sqrt(1 + torch.where(only_option, 0.0, sum_sq))
        target = torch.where(only_option, 1.0, target)
        stats = torch.stack([
            torch.where(valid, log_p, 0.0), torch.where(valid, entropy, 0.0), grad_norm,
            torch.where(valid, target, 0.0), (valid & clamped).to(cdt), (valid & clipped).to(cdt),
        ]).to(torch.float32 if cdt == torch.float32 else cdt)
    return loss, alpha, lse_excl, stats


def backward_rows(logits3d, labels, coef, lse_excl, grad3d):
    """Write coef·p̃ (and −coef at the label) into ``grad3d``, which may be ``logits3d`` itself."""
    V = logits3d.shape[-1]
    idx = labels.clamp(0, V - 1)[:, None]  # rows with coef = 0 (ignored ones) are zeroed below
    active = coef != 0
    cdt = _compute_dtype(logits3d.dtype)
    # When the gradient has the compute dtype, build it in place in its destination (3 passes);
    # otherwise in a chunk buffer, cast on the way out.
    direct = grad3d.dtype == cdt
    buf = None if direct else _chunk_buffer(logits3d)
    step = _rows_per_chunk(logits3d)
    for (rows, view), (_, out) in zip(_row_chunks(logits3d, step), _row_chunks(grad3d, step)):
        g = out if direct else buf[: view.shape[0]]
        if direct:
            torch.sub(view, lse_excl[rows, None], out=g)
        else:
            g.copy_(view)
            g.sub_(lse_excl[rows, None])
        g.exp_().mul_(coef[rows, None])
        g.scatter_(1, idx[rows], -coef[rows, None])
        # on CPU, skip the pass when every row is active; on a GPU that test would be a host sync
        if g.device.type != "cpu" or not bool(active[rows].all()):
            g.masked_fill_(~active[rows, None], 0.0)
        if not direct:
            out.copy_(g)
