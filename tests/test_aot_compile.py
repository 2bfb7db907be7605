"""Every kernel configuration the API can launch compiles for sm_80 and sm_90 with zero spills (SPEC §3).

No GPU is needed: triton.compile with an explicit GPUTarget, then cuobjdump from the triton wheel.
"""
import os

import pytest
import torch

from helpers import make_inputs
import lco_kernels
from lco_kernels import token_logprobs
from lco_kernels.diagnostics import aot
from lco_kernels.diagnostics.traffic import count_traffic
from lco_kernels.triton_backend import FUSED, HEAD, SWEEP, launch_config

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The launch configurations, written out: (BLOCK_V, num_warps).
CONFIGS = {(1024, 4), (2048, 4), (4096, 8)}


@pytest.fixture(scope="module")
def report():
    return aot.run_report()


@pytest.mark.parametrize("V,expected", [(1, (1024, 4)), (1000, (1024, 4)), (1024, (1024, 4)), (1025, (2048, 4)),
                                        (2048, (2048, 4)), (2049, (4096, 8)), (32000, (4096, 8)),
                                        (151936, (4096, 8)), (262144, (4096, 8)), (1 << 20, (4096, 8))])
def test_launch_config(V, expected):
    assert launch_config(V) == expected


def test_every_sweep_configuration_compiled(report):
    expected = {(k, str(d).replace("torch.", ""), bv, nw, arch, aligned)
                for k in ("_forward_kernel", "_backward_kernel") for d in DTYPES
                for bv, nw in CONFIGS for arch in ("sm_80", "sm_90") for aligned in (True, False)}
    got = {(r["kernel"], r["dtype"], r["BLOCK_V"], r["num_warps"], r["arch"], r["aligned"]) for r in report}
    assert expected <= got
    modes = {r.get("mode", FUSED) for r in report if r["kernel"] == "_forward_kernel"}
    assert modes == {FUSED, SWEEP, HEAD}
    assert any(r.get("entropy") for r in report if r["kernel"] == "_backward_kernel")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="launch constexprs are read by the interpreter")
def test_every_head_the_api_launches_is_compiled(report):
    """Run each public loss with each head's options (with and without stats) and check the variant it
    launches is in the report."""
    logits, labels, adv = make_inputs((4,), 64)
    old = torch.zeros(4)
    compiled = {(r["head"], r["stats"]) for r in report if r["kernel"] == "_forward_kernel"}
    keys = list(aot.heads()[0].constexprs())
    by_constexprs = {tuple(h.constexprs().values()): h.name for h in aot.heads()}
    for h in aot.heads():
        args, options = h.arguments(adv, old, old - 0.5)
        for stats in (False, True):
            with count_traffic() as launches:
                getattr(lco_kernels, f"{h.loss}_loss")(logits, labels, *args, **options, backend="triton",
                                                       return_stats=stats)
            c = launches[0].constexprs
            assert by_constexprs[tuple(c[k] for k in keys)] == h.name
            assert c["WITH_STATS"] == stats and (h.name, stats) in compiled
    with count_traffic() as launches:
        token_logprobs(logits.requires_grad_(True), labels, return_entropy=True, backend="triton")[1].sum().backward()
    assert launches[1].constexprs["HAS_ENTROPY"]


def test_no_spills(report):
    for r in report:
        assert r["spill_instructions"] == 0 and r["stack"] == 0 and r["local"] == 0, r
        assert 0 < r["registers"] <= 128, r


def test_row_offsets_are_64_bit(report):
    assert all(r["i64_row_offset"] for r in report)


def test_fp64_hyperparameters_compile_to_fp32_arithmetic(report):
    """torch.compile may pass Python floats as fp64: the kernel casts them and computes in fp32."""
    fp64 = [r for r in report if r.get("scalars") == "fp64"]
    assert len(fp64) == len(DTYPES) * 2 * 2  # forward and backward, each dtype, sm_80 and sm_90
    assert not any(r["fp64_arithmetic"] for r in fp64)
    assert not any(r["fp64_arithmetic"] for r in report)


def test_aligned_loads_are_128_bit(report):
    """With 16-divisible pointers, strides and V (e.g. V = 151936) every kernel issues LDG.E.128."""
    for r in report:
        if r["aligned"] and r.get("mode") != HEAD:  # head-only launches read no logits
            assert r["ldg128"] > 0, r
