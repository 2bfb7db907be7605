"""The PyTorch backend: the same two sweeps as the Triton kernels, vectorised over chunks of rows.

It has the Triton launchers' interface (``forward_rows`` / ``backward_rows`` on a (B, T, V) view)
and the same scalar head, written with torch ops. Its extra memory is one chunk of about
``_CHUNK_ELEMENTS`` logits (plus the temporaries of one ``logsumexp`` on it), never N×V.
Computation is in fp32, or fp64 for fp64 logits (used by gradcheck).
"""
import torch

_CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 per chunk of rows


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(logits3d):
    """Yield (seq, pos0, pos1, row0): the rows logits3d[seq, pos0:pos1] are flat rows row0…"""
    B, T, V = logits3d.shape
    step = max(1, _CHUNK_ELEMENTS // max(V, 1))
    for seq in range(B):
        for pos0 in range(0, T, step):
            pos1 = min(T, pos0 + step)
            yield seq, pos0, pos1, seq * T + pos0


def _softplus(x):
    # log(1 + e^x) without overflow and with e^x's digits for very negative x (as in the kernel).
    return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))


def lco_head(d, adv, rho_pos, rho_neg):
    """(loss, alpha) per row from d = log p_i − log(1 − p_i); the torch twin of triton_kernels._lco_head."""
    log_p = -_softplus(-d)
    log_1mp = -_softplus(d)
    p = torch.exp(log_p)
    rho = torch.where(adv > 0, rho_pos, rho_neg).to(d.dtype)
    abs_adv = adv.abs()
    log_rho = torch.log(rho)
    clamped = (rho > 1) & (log_rho + log_p >= 0)
    delta = torch.where(rho > 1, torch.log1p((1 - rho) * torch.exp(d)), _softplus(torch.log(1 - rho) + d))
    t = torch.where(clamped, 1.0, rho * p)
    kl_sampled = torch.where(clamped, -log_p, torch.where(t > 0, t * log_rho, 0.0))
    kl_rest = torch.where(clamped, 0.0, torch.exp(log_1mp + delta) * delta)
    alpha = abs_adv * torch.where(clamped, torch.exp(log_1mp), (rho - 1) * p)
    return abs_adv * (kl_sampled + kl_rest), alpha


def forward_rows(logits3d, labels, advantages, rho_pos, rho_neg, ignore_index):
    """Per-row (loss, alpha, lse_excl) for a (B, T, V) logits view."""
    B, T, V = logits3d.shape
    cdt = _compute_dtype(logits3d.dtype)
    dev = logits3d.device
    n = B * T
    z_i = torch.empty(n, dtype=cdt, device=dev)
    lse_excl = torch.empty(n, dtype=cdt, device=dev)
    valid = labels != ignore_index
    idx = torch.where(valid, labels, 0).long()[:, None]
    buf = torch.empty(min(n, max(1, _CHUNK_ELEMENTS // max(V, 1))), V, dtype=cdt, device=dev)
    for seq, pos0, pos1, row0 in _row_chunks(logits3d):
        rows = slice(row0, row0 + pos1 - pos0)
        z = buf[: pos1 - pos0]
        z.copy_(logits3d[seq, pos0:pos1])
        z_i[rows] = z.gather(1, idx[rows])[:, 0]
        z.scatter_(1, idx[rows], -torch.inf)
        torch.logsumexp(z, dim=1, out=lse_excl[rows])
    loss, alpha = lco_head(z_i - lse_excl, advantages.to(cdt), rho_pos, rho_neg)
    zero = ~valid | torch.isneginf(lse_excl)
    return torch.where(zero, 0.0, loss), torch.where(zero, 0.0, alpha), lse_excl


def backward_rows(logits3d, labels, coef, lse_excl, grad3d):
    """Write coef·p̃ (and −coef at the label) into ``grad3d``, which may be ``logits3d`` itself."""
    B, T, V = logits3d.shape
    cdt = _compute_dtype(logits3d.dtype)
    n = B * T
    idx = labels.clamp(0, V - 1).long()[:, None]  # ignored rows have coef = 0: any column will do
    active = coef != 0
    buf = torch.empty(min(n, max(1, _CHUNK_ELEMENTS // max(V, 1))), V, dtype=cdt, device=logits3d.device)
    for seq, pos0, pos1, row0 in _row_chunks(logits3d):
        rows = slice(row0, row0 + pos1 - pos0)
        g = buf[: pos1 - pos0]
        g.copy_(logits3d[seq, pos0:pos1])
        g.sub_(lse_excl[rows, None]).exp_().mul_(coef[rows, None])
        g.scatter_(1, idx[rows], -coef[rows, None])
        g.masked_fill_(~active[rows, None], 0.0)
        grad3d[seq, pos0:pos1].copy_(g)
