"""The ranks of tests/test_data_parallel.py: data parallelism, each rank holding its own sequences, against
one process on the concatenated batch, which every rank recomputes from the same seed. Run through
``tp_worker.run_cases`` (cases "dp_worker:ddp", "dp_worker:fsdp", ...), spawned or under torchrun.

The rule checked: each rank passes the global normaliser (``token_count`` for "mean", ``seq_count`` for
the "seq-*" reductions, all-reduced from the ranks' local counts) and multiplies its loss by the world
size, because DDP and FSDP2 average the ranks' gradients; the parameters' gradients are then one
process's.
"""
import json
import os

import torch
import torch.distributed as dist

import lco_kernels

V, H, T = 32, 8, 5
SPLIT = (1, 3)  # sequences per rank: uneven, so local counts differ from the global ones
REDUCTIONS = ("mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


class TinyLM(torch.nn.Module):
    """Embedding → tanh(linear) → LM head (no bias): ``forward(ids)`` gives logits, ``forward(ids,
    logits=False)`` the last hidden states, for a fused-linear loss reading ``lm_head.weight``."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, H)
        self.body = torch.nn.Linear(H, H)
        self.lm_head = torch.nn.Linear(H, V, bias=False)

    def forward(self, ids, logits=True):
        hidden = torch.tanh(self.body(self.embed(ids)))
        return self.lm_head(hidden) if logits else hidden


def batch(seed):
    """The concatenated batch: ids, labels (some ignored, more on the first rank's rows), advantages,
    old log-probs."""
    g = torch.Generator().manual_seed(seed)
    n = sum(SPLIT)
    ids = torch.randint(0, V, (n, T), generator=g)
    labels = torch.randint(0, V, (n, T), generator=g)
    labels[0, 2:] = -100
    labels[torch.rand(n, T, generator=g) < 0.15] = -100
    adv = torch.randn(n, T, generator=g) * 2
    old = -torch.rand(n, T, generator=g) * 4 - 1.5  # p_old below the policy's: PPO's clip engages on some tokens
    return ids, labels, adv, old


def loss_of(model, name, ids, labels, adv, old, head_weight, **counts):
    """One of the losses a data-parallel step runs; ``head_weight()`` reads the LM head's weight after the
    forward (for the fused-linear loss)."""
    kw = dict(backend="torch", **counts)
    if name == "fused":
        hidden = model(ids, logits=False)
        return lco_kernels.fused_linear_lco_loss(hidden, head_weight(), labels, adv, old_logprobs=old, chunk_size=3,
                                                 **kw)
    logits = model(ids)
    if name == "ppo":
        return lco_kernels.ppo_loss(logits, labels, adv, old, **kw)
    return lco_kernels.lco_loss(logits, labels, adv, old_logprobs=old, **kw)


def global_counts(labels, reduction, world):
    """The normaliser the user all-reduces: valid tokens for "mean", sequences for "seq-*"."""
    local = (labels != -100).sum() if reduction == "mean" else torch.tensor(labels.shape[0])
    dist.all_reduce(local)
    return {"token_count" if reduction == "mean" else "seq_count": local.float()}


def step(wrapped, plain, name, reduction, rank, world, seed, head_weight):
    """One data-parallel backward of ``wrapped`` (DDP or FSDP2 around this rank's model) and one
    single-process backward of ``plain`` on the whole batch; the largest gradient difference relative
    to the largest gradient."""
    ids, labels, adv, old = batch(seed)
    reference = loss_of(plain, name, ids, labels, adv, old, lambda: plain.lm_head.weight, reduction=reduction)
    reference.backward()
    lo = sum(SPLIT[:rank])
    mine = slice(lo, lo + SPLIT[rank])
    ids, labels, adv, old = ids[mine], labels[mine], adv[mine], old[mine]
    loss = loss_of(wrapped, name, ids, labels, adv, old, head_weight, reduction=reduction,
                   **global_counts(labels, reduction, world))
    (loss * world).backward()  # DDP / FSDP2 average the ranks' gradients: the world size undoes it
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, reference.detach(), rtol=1e-5, atol=1e-7)
    worst, scale = 0.0, 0.0
    for (key, p), q in zip(wrapped.named_parameters(), plain.parameters()):
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        torch.testing.assert_close(grad, q.grad, rtol=1e-5, atol=1e-6 * float(q.grad.abs().max()),
                                   msg=lambda m: f"{key} [{name} {reduction} rank {rank}/{world}]: {m}")
        worst, scale = max(worst, float((grad - q.grad).abs().max())), max(scale, float(q.grad.abs().max()))
    return worst / scale


def fresh(seed):
    torch.manual_seed(seed)
    return TinyLM()


def report(rank, out_dir, tag, errors):
    print(f"{tag}, rank {rank}: largest gradient difference from one process, relative {errors}", flush=True)
    if rank == 0:
        with open(os.path.join(out_dir, f"{tag}.json"), "w") as f:
            json.dump(errors, f)


def ddp(rank, world, out_dir):
    """DDP around the tiny model: lco_loss and ppo_loss on its logits, fused_linear_lco_loss on its hidden
    states and ``lm_head.weight``, for "mean" and each "seq-*" reduction."""
    from torch.nn.parallel import DistributedDataParallel
    errors = {}
    for k, (name, reduction) in enumerate((n, r) for n in ("lco", "ppo", "fused") for r in REDUCTIONS):
        model = DistributedDataParallel(fresh(k))
        errors[f"{name} {reduction}"] = step(model, fresh(k), name, reduction, rank, world, 100 + k,
                                             lambda: model.module.lm_head.weight)
    report(rank, out_dir, "ddp", errors)


def fsdp(rank, world, out_dir):
    """FSDP2 (fully_shard on the body, the LM head and the root) around the tiny model: the losses on its
    logits, and the fused-linear loss reading ``lm_head.weight`` outside the head's forward, where it is a
    DTensor sharded on the vocabulary (gathered by the library); then with the head in the root's group,
    whose weight the root's forward leaves unsharded. Placements it cannot gather raise."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard
    mesh = init_device_mesh("cpu", (world,))
    errors = {}
    cases = [(n, r, True) for n in ("lco", "fused") for r in REDUCTIONS] + [("ppo", "mean", True),
                                                                             ("fused", "mean", False)]
    for k, (name, reduction, shard_head) in enumerate(cases):
        model = fresh(k)
        fully_shard(model.body, mesh=mesh)
        if shard_head:
            fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)

        def head_weight():
            weight = model.lm_head.weight
            assert isinstance(weight, DTensor) == shard_head, type(weight)
            return weight
        errors[f"{name} {reduction}{'' if shard_head else ' head in root'}"] = step(
            model, fresh(k), name, reduction, rank, world, 200 + k, head_weight)
    by_columns = DTensor.from_local(torch.randn(V, H // world), mesh, [Shard(1)])
    by_rows = DTensor.from_local(torch.randn(V // world, H), mesh, [Shard(0)])
    hidden, labels, adv = torch.randn(2, H), torch.randint(0, V, (2,)), torch.randn(2)
    for h, weight, kwargs, needle in (
            (hidden, by_columns, {}, "Shard(0)"),
            (hidden, by_rows, {"process_group": dist.group.WORLD}, "process_group"),
            (DTensor.from_local(hidden, mesh, [Replicate()]), by_rows, {}, "plain tensor")):
        try:
            lco_kernels.fused_linear_lco_loss(h, weight, labels, adv, **kwargs)
        except ValueError as e:
            assert needle in str(e), str(e)
        else:
            raise AssertionError(f"accepted: {needle}")
    report(rank, out_dir, "fsdp", errors)
