"""The PyTorch backend: the same two sweeps as the Triton kernels, vectorised over chunks of rows.

It has triton_backend.py's interface (``forward_rows``, ``sweep_rows``, ``head_rows``,
``backward_rows`` on a (B, T, V) view) and the same per-row head (torch_heads.py). Its extra memory
is one chunk of about ``_CHUNK_ELEMENTS`` logits plus the temporaries of the reductions over it,
never N×V. Computation is in fp32, or fp64 for fp64 logits (used by gradcheck).
"""
import torch

from .stats import PART, PARTIALS, ROW, ROW_STATE, STAT_ROWS
from .torch_heads import row_head

_CHUNK_ELEMENTS = 1 << 20  # 4 MiB of fp32 per chunk of rows


def compute_dtype(dtype):
    """The dtype the per-row math runs in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(logits3d):
    B, T, V = logits3d.shape
    return max(1, min(B * T, _CHUNK_ELEMENTS // max(V, 1)))


def _row_chunks(logits3d, rows_per_chunk):
    """Yield (rows, view): flat row indices ``rows`` (a slice) and the logits view holding them."""
    B, T, V = logits3d.shape
    for seq in range(B):
        for pos0 in range(0, T, rows_per_chunk):
            pos1 = min(T, pos0 + rows_per_chunk)
            yield slice(seq * T + pos0, seq * T + pos1), logits3d[seq, pos0:pos1]


def _scaled(view, inv_temp, out):
    """``out`` = view / τ in the compute dtype, in one pass where the dtypes agree (out may be ``view``).
    Otherwise cast first: a bf16 product would round z/τ to bf16."""
    if view.dtype == out.dtype:
        return torch.mul(view, inv_temp, out=out)
    return out.copy_(view).mul_(inv_temp)


def sweep_rows(logits3d, labels, spec, ignore_index, need_entropy, vocab_start):
    """The (N, len(PARTIALS)) raw sweep quantities (m, s, z_i, owned, u, q) of a vocabulary shard."""
    B, T, V = logits3d.shape
    cdt = compute_dtype(logits3d.dtype)
    n = labels.numel()
    partials = torch.zeros(n, len(PARTIALS), dtype=cdt, device=labels.device)
    local = labels - vocab_start
    owned = (local >= 0) & (local < V) & (labels != ignore_index)
    idx = torch.where(owned, local, 0)[:, None]
    inv_temp = 1.0 / spec.temperature
    step = _rows_per_chunk(logits3d)
    buf = torch.empty(step, V, dtype=cdt, device=logits3d.device)
    for rows, view in _row_chunks(logits3d, step):
        z = _scaled(view, inv_temp, buf[: view.shape[0]])
        here = owned[rows, None]
        part = partials[rows]
        part[:, PART["z_i"]] = torch.where(here, z.gather(1, idx[rows]), 0.0)[:, 0]
        z.scatter_(1, idx[rows], torch.where(here, -torch.inf, z.gather(1, idx[rows])))
        # the same online quantities as the kernel, in one step per chunk: m = max (NaN propagates),
        # e = e^{z − m} against 0 while every logit is −inf
        m = z.amax(dim=1)
        m_ref = torch.where(torch.isneginf(m), 0.0, m)
        z.sub_(m_ref[:, None])
        e = z.exp()
        part[:, PART["m"]] = m
        part[:, PART["s"]] = e.sum(dim=1)
        part[:, PART["owned"]] = owned[rows].to(cdt)
        if need_entropy:
            part[:, PART["u"]] = torch.where(e > 0, e * z, 0.0).sum(dim=1)
            part[:, PART["q"]] = (e * e).sum(dim=1)
    # ignored rows sweep nothing (as in the kernel): their values are never used
    return partials


def head_rows(partials, labels, advantages, old_logprobs, ref_logprobs, spec, ignore_index, need_entropy,
              with_stats):
    """(rows, stats) from (combined) partials; see triton_backend.forward_rows."""
    cdt = partials.dtype
    col = dict(zip(PARTIALS, partials.unbind(1)))
    old = old_logprobs.to(cdt) if spec.has_old else None
    ref = ref_logprobs.to(cdt) if spec.has_ref else None
    table, clamped, clipped = row_head(col["z_i"], col["m"], col["s"], col["u"], col["q"], labels != ignore_index,
                                       col["owned"] > 0.5, advantages.to(cdt), old, ref, spec, need_entropy,
                                       with_stats)
    if not with_stats:
        return table, None
    named = dict(logprobs=table[:, ROW["log_p"]], entropy=table[:, ROW["entropy"]], logit_grad_norm=table[:, -2],
                 target_prob=table[:, -1], clamped=clamped.to(cdt), clipped=clipped.to(cdt))
    stats = torch.stack([named[name] for name in STAT_ROWS], dim=1).to(torch.float32 if cdt == torch.float32 else cdt)
    return table[:, :len(ROW_STATE)].contiguous(), stats


def forward_rows(logits3d, labels, advantages, old_logprobs, ref_logprobs, spec, ignore_index, need_entropy,
                 with_stats):
    """(rows, stats); see triton_backend.forward_rows."""
    partials = sweep_rows(logits3d, labels, spec, ignore_index, need_entropy, 0)
    # a label outside [0, V) is owned by no shard: the head makes its row NaN
    return head_rows(partials, labels, advantages, old_logprobs, ref_logprobs, spec, ignore_index, need_entropy,
                     with_stats)


def backward_rows(logits3d, labels, coef, ent_coef, rows, grad3d, spec, vocab_start=0):
    """Write coef·p̃ (−coef at the label) (+ ent_coef·∂H/∂z) into ``grad3d``, which may be ``logits3d``."""
    V = logits3d.shape[-1]
    local = labels - vocab_start
    owned = (local >= 0) & (local < V)
    idx = torch.where(owned, local, 0)[:, None]
    active = coef != 0
    if ent_coef is not None:
        active = active | (ent_coef != 0)
    cdt = compute_dtype(logits3d.dtype)
    inv_temp = 1.0 / spec.temperature
    m, log_s = rows[:, ROW["m"]], rows[:, ROW["log_s"]]
    step = _rows_per_chunk(logits3d)
    # When the gradient has the compute dtype, build it in its destination (in place too: each
    # element is read before it is overwritten); otherwise in a chunk buffer, cast on the way out.
    direct = grad3d.dtype == cdt
    buf = None if direct else torch.empty(step, V, dtype=cdt, device=logits3d.device)
    for (rows_, view), (_, out) in zip(_row_chunks(logits3d, step), _row_chunks(grad3d, step)):
        g = _scaled(view, inv_temp, out if direct else buf[: view.shape[0]])
        g.sub_(m[rows_, None]).sub_(log_s[rows_, None])            # log p̃
        here = owned[rows_, None]
        c = coef[rows_, None]
        if ent_coef is not None:
            st = rows[rows_]
            log_pk = g + st[:, ROW["log_1mp"], None]
            log_pk.scatter_(1, idx[rows_], torch.where(here, st[:, ROW["log_p"], None], log_pk.gather(1, idx[rows_])))
            p_k = log_pk.exp()
            ent = torch.where(p_k > 0, -ent_coef[rows_, None] * p_k * (log_pk + st[:, ROW["entropy"], None]), 0.0)
        g.exp_().mul_(c)
        g.scatter_(1, idx[rows_], torch.where(here, -c, g.gather(1, idx[rows_])))
        if ent_coef is not None:
            g.add_(ent)
        # on CPU, skip the pass when every row is active; on a GPU that test would be a host sync
        if g.device.type != "cpu" or not bool(active[rows_].all()):
            g.masked_fill_(~active[rows_, None], 0.0)
        if not direct:
            out.copy_(g)
