"""pytest-benchmark tests of the CPU paths: ``pytest bench/ --benchmark-only``.

Each group times one shape; within a group, ours, the plain PyTorch LCO and the float64
reference sit side by side in pytest-benchmark's table. Not part of the default test run.
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark (the bench extra) provides the benchmark fixture")
from bench.variants import make, step  # noqa: E402

SHAPES = [(256, 32000), (64, 151936)]
VARIANTS = ["ours", "ours-inplace", "eager", "reference"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n,vocab", SHAPES, ids=[f"N{n}-V{v}" for n, v in SHAPES])
def test_forward_backward(benchmark, variant, n, vocab):
    benchmark.group = f"forward+backward N={n} V={vocab} float32 CPU"
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, vocab, generator=g) * 2).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    adv = torch.randn(n, generator=g)
    fn = make(variant, "torch")
    benchmark.pedantic(step, args=(fn, logits, labels, adv), rounds=5, warmup_rounds=1)
    assert torch.isfinite(logits.grad).all()
