"""Vocabulary-parallel (tensor-parallel) losses: each rank holds the logits of its slice
[v0, v0 + V_r) of the vocabulary; labels are global ids, the same on every rank.

Every loss sees a row only through lse₋ᵢ and z_i (and, for the entropy and the statistics, the
accumulators u and q), and those combine across ranks from O(N) per-row partials of each shard's
sweep (stats.PARTIALS):

    m = max_r m_r,  s = Σ_r s_r·e^{m_r − m},  u = Σ_r (u_r + (m_r − m)·s_r)·e^{m_r − m},
    q = Σ_r q_r·e^{2(m_r − m)},  z_i from the rank that owns column i,

with s_r = Σ e, u_r = Σ e·(z − m_r), q_r = Σ e², e = e^{z − m_r} over the shard's non-label columns
(of z/τ). One all-gather of the packed partials per forward is all the communication: K = 4 fp32
values per row (m, s, z_i, owned), 6 when the entropy is needed. The head then runs on every rank
(the same loss everywhere) and the backward is local: each rank writes α·p̃ on its columns from the
global per-row state, −α only where it owns the label.
"""
import sys

import torch

from ._validation import label_check_reads_device
from .stats import PART, PARTIALS

_M, _S, _Z, _OWNED, _U, _Q = (PART[name] for name in ("m", "s", "z_i", "owned", "u", "q"))
_BASE_K = 4  # the columns sent without the entropy: m, s, z_i, owned lead PARTIALS (tests check it)


def combine_partials(gathered):
    """(W, N, K) partials of W shards → (N, len(PARTIALS)) partials of the whole vocabulary, K = 4
    (u and q come back 0) or 6. ``owned`` becomes the number of ranks that hold the label.

    The same formula on every rank over the same gathered tensor: every rank gets bit-identical
    results. NaN anywhere in a row's partials stays NaN; a shard whose columns are all −inf
    (m_r = −inf, s_r = 0) adds nothing.
    """
    m_r, s_r = gathered[..., _M], gathered[..., _S]
    m = m_r.amax(dim=0)
    # While the whole row is −inf, rescale against 0 instead of −inf (−inf − −inf is NaN), as the sweep does.
    m_ref = torch.where(m == -torch.inf, 0.0, m)
    scale = torch.exp(m_r - m_ref)
    owned_r = gathered[..., _OWNED]
    out = gathered.new_zeros(gathered.shape[1], len(PARTIALS))
    out[:, _M] = m
    out[:, _S] = (s_r * scale).sum(dim=0)
    out[:, _Z] = torch.where(owned_r != 0, gathered[..., _Z], 0.0).sum(dim=0)
    out[:, _OWNED] = owned_r.sum(dim=0)
    if gathered.shape[-1] > _BASE_K:
        shift = torch.where(s_r > 0, m_r - m_ref, 0.0)  # an empty shard has m_r = −inf and s_r = 0: no shift
        out[:, _U] = (scale * (gathered[..., _U] + shift * s_r)).sum(dim=0)
        out[:, _Q] = (scale * scale * gathered[..., _Q]).sum(dim=0)
    return out


def all_gather_partials(partials, group, need_entropy):
    """The one collective of a vocabulary-parallel forward: all-gather the (N, K) partials of every
    rank (K·4 bytes per row sent, W·K·4 gathered, K = 4 or 6 with the entropy) and combine them."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    send = partials if need_entropy else partials[:, :_BASE_K]
    send = send.contiguous()
    gathered = send.new_empty((world * send.shape[0], send.shape[1]))
    # all_gather_single is the newer name of all_gather_into_tensor (which recent torch deprecates)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, send, group=group)
    return combine_partials(gathered.view(world, *send.shape))


def check_ownership(combined, labels, ignore_index):
    """Every counted row's label must lie in exactly one rank's shard. Eager CPU calls raise a
    ValueError (after the collective, so every rank raises alike); where reading the counts would be
    a host synchronisation (CUDA, torch.compile) such rows are marked unowned: the head makes them NaN."""
    bad = (labels != ignore_index) & (combined[:, _OWNED] != 1)
    if label_check_reads_device(labels):
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels must lie in the vocabulary of the process group's shards or equal "
                             f"ignore_index={ignore_index}; label {int(labels[k])} is held by "
                             f"{int(combined[k, _OWNED])} ranks (check vocab_start_index)")
        return combined
    combined[:, _OWNED] = torch.where(bad, 0.0, combined[:, _OWNED])
    return combined


def forward_rows(backend, tp, logits3d, labels, advantages, old_logprobs, ref_logprobs, spec, ignore_index,
                 need_entropy, with_stats):
    """backend.forward_rows over a vocabulary shard: local sweep → one all-gather → the head on every rank.
    ``tp`` = (process group, this shard's first column)."""
    group, vocab_start = tp
    partials = backend.sweep_rows(logits3d, labels, spec, ignore_index, need_entropy, vocab_start)
    combined = check_ownership(all_gather_partials(partials, group, need_entropy), labels, ignore_index)
    return backend.head_rows(combined, labels, advantages, old_logprobs, ref_logprobs, spec, ignore_index,
                             need_entropy, with_stats)


def resolve_shard(process_group, vocab_start_index, shard_vocab):
    """(process_group, this rank's first global column): ``vocab_start_index``, or rank × V_r
    (Megatron's equal split); None without a group."""
    if process_group is None:
        if vocab_start_index is not None:
            raise ValueError("vocab_start_index is only meaningful with process_group (a vocabulary-parallel loss)")
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group is given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    if vocab_start_index is None:
        return process_group, dist.get_rank(process_group) * shard_vocab
    if isinstance(vocab_start_index, bool) or not isinstance(vocab_start_index, int) or vocab_start_index < 0:
        raise ValueError(f"vocab_start_index must be a non-negative int, got {vocab_start_index!r}")
    return process_group, vocab_start_index


def agree_on_min(value, group, device):
    """The smallest of an int chosen on each rank (one tiny all-reduce)."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())


def is_dtensor(x):
    """True for a DTensor, without importing torch.distributed.tensor when nobody has (then x cannot be one)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def unwrap_dtensor(logits, process_group, vocab_start_index):
    """(local logits, (group, first column), mesh) of logits that are a DTensor sharded on the
    vocabulary dimension over a 1-D mesh. ``to_local`` keeps the autograd link, so the gradient
    comes back as a DTensor with the same placements."""
    import torch.distributed.tensor as dt

    if process_group is not None or vocab_start_index is not None:
        raise ValueError("logits is a DTensor, which carries its own group and shard: leave process_group and "
                         "vocab_start_index as None")
    mesh, placements = logits.device_mesh, logits.placements
    vocab_dim = logits.dim() - 1
    if mesh.ndim != 1 or not isinstance(placements[0], dt.Shard) or placements[0].dim % logits.dim() != vocab_dim:
        raise ValueError(f"logits as a DTensor must be sharded on the vocabulary (last) dimension, Shard(-1), over "
                         f"a 1-D device mesh; got placements {placements} on a {mesh.ndim}-D mesh")
    local = logits.to_local()
    V, world, rank = logits.shape[-1], mesh.size(), mesh.get_local_rank()
    chunk = -(-V // world)  # Shard splits as torch.chunk does: ceil(V / W) columns per rank, the rest last
    start = min(rank * chunk, V)
    if local.shape[-1] != min(chunk, V - start):
        raise ValueError(f"logits' local shard has {local.shape[-1]} columns, expected {min(chunk, V - start)} "
                         f"(Shard(-1) of {V} over {world} ranks)")
    return local, (mesh.get_group(), start), mesh


def local_value(x):
    """A per-token argument given as a DTensor: its full (replicated) value as a plain tensor."""
    return x.full_tensor() if is_dtensor(x) else x


def wrap_replicated(x, mesh):
    """A result as PyTorch's loss_parallel returns it on a 1-D mesh: a DTensor replicated over ``mesh``."""
    import torch.distributed.tensor as dt

    return dt.DTensor.from_local(x, mesh, [dt.Replicate()], run_check=False)


def gather_sharded_head(hidden, weight, bias):
    """(weight, bias) of an LM head whose parameters are DTensors, as full plain tensors for the fused
    linear loss; plain tensors pass through.

    Under FSDP2 (``fully_shard``) the head's parameters, read outside the head's forward, are DTensors
    sharded on the vocabulary (Shard(0)), and ``hidden`` holds this rank's own sequences. Each such
    parameter is all-gathered here (``full_tensor``, as FSDP's own unshard) and its gradient is
    reduce-scattered back as the mean over the mesh's ranks (Partial("avg")), which is what FSDP2's
    default reduce-scatter gives every other parameter, so DDP's rule applies unchanged: with global
    counts, multiply the loss by the world size. Meshes of any rank (HSDP) with Shard(0) / Replicate
    placements are accepted; any other placement raises, as does a DTensor ``hidden``. (A plain
    ``weight.full_tensor()`` passed by the user would be silently wrong: its gradient would keep each
    rank's own rows of its own batch's gradient, unreduced.)
    """
    if not (is_dtensor(weight) or is_dtensor(bias)):
        if is_dtensor(hidden):
            raise ValueError("hidden is a DTensor but weight is not: pass hidden.to_local() (this rank's rows)")
        return weight, bias
    import torch.distributed.tensor as dt

    if is_dtensor(hidden):
        raise ValueError("hidden must be a plain tensor (this rank's hidden states) when weight is a DTensor; for a "
                         "vocabulary-parallel head pass the local rows of weight with process_group instead")
    gathered = []
    for name, t in (("weight", weight), ("bias", bias)):
        if is_dtensor(t):
            if any(not (p.is_replicate() or (p.is_shard() and p.dim == 0)) for p in t.placements):
                raise ValueError(f"{name} is a DTensor with placements {t.placements}; the fused linear loss gathers a "
                                 "head sharded on its rows (FSDP2's Shard(0)) or replicated: redistribute it to "
                                 f"those placements first ({name}.redistribute(...) keeps the gradient's path)")
            t = t.full_tensor(grad_placements=[dt.Partial("avg")] * t.device_mesh.ndim)
        gathered.append(t)
    return tuple(gathered)
