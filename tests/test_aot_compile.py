"""Every kernel configuration the API can launch compiles for sm_80 and sm_90 with zero spills (SPEC §3).

No GPU is needed: triton.compile with an explicit GPUTarget, then cuobjdump from the triton wheel.
"""
import pytest
import torch

from lco_kernels import triton_kernels
from lco_kernels.diagnostics import aot

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def report():
    return aot.run_report()


def test_launch_configs_cover_every_vocabulary():
    """Whatever V (up to 262,144 and beyond), launch_config picks one of the compiled configurations."""
    for dtype in DTYPES:
        configs = set(triton_kernels.all_launch_configs(dtype))
        for V in list(range(1, 70000, 997)) + [151936, 152064, 256000, 262144, 1 << 20]:
            assert triton_kernels.launch_config(V, dtype) in configs


def test_every_configuration_compiled(report):
    expected = {(k, str(d).replace("torch.", ""), bv, nw, arch, aligned)
                for k in ("_lco_forward_kernel", "_lco_backward_kernel") for d in DTYPES
                for bv, nw in triton_kernels.all_launch_configs(d) for arch in ("sm_80", "sm_90")
                for aligned in (True, False)}
    got = {(r["kernel"], r["dtype"], r["BLOCK_V"], r["num_warps"], r["arch"], r["aligned"]) for r in report}
    assert got == expected


def test_no_spills(report):
    for r in report:
        assert r["spill_instructions"] == 0 and r["stack"] == 0 and r["local"] == 0, r
        assert 0 < r["registers"] <= 128, r


def test_row_offsets_are_64_bit(report):
    assert all(r["i64_row_offset"] for r in report)


def test_aligned_loads_are_128_bit(report):
    """With 16-divisible pointers, strides and V (e.g. V = 151936) every kernel issues LDG.E.128."""
    for r in report:
        if r["aligned"]:
            assert r["ldg128"] > 0, r
