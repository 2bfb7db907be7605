"""LCOGRPOTrainer with a PEFT LoRA adapter (TRL's ``peft_config``): the way RL fits on small hardware.

Skipped only when the "integrations" extra (which pins peft) is not installed; CI installs it.
"""
import math

import pytest
import torch

pytest.importorskip("trl")
peft = pytest.importorskip("peft")
from test_integrations_trl import captured_batch, config, grads, make, max_diff  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from lco_kernels.integrations.trl import LCOGRPOTrainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def lora(**overrides):
    """Adapters on the attention projections; the LM head stays frozen (not in target_modules)."""
    return peft.LoraConfig(**dict(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                       task_type="CAUSAL_LM"), **overrides))


def test_lco_with_lora_trains_fused_linear(tmp_path, monkeypatch):
    """policy_loss="lco" with fused_linear=True trains 3 steps: only the adapters move, the frozen LM head's
    weight gets no gradient and the fused loss allocates no V×H accumulator for it (the logits path is
    exercised by the parity test below)."""
    from lco_kernels import fused_linear as fl
    accumulators = []
    real_init = fl._Grads.__init__

    def spy(self, *args):
        real_init(self, *args)
        accumulators.append(self.weight_acc)
    monkeypatch.setattr(fl._Grads, "__init__", spy)
    trainer = make(LCOGRPOTrainer, tmp_path, cfg=config(tmp_path, max_steps=3), policy_loss="lco",
                   fused_linear=True, peft_config=lora())
    model = trainer.model
    assert isinstance(model, peft.PeftModel)
    head = model.get_output_embeddings().weight
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3 and all(math.isfinite(log["loss"]) and log["grad_norm"] > 0 for log in logs), logs
    changed = {k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])}
    trainable = {k for k, v in model.named_parameters() if v.requires_grad}
    assert changed == trainable and trainable and all("lora_" in k for k in trainable), changed
    assert not head.requires_grad and head.grad is None
    # the loss's gradients were formed (grad_hidden), never one for the head
    assert accumulators and all(acc is None for acc in accumulators)


@pytest.mark.parametrize("fused_linear", [False, True])
def test_ppo_with_lora_reproduces_stock_grpo(tmp_path, fused_linear):
    """policy_loss="ppo" with a LoraConfig gives stock GRPOTrainer's loss and adapter gradients (the same
    peft_config, non-zero initial adapters so every adapter matrix has a gradient) on a captured batch,
    off-policy."""
    cfg = config(tmp_path, bf16=False, num_iterations=2)
    torch.manual_seed(5)
    stock = make(GRPOTrainer, tmp_path, cfg=cfg, peft_config=lora(init_lora_weights=False))
    torch.manual_seed(5)
    ours = make(LCOGRPOTrainer, tmp_path, cfg=cfg, policy_loss="ppo", fused_linear=fused_linear,
                peft_config=lora(init_lora_weights=False))
    for (k, a), b in zip(stock.model.named_parameters(), ours.model.parameters()):
        assert torch.equal(a, b), k  # the same adapters
    inputs = captured_batch(stock, old_shift=0.3)
    for t in (stock, ours):
        t.model.train()
        t.current_gradient_accumulation_steps = 1
    loss_stock, g_stock = grads(stock, inputs)
    loss_ours, g_ours = grads(ours, inputs)
    assert set(g_ours) == set(g_stock) and all(g is not None for g in g_ours.values())
    abs_diff, rel_diff = max_diff(g_ours, g_stock)
    print(f"LoRA ppo fused_linear={fused_linear}: gradient max abs diff {abs_diff:.2e}, relative {rel_diff:.2e}")
    torch.testing.assert_close(loss_ours, loss_stock, rtol=1e-5, atol=1e-7)
    assert rel_diff < 1e-5
