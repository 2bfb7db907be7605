"""The vocabulary kernels and their launchers: one forward sweep with a per-loss scalar head,
one backward sweep shared by every loss.

Symbols follow SPEC §1: ``z`` logits, ``i`` the sampled label, ``lse_excl`` = log Σ_{k≠i} exp z_k,
``d`` = z_i − lse_excl (the log-odds of the sampled token), p̃_k = exp(z_k − lse_excl) for k ≠ i,
and ``alpha`` the coefficient of the logit gradient α·(p̃ − e_i) (triton_heads.py).

* forward (sweep 1 + head): reads the logits once; writes per row the loss, ``alpha`` and
  ``lse_excl`` (and, with stats, log p_i, the entropy, ‖∂L/∂z‖, the target probability and the
  clamp/clip flags, from the same sweep);
* backward (sweep 2): reads the logits once more and writes the gradient once,
  ``coef·p̃`` off the label and ``−coef`` on it, with ``coef = alpha × reduction weight × upstream
  gradient`` per row.

Forward + backward is 2 launches and exactly 3·N·V elements of vocabulary traffic; the upstream
gradient is applied exactly without another pass; a forward that is never differentiated costs
one read. Rows are addressed as a (B, T, V) view with two row strides, so ``logits[:, :-1, :]``
runs without a copy; row offsets are int64 (N·V may exceed 2³¹).
"""
import torch
import triton
import triton.language as tl

from .losses import LossSpec
from .stats import N_STATS
from .triton_heads import LCO, _softplus, policy_head

_MAX_BLOCK_V = 4096
_MIN_BLOCK_V = 1024


def launch_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of V logits: the one place they are chosen.

    BLOCK_V is the power of two covering V, between 1024 and 4096; num_warps = BLOCK_V / 512, at
    least 4. At full size every thread holds 16 logits (four 128-bit loads in fp32, two in
    bf16/fp16). Larger chunks for 16-bit logits (8192 with 8 or 16 warps) spilled registers on
    sm_80/sm_90 with Triton 3.6's ptxas, so the dtype does not enter the choice;
    tests/test_aot_compile.py checks every configuration for every dtype.
    """
    block_v = min(_MAX_BLOCK_V, max(_MIN_BLOCK_V, triton.next_power_of_2(V)))
    num_warps = max(4, block_v // 512)
    return block_v, num_warps


def all_launch_configs() -> list[tuple[int, int]]:
    """Every (BLOCK_V, num_warps) ``launch_config`` can return, whatever V is."""
    return sorted({launch_config(2 ** k) for k in range(0, _MAX_BLOCK_V.bit_length() + 1)})


@triton.jit
def _policy_forward_kernel(
    logits_ptr, stride_lb, stride_lt, T,
    labels_ptr, adv_ptr, old_logp_ptr, ref_logp_ptr,
    loss_ptr, alpha_ptr, lse_excl_ptr, stats_ptr,
    N, V, ignore_index,
    rho_pos, rho_neg, eps_low, eps_high, clip_c, beta,
    LOSS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, DUAL_CLIP: tl.constexpr,
    WITH_STATS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    seq = row // T
    pos = row - seq * T
    row_ptr = logits_ptr + seq * stride_lb + pos * stride_lt

    label = tl.load(labels_ptr + row)
    adv = tl.load(adv_ptr + row).to(tl.float32)
    old_logp = tl.zeros([], tl.float32)
    ref_logp = tl.zeros([], tl.float32)
    if HAS_OLD:
        old_logp = tl.load(old_logp_ptr + row).to(tl.float32)
    if HAS_REF:
        ref_logp = tl.load(ref_logp_ptr + row).to(tl.float32)
    valid = label != ignore_index

    # Sweep 1: online max/sum of exp over the vocabulary without the sampled column, and z_i.
    # With stats, also Σ e·(z − m) (for the entropy of p̃) and Σ e² (for Σ p̃²), e = exp(z − m).
    # Ignored rows sweep nothing: their logits are never read.
    cols0 = tl.arange(0, BLOCK_V)
    m = tl.full([], -float("inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    u = tl.zeros([], tl.float32)
    q = tl.zeros([], tl.float32)
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
        scale = tl.exp(m - m_ref)
        e = tl.exp(z - m_ref)
        if WITH_STATS:
            u = scale * (u + tl.where(s > 0.0, m - m_ref, 0.0) * s) + tl.sum(tl.where(e > 0.0, e * (z - m_ref), 0.0), axis=0)
            q = scale * scale * q + tl.sum(e * e, axis=0)
        s = s * scale + tl.sum(e, axis=0)
        m = m_new
    lse_excl = m + tl.log(s)
    d = z_i - lse_excl

    loss, alpha, target, clamped, clipped = policy_head(
        d, adv, old_logp, ref_logp,
        tl.cast(rho_pos, tl.float32), tl.cast(rho_neg, tl.float32),   # fp32 even when a caller
        tl.cast(eps_low, tl.float32), tl.cast(eps_high, tl.float32),  # (torch.compile) passes fp64
        tl.cast(clip_c, tl.float32), tl.cast(beta, tl.float32),
        LOSS, HAS_OLD, HAS_REF, DUAL_CLIP)
    # Ignored rows are exact zeros. For LCO, so are rows whose other logits are all −inf: there is
    # no mass to move, π' = π (SPEC §1).
    only_option = lse_excl == -float("inf")
    zero = label == ignore_index
    if LOSS == LCO:
        zero = zero | only_option
    tl.store(loss_ptr + row, tl.where(zero, 0.0, loss))
    alpha = tl.where(zero, 0.0, alpha)
    tl.store(alpha_ptr + row, alpha)
    tl.store(lse_excl_ptr + row, lse_excl)

    if WITH_STATS:
        log_p = -_softplus(-d)
        log_1mp = -_softplus(d)
        p = tl.exp(log_p)
        one_minus_p = tl.exp(log_1mp)
        # H(π) = h(p_i) + (1 − p_i)·H(p̃), H(p̃) = log s − u/s; 0·log 0 = 0 for p_i ∈ {0, 1}.
        h_excl = tl.where(s > 0.0, tl.log(s) - u / s, 0.0)
        entropy = (tl.where(p > 0.0, -p * log_p, 0.0) + tl.where(one_minus_p > 0.0, -one_minus_p * log_1mp, 0.0)
                   + one_minus_p * h_excl)
        # ‖α·(p̃ − e_i)‖₂ = |α|·sqrt(1 + Σ_{j≠i} p̃_j²)
        grad_norm = tl.abs(alpha) * tl.sqrt(1.0 + tl.where(s > 0.0, q / (s * s), 0.0))
        target = tl.where(only_option, 1.0, target)
        stats_row = stats_ptr + row
        tl.store(stats_row, tl.where(valid, log_p, 0.0))
        tl.store(stats_row + N, tl.where(valid, entropy, 0.0))
        tl.store(stats_row + 2 * N, grad_norm)
        tl.store(stats_row + 3 * N, tl.where(valid, target, 0.0))
        tl.store(stats_row + 4 * N, tl.where(valid & clamped, 1.0, 0.0))
        tl.store(stats_row + 5 * N, tl.where(valid & clipped, 1.0, 0.0))


@triton.jit
def _policy_backward_kernel(
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
    coef = tl.load(coef_ptr + row)  # alpha × reduction weight × upstream gradient
    lse_excl = tl.load(lse_excl_ptr + row)
    # Rows without gradient (ignored, Ψ = 0, clipped, degenerate) are written as zeros without
    # reading their logits. NaN stays active, so a NaN row gets a NaN gradient.
    active = coef != 0.0
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


def forward_rows(logits3d, labels, advantages, old_logprobs, ref_logprobs, spec: LossSpec, ignore_index,
                 with_stats):
    """Per-row fp32 (loss, alpha, lse_excl, stats or None) for a (B, T, V) view with unit last stride.

    ``stats`` is a (N_STATS, N) fp32 tensor: log p_i, entropy, ‖∂L/∂z‖, target prob, clamped, clipped.
    """
    B, T, V = logits3d.shape
    n = B * T
    dev = logits3d.device
    loss, alpha, lse_excl = (torch.empty(n, dtype=torch.float32, device=dev) for _ in range(3))
    stats = torch.empty(N_STATS, n, dtype=torch.float32, device=dev) if with_stats else None
    if n == 0:
        return loss, alpha, lse_excl, stats
    block_v, num_warps = launch_config(V)
    _policy_forward_kernel[(n,)](
        logits3d, logits3d.stride(0), logits3d.stride(1), T,
        # absent inputs/outputs are never touched (their constexpr flag is off): any tensor will do
        labels, advantages, old_logprobs if spec.has_old else advantages, ref_logprobs if spec.has_ref else advantages,
        loss, alpha, lse_excl, stats if with_stats else loss,
        n, V, int(ignore_index),
        float(spec.rho_pos), float(spec.rho_neg), float(spec.epsilon_low), float(spec.epsilon_high),
        float(spec.dual_clip or 0.0), float(spec.beta),
        LOSS=int(spec.kind), HAS_OLD=spec.has_old, HAS_REF=spec.has_ref, DUAL_CLIP=spec.dual_clip is not None,
        WITH_STATS=with_stats, BLOCK_V=block_v, num_warps=num_warps,
    )
    return loss, alpha, lse_excl, stats


def backward_rows(logits3d, labels, coef, lse_excl, grad3d):
    """Write ∂L/∂logits into ``grad3d`` (which may be ``logits3d`` itself) from per-row ``coef``."""
    B, T, V = logits3d.shape
    if B * T == 0:
        return
    block_v, num_warps = launch_config(V)
    _policy_backward_kernel[(B * T,)](
        logits3d, logits3d.stride(0), logits3d.stride(1),
        grad3d, grad3d.stride(0), grad3d.stride(1), T,
        labels, coef, lse_excl,
        V,
        BLOCK_V=block_v, num_warps=num_warps,
    )
