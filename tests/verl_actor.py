"""verl 0.9.1's actor loss in float64, for the parity tests of the losses verl registers.

verl is a test dependency, installed by .ci/run (``pip install --no-deps verl==0.9.1`` and the few packages
its import needs); ``import lco_kernels`` never imports it, and the tests that do not compare with verl run
without it.
"""
import pytest
import torch

import reference

# our reduction -> verl's loss_agg_mode
VERL_MODES = {"mean": "token-mean", "seq-mean-token-mean": "seq-mean-token-mean",
              "seq-mean-token-sum": "seq-mean-token-sum", "seq-mean-token-sum-norm": "seq-mean-token-sum-norm"}


def verl_actor_loss(loss_mode, z, labels, adv, old, reduction="mean", *, temperature=1.0, eps=(0.2, 0.2), ref=None,
                    beta=0.0, kl_type="k3", entropy_coef=0.0, global_batch_info=None, **policy_loss):
    """verl's actor loss on float64 logits ``z`` (in an autograd graph): verl's own registered policy loss
    ``loss_mode`` (``policy_loss``: its PolicyLossConfig fields), plus β·KL (``reference.policy.kl_penalty``,
    verl's estimators) minus c·entropy, each aggregated with the same mode (``reference.aggregate``, verl's
    agg_loss), as verl's actor adds them. Masked positions of ``old`` / ``ref`` may hold anything."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig
    mode = VERL_MODES[reduction]
    cfg = FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=eps[0],
                          clip_ratio_high=eps[1], loss_agg_mode=mode,
                          policy_loss=PolicyLossConfig(loss_mode=loss_mode, **policy_loss),
                          global_batch_info=global_batch_info or {})
    logp = reference.token_logprobs(z / temperature, labels, -100)
    valid = labels != -100
    old64 = torch.where(valid, old.double(), 0.0)
    loss, _ = core_algos.get_policy_loss_fn(loss_mode)(old64, logp, adv.double().expand(labels.shape),
                                                        valid.double(), mode, cfg)
    if beta:
        kl = reference.policy.kl_penalty(logp, torch.where(valid, ref.double(), 0.0), kl_type)
        loss = loss + beta * reference.aggregate(kl, valid, reduction)
    if entropy_coef:
        loss = loss - entropy_coef * reference.aggregate(reference.policy.entropy(z / temperature), valid, reduction)
    return loss
