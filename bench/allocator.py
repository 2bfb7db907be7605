"""Eager PyTorch LCO vs ours on the CPU, with glibc's default allocation and with heap allocations forced.

    python -m bench.allocator [N V]     (default 1024 32000)

Each setting runs in a fresh process (the allocator reads its environment at start; ``bench.timing_worker``,
``HEAP`` there): forward + backward on one thread, 9 interleaved rounds after a warm-up, eager
(``bench.variants.plain_lco``) and ours (``lco_loss``, torch backend); figures are the minima.
"""
import sys

from bench import timing_worker


def main(argv):
    n, vocab = (int(argv[0]), int(argv[1])) if argv else (1024, 32000)
    for label, heap in (("glibc defaults", False), ("heap allocations forced", True)):
        best = {r["variant"]: min(r["times_s"]) for r in timing_worker.run([(n, vocab, ["eager", "ours"])], 9, heap=heap)}
        print(f"N={n} V={vocab} fp32, {label}: eager {best['eager'] * 1e3:.1f} ms, ours {best['ours'] * 1e3:.1f} ms, "
              f"eager ÷ ours {best['eager'] / best['ours']:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
