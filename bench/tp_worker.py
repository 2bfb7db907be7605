"""Vocabulary-parallel LCO on CPU/gloo: prints one JSON line with, for ``world`` ranks each holding
V / world columns, the collectives per forward and per backward, the bytes each rank sends and
receives per row, and the time of one forward + backward per rank vs one process with the whole
vocabulary.

Each rank runs one thread (as each GPU of a tensor-parallel group is its own device); so does the
single process, timed on rank 0 while the other ranks wait. Collectives are counted by wrapping the
torch.distributed functions a loss could call, so anything the loss communicates is seen.
Usage: python -m bench.tp_worker N V WORLD REPEATS
"""
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object",
               "reduce_scatter", "reduce_scatter_tensor", "broadcast", "all_to_all", "all_to_all_single", "reduce")


def _count_collectives(log):
    """Wrap every collective of torch.distributed: each call appends (name, bytes sent, bytes received),
    counting the input as sent and the output (own part included) as received."""
    def wrap(name, fn):
        def counted(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            nbytes = [t.numel() * t.element_size() for t in tensors]
            # (output, input) for the *_into_tensor / *_single forms; one tensor (in place) otherwise
            log.append((name, nbytes[-1] if nbytes else 0, nbytes[0] if nbytes else 0))
            return fn(*args, **kwargs)
        return counted
    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))


def _times(step, repeats):
    step()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def _rank(rank, world, n, vocab, repeats, init_method, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    from lco_kernels import lco_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (n,), generator=g)
    adv = torch.randn(n, generator=g)
    v_r = vocab // world
    shard = logits[:, rank * v_r:(rank + 1) * v_r].clone().requires_grad_(True)
    single = None
    if rank == 0:
        whole = logits.clone().requires_grad_(True)
        single = _times(lambda: lco_loss(whole, labels, adv, backend="torch").backward(), repeats)
        del whole
    del logits
    dist.barrier()

    log = []
    _count_collectives(log)
    loss = lco_loss(shard, labels, adv, backend="torch", process_group=dist.group.WORLD)
    forward = list(log)
    loss.backward()
    backward = log[len(forward):]
    del log[:]

    def step():
        shard.grad = None
        lco_loss(shard, labels, adv, backend="torch", process_group=dist.group.WORLD).backward()
    times = [None] * world
    dist.all_gather_object(times, _times(step, repeats))
    if rank == 0:
        with open(out_path, "w") as f:
            # a step takes as long as its slowest rank; min as well as median: the CPU may be shared
            median_s = max(statistics.median(t) for t in times)
            min_s = max(min(t) for t in times)
            json.dump(dict(N=n, V=vocab, world=world, threads_per_rank=1, single_median_s=statistics.median(single),
                           single_min_s=min(single), rank_median_s=median_s, rank_min_s=min_s,
                           ratio_median=median_s / statistics.median(single), ratio_min=min_s / min(single),
                           forward_collectives=[c[0] for c in forward],
                           backward_collectives=[c[0] for c in backward],
                           sent_bytes_per_row=sum(c[1] for c in forward + backward) / n,
                           received_bytes_per_row=sum(c[2] for c in forward + backward) / n), f)
    dist.destroy_process_group()


def main(n, vocab, world, repeats):
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "tp.json")
        mp.spawn(_rank, args=(world, n, vocab, repeats, f"file://{tmp}/rendezvous", out_path), nprocs=world)
        with open(out_path) as f:
            return json.load(f)


if __name__ == "__main__":
    print(json.dumps(main(*(int(a) for a in sys.argv[1:5]))))
