"""Eager PyTorch LCO vs ours on the CPU, with glibc's default allocation and with heap allocations forced.

    python -m bench.allocator [N V]     (default 1024 32000; README "Performance")

Each setting runs in a fresh process (the allocator reads its environment at start): forward + backward,
median of 9 after a warm-up, eager (``bench.variants.plain_lco``) and ours (``lco_loss``, torch backend).
"""
import os
import statistics
import subprocess
import sys

HEAP = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000"}


def measure(n, vocab):
    import torch

    from bench.suite import _times
    from bench.variants import plain_lco
    from lco_kernels import lco_loss
    torch.manual_seed(0)
    z = torch.randn(n, vocab, requires_grad=True)
    labels, adv = torch.randint(0, vocab, (n,)), torch.randn(n)
    medians = {}
    for name, fn in (("eager", plain_lco), ("ours", lambda *t: lco_loss(*t, backend="torch"))):
        def one():
            z.grad = None
            fn(z, labels, adv).backward()
        one()
        medians[name] = statistics.median(_times(one, "cpu", 9))
    return medians


def main(argv):
    n, vocab = (int(argv[0]), int(argv[1])) if argv else (1024, 32000)
    if os.environ.get("LCO_BENCH_ALLOCATOR_CHILD"):
        medians = measure(n, vocab)
        print(f"eager {medians['eager'] * 1e3:.1f} ms, ours {medians['ours'] * 1e3:.1f} ms, "
              f"eager ÷ ours {medians['eager'] / medians['ours']:.2f}")
        return
    for label, extra in (("glibc defaults", {}), ("heap allocations forced", HEAP)):
        env = dict(os.environ, LCO_BENCH_ALLOCATOR_CHILD="1", **extra)
        out = subprocess.run([sys.executable, "-m", "bench.allocator", str(n), str(vocab)], env=env,
                             capture_output=True, text=True, check=True)
        print(f"N={n} V={vocab} fp32, {label}: {out.stdout.strip()}")


if __name__ == "__main__":
    main(sys.argv[1:])
