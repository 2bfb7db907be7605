"""The benchmark suite: timing, memory, traffic and static kernel reports, run side by side.

Every figure is a ratio against ours measured in the same run, or an absolute figure from a GPU.
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from bench import timing_worker
from bench.progress import Progress, log  # noqa: F401 - log: the suite's stderr, used by bench.__main__
from bench.variants import liger_available, make, step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(n, vocab, dtype, device):
    # drawn on the device itself: 16384 × 262144 logits would take the CPU tens of seconds
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(n, vocab, generator=g, device=device) * 2).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), generator=g, device=device)
    adv = torch.randn(n, generator=g, device=device)
    return logits, labels, adv


def _times(one, device, repeats):
    """Seconds per call of ``one`` (already warmed up): triton's do_bench on CUDA, else ``repeats``
    wall-clock timings."""
    if device == "cuda":
        import triton.testing
        return [t / 1e3 for t in triton.testing.do_bench(one, return_mode="all")]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    return times


def time_case(variant, n, vocab, dtype, device, repeats):
    """CUDA: times (seconds, triton's do_bench) of forward + backward after a warm-up call (compilation),
    and the peak memory of one more call beyond its inputs (torch.cuda.max_memory_allocated)."""
    fn = make(variant, "triton")
    logits, labels, adv = _inputs(n, vocab, dtype, device)
    step(fn, logits, labels, adv)
    times = _times(lambda: step(fn, logits, labels, adv), device, repeats)
    logits.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(fn, logits, labels, adv)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return times, {"peak_bytes": peak, "extra_bytes": peak - base}


def memory_case(variant, n, vocab, dtype, device, hidden_size=0):
    """Memory of one forward + backward in a fresh subprocess (bench.memory_worker)."""
    out = subprocess.run([sys.executable, "-m", "bench.memory_worker", variant, str(n), str(vocab),
                          str(dtype).replace("torch.", ""), device, str(hidden_size)], capture_output=True, text=True,
                         cwd=ROOT, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "memory worker failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_cases(cases, device, repeats):
    """cases: (variant, N, V, dtype). Returns one record per case; failures are recorded, not raised.

    CPU: the timings come from two fresh one-thread processes (``bench.timing_worker``, interleaved
    rounds), one with glibc's default allocator and one with heap allocations forced (its times in
    ``heap_times_s``; not for the float64 reference), then the memory from a fresh process per case."""
    timed = {}
    if device == "cpu":
        shapes = list(dict.fromkeys((n, vocab) for _, n, vocab, _ in cases))
        plan = [(n, vocab, [v for v, n2, v2, _ in cases if (n2, v2) == (n, vocab)]) for n, vocab in shapes]
        log(f"timing: {len(shapes)} shapes × their variants, glibc's default allocator (a fresh process) ...")
        for r in timing_worker.run(plan, repeats, label="default allocator "):
            timed[r["variant"], r["N"], r["V"]] = r
        log("timing again with heap allocations forced (a fresh process) ...")
        heap_plan = [(n, vocab, [v for v in vs if v != "reference"]) for n, vocab, vs in plan]
        for r in timing_worker.run(heap_plan, repeats, heap=True, label="heap forced "):
            timed[r["variant"], r["N"], r["V"]]["heap_times_s"] = r["times_s"]
    progress = Progress("memory" if device == "cpu" else "case", len(cases))
    records = []
    for variant, n, vocab, dtype in cases:
        rec = dict(variant=variant, N=n, V=vocab, dtype=str(dtype).replace("torch.", ""), device=device)

        def measure():
            if device == "cpu":
                t = timed[variant, n, vocab]
                if "error" in t:
                    raise RuntimeError(t["error"])
                # CPU: peak RSS of a fresh process per variant
                return t["times_s"], dict(memory_case(variant, n, vocab, dtype, device), threads=t["threads"],
                                          inner=t["inner"], heap_times_s=t.get("heap_times_s"))
            return time_case(variant, n, vocab, dtype, device, repeats)  # CUDA: memory measured in-process
        with progress.step(f"{variant} N={n} V={vocab} {rec['dtype']}"):
            _record(rec, device, measure)
        log(f"    {variant} N={n} V={vocab}: "
            + (f"min {rec['min_s'] * 1e3:.2f} ms, median {rec['median_s'] * 1e3:.2f} ms" if "median_s" in rec
               else rec.get("error", ""))
            + (f", extra memory {rec['extra_bytes'] / 2**20:.1f} MiB" if "extra_bytes" in rec else ""))
        records.append(rec)
    return records


def _record(rec, device, measure):
    """``measure()`` → (times, other fields) into ``rec`` as times_s / min_s / median_s / max_s and the
    fields, or its error (an OOM, a compile failure or a missing anchor is a result, not a crash)."""
    try:
        times, fields = measure()
        rec.update(times_s=times, min_s=min(times), median_s=statistics.median(times), max_s=max(times), **fields)
    except Exception as e:  # noqa: BLE001
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if device == "cuda":
        torch.cuda.empty_cache()


def linear_cases(quick, device):
    """Fused linear + LCO vs the projection followed by lco_loss: (variant, N, H, V, dtype)."""
    if device == "cuda":
        shape, dtype = ((4096, 4096, 151936) if quick else (16384, 4096, 151936)), torch.bfloat16
    else:
        shape, dtype = ((1024, 512, 32000) if quick else (4096, 1024, 65536)), torch.float32
    return [(v,) + shape + (dtype,) for v in ("fused-linear", "unfused-linear")]


def _time_linear(fn, n, hidden_size, vocab, dtype, device, repeats):
    """Times (seconds) of forward + backward of ``fn(hidden, weight, labels, advantages)`` after a warm-up."""
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, hidden_size, generator=g, device=device).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden_size, generator=g, device=device) / hidden_size ** 0.5).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), generator=g, device=device)
    adv = torch.randn(n, generator=g, device=device)

    def one():
        h.grad = w.grad = None
        fn(h, w, labels, adv).backward()
    one()
    return _times(one, device, repeats)


def run_linear(cases, device, repeats):
    from bench.variants import linear_variant
    progress = Progress("linear", len(cases))
    records = []
    for variant, n, hidden_size, vocab, dtype in cases:
        rec = dict(variant=variant, N=n, H=hidden_size, V=vocab, dtype=str(dtype).replace("torch.", ""), device=device)

        def measure():
            memory = memory_case(variant, n, vocab, dtype, device, hidden_size)
            fn = linear_variant(variant, "triton" if device == "cuda" else "torch")
            return _time_linear(fn, n, hidden_size, vocab, dtype, device, repeats), memory
        with progress.step(f"{variant} N={n} H={hidden_size} V={vocab} {rec['dtype']}: memory in a fresh process, "
                           f"then a warm-up and {repeats} timed calls"):
            _record(rec, device, measure)
        log(f"    {variant}: " + (f"median {rec['median_s'] * 1e3:.1f} ms, extra memory "
                                  f"{rec['extra_bytes'] / 2**20:.0f} MiB" if "median_s" in rec else rec.get("error", "")))
        records.append(rec)
    return records


def compiled_step_cases(quick, device):
    """A ``torch.compile(fullgraph=True)`` model step (embedding → linear → loss, forward + backward) with
    our loss, with our fused linear + loss (no logits), and with the plain PyTorch LCO: (variant, N, H, V),
    float32."""
    if device == "cuda":
        shape = (4096, 1024, 151936) if quick else (16384, 2048, 151936)
    else:
        shape = (256, 256, 32000) if quick else (1024, 512, 32000)
    return [(v,) + shape for v in ("compiled-ours", "compiled-ours-fused-linear", "compiled-plain")]


def _time_compiled_step(variant, n, hidden_size, vocab, device, repeats):
    from bench.variants import plain_lco
    from lco_kernels import fused_linear_lco_loss, lco_loss
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, hidden_size), torch.nn.Linear(hidden_size, vocab)).to(device)
    tokens = torch.randint(0, vocab, (n,), device=device)
    labels = torch.randint(0, vocab, (n,), device=device)  # none ignored: plain_lco's mean is over all tokens
    adv = torch.randn(n, device=device)
    backend = "triton" if device == "cuda" else "torch"
    embed, head = model
    if variant == "compiled-ours-fused-linear":
        def step(t, l, a):
            return fused_linear_lco_loss(embed(t), head.weight, l, a, bias=head.bias, backend=backend)
    else:
        loss_fn = (lambda z, l, a: lco_loss(z, l, a, backend=backend)) if variant == "compiled-ours" else plain_lco

        def step(t, l, a):
            return loss_fn(model(t), l, a)
    forward = torch.compile(step, fullgraph=True, dynamic=False)

    def one():
        model.zero_grad(set_to_none=True)
        forward(tokens, labels, adv).backward()
    one()  # compiles
    return _times(one, device, repeats)


def run_compiled_steps(cases, device, repeats):
    progress = Progress("compiled", len(cases))
    records = []
    for variant, n, hidden_size, vocab in cases:
        rec = dict(variant=variant, N=n, H=hidden_size, V=vocab, dtype="float32", device=device)

        def measure():
            return _time_compiled_step(variant, n, hidden_size, vocab, device, repeats), {}
        with progress.step(f"{variant} N={n} H={hidden_size} V={vocab}: compile, then {repeats} timed steps"):
            _record(rec, device, measure)
        log(f"    {variant}: " + (f"median {rec['median_s'] * 1e3:.1f} ms" if "median_s" in rec else rec.get("error", "")))
        records.append(rec)
    return records


def traffic_table():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-W", "ignore", "-m", "bench.traffic_worker"], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def tp_table(quick, repeats):
    """Vocabulary-parallel LCO on 2 gloo ranks vs one process (bench.tp_worker, fresh processes)."""
    n, vocab = (64, 32000) if quick else (256, 128256)
    out = subprocess.run([sys.executable, "-W", "ignore", "-m", "bench.tp_worker", str(n), str(vocab), "2",
                          str(repeats)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def static_report(quick):
    from lco_kernels.diagnostics import aot
    return aot.run_report(quick=quick)


def copy_bandwidth(device):
    """Device-to-device copy bandwidth in bytes/s (read + write), measured now."""
    import triton.testing
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def cpu_plan(quick):
    variants = ["ours", "ours-inplace", "eager", "torch.compile", "reference"]
    if quick:
        shapes = [(64, 32000)]
    else:
        shapes = [(256, 32000), (256, 128256), (256, 151936), (64, 32000), (1024, 32000)]
    # the float64 reference is a correctness anchor, seconds per call at the large shapes: the small one only
    return [(v, n, vocab, torch.float32) for n, vocab in shapes for v in variants
            if v != "reference" or n * vocab <= 64 * 32000]


def cuda_plan(quick):
    variants = ["ours", "ours-inplace", "torch.compile", "reference"]
    missing = liger_available()
    if missing is None:
        variants.append("liger-ce")
    else:
        log(f"liger-ce skipped: {missing}")
    vocabs = [32000, 128256, 151936, 262144]
    ns = [1024, 4096, 16384]
    if quick:
        vocabs, ns = [151936], [4096]
    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        for vocab in vocabs:
            for n in ns:
                for v in variants:
                    # the float64 reference materialises several N×V float64 tensors: keep it small
                    if v == "reference" and n * vocab > 4096 * 151936:
                        continue
                    cases.append((v, n, vocab, dtype))
    return cases


def cpu_name():
    """The processor's model name (Linux's /proc/cpuinfo, else ``platform.processor()``): ratios at small and
    medium shapes depend on it (the same torch build runs ``torch.exp`` at very different speeds on different
    processors, docs/performance.md), so every record names it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown processor"


def cpu_description():
    """``cpu_name()`` with the core count and the vector instructions torch's CPU kernels use here."""
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"


def environment():
    import triton
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT)
    cpu = cpu_description()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {cpu}"
    return dict(device=device, cpu=cpu, torch=torch.__version__, triton=triton.__version__,
                commit=(commit.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else ""),
                python=sys.version.split()[0], argv=sys.argv, time=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
