"""One forward + backward of one variant in a fresh process; prints its memory as JSON.

CPU: peak RSS (VmHWM, reset after the inputs exist) minus the RSS holding the inputs.
CUDA: torch.cuda.max_memory_allocated minus the memory holding the inputs.
Usage: python -m bench.memory_worker VARIANT N V DTYPE DEVICE
"""
import gc
import json
import sys

import torch

from bench.variants import make, step


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(variant, n, vocab, dtype, device):
    torch.manual_seed(0)
    backend = "triton" if device == "cuda" else "torch"
    fn = make(variant, backend)
    logits = (torch.randn(n, vocab, device=device) * 2).to(getattr(torch, dtype)).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), device=device)
    adv = torch.randn(n, device=device)
    # a warm-up on two rows keeps one-time costs (thread pools, torch.compile) out of the window
    step(fn, logits[:2].detach().clone().requires_grad_(True), labels[:2], adv[:2])
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, logits, labels, adv)
        torch.cuda.synchronize()
        peak, extra = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status("VmRSS")
        step(fn, logits, labels, adv)
        peak = _status("VmHWM")
        extra = peak - base
    print(json.dumps({"peak_bytes": peak, "extra_bytes": extra, "inputs_bytes": logits.numel() * logits.element_size()}))


if __name__ == "__main__":
    v, n, V, dt, dev = sys.argv[1:6]
    main(v, int(n), int(V), dt, dev)
