"""One forward + backward of one variant in a fresh process; prints its memory as JSON.

CPU: peak RSS (VmHWM, reset once the inputs exist) minus the RSS holding the inputs.
CUDA: torch.cuda.max_memory_allocated minus the memory holding the inputs.
Usage: python -m bench.memory_worker VARIANT N V DTYPE DEVICE [H]
  VARIANT: a logits-level variant of bench.variants, or "fused-linear" / "unfused-linear"
  (hidden (N, H) and weight (V, H) as inputs; H is then required), with "-frozen-head" appended for a
  weight that requires no gradient (a frozen LM head).
"""
import gc
import json
import sys

import torch

from bench.variants import FROZEN, linear_variant, make


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _inputs(n, vocab, dtype, device, hidden_size, frozen_head=False):
    torch.manual_seed(0)
    labels = torch.randint(0, vocab, (n,), device=device)
    adv = torch.randn(n, device=device)
    if hidden_size:
        hidden = torch.randn(n, hidden_size, device=device).to(dtype).requires_grad_(True)
        weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size ** 0.5).to(dtype)
        weight.requires_grad_(not frozen_head)
        return (hidden, weight), labels, adv
    logits = (torch.randn(n, vocab, device=device) * 2).to(dtype).requires_grad_(True)
    return (logits,), labels, adv


def main(variant, n, vocab, dtype, device, hidden_size=0):
    backend = "triton" if device == "cuda" else "torch"
    fn = linear_variant(variant, backend) if hidden_size else make(variant, backend)
    tensors, labels, adv = _inputs(n, vocab, getattr(torch, dtype), device, hidden_size, variant.endswith(FROZEN))

    def run(ts, lab, a):
        for t in ts:
            t.grad = None
        fn(*ts, lab, a).backward()

    # a warm-up on two rows keeps one-time costs (thread pools, torch.compile) out of the window
    small = [tensors[0][:2].detach().clone().requires_grad_(True)] + [
        t.detach().clone().requires_grad_(t.requires_grad) for t in tensors[1:]]
    run(small, labels[:2], adv[:2])
    del small
    inputs_bytes = sum(t.numel() * t.element_size() for t in tensors)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(tensors, labels, adv)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status("VmRSS")
        run(tensors, labels, adv)
        peak = _status("VmHWM")
    print(json.dumps({"peak_bytes": peak, "extra_bytes": peak - base, "inputs_bytes": inputs_bytes}))


if __name__ == "__main__":
    v, n, V, dt, dev = sys.argv[1:6]
    main(v, int(n), int(V), dt, dev, int(sys.argv[6]) if len(sys.argv) > 6 else 0)
