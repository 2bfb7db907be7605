"""The ranks of tests/test_data_parallel.py's TRL cases: ``LCOGRPOTrainer`` on several CPU processes, as
torchrun runs it with ``use_cpu=True`` (accelerate's MULTI_CPU: DDP over gloo), each process with its own
prompts and samples. Run through ``tp_worker.run_cases`` ("trl_dp_worker:parity",
"trl_dp_worker:train"), spawned or under torchrun.
"""
import json
import math
import os

import torch
import torch.distributed as dist


def as_accelerate_launch(rank, world):
    """The environment torchrun gives each process (accelerate then finds the process group already
    initialised and joins it as MULTI_CPU)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")


# name: (GRPOConfig overrides, old-log-prob shift, fused_linear); ours runs policy_loss="ppo"
PARITY_CASES = {"dapo-default": ({}, None, False), "grpo-offpolicy": ({"loss_type": "grpo", "num_iterations": 2}, 0.3,
                                                                      False),
                "bnpo-offpolicy-fused": ({"loss_type": "bnpo", "num_iterations": 2}, 0.3, True)}


def parity(rank, world, out_dir):
    """On each process's own captured batch, ``LCOGRPOTrainer(policy_loss="ppo")`` and stock ``GRPOTrainer``
    with the same GRPOConfig, both models wrapped by the trainer's accelerator (DDP): the same loss and
    gradients after DDP's averaging.

    Then FSDP2 (accelerate does not shard on CPU: ``fully_shard`` by hand on the decoder layers, the LM head
    and the root) with ``fused_linear=True``, whose loss reads the LM head's weight as a DTensor sharded on
    the vocabulary: its gradients equal the DDP ones of the first case (the same batch). Stock GRPOTrainer
    under the same sharding is recorded too: TRL's fused LM head gathers the weight with a plain
    ``full_tensor()``, whose gradient is not reduced over the ranks."""
    as_accelerate_launch(rank, world)
    from test_integrations_trl import captured_batch, config, make, max_diff
    from trl import GRPOTrainer

    from lco_kernels.integrations.trl import LCOGRPOTrainer
    tmp = os.path.join(out_dir, f"rank{rank}")
    errors, reference = {}, None
    for name, (overrides, old_shift, fused_linear) in PARITY_CASES.items():
        cfg = config(tmp, bf16=False, **overrides)
        stock = make(GRPOTrainer, _path(out_dir), cfg=cfg)
        ours = make(LCOGRPOTrainer, _path(out_dir), cfg=cfg, policy_loss="ppo", fused_linear=fused_linear)
        assert stock.accelerator.num_processes == world and ours.accelerator.num_processes == world
        inputs = captured_batch(stock, old_shift, rank=rank)
        loss_stock, g_stock = _grads(stock, inputs, "ddp")
        loss_ours, g_ours = _grads(ours, inputs, "ddp")
        torch.testing.assert_close(loss_ours, loss_stock, rtol=1e-5, atol=1e-7)
        errors[name] = max_diff(g_ours, g_stock)[1]
        if reference is None:
            reference = (cfg, inputs, loss_stock, g_stock)
    cfg, inputs, loss_ddp, g_ddp = reference
    loss_fsdp, g_fsdp = _grads(make(LCOGRPOTrainer, _path(out_dir), cfg=cfg, policy_loss="ppo", fused_linear=True),
                               inputs, "fsdp2")
    torch.testing.assert_close(loss_fsdp, loss_ddp, rtol=1e-5, atol=1e-7)
    errors["dapo-fsdp2-fused vs DDP"] = max_diff(g_fsdp, g_ddp)[1]
    _, g_stock_fsdp = _grads(make(GRPOTrainer, _path(out_dir), cfg=cfg), inputs, "fsdp2")
    stock_fsdp = {k: max_diff({k: g_stock_fsdp[k]}, {k: g_ddp[k]})[1] for k in g_ddp}
    print(f"TRL, rank {rank}/{world}: gradient vs stock GRPOTrainer, max relative difference {errors}; stock "
          f"GRPOTrainer under FSDP2 vs DDP: largest {max(stock_fsdp.items(), key=lambda kv: kv[1])}", flush=True)
    assert max(errors.values()) < 1e-5, errors
    if rank == 0:
        with open(os.path.join(out_dir, "trl-parity.json"), "w") as f:
            json.dump({"ours": errors, "stock-fsdp2-vs-ddp": stock_fsdp}, f)


def _grads(trainer, inputs, wrap):
    """test_integrations_trl's ``grads`` on the trainer's model wrapped by its accelerator ("ddp") or by
    ``fully_shard`` ("fsdp2"), parameter names without the wrapper's prefix."""
    from test_integrations_trl import grads
    trainer.current_gradient_accumulation_steps = 1
    if wrap == "ddp":
        model = trainer.accelerator.prepare_model(trainer.model)
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel), type(model)
    else:
        model = trainer.model = _fully_shard(trainer.model)
    model.train()
    loss, g = grads(trainer, inputs, model)
    return loss, {k.removeprefix("module."): v for k, v in g.items()}


def _path(out_dir):
    """The directory ``make`` loads the tiny model from (``/tiny``), saved once by rank 0 for every process."""
    import pathlib
    path = pathlib.Path(out_dir) / "shared"
    if dist.get_rank() == 0 and not (path / "tiny").exists():
        from lco_kernels.integrations.tiny import tiny_model
        tiny_model().save_pretrained(path / "tiny")
    dist.barrier()
    return path


def _fully_shard(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model.lm_head, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def train(rank, world, out_dir, steps=3):
    """``LCOGRPOTrainer(policy_loss="lco", fused_linear=True)`` trains ``steps`` steps under DDP: finite losses and
    gradient norms, and every process ends with the same weights."""
    as_accelerate_launch(rank, world)
    from test_integrations_trl import config, make

    from lco_kernels.integrations.trl import LCOGRPOTrainer
    tmp = os.path.join(out_dir, f"train{rank}")
    trainer = make(LCOGRPOTrainer, _path(out_dir), cfg=config(tmp, max_steps=steps), policy_loss="lco",
                   fused_linear=True)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == steps, logs
    assert all(math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"]) and log["grad_norm"] > 0
               for log in logs), logs
    flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    assert all(torch.equal(everyone[0], other) for other in everyone[1:]), "the processes' weights diverged"
    print(f"TRL train, rank {rank}/{world}: {steps} steps, losses {[log['loss'] for log in logs]}", flush=True)
