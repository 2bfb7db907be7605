"""Data parallelism (spawned gloo ranks on CPU): DDP and FSDP2 steps with the losses, each rank holding its
own sequences and passing global counts, against one process on the concatenated batch (tests/dp_worker.py)."""
import json

import pytest
from helpers import spawn


def test_ddp_and_fsdp2_two_ranks_equal_one_process(tmp_path):
    """lco_loss, ppo_loss and fused_linear_lco_loss under DDP, and under FSDP2 with the fused-linear loss
    reading the sharded LM head, for "mean" and each "seq-*" reduction: one process's gradients."""
    spawn(tmp_path, 2, ("dp_worker:ddp", [str(tmp_path)]), ("dp_worker:fsdp", [str(tmp_path)]))
    for tag in ("ddp", "fsdp"):
        errors = json.loads((tmp_path / f"{tag}.json").read_text())
        assert errors and max(errors.values()) < 1e-5, errors


def test_trl_two_processes(tmp_path):
    """LCOGRPOTrainer under accelerate's MULTI_CPU (DDP, 2 processes): policy_loss="ppo" gives stock
    GRPOTrainer's gradients, and under FSDP2 with fused_linear=True the DDP ones; policy_loss="lco" with
    fused_linear=True trains 3 steps. Skipped only without the "integrations" extra; CI installs it."""
    pytest.importorskip("trl")
    spawn(tmp_path, 2, ("trl_dp_worker:parity", [str(tmp_path)]), ("trl_dp_worker:train", [str(tmp_path)]))
    errors = json.loads((tmp_path / "trl-parity.json").read_text())["ours"]
    assert len(errors) == 4 and max(errors.values()) < 1e-5, errors
