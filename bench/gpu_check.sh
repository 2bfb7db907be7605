#!/usr/bin/env bash
# For a lent GPU: the tests on CUDA, then the benchmark suite; everything lands under $OUT.
# Needs only the machine's torch, triton and pytest: every other package is optional, and a part that
# needs a missing one is skipped and named in the summary (no network there: nothing is installed).
# Every part runs whatever an earlier one did (no -x); the last lines say which passed, failed or skipped.
# Budget: under 8 minutes on one H200. PYTEST_ARGS (default: tests) and BENCH_ARGS (default: none, e.g.
# --quick) narrow the two long parts, for a try-out of this script elsewhere.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
  | tee "$OUT/versions.txt"

echo "== optional packages (a missing one skips only what needs it) =="
python - <<'PY' 2>&1 | tee "$OUT/optional.txt"
import importlib.util
NEEDED_BY = {"hypothesis": "tests/test_properties.py", "trl": "the TRL integration and parity tests",
             "transformers": "the TRL integration tests", "peft": "the PEFT integration tests",
             "verl": "the verl integration and parity tests",
             "liger_kernel": "the Liger parity tests and the benchmark's Liger anchor",
             "matplotlib": "the benchmark's plots"}
for name, what in NEEDED_BY.items():
    print(f"{name:>13}: {'present' if importlib.util.find_spec(name) else 'missing, skips ' + what}")
PY

echo "== tests on CUDA =="
# -rs: the summary names every skipped test and its reason (a missing package, no second GPU, ...).
# One process: pytest.ini's addopts spread the CPU suite over two (pytest-xdist), a plugin this machine may lack.
timeout 300 python -m pytest -q -rs -p no:cacheprovider -o 'addopts=-m "not docs"' ${PYTEST_ARGS:-tests} 2>&1 | tee "$OUT/pytest.txt" | tail -40
tests_rc=${PIPESTATUS[0]}

echo "== CUDA graph: capture forward + backward once, replay on new inputs, compare with eager =="
timeout 120 python - <<'PY' 2>&1 | tee "$OUT/cuda_graph.txt"
import torch
from lco_kernels import fused_linear_lco_loss, lco_loss

if not torch.cuda.is_available():
    print("CUDA graph check: skipped, no GPU here")
    raise SystemExit(77)
torch.manual_seed(0)
N, H, V = 512, 256, 32000
dev = "cuda"
labels, adv = torch.randint(0, V, (N,), device=dev), torch.randn(N, device=dev)  # static inputs, refilled
cases = {  # name: (leaves, loss of the leaves)
    "lco_loss": ([(torch.randn(N, V, device=dev) * 2).requires_grad_(True)],
                 lambda z: lco_loss(z, labels, adv, backend="triton")),
    "fused_linear_lco_loss": ([torch.randn(N, H, device=dev, requires_grad=True),
                               (torch.randn(V, H, device=dev) / H ** 0.5).requires_grad_(True)],
                              lambda h, w: fused_linear_lco_loss(h, w, labels, adv, backend="triton")),
}
failed = []
for name, (leaves, fn) in cases.items():
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: Triton compiles, the allocator settles
        for _ in range(3):
            for leaf in leaves:
                leaf.grad = None
            fn(*leaves).backward()
    torch.cuda.current_stream().wait_stream(side)
    for leaf in leaves:
        leaf.grad = None  # the captured backward allocates them from the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a host synchronisation inside fails the capture
        loss = fn(*leaves)
        loss.backward()
    for seed in (1, 2):
        g = torch.Generator(device=dev).manual_seed(seed)
        with torch.no_grad():
            labels.copy_(torch.randint(0, V, (N,), generator=g, device=dev))
            labels[::7] = -100
            adv.copy_(torch.randn(N, generator=g, device=dev))
            for leaf in leaves:
                leaf.copy_(torch.randn(leaf.shape, generator=g, device=dev))
        graph.replay()
        replayed = [loss.detach().clone()] + [leaf.grad.clone() for leaf in leaves]
        fresh = [leaf.detach().clone().requires_grad_(True) for leaf in leaves]
        eager_loss = fn(*fresh)
        eager = [eager_loss.detach()] + list(torch.autograd.grad(eager_loss, fresh))
        err = max(float((r - e).abs().max() / e.abs().max().clamp(min=1e-30)) for r, e in zip(replayed, eager))
        print(f"{name}: replay {seed}: max difference to eager, relative to the largest element: {err:.2e}")
        if not err < 1e-5:
            failed.append(name)
print("CUDA graph check:", "FAILED " + ", ".join(failed) if failed else "ok")
raise SystemExit(1 if failed else 0)
PY
graph_rc=${PIPESTATUS[0]}

echo "== benchmark =="
timeout 300 python -m bench ${BENCH_ARGS:-} --out "$OUT/bench" 2>&1 | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}

echo "== summary =="
verdict() { case "$1" in 0) echo passed ;; 5) echo "no tests ran" ;; 77) echo "skipped (no GPU)" ;; 124) echo "timed out" ;; *) echo "failed (exit $1)" ;; esac; }
{
  echo "tests: $(verdict "$tests_rc"): $(grep -E '(passed|failed|skipped|error).* in [0-9.]+s' "$OUT/pytest.txt" | tail -1)"
  echo "CUDA graph: $(verdict "$graph_rc")"
  echo "bench: $(verdict "$bench_rc")"
  grep -E '^SKIPPED' "$OUT/pytest.txt" | sed 's/^/  skipped test: /'
  grep -E 'missing, skips' "$OUT/optional.txt" | sed 's/^ */  skipped part: /'
  grep -E 'plots skipped|not measured|not importable' "$OUT/bench.txt" | sed 's/^/  skipped in the bench: /'
} | tee "$OUT/status.txt"
[ "$tests_rc" = 0 ] && [ "$graph_rc" = 0 ] && [ "$bench_rc" = 0 ]
