"""Interleaved timing of forward + backward, in a fresh process: the allocator, the thread count and
the compile caches are the worker's own.

    python -m bench.timing_worker SPEC_JSON        (prints one JSON line: the records)

SPEC: {"device": "cpu" | "cuda", "threads": int, "repeats": int, "target_s": float,
       "shapes": [[N, V, [variant, ...]], ...],   (variants: names of ``bench.variants.make``)
       "parts": ["step" | "forward" | "backward", ...],   (optional; default ["step"], see ``PARTS``)
       "padded": bool}   (optional; the last N / 8 labels are padding, -100, as at a sequence's end)

Per shape, every variant is warmed up (four calls; ``torch.compile`` compiles in the first), then
timed in ``repeats`` rounds; each round times every variant once, in an order rotated from round to
round, so that a slow spell of a shared machine hits all of them alike. A timing is the mean of
``inner`` back-to-back calls, ``inner`` chosen from the warm-up so that one timing lasts about
``target_s`` (small shapes take microseconds, below a single timer read's noise). Glibc reads its
allocator settings (``MALLOC_MMAP_THRESHOLD_``, ...) at start: ``run`` passes them in the environment.
Progress (shape k of n, elapsed, an estimate of what is left) goes to stderr.
"""
import json
import os
import subprocess
import sys
import time

import torch

from bench.progress import Progress, log
from bench.variants import make, step

# glibc's allocator with heap allocations forced: N×V temporaries come from the heap, reused from call
# to call, instead of freshly mapped (and faulted in) pages above the mmap threshold (32 MiB at most)
HEAP = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# what a timing covers: one forward + backward; the forward alone (its graph dropped); the backward alone,
# again and again through one forward's graph (kept with retain_graph)
PARTS = ("step", "forward", "backward")


def run(shapes, repeats, *, device="cpu", threads=1, heap=False, target_s=0.01, label="timing", parts=("step",),
        padded=False):
    """Records (variant, part, N, V, times_s, inner, ...) from a fresh worker process; ``heap`` forces heap
    allocations (``HEAP``); ``parts`` (of ``PARTS``) what each variant is timed doing; ``padded``: the last N / 8
    labels are padding. The worker's progress lines pass through to this process's stderr."""
    spec = dict(device=device, threads=threads, repeats=repeats, target_s=target_s, label=label,
                shapes=[[n, v, list(variants)] for n, v, variants in shapes], parts=list(parts), padded=padded)
    env = dict(os.environ, **(HEAP if heap else {}))
    out = subprocess.run([sys.executable, "-W", "ignore", "-m", "bench.timing_worker", json.dumps(spec)],
                         stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"timing worker exited with {out.returncode} (its stderr is above)")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(one, inner, device):
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        one()
    _sync(device)
    return (time.perf_counter() - t0) / inner


def measure(spec):
    torch.set_num_threads(spec["threads"])
    device, backend = spec["device"], ("triton" if spec["device"] == "cuda" else "torch")
    records, shapes = [], spec["shapes"]
    progress = Progress(spec.get("label", "timing").strip(), len(shapes))
    for n, vocab, variants in shapes:
        compiles = " (torch.compile may compile here)" if "torch.compile" in variants else ""
        with progress.step(f"N={n} V={vocab}: warm-up{compiles}, then {spec['repeats']} rounds of "
                           f"{', '.join(variants)}"):
            recs = _shape(spec, n, vocab, variants, device, backend)
        log("    " + ", ".join(f"{_name(*key)} {min(r['times_s']) * 1e6:.0f} µs" if r["times_s"]
                               else f"{_name(*key)} {r.get('error', 'no timing')}" for key, r in recs.items()))
        records += recs.values()
    return records


def _shape(spec, n, vocab, variants, device, backend):
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(n, vocab, generator=g, device=device) * 2).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), generator=g, device=device)
    padded = spec.get("padded", False)
    if padded:
        labels[-max(1, n // 8):] = -100
    adv = torch.randn(n, generator=g, device=device)
    calls, recs = {}, {}
    for name in variants:
        for part in spec.get("parts", ["step"]):
            key = (name, part)
            rec = recs[key] = dict(variant=name, part=part, N=n, V=vocab, dtype="float32", device=device,
                                   threads=spec["threads"], padded=padded, times_s=[])
            try:
                fn = make(name, backend, padded)
                # in place, the gradient overwrites the logits: that variant gets a copy of its own
                z = logits.detach().clone().requires_grad_(True) if name == "ours-inplace" else logits
                one = calls[key] = _call(part, fn, z, labels, adv)
                one()  # compiles (torch.compile), fills caches, settles the allocator
                warm = min(_timed(one, 1, device) for _ in range(3))
                rec["inner"] = max(1, min(1000, round(spec["target_s"] / max(warm, 1e-7))))
            except Exception as e:  # noqa: BLE001 - a variant that cannot run is a result, not a crash
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                calls.pop(key, None)
    order = list(calls)
    for r in range(spec["repeats"]):
        for key in order[r % len(order):] + order[:r % len(order)] if order else ():
            recs[key]["times_s"].append(_timed(calls[key], recs[key]["inner"], device))
    return recs


def _call(part, fn, z, labels, adv):
    """What one timing of ``part`` (see ``PARTS``) calls."""
    if part == "step":
        return lambda: step(fn, z, labels, adv)
    if part == "forward":
        return lambda: fn(z, labels, adv)
    if part != "backward":
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    loss = fn(z, labels, adv)

    def backward():
        z.grad = None
        loss.backward(retain_graph=True)
    return backward


def _name(variant, part):
    return variant if part == "step" else f"{variant} {part}"


def main(argv):
    spec = json.loads(argv[0])
    print(json.dumps(measure(spec)))


if __name__ == "__main__":
    main(sys.argv[1:])
