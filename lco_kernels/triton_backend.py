"""The Triton backend: the vocabulary kernels and their launchers (the twin of torch_backend.py).

Symbols follow SPEC §1 and triton_heads.py: ``z`` the logits divided by the temperature, ``i`` the
sampled label, ``m`` and ``s`` the running max and Σ e^{z_k − m} over the non-sampled logits, so
lse₋ᵢ = m + log s and p̃_k = e^{(z_k − m) − log s} (k ≠ i); ``alpha`` the coefficient of the logit
gradient α·(p̃ − e_i).

* forward (sweep 1 + ``row_head``): reads the logits once; writes the per-row state (stats.ROW_STATE:
  m, log s, loss, alpha, and with the entropy log p_i, log(1 − p_i), H, else zeros there) and, on request, the
  per-token statistics. It can also run split for vocabulary-parallel use: ``sweep_rows`` writes
  a shard's raw quantities (stats.PARTIALS) and ``head_rows`` runs the head on combined ones.
* backward (sweep 2): reads the logits once more and writes the gradient once, ``coef·p̃`` off the
  label and ``−coef`` on it, plus ``ent_coef·∂H/∂z`` when an entropy has a gradient; ``coef`` and
  ``ent_coef`` carry the reduction weight, the upstream gradient and 1/τ per row.

Forward + backward is 2 launches and exactly 3·N·V elements of vocabulary traffic; a forward that
is never differentiated costs one read. Rows are addressed as a (B, T, V) view with two row strides,
so ``logits[:, :-1, :]`` runs without a copy; row offsets are int64 (N·V may exceed 2³¹).
"""
import torch
import triton
import triton.language as tl

from .registry import Kind
from .stats import PART, PARTIALS, ROW, ROW_STATE, STAT, STAT_ROWS
from .triton_heads import row_head

_MAX_BLOCK_V = 4096
_MIN_BLOCK_V = 1024

# Forward kernel modes.
FUSED = 0       # sweep + head
SWEEP = 1       # sweep only: write the shard's partials
HEAD = 2        # head only: read combined partials, never the logits

# Column offsets as constexprs, so the kernels address the buffers by name.
_ROW_K: tl.constexpr = tl.constexpr(len(ROW_STATE))
_PART_K: tl.constexpr = tl.constexpr(len(PARTIALS))
_STAT_K: tl.constexpr = tl.constexpr(len(STAT_ROWS))
_R_LOSS: tl.constexpr = tl.constexpr(ROW["loss"])
_R_ALPHA: tl.constexpr = tl.constexpr(ROW["alpha"])
_R_M: tl.constexpr = tl.constexpr(ROW["m"])
_R_LOG_S: tl.constexpr = tl.constexpr(ROW["log_s"])
_R_ENT_MASK: tl.constexpr = tl.constexpr(ROW["ent_mask"])
_R_LOG_P: tl.constexpr = tl.constexpr(ROW["log_p"])
_R_LOG_1MP: tl.constexpr = tl.constexpr(ROW["log_1mp"])
_R_ENTROPY: tl.constexpr = tl.constexpr(ROW["entropy"])
_P_M: tl.constexpr = tl.constexpr(PART["m"])
_P_S: tl.constexpr = tl.constexpr(PART["s"])
_P_Z_I: tl.constexpr = tl.constexpr(PART["z_i"])
_P_OWNED: tl.constexpr = tl.constexpr(PART["owned"])
_P_U: tl.constexpr = tl.constexpr(PART["u"])
_P_Q: tl.constexpr = tl.constexpr(PART["q"])
_S_LOGPROBS: tl.constexpr = tl.constexpr(STAT["logprobs"])
_S_ENTROPY: tl.constexpr = tl.constexpr(STAT["entropy"])
_S_GRAD_NORM: tl.constexpr = tl.constexpr(STAT["logit_grad_norm"])
_S_TARGET: tl.constexpr = tl.constexpr(STAT["target_prob"])
_S_CLAMPED: tl.constexpr = tl.constexpr(STAT["clamped"])
_S_CLIPPED: tl.constexpr = tl.constexpr(STAT["clipped"])
_FUSED: tl.constexpr = tl.constexpr(FUSED)
_SWEEP: tl.constexpr = tl.constexpr(SWEEP)
_HEAD: tl.constexpr = tl.constexpr(HEAD)

# The kernels' integer scalar arguments; every other non-pointer, non-constexpr argument is a float
# hyperparameter (diagnostics/aot.py derives the compile signatures from this).
INT_ARGS = ("stride_lb", "stride_lt", "stride_gb", "stride_gt", "T", "V", "vocab_start", "ignore_index")


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
    """Every (BLOCK_V, num_warps) ``launch_config`` can return, whatever V is (the AOT compile list)."""
    return sorted({launch_config(2 ** k) for k in range(0, _MAX_BLOCK_V.bit_length() + 1)})


@triton.jit
def _forward_kernel(
    logits_ptr, stride_lb, stride_lt, T,
    labels_ptr, adv_ptr, old_logp_ptr, ref_logp_ptr,
    rows_ptr, stats_ptr, partials_ptr,
    V, vocab_start, ignore_index,
    inv_temp, rho_pos, rho_neg, eps_low, eps_high, clip_c, beta, entropy_coef,
    tau_pos, tau_neg, delta_low, delta_high, trunc_c, dro_beta,
    LOSS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, KL_TYPE: tl.constexpr,
    DUAL_CLIP: tl.constexpr, NEED_ENTROPY: tl.constexpr, WITH_STATS: tl.constexpr, MODE: tl.constexpr,
    DIVERGENCE: tl.constexpr, BIAS_KL: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_temp = tl.cast(inv_temp, tl.float32)  # fp32 even when a caller (torch.compile) passes fp64
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    local_label = label - vocab_start
    part_row = partials_ptr + row * _PART_K

    if MODE == _HEAD:
        m = tl.load(part_row + _P_M)
        s = tl.load(part_row + _P_S)
        z_i = tl.load(part_row + _P_Z_I)
        owned = tl.load(part_row + _P_OWNED) > 0.5
        u = tl.load(part_row + _P_U)
        q = tl.load(part_row + _P_Q)
    else:
        seq = row // T
        pos = row - seq * T
        row_ptr = logits_ptr + seq * stride_lb + pos * stride_lt
        owned = (local_label >= 0) & (local_label < V)
        # Sweep 1: online max/sum of e^z over the vocabulary without the sampled column, and z_i;
        # with the entropy also u = Σ e·(z − m) and q = Σ e², e = e^{z − m}. Ignored rows sweep
        # nothing: their logits are never read.
        cols0 = tl.arange(0, BLOCK_V)
        m = tl.full([], -float("inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        u = tl.zeros([], tl.float32)
        q = tl.zeros([], tl.float32)
        z_i = tl.zeros([], tl.float32)
        for start in range(0, tl.where(valid, V, 0), BLOCK_V):
            cols = start + cols0
            z = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32) * inv_temp
            is_label = cols == local_label
            z_i += tl.sum(tl.where(is_label, z, 0.0), axis=0)
            z = tl.where(is_label, -float("inf"), z)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # While every logit seen is −inf, rescale against 0 instead of −inf (−inf − −inf is NaN).
            m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
            scale = tl.exp(m - m_ref)
            e = tl.exp(z - m_ref)
            if NEED_ENTROPY:
                # Moving the reference from m to m_ref: each old e gains the factor `scale` and each
                # old (z − m) becomes (z − m_ref) + (m − m_ref), so u ← scale·(u + (m − m_ref)·s).
                u = scale * (u + tl.where(s > 0.0, m - m_ref, 0.0) * s) + tl.sum(
                    tl.where(e > 0.0, e * (z - m_ref), 0.0), axis=0)
                q = scale * scale * q + tl.sum(e * e, axis=0)
            s = s * scale + tl.sum(e, axis=0)
            m = m_new

    if MODE == _SWEEP:
        tl.store(part_row + _P_M, m)
        tl.store(part_row + _P_S, s)
        tl.store(part_row + _P_Z_I, z_i)
        tl.store(part_row + _P_OWNED, tl.where(owned, 1.0, 0.0))
        if NEED_ENTROPY:
            tl.store(part_row + _P_U, u)
            tl.store(part_row + _P_Q, q)
    else:
        adv = tl.load(adv_ptr + row).to(tl.float32)
        old_logp = tl.zeros([], tl.float32)
        ref_logp = tl.zeros([], tl.float32)
        if HAS_OLD:
            old_logp = tl.load(old_logp_ptr + row).to(tl.float32)
        if HAS_REF:
            ref_logp = tl.load(ref_logp_ptr + row).to(tl.float32)
        loss, alpha, ent_mask, log_p, log_1mp, entropy, grad_norm, target, clamped, clipped = row_head(
            z_i, m, s, u, q, valid, owned, adv, old_logp, ref_logp,
            # fp32 even when a caller (torch.compile) passes the hyperparameters as fp64
            inv_temp, tl.cast(rho_pos, tl.float32), tl.cast(rho_neg, tl.float32),
            tl.cast(eps_low, tl.float32), tl.cast(eps_high, tl.float32), tl.cast(clip_c, tl.float32),
            tl.cast(beta, tl.float32), tl.cast(entropy_coef, tl.float32),
            tl.cast(tau_pos, tl.float32), tl.cast(tau_neg, tl.float32), tl.cast(delta_low, tl.float32),
            tl.cast(delta_high, tl.float32), tl.cast(trunc_c, tl.float32), tl.cast(dro_beta, tl.float32),
            LOSS, HAS_OLD, HAS_REF, KL_TYPE, DUAL_CLIP, NEED_ENTROPY, DIVERGENCE, BIAS_KL)
        state = rows_ptr + row * _ROW_K
        tl.store(state + _R_LOSS, loss)
        tl.store(state + _R_ALPHA, alpha)
        tl.store(state + _R_M, m)
        tl.store(state + _R_LOG_S, tl.log(s))
        if NEED_ENTROPY:
            tl.store(state + _R_ENT_MASK, ent_mask)
            tl.store(state + _R_LOG_P, log_p)
            tl.store(state + _R_LOG_1MP, log_1mp)
            tl.store(state + _R_ENTROPY, entropy)
        else:  # zeros: the row state is fully written by the launch (no fill after it)
            tl.store(state + _R_ENT_MASK, 0.0)
            tl.store(state + _R_LOG_P, 0.0)
            tl.store(state + _R_LOG_1MP, 0.0)
            tl.store(state + _R_ENTROPY, 0.0)
        if WITH_STATS:
            stats_row = stats_ptr + row * _STAT_K
            tl.store(stats_row + _S_LOGPROBS, log_p)
            tl.store(stats_row + _S_ENTROPY, entropy)
            tl.store(stats_row + _S_GRAD_NORM, grad_norm)
            tl.store(stats_row + _S_TARGET, target)
            tl.store(stats_row + _S_CLAMPED, tl.where(clamped, 1.0, 0.0))
            tl.store(stats_row + _S_CLIPPED, tl.where(clipped, 1.0, 0.0))


@triton.jit
def _backward_kernel(
    logits_ptr, stride_lb, stride_lt,
    grad_ptr, stride_gb, stride_gt, T,
    labels_ptr, coef_ptr, ent_coef_ptr, rows_ptr,
    V, vocab_start, inv_temp,
    HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_temp = tl.cast(inv_temp, tl.float32)
    seq = row // T
    pos = row - seq * T
    row_ptr = logits_ptr + seq * stride_lb + pos * stride_lt
    grad_row_ptr = grad_ptr + seq * stride_gb + pos * stride_gt

    local_label = tl.load(labels_ptr + row) - vocab_start
    coef = tl.load(coef_ptr + row)  # alpha × reduction weight × upstream gradient / τ
    state = rows_ptr + row * _ROW_K
    m = tl.load(state + _R_M)
    log_s = tl.load(state + _R_LOG_S)
    active = coef != 0.0
    ent_coef = tl.zeros([], tl.float32)
    log_p = tl.zeros([], tl.float32)
    log_1mp = tl.zeros([], tl.float32)
    entropy = tl.zeros([], tl.float32)
    if HAS_ENTROPY:
        ent_coef = tl.load(ent_coef_ptr + row)  # ∂(loss)/∂H × weight × upstream / τ
        active = active | (ent_coef != 0.0)
        log_p = tl.load(state + _R_LOG_P)
        log_1mp = tl.load(state + _R_LOG_1MP)
        entropy = tl.load(state + _R_ENTROPY)
    # Rows without gradient (ignored, Ψ = 0, clipped, degenerate) are written as zeros without
    # reading their logits. NaN stays active, so a NaN row gets a NaN gradient.
    n_read = tl.where(active, V, 0)

    # Sweep 2: ∂L/∂z_k = coef·p̃_k off the label, −coef on it (+ ent_coef·∂H/∂z_k). In place
    # (grad_ptr == logits_ptr) each chunk is read before the same program overwrites it.
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        z = tl.load(row_ptr + cols, mask=cols < n_read, other=-float("inf")).to(tl.float32) * inv_temp
        is_label = cols == local_label
        log_pt = (z - m) - log_s  # log p̃_k, exact at large common offsets (never z − lse₋ᵢ)
        grad = tl.where(is_label, -coef, coef * tl.exp(log_pt))
        if HAS_ENTROPY:
            # ∂H/∂z_k = −p_k·(log p_k + H), with log p_k = log(1 − p_i) + log p̃_k off the label.
            log_pk = tl.where(is_label, log_p, log_1mp + log_pt)
            p_k = tl.exp(log_pk)
            grad += tl.where(p_k > 0.0, -ent_coef * p_k * (log_pk + entropy), 0.0)
        grad = tl.where(active, grad, 0.0)
        tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < V)


def _empty_rows(n, k, device):
    return torch.empty(n, k, dtype=torch.float32, device=device)


def _launch_forward(mode, logits3d, labels, advantages, old_logprobs, ref_logprobs, spec, ignore_index,
                    need_entropy, with_stats, partials, vocab_start=0):
    n = labels.numel()
    dev = labels.device
    rows = _empty_rows(n, len(ROW_STATE), dev) if mode != SWEEP else None
    stats = _empty_rows(n, len(STAT_ROWS), dev) if with_stats else None
    if n == 0:
        return rows, stats
    V = logits3d.shape[-1]
    block_v, num_warps = launch_config(V)
    anything = labels  # absent inputs/outputs are never touched (their constexpr flag is off)
    _forward_kernel[(n,)](
        logits3d, logits3d.stride(0), logits3d.stride(1), logits3d.shape[1],
        labels, anything if advantages is None else advantages,
        old_logprobs if spec.has_old else anything, ref_logprobs if spec.has_ref else anything,
        anything if rows is None else rows, stats if with_stats else anything, anything if partials is None else partials,
        V, int(vocab_start), int(ignore_index),
        1.0 / spec.temperature, spec.rho_pos, spec.rho_neg,
        1.0 if spec.epsilon_low is None else spec.epsilon_low,  # CISPO's one-sided cap: lower bound 1 − 1 = 0
        spec.epsilon_high, spec.dual_clip or 0.0, spec.beta, spec.entropy_coef,
        spec.tau_pos, spec.tau_neg, spec.delta_low, spec.delta_high, spec.clip_ratio_c, spec.dro_beta,
        LOSS=int(spec.kind), HAS_OLD=spec.has_old, HAS_REF=spec.has_ref,
        KL_TYPE=int(spec.kl_type) if spec.has_ref else 0,  # one compiled variant when there is no KL term
        DUAL_CLIP=spec.dual_clip is not None, NEED_ENTROPY=need_entropy, WITH_STATS=with_stats, MODE=mode,
        DIVERGENCE=spec.divergence if spec.kind == Kind.DPPO else 0,  # one compiled variant for the other losses
        BIAS_KL=spec.bias_correction_kl,
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return rows, stats


def forward_rows(logits3d, labels, advantages, old_logprobs, ref_logprobs, spec, ignore_index, need_entropy,
                 with_stats):
    """(rows, stats): the (N, len(ROW_STATE)) per-row state and the (N, len(STAT_ROWS)) statistics (or
    None) of a (B, T, V) logits view with unit last stride, N = B·T rows of flat per-token inputs."""
    return _launch_forward(FUSED, logits3d, labels, advantages, old_logprobs, ref_logprobs, spec, ignore_index,
                           need_entropy, with_stats, None)


def sweep_rows(logits3d, labels, spec, ignore_index, need_entropy, vocab_start):
    """The (N, len(PARTIALS)) raw sweep quantities of a vocabulary shard starting at ``vocab_start``."""
    partials = _empty_rows(labels.numel(), len(PARTIALS), labels.device)
    _launch_forward(SWEEP, logits3d, labels, None, None, None, spec, ignore_index, need_entropy, False, partials,
                    vocab_start)
    return partials


def head_rows(partials, labels, advantages, old_logprobs, ref_logprobs, spec, ignore_index, need_entropy,
              with_stats):
    """``forward_rows`` from combined partials: the head alone, no logits read."""
    no_logits = partials.new_empty(1, 0, 1)
    return _launch_forward(HEAD, no_logits, labels, advantages, old_logprobs, ref_logprobs, spec, ignore_index,
                           need_entropy, with_stats, partials)


def backward_rows(logits3d, labels, coef, ent_coef, rows, grad3d, spec, vocab_start=0):
    """Write ∂L/∂logits into ``grad3d`` (which may be ``logits3d`` itself) from per-row ``coef`` (and
    ``ent_coef``, the entropy's coefficient, or None) and the forward's row state."""
    B, T, V = logits3d.shape
    if B * T == 0:
        return
    block_v, num_warps = launch_config(V)
    _backward_kernel[(B * T,)](
        logits3d, logits3d.stride(0), logits3d.stride(1),
        grad3d, grad3d.stride(0), grad3d.stride(1), T,
        labels, coef, coef if ent_coef is None else ent_coef, rows,
        V, int(vocab_start), 1.0 / spec.temperature,
        HAS_ENTROPY=ent_coef is not None, BLOCK_V=block_v, num_warps=num_warps,
    )
