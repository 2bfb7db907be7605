"""The PyTorch backend: the same two sweeps as the Triton kernels, vectorised over chunks of rows.

It has triton_backend.py's interface (``forward_rows``, ``sweep_rows``, ``head_rows``,
``backward_rows`` on a (B, T, V) view) and the same per-row head (torch_heads.py). Its extra memory
is one chunk of about ``_CHUNK_ELEMENTS`` logits plus the temporaries of the reductions over it,
never N×V. Computation is in fp32, or fp64 for fp64 logits (used by gradcheck).
"""
import torch

from . import torch_heads
from ._validation import every_label_a_column
from .registry import Kind
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
    """Yield (rows, view): flat row indices ``rows`` (a slice; None when the view holds every row, as it
    does for small inputs) and the logits view holding them."""
    B, T, V = logits3d.shape
    if B == 1 and 0 < T <= rows_per_chunk:
        yield None, logits3d[0]
        return
    for seq in range(B):
        for pos0 in range(0, T, rows_per_chunk):
            pos1 = min(T, pos0 + rows_per_chunk)
            yield slice(seq * T + pos0, seq * T + pos1), logits3d[seq, pos0:pos1]


def _take(column, rows, unsqueeze=False):
    """``column[rows]`` (the whole column for rows None), as (n, 1) with ``unsqueeze``."""
    part = column if rows is None else column[rows]
    return part.unsqueeze(1) if unsqueeze else part


def _scaled(view, inv_temp, out):
    """``out`` = view / τ in the compute dtype, in one pass where the dtypes agree (out may be ``view``).
    Otherwise cast first: a bf16 product would round z/τ to bf16."""
    if view.dtype == out.dtype:
        return torch.mul(view, inv_temp, out=out)
    out.copy_(view)
    return out if inv_temp == 1.0 else out.mul_(inv_temp)


# On the CPU the sweep's reference m needs no pass of its own (``_sweep_cpu``): a row whose sum s
# then leaves [_TINY, _HUGE] is swept again with m the max without its label (``_sweep_excluded``),
# so s keeps its relative precision and 1/s stays a normal number; the label is excluded from every
# sum either way.
_TINY = 2.0 ** -40
_HUGE = 2.0 ** 64


def _shifted(view, m, inv_temp, out):
    """``out`` = view / τ − m per row in the compute dtype, one pass (a fused multiply-add); rows with
    m = −inf are shifted by 0 (every logit −inf: e = 0, not NaN)."""
    m_ref = torch.where(torch.isneginf(m), 0.0, m)
    return torch.add(-m_ref[:, None], view, alpha=inv_temp, out=out)


def _exclude_label(z, lab, here):
    """−inf at each row's label column where ``here`` (every row where it is None)."""
    z.scatter_(1, lab, -torch.inf if here is None else torch.where(here, -torch.inf, z.gather(1, lab)))


def _exp_sums(z, need_entropy):
    """(s, u, q) over each row of z = z − m (−inf where excluded): s = Σ e, u = Σ e·z, q = Σ e², e = e^z
    (u, q None without the entropy). Overwrites z."""
    if not need_entropy:
        return z.exp_().sum(dim=1), None, None
    e = z.exp()
    return e.sum(dim=1), torch.where(e > 0, e * z, 0.0).sum(dim=1), (e * e).sum(dim=1)


def _sweep_excluded(view, lab, here, inv_temp, out, need_entropy):
    """(m, s, u, q) of a chunk with m the max without the label (any device)."""
    z = _scaled(view, inv_temp, out)
    _exclude_label(z, lab, here)
    m = z.amax(dim=1)
    z.sub_(torch.where(torch.isneginf(m), 0.0, m)[:, None])
    return (m, *_exp_sums(z, need_entropy))


def _direct_or_scaled(view, inv_temp, out):
    """view / τ in the compute dtype: ``view`` itself where that is already it, else ``_scaled`` into out."""
    return view if inv_temp == 1.0 and view.dtype == out.dtype else _scaled(view, inv_temp, out)


def _sweep_cpu(view, lab, here, inv_temp, out, need_entropy):
    """``_sweep_excluded``'s values in fewer passes, with a reference that costs none. Without the
    entropy, m = 0 (returned as None while no row is redone): e^z written once (after a scaled copy
    only where τ ≠ 1 or the dtypes differ), the label's entry zeroed, one sum. With it, m is the max of the whole row, the label included (so every
    z − m ≤ 0 and u = Σ e·(z − m) sums terms of one sign): max, shift, exp, sum. Rows whose s leaves
    [_TINY, _HUGE] (logits past about ±44 from the reference, the label leading the rest by over 28
    nats, no other option, NaN) are redone by ``_sweep_excluded``; on a GPU that test would be a host
    sync."""
    if need_entropy:
        m = view.amax(dim=1).to(out.dtype)
        if inv_temp != 1.0:
            m = m * inv_temp  # the max of z/τ: scaling by τ⁻¹ > 0 keeps the order
        z = _shifted(view, m, inv_temp, out)
        _exclude_label(z, lab, here)
        values = [m, *_exp_sums(z, True)]
    else:
        e = torch.exp(_direct_or_scaled(view, inv_temp, out), out=out)
        e.scatter_(1, lab, 0.0 if here is None else torch.where(here, 0.0, e.gather(1, lab)))
        s = e.sum(dim=1)
        values = [None, s, None, None]  # m None: 0 for every row
    s = values[1]
    lo, hi = s.aminmax()
    if not (float(lo) >= _TINY and float(hi) <= _HUGE):  # NaN fails both
        redo = (~((s >= _TINY) & (s <= _HUGE))).nonzero()[:, 0]
        if values[0] is None:
            values[0] = torch.zeros_like(s)
        exact = _sweep_excluded(view[redo], lab[redo], None if here is None else here[redo], inv_temp,
                                out[: redo.numel()], need_entropy)
        for v, x in zip(values, exact):
            if v is not None:
                v[redo] = x
    return values


def _label_columns(labels, vocab_start, V):
    """(owned, idx): whether each row's label lies in this shard's columns [vocab_start, vocab_start + V),
    and its column (N, 1), clamped into range where it does not (those rows never use it)."""
    local = labels - vocab_start if vocab_start else labels
    return (local >= 0) & (local < V), local.clamp(0, max(V - 1, 0))[:, None]


def _sweep_columns(logits3d, labels, spec, ignore_index, need_entropy, vocab_start):
    """The raw sweep quantities of a vocabulary shard as (N,) columns named as stats.PARTIALS (``owned``
    bool, or None where every row owns its label; u and q None without the entropy; m None where it is
    0 for every row)."""
    B, T, V = logits3d.shape
    cdt = compute_dtype(logits3d.dtype)
    if every_label_a_column(labels, V, ignore_index, vocab_start):
        owned, idx = None, (labels - vocab_start if vocab_start else labels).unsqueeze(1)
    else:
        owned, idx = _label_columns(labels, vocab_start, V)
        owned &= labels != ignore_index
    inv_temp = 1.0 / spec.temperature
    step = _rows_per_chunk(logits3d)
    buf = torch.empty(step, V, dtype=cdt, device=logits3d.device)
    sweep = _sweep_cpu if logits3d.is_cpu else _sweep_excluded
    chunks = []
    for rows, view in _row_chunks(logits3d, step):
        here, lab = None if owned is None else _take(owned, rows, True), _take(idx, rows)
        z_i = view.gather(1, lab).squeeze(1)
        z_i = z_i if z_i.dtype == cdt else z_i.to(cdt)
        z_i = z_i if inv_temp == 1.0 else z_i * inv_temp
        if here is not None:
            z_i = torch.where(here[:, 0], z_i, 0.0)
        m, s, u, q = sweep(view, lab, here, inv_temp, buf if rows is None else buf[: view.shape[0]], need_entropy)
        chunks.append((m, s, z_i, u, q))
    # ignored rows sweep nothing (as in the kernel): their values are never used
    if not chunks:
        empty = torch.zeros(0, dtype=cdt, device=labels.device)
        chunks.append((empty,) * 3 + ((empty,) * 2 if need_entropy else (None, None)))
    if len(chunks) > 1:  # a reference of 0 (m None) for some chunks only: write it out
        chunks = [(torch.zeros_like(c[1]) if c[0] is None else c[0],) + c[1:] for c in chunks]
    columns = [c[0] if len(chunks) == 1 or c[0] is None else torch.cat(c) for c in zip(*chunks)]
    return dict(zip(("m", "s", "z_i", "u", "q"), columns), owned=owned)


def sweep_rows(logits3d, labels, spec, ignore_index, need_entropy, vocab_start):
    """The (N, len(PARTIALS)) raw sweep quantities (m, s, z_i, owned, u, q) of a vocabulary shard (u, q
    zero without the entropy): what vocabulary-parallel ranks exchange."""
    col = _sweep_columns(logits3d, labels, spec, ignore_index, need_entropy, vocab_start)
    owned = col["owned"]  # None: this shard owns every label
    col["owned"] = torch.ones_like(col["s"]) if owned is None else owned.to(col["s"].dtype)
    zero = torch.zeros_like(col["s"])
    return torch.stack([zero if col[name] is None else col[name] for name in PARTIALS], dim=1)


def head_rows(partials, labels, advantages, old_logprobs, ref_logprobs, spec, ignore_index, need_entropy,
              with_stats):
    """(rows, stats) from (combined) partials; see triton_backend.forward_rows."""
    col = dict(zip(PARTIALS, partials.unbind(1)))
    col["owned"] = col["owned"] > 0.5
    return _head(col, labels, advantages, old_logprobs, ref_logprobs, spec, ignore_index, need_entropy, with_stats)


def _head(col, labels, advantages, old_logprobs, ref_logprobs, spec, ignore_index, need_entropy, with_stats):
    cdt = col["s"].dtype
    old = _as(old_logprobs, cdt) if spec.has_old else None
    ref = _as(ref_logprobs, cdt) if spec.has_ref else None
    owned = col["owned"]
    if owned is None and with_stats:  # the statistics' flags are masked by validity
        owned = torch.ones_like(labels, dtype=torch.bool)
    valid = None if owned is None else labels != ignore_index
    table, clamped, clipped = row_head(col["z_i"], col["m"], col["s"], col["u"], col["q"], valid, owned,
                                       _as(advantages, cdt), old, ref, spec, need_entropy, with_stats)
    if not with_stats:
        return table, None
    named = dict(logprobs=table[:, ROW["log_p"]], entropy=table[:, ROW["entropy"]], logit_grad_norm=table[:, -2],
                 target_prob=table[:, -1], clamped=clamped.to(cdt), clipped=clipped.to(cdt))
    stats = torch.stack([named[name] for name in STAT_ROWS], dim=1).to(torch.float32 if cdt == torch.float32 else cdt)
    return table[:, :len(ROW_STATE)].contiguous(), stats


def _as(x, dtype):
    return x if x.dtype == dtype else x.to(dtype)


def forward_rows(logits3d, labels, advantages, old_logprobs, ref_logprobs, spec, ignore_index, need_entropy,
                 with_stats):
    """(rows, stats); see triton_backend.forward_rows. The sweep's columns go to the head as they are
    (``sweep_rows`` stacks them only for the exchange between ranks)."""
    col = _sweep_columns(logits3d, labels, spec, ignore_index, need_entropy, 0)
    # a label outside [0, V) is owned by no shard: the head makes its row NaN
    return _head(col, labels, advantages, old_logprobs, ref_logprobs, spec, ignore_index, need_entropy, with_stats)


def backward_rows(logits3d, labels, coef, ent_coef, rows, grad3d, spec, vocab_start=0):
    """Write coef·p̃ (−coef at the label) (+ ent_coef·∂H/∂z) into ``grad3d``, which may be ``logits3d``."""
    V = logits3d.shape[-1]
    cpu = logits3d.is_cpu
    if every_label_a_column(labels, V, None, vocab_start):
        owned, idx = None, (labels - vocab_start if vocab_start else labels).unsqueeze(1)
    else:
        owned, idx = _label_columns(labels, vocab_start, V)
    cdt = compute_dtype(logits3d.dtype)
    inv_temp = 1.0 / spec.temperature
    m, log_s = rows[:, ROW["m"]], rows[:, ROW["log_s"]]
    inv_s_coef = coef * torch.exp(-log_s)  # p̃ = e^{z − m} / s: the 1/s folded into the row's coefficient
    step = _rows_per_chunk(logits3d)
    # When the gradient has the compute dtype, build it in its destination (in place too: each
    # element is read before it is overwritten); otherwise in a chunk buffer, cast on the way out.
    direct = grad3d.dtype == cdt
    buf = None if direct else torch.empty(step, V, dtype=cdt, device=logits3d.device)
    # a row without a gradient (coef and ent_coef 0: ignored, or nothing to push) is zeroed
    inactive = coef == 0 if ent_coef is None else (coef == 0) & (ent_coef == 0)
    # on a GPU these two tests would be host syncs
    reference_zero = cpu and not bool(m.any())  # every row swept with m = 0 (``_sweep_cpu``): no shift pass
    if cpu and not bool(inactive.any()):
        inactive = None
    for (part, view), (_, out) in zip(_row_chunks(logits3d, step), _row_chunks(grad3d, step)):
        dst = out if direct else buf if part is None else buf[: view.shape[0]]
        if reference_zero:
            g = _direct_or_scaled(view, inv_temp, dst)
        else:
            g = _shifted(view, _take(m, part), inv_temp, dst)
        # g = z − m here (z = logits / τ); it becomes the gradient in dst
        here, lab = None if owned is None else _take(owned, part, True), _take(idx, part)
        c = _take(coef, part, True)
        if ent_coef is not None:
            st = _take(rows, part)
            log_pk = (g - st[:, ROW["log_s"], None]) + st[:, ROW["log_1mp"], None]
            log_p = st[:, ROW["log_p"], None]
            log_pk.scatter_(1, lab, log_p if here is None else torch.where(here, log_p, log_pk.gather(1, lab)))
            p_k = log_pk.exp()
            ent = torch.where(p_k > 0, -_take(ent_coef, part, True) * p_k * (log_pk + st[:, ROW["entropy"], None]), 0.0)
        g = torch.exp(g, out=dst).mul_(_take(inv_s_coef, part, True))
        g.scatter_(1, lab, -c if here is None else torch.where(here, -c, g.gather(1, lab)))
        if ent_coef is not None:
            g.add_(ent)
        if inactive is not None:
            g.masked_fill_(_take(inactive, part, True), 0.0)
        if not direct:
            out.copy_(g)


# ---- one pass each way for ordinary calls ----
# A call on the CPU whose logits fit one chunk, without the entropy, statistics or an in-place gradient,
# where every label is a column (padding too, under a reduction that weighs it 0: autograd.LossFunction gives
# it a column, whose values its weight removes) and every row is ordinary (its sum s in [_TINY, _HUGE], d and the
# per-token inputs finite) needs none of the row table, masks or chunking: the sweep, the head's loss and α, and
# the gradient from (α, log s) alone. The values are those of the general path, bit for bit
# (tests/test_losses.py::test_ordinary_calls_leave_out_the_masks_exactly and
# ::test_padded_calls_take_the_one_pass_path_exactly). The forward's buffer
# e^{z/τ} (at most one chunk) is kept for the backward, which scales it into the gradient in place: one
# exp pass and one allocation fewer, and no higher peak, as the buffer is the gradient's.

def ordinary_view(logits):
    """The (N, V) view of (..., V) logits that ``ordinary_forward`` takes, or None where the call cannot take
    it: CPU, one chunk, the compute dtype already (the gradient is then built in its destination), and a
    view of the caller's logits (never a copy: the backward reads them again)."""
    V = logits.shape[-1]
    if not (logits.is_cpu and 0 < logits.numel() <= _CHUNK_ELEMENTS
            and logits.dtype == compute_dtype(logits.dtype) and logits.stride(-1) == 1):
        return None
    if logits.dim() == 2:
        return logits
    try:
        return logits.view(-1, V)
    except RuntimeError:  # rows that no single stride steps through
        return None


def _exp(view, inv_temp):
    """e^{view / τ} as a new tensor in the compute dtype (``view`` has it)."""
    if inv_temp == 1.0:
        return torch.exp(view)
    e = torch.mul(view, inv_temp)
    return torch.exp(e, out=e)


def ordinary_forward(logits2d, labels, advantages, old_logprobs, ref_logprobs, spec):
    """(loss, alpha, state, e) per row, or None where some row is not ordinary (the caller then takes the
    general path). ``labels`` must all be columns of ``logits2d``; ``state`` (the labels and log s as (N, 1)
    columns) is what ``ordinary_backward`` takes besides the logits, and ``e`` (e^{z/τ}, the label's entry
    zeroed) the buffer it may write the gradient into."""
    lab = labels[:, None]
    inv_temp = 1.0 / spec.temperature
    z_i = logits2d.gather(1, lab).squeeze(1)
    z_i = z_i if inv_temp == 1.0 else z_i * inv_temp
    e = _exp(logits2d, inv_temp)  # the reference m = 0, as _sweep_cpu's
    e.scatter_(1, lab, 0.0)
    s = e.sum(dim=1)
    # one host read for both conditions: s + 0·(z_i + the per-token inputs) is s where those are finite, NaN
    # where one is not (0·±inf is NaN: tests/test_losses.py::test_one_pass_forward_refuses_non_finite_rows)
    probe = z_i
    for x in (advantages, old_logprobs, ref_logprobs):
        probe = probe if x is None else probe + x
    lo, hi = torch.add(s, probe, alpha=0.0).aminmax()
    if not (float(lo) >= _TINY and float(hi) <= _HUGE):  # NaN fails both
        return None
    log_s = torch.log(s)
    # d = z_i − log s is finite: z_i is, and log s lies in [log _TINY, log _HUGE]
    if spec.kind == Kind.SFT:  # its head takes −d, formed in the same one op
        loss, alpha = torch_heads.sft_terms(log_s - z_i)
    else:
        _, _, loss, alpha, _, _, _ = torch_heads.loss_terms(z_i - log_s, advantages, old_logprobs, ref_logprobs, spec)
    return loss, alpha, (lab, log_s[:, None]), e


def ordinary_backward(logits2d, coef, state, inv_temp, e=None):
    """The gradient coef·p̃ (−coef at the label) of ``ordinary_forward``'s rows: written into its buffer ``e``
    when given (the same values: e^{z/τ} is what this would form again), else into a new tensor."""
    lab, log_s = state
    c = coef[:, None]
    g = (_exp(logits2d, inv_temp) if e is None else e).mul_(c * torch.exp(-log_s))
    return g.scatter_(1, lab, -c)
