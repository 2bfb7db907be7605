"""The fixed cost per call: forward + backward at small and medium shapes, where host work (validation,
op dispatch, the per-row head) weighs as much as the arithmetic.

    python -m bench.fixed_cost [--repeats R] [--threads T] [--shapes 8x64,64x1024] [--no-compile] [--apart]
                               [--padded]
                                                        (also the first section of ``python -m bench``)

µs per forward + backward of ``lco_loss``, ``sft_loss``, plain LCO, ``F.cross_entropy`` and
``torch.compile`` of plain LCO at 8 × 64, 64 × 1024 and 256 × 4096 (float32), timed in one fresh
process (``bench.timing_worker``: interleaved rounds, one thread on a CPU by default); every ratio
is between minima of the same run.

``--apart`` also times each call's forward alone and its backward alone (through one kept graph) beside
the two in turn, without ``torch.compile``: where the two in turn take longer than their sum, the
difference is what running one right after the other costs (the host code of both passes in the
processor's caches and predictors at once), not arithmetic.

``--padded`` makes the last N / 8 labels padding (-100), as at the end of a sequence: what an SFT or RL
trainer's batches hold. The plain PyTorch LCO then masks them (``bench.variants.plain_lco_padded``).
"""
import argparse
import os
import sys

SHAPES = [(8, 64), (64, 1024), (256, 4096)]
VARIANTS = ["ours", "eager", "torch.compile", "ours-sft", "cross-entropy"]
REPEATS = 21


def run(repeats=REPEATS, device="cpu", threads=1, shapes=SHAPES, variants=VARIANTS, parts=("step",), padded=False):
    from bench import timing_worker
    return timing_worker.run([(n, v, variants) for n, v in shapes], repeats, device=device, threads=threads,
                             label="fixed cost ", parts=parts, padded=padded)


def main(argv=None):
    import torch

    from bench import report, suite
    parser = argparse.ArgumentParser(prog="python -m bench.fixed_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"timed rounds (default {REPEATS})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the worker (default 1)")
    parser.add_argument("--shapes", default=",".join(f"{n}x{v}" for n, v in SHAPES),
                        help="N×V shapes, comma-separated (default %(default)s)")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out torch.compile of plain LCO (its compilation takes the most time)")
    parser.add_argument("--apart", action="store_true",
                        help="also time the forward alone and the backward alone (implies --no-compile)")
    parser.add_argument("--padded", action="store_true",
                        help="the last N / 8 labels are padding (-100), as at the end of a sequence")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
    variants = [v for v in VARIANTS if not ((args.no_compile or args.apart) and v == "torch.compile")]
    parts = ("step", "forward", "backward") if args.apart else ("step",)
    load = os.getloadavg()
    records = run(args.repeats, device, args.threads, shapes, variants, parts, args.padded)
    env = suite.environment()
    print(f"`python -m bench.fixed_cost {' '.join(sys.argv[1:] if argv is None else argv)}` · {env['device']} · "
          f"torch {env['torch']} · commit {env['commit']}\n")
    print(report.fixed_cost_header(device, args.threads, args.repeats, load, os.getloadavg(), variants, args.padded))
    steps = [r for r in records if r["part"] == "step"]
    print(report.fixed_cost_table(steps))
    if args.apart:
        print("\n" + report.fixed_cost_apart_table(records))
    return 1 if any("error" in r and r["variant"] in ("ours", "ours-sft") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
