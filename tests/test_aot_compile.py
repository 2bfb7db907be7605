"""Every kernel configuration the API can launch compiles for sm_80 and sm_90 with zero spills (SPEC §3).

No GPU is needed: triton.compile with an explicit GPUTarget, then cuobjdump from the triton wheel.
"""
import os

import pytest
import torch

from helpers import make_inputs
from lco_kernels import cispo_loss, lco_loss, pg_loss, ppo_loss, sft_loss, triton_kernels
from lco_kernels.diagnostics import aot
from lco_kernels.diagnostics.traffic import count_traffic

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def report():
    return aot.run_report()


def test_launch_configs_cover_every_vocabulary():
    """Whatever V (up to 262,144 and beyond), launch_config picks one of the compiled configurations."""
    configs = set(triton_kernels.all_launch_configs())
    for V in list(range(1, 70000, 997)) + [151936, 152064, 256000, 262144, 1 << 20]:
        assert triton_kernels.launch_config(V) in configs


def test_every_sweep_configuration_compiled(report):
    expected = {(k, str(d).replace("torch.", ""), bv, nw, arch, aligned)
                for k in ("_policy_forward_kernel", "_policy_backward_kernel") for d in DTYPES
                for bv, nw in triton_kernels.all_launch_configs() for arch in ("sm_80", "sm_90")
                for aligned in (True, False)}
    got = {(r["kernel"], r["dtype"], r["BLOCK_V"], r["num_warps"], r["arch"], r["aligned"]) for r in report}
    assert expected <= got


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="launch constexprs are read by the interpreter")
def test_every_head_the_api_launches_is_compiled(report):
    """Run each public loss (with and without stats) and check its head variant is in the report."""
    logits, labels, adv = make_inputs((4,), 64)
    old = torch.zeros(4)
    calls = [lambda **k: sft_loss(logits, labels, **k), lambda **k: pg_loss(logits, labels, adv, **k),
             lambda **k: ppo_loss(logits, labels, adv, old, **k),
             lambda **k: ppo_loss(logits, labels, adv, old, dual_clip=3.0, **k),
             lambda **k: ppo_loss(logits, labels, adv, old, ref_logprobs=old, beta=0.1, **k),
             lambda **k: ppo_loss(logits, labels, adv, old, ref_logprobs=old, beta=0.1, dual_clip=2.0, **k),
             lambda **k: cispo_loss(logits, labels, adv, old, **k), lambda **k: lco_loss(logits, labels, adv, **k),
             lambda **k: lco_loss(logits, labels, adv, old_logprobs=old, **k)]
    compiled = {(r["head"], r["stats"]) for r in report if r["kernel"] == "_policy_forward_kernel"}
    heads = {(h[1], h[2], h[3], h[4]): h[0] for h in aot.HEADS}
    for call in calls:
        for stats in (False, True):
            with count_traffic() as launches:
                call(backend="triton", return_stats=stats)
            c = launches[0].constexprs
            head = heads[(c["LOSS"], c["HAS_OLD"], c["HAS_REF"], c["DUAL_CLIP"])]
            assert c["WITH_STATS"] == stats and (head, stats) in compiled


def test_no_spills(report):
    for r in report:
        assert r["spill_instructions"] == 0 and r["stack"] == 0 and r["local"] == 0, r
        assert 0 < r["registers"] <= 128, r


def test_row_offsets_are_64_bit(report):
    assert all(r["i64_row_offset"] for r in report)


def test_fp64_hyperparameters_compile_to_fp32_arithmetic(report):
    """torch.compile may pass Python floats as fp64: the kernel casts them and computes in fp32."""
    fp64 = [r for r in report if r.get("scalars") == "fp64"]
    assert len(fp64) == len(DTYPES) * 2
    assert not any(r["fp64_arithmetic"] for r in fp64)
    assert not any(r["fp64_arithmetic"] for r in report)


def test_aligned_loads_are_128_bit(report):
    """With 16-divisible pointers, strides and V (e.g. V = 151936) every kernel issues LDG.E.128."""
    for r in report:
        if r["aligned"]:
            assert r["ldg128"] > 0, r
