"""The LCO vocabulary kernels and their launchers.

Symbols follow SPEC §1: ``z`` logits, ``i`` the sampled label, ``lse_excl`` = log Σ_{k≠i} exp z_k,
``d`` = z_i − lse_excl (the log-odds of the sampled token), ``p`` = p_i, ``t`` = target probability,
``alpha`` = |Ψ|·(t − p_i), so that ∂L/∂z = alpha·(p̃ − e_i) with p̃_k = exp(z_k − lse_excl), k ≠ i.

Two kernels, one launch each, split where the autograd graph splits:

* forward (sweep 1 + scalar head): reads the logits once and writes three fp32 numbers per row —
  the loss, ``alpha`` and ``lse_excl``;
* backward (sweep 2): reads the logits once more and writes the gradient once,
  ``coef·p̃`` off the label and ``−coef`` on it, with ``coef = alpha × upstream gradient`` per row.

So forward + backward is 2 launches and exactly 3·N·V elements of vocabulary traffic, the upstream
gradient (a scalar or one value per token) is applied exactly without another pass, and a forward
that is never differentiated costs one read.

Rows are addressed as a (B, T, V) view with two row strides, so ``logits[:, :-1, :]`` runs without
a copy; row offsets are computed in int64 (N·V may exceed 2³¹).
"""
import torch
import triton
import triton.language as tl

# Bytes of one vocabulary chunk: 4096 fp32 or 8192 bf16/fp16 elements. 16 KiB per chunk keeps
# every thread at 16-32 B per load (128-bit vector loads) and the kernels free of spills (checked
# by tests/test_aot_compile.py for sm_80 and sm_90).
_CHUNK_BYTES = 16384
_MIN_BLOCK_V = 1024


def launch_config(V: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of V logits of ``dtype``: the one place they are chosen.

    BLOCK_V is the power of two covering V, between 1024 and one 16 KiB chunk; 8 warps for the
    large blocks, 4 below 4096 elements.
    """
    cap = _CHUNK_BYTES // torch.tensor([], dtype=dtype).element_size()
    block_v = min(cap, max(_MIN_BLOCK_V, triton.next_power_of_2(V)))
    num_warps = 8 if block_v >= 4096 else 4
    return block_v, num_warps


def all_launch_configs(dtype: torch.dtype) -> list[tuple[int, int]]:
    """Every (BLOCK_V, num_warps) ``launch_config`` can return for ``dtype``, whatever V is."""
    cap = _CHUNK_BYTES // torch.tensor([], dtype=dtype).element_size()
    return sorted({launch_config(v, dtype) for v in (2 ** k for k in range(0, cap.bit_length()))})


@triton.jit
def _log1p(x):
    # log(1 + x) to full precision for tiny x (Goldberg's correction); avoids libdevice, which the
    # interpreter does not map on every Triton version.
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _softplus(x):
    # log(1 + e^x): no overflow for large x, and e^x (not 0) for very negative x.
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _lco_head(d, adv, rho_pos, rho_neg):
    """(loss, alpha) of one row from d = log p_i − log(1 − p_i) and the advantage Ψ.

    Everything is in the log domain: log(1 − p_i) = −softplus(d) is exact for confident tokens,
    where 1 − p_i by subtraction would be 0.
    """
    log_p = -_softplus(-d)
    log_1mp = -_softplus(d)
    p = tl.exp(log_p)
    rho = tl.where(adv > 0, rho_pos, rho_neg)
    abs_adv = tl.abs(adv)
    log_rho = tl.log(rho)
    # ρ·p_i ≥ 1: no finite logit shift reaches ρ·p_i; the target is one-hot (t = 1), SPEC §1.
    clamped = (rho > 1.0) & (log_rho + log_p >= 0.0)
    # delta = log(1 − t) − log(1 − p_i) = log(1 + (1 − ρ)·e^d), the shift of the non-sampled mass.
    # For ρ ≤ 1 the softplus form cannot overflow; for ρ > 1 unclamped, (ρ − 1)·e^d < 1.
    delta = tl.where(rho > 1.0, _log1p((1.0 - rho) * tl.exp(d)), _softplus(tl.log(1.0 - rho) + d))
    t = tl.where(clamped, 1.0, rho * p)
    # KL(target ‖ policy) collapses to two outcomes (eq. 17): sampled token + the rest.
    kl_sampled = tl.where(clamped, -log_p, tl.where(t > 0.0, t * log_rho, 0.0))
    kl_rest = tl.where(clamped, 0.0, tl.exp(log_1mp + delta) * delta)
    # t − p_i: (ρ − 1)·p_i unclamped, 1 − p_i = e^{log(1 − p_i)} clamped; neither subtracts.
    alpha = abs_adv * tl.where(clamped, tl.exp(log_1mp), (rho - 1.0) * p)
    return abs_adv * (kl_sampled + kl_rest), alpha


@triton.jit
def _lco_forward_kernel(
    logits_ptr, stride_lb, stride_lt, T,
    labels_ptr, adv_ptr,
    loss_ptr, alpha_ptr, lse_excl_ptr,
    V, rho_pos, rho_neg, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    seq = row // T
    pos = row - seq * T
    row_ptr = logits_ptr + seq * stride_lb + pos * stride_lt

    label = tl.load(labels_ptr + row)
    adv = tl.load(adv_ptr + row).to(tl.float32)
    # Under torch.compile Python floats arrive as fp64: compute in fp32 whatever the caller passed.
    rho_pos = tl.cast(rho_pos, tl.float32)
    rho_neg = tl.cast(rho_neg, tl.float32)
    valid = label != ignore_index

    # Sweep 1: online max/sum of exp over the vocabulary without the sampled column, and z_i.
    # Ignored rows sweep nothing: their logits are never read.
    cols0 = tl.arange(0, BLOCK_V)
    m = tl.full([], -float("inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    z_i = tl.zeros([], tl.float32)
    for start in range(0, tl.where(valid, V, 0), BLOCK_V):
        cols = start + cols0
        z = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        is_label = cols == label
        z_i += tl.sum(tl.where(is_label, z, 0.0), axis=0)
        z = tl.where(is_label, -float("inf"), z)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # While every logit seen is −inf, rescale against 0 instead of −inf (−inf − −inf is NaN).
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref), axis=0)
        m = m_new
    lse_excl = m + tl.log(s)

    loss, alpha = _lco_head(z_i - lse_excl, adv, rho_pos, rho_neg)
    # Ignored rows, and rows whose other logits are all −inf (no mass to move: π' = π), are exact zeros.
    zero = (label == ignore_index) | (lse_excl == -float("inf"))
    tl.store(loss_ptr + row, tl.where(zero, 0.0, loss))
    tl.store(alpha_ptr + row, tl.where(zero, 0.0, alpha))
    tl.store(lse_excl_ptr + row, lse_excl)


@triton.jit
def _lco_backward_kernel(
    logits_ptr, stride_lb, stride_lt,
    grad_ptr, stride_gb, stride_gt, T,
    labels_ptr, coef_ptr, lse_excl_ptr,
    V,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    seq = row // T
    pos = row - seq * T
    row_ptr = logits_ptr + seq * stride_lb + pos * stride_lt
    grad_row_ptr = grad_ptr + seq * stride_gb + pos * stride_gt

    label = tl.load(labels_ptr + row)
    coef = tl.load(coef_ptr + row)  # alpha × upstream gradient of this row's loss
    lse_excl = tl.load(lse_excl_ptr + row)
    # Rows without gradient (ignored, Ψ = 0, degenerate) are written as zeros without reading logits.
    active = coef != 0.0  # NaN stays active, so a NaN row gets a NaN gradient
    n_read = tl.where(active, V, 0)

    # Sweep 2: ∂L/∂z_k = coef·p̃_k off the label, −coef on it. In place (grad_ptr == logits_ptr)
    # each chunk is read before the same program overwrites it.
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        z = tl.load(row_ptr + cols, mask=cols < n_read, other=-float("inf")).to(tl.float32)
        grad = tl.where(cols == label, -coef, coef * tl.exp(z - lse_excl))
        grad = tl.where(active, grad, 0.0)
        tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < V)


def forward_rows(logits3d, labels, advantages, rho_pos, rho_neg, ignore_index):
    """Per-row (loss, alpha, lse_excl), fp32, for a (B, T, V) logits view with unit last stride."""
    B, T, V = logits3d.shape
    n = B * T
    loss, alpha, lse_excl = (torch.empty(n, dtype=torch.float32, device=logits3d.device) for _ in range(3))
    if n == 0:
        return loss, alpha, lse_excl
    block_v, num_warps = launch_config(V, logits3d.dtype)
    _lco_forward_kernel[(n,)](
        logits3d, logits3d.stride(0), logits3d.stride(1), T,
        labels, advantages,
        loss, alpha, lse_excl,
        V, float(rho_pos), float(rho_neg), int(ignore_index),
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return loss, alpha, lse_excl


def backward_rows(logits3d, labels, coef, lse_excl, grad3d):
    """Write ∂L/∂logits into ``grad3d`` (which may be ``logits3d`` itself) from per-row ``coef``."""
    B, T, V = logits3d.shape
    if B * T == 0:
        return
    block_v, num_warps = launch_config(V, logits3d.dtype)
    _lco_backward_kernel[(B * T,)](
        logits3d, logits3d.stride(0), logits3d.stride(1),
        grad3d, grad3d.stride(0), grad3d.stride(1), T,
        labels, coef, lse_excl,
        V,
        BLOCK_V=block_v, num_warps=num_warps,
    )
