"""The traffic table: launches and bytes per N·V element of forward + backward, counted under the
Triton interpreter for each of our kernels and for Liger-Kernel's cross-entropy (the anchor).

Run with TRITON_INTERPRET=1 (bench.suite does); prints JSON rows.
"""
import json
import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("run with TRITON_INTERPRET=1: traffic is counted by the Triton interpreter")

import torch  # noqa: E402

import lco_kernels  # noqa: E402
from bench.variants import liger_available  # noqa: E402
from lco_kernels.diagnostics.aot import heads  # noqa: E402
from lco_kernels.diagnostics.traffic import count_traffic, summarize  # noqa: E402

N, V = 8, 5000


def ours_cases(adv, old, ref):
    """(name, loss function, its arguments after (logits, labels), its options) for every head of the
    loss registry."""
    for head in heads():
        args, options = head.arguments(adv, old, ref)
        yield head.name, getattr(lco_kernels, f"{head.loss}_loss"), args, options


def main():
    torch.manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        z = (torch.randn(N, V) * 2).to(dtype)
        labels = torch.randint(0, V, (N,))
        adv = torch.randn(N)
        old = torch.log_softmax(z.float(), -1).gather(1, labels[:, None])[:, 0] + 0.05 * torch.randn(N)
        for name, fn, args, options in ours_cases(adv, old, old - 0.1):
            for inplace in (False, True):
                for stats in (False, True):
                    x = z.clone().requires_grad_(True)
                    with count_traffic() as launches:
                        out = fn(x.view_as(x), labels, *args, **options, backend="triton",
                                 inplace_backward=inplace, return_stats=stats)
                        (out[0] if stats else out).backward()
                    rows.append(dict(kernel=f"ours: {name}", dtype=str(dtype)[6:], inplace=inplace, stats=stats,
                                     grad_output="any", **summarize(launches, N, V, z.element_size())))
        reason = liger_available()
        if reason:
            rows.append(dict(kernel="liger cross-entropy", dtype=str(dtype)[6:], skipped=reason))
            continue
        from bench.variants import liger_ce
        for grad_output in (1.0, 2.0):
            x = z.clone().requires_grad_(True)
            with count_traffic() as launches:
                liger_ce(x, labels, adv).backward(torch.tensor(grad_output))
            rows.append(dict(kernel="liger cross-entropy", dtype=str(dtype)[6:], inplace=True, stats=False,
                             grad_output=grad_output,
                             **summarize(launches, N, V, z.element_size(), vocab_args=("X_ptr",))))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
