"""LCOGRPOTrainer inside the real TRL GRPOTrainer (CPU, a tiny random Qwen2, no download).

Skipped only when the "integrations" extra is not installed; CI installs it.
"""
import math

import pytest
import torch

trl = pytest.importorskip("trl")
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import lco_kernels  # noqa: E402
from lco_kernels.integrations.tiny import prompt_dataset, tiny_model, tiny_tokenizer, toy_reward  # noqa: E402
from lco_kernels.integrations.trl import LCOGRPOTrainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def config(tmp_path, **overrides):
    """TRL's defaults (bf16 autocast included) on a tiny run; parity tests pass bf16=False."""
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                max_steps=2, learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True,
                save_strategy="no", seed=0, disable_tqdm=True)
    base.update(overrides)
    return GRPOConfig(**base)


def make(cls, tmp_path, cfg=None, **kwargs):
    """A trainer on the tiny model saved to a local directory, passed by path as a user passes a model name
    (with beta > 0 TRL loads the reference model from it too). Every call gets the same initial weights."""
    path = tmp_path / "tiny"
    if not path.exists():
        tiny_model().save_pretrained(path)
    return cls(model=str(path), reward_funcs=toy_reward, args=cfg or config(tmp_path), train_dataset=prompt_dataset(),
               processing_class=tiny_tokenizer(), **kwargs)


TRAIN_CONFIGS = {"gspo": {"importance_sampling_level": "sequence"},
                 "trl": {"top_entropy_quantile": 0.2, "off_policy_mask_threshold": 0.1, "delta": 4.0}}


@pytest.mark.parametrize("policy_loss, fused_linear", [
    (loss, fused) for loss in ("lco", "ppo", "pg", "cispo", "gspo") for fused in (False, True)] + [("trl", False)])
def test_trains_a_few_steps(tmp_path, policy_loss, fused_linear):
    cfg = config(tmp_path, **TRAIN_CONFIGS[policy_loss]) if policy_loss in TRAIN_CONFIGS else None
    trainer = make(LCOGRPOTrainer, tmp_path, cfg=cfg, policy_loss=policy_loss, fused_linear=fused_linear)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert len(steps) == 2
    for log in steps:
        assert math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"]) and log["grad_norm"] > 0
        for name in ("entropy", "lco/token_prob", "lco/logit_grad_norm"):
            assert math.isfinite(log[name]), name
        assert 0 < log["lco/token_prob"] < 1 and log["entropy"] > 0 and log["lco/logit_grad_norm"] > 0
        if policy_loss == "lco":
            assert 0 <= log["lco/clamped_frac"] <= 1 and 0 < log["lco/target_prob"] <= 1
        if policy_loss in ("ppo", "cispo", "gspo", "trl"):
            assert log["clip_ratio/region_mean"] == 0.0  # on-policy: the ratio is exactly 1
    changed = [k for k, v in trainer.model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert "lm_head.weight" in changed and len(changed) == len(before)


def captured_batch(stock, old_shift=None, ref_shift=None, rank=0):
    """One generated, scored batch from the stock trainer, optionally with old and reference log-probs
    moved off the current ones by Gaussian noise of the given scale (so PPO's clip and the KL engage).
    ``rank``: this process's own prompts and samples under a multi-process launch (every process calls)."""
    # Two groups of num_generations=4 samples, as TRL's sampler repeats each prompt.
    prompts = [{"prompt": p} for p in prompt_dataset()["prompt"][2 * rank:2 * rank + 2] for _ in range(4)]
    torch.manual_seed(1 + rank)
    inputs = stock._generate_and_score_completions(prompts)
    # A random model almost never samples EOS within 8 tokens: end some completions early, as EOS would.
    for row, length in ((0, 3), (5, 6), (6, 1))[rank:]:
        inputs["completion_mask"][row, length:] = 0
    # as TRL counts it: over all processes
    inputs["num_items_in_batch"] = stock.accelerator.reduce(inputs["completion_mask"].sum(), reduction="sum")
    current = current_logprobs(stock, inputs)
    gen = torch.Generator().manual_seed(2)
    for key, shift in (("old_per_token_logps", old_shift), ("ref_per_token_logps", ref_shift)):
        if shift is not None:
            inputs[key] = current + shift * torch.randn(current.shape, generator=gen)
    return inputs


def current_logprobs(stock, inputs):
    """TRL's own log-probs of the batch's completions under the current model (no gradient)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        current, _, _ = stock._get_per_token_logps_and_entropies(stock.model, ids, mask, inputs["completion_ids"].size(1))
    return current


def vllm_ratio(kind, shape):
    """What vLLM generation with TRL's importance-sampling correction hands over: per token ("token_truncate")
    or per sequence, and in the "*_mask" modes with the ratios outside the bounds set to 0."""
    gen = torch.Generator().manual_seed(3)
    level, mode = kind.split("-")
    ratio = torch.rand(shape if level == "token" else (shape[0], 1), generator=gen) + 0.5
    if mode == "mask":
        ratio[ratio > 1.3] = 0.0
    return ratio


def grads(trainer, inputs, model=None):
    """Loss and the trainable parameters' gradients of one backward; ``model``: the trainer's model as wrapped
    for several processes (DDP; FSDP2, whose sharded gradients are gathered)."""
    model = trainer.model if model is None else model
    model.zero_grad()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    return loss.detach(), {k: v.grad.full_tensor() if hasattr(v.grad, "full_tensor") else v.grad.clone()
                           for k, v in model.named_parameters() if v.requires_grad}


def max_diff(g, h):
    abs_diff = max((g[k] - h[k]).abs().max().item() for k in g)
    scale = max(h[k].abs().max().item() for k in h)
    return abs_diff, abs_diff / scale


_GSPO = {"importance_sampling_level": "sequence", "num_iterations": 2, "epsilon": 3e-4, "epsilon_high": 4e-4}
# name: (policy_loss, GRPOConfig overrides, old-log-prob shift, reference shift, vLLM importance-sampling ratio)
PARITY_CASES = {
    "dapo-default": ("ppo", {}, None, None, None),
    "dapo-offpolicy-kl-temperature": ("ppo", {"beta": 0.04, "use_bias_correction_kl": False, "temperature": 0.7,
                                              "num_iterations": 2}, 0.3, 0.5, None),
    "grpo": ("ppo", {"loss_type": "grpo", "num_iterations": 2}, 0.3, None, None),
    "bnpo": ("ppo", {"loss_type": "bnpo", "num_iterations": 2, "epsilon_high": 0.28}, 0.3, None, None),
    "dr_grpo": ("ppo", {"loss_type": "dr_grpo", "num_iterations": 2}, 0.3, None, None),
    "luspo": ("ppo", {"loss_type": "luspo"}, None, None, None),
    "cispo": ("cispo", {"loss_type": "cispo", "epsilon_high": 1.2, "num_iterations": 2}, 0.3, None, None),
    # per token (TRL's "token_*" modes): for GSPO the harder case
    "dapo-vllm-is-ratio": ("ppo", {"num_iterations": 2}, 0.3, None, "token-truncate"),
    "bnpo-entropy-bonus": ("ppo", {"loss_type": "bnpo", "entropy_coef": 0.05}, None, None, None),
    # TRL's GSPO, importance_sampling_level="sequence", with the GSPO paper's clip range where off-policy (every
    # sequence then lies outside it: some are clipped, the others keep their gradient)
    "gspo-dapo-default": ("gspo", {"importance_sampling_level": "sequence"}, None, None, None),
    "gspo-dapo-offpolicy-kl-temperature-entropy": ("gspo", dict(_GSPO, beta=0.04, use_bias_correction_kl=False,
                                                                temperature=0.7, entropy_coef=0.05), 0.3, 0.5, None),
    "gspo-grpo": ("gspo", dict(_GSPO, loss_type="grpo"), 0.3, None, None),
    "gspo-bnpo": ("gspo", dict(_GSPO, loss_type="bnpo"), 0.3, None, None),
    "gspo-dr_grpo": ("gspo", dict(_GSPO, loss_type="dr_grpo"), 0.3, None, None),
    "gspo-luspo": ("gspo", dict(_GSPO, loss_type="luspo"), 0.3, None, None),
    "gspo-dapo-vllm-is-ratio": ("gspo", _GSPO, 0.3, None, "token-truncate"),
    # policy_loss="trl": the formula GRPOConfig selects
    # this batch's mean sequence KLs (old − current) are all negative: -0.1 drops some sequences, keeps others
    "trl-off-policy-mask": ("trl", {"off_policy_mask_threshold": -0.1, "num_iterations": 2}, 0.3, None, None),
    "trl-top-entropy-quantile-0.2": ("trl", {"top_entropy_quantile": 0.2, "num_iterations": 2}, 0.3, None, None),
    "trl-delta-4": ("trl", {"delta": 4.0, "num_iterations": 2}, 1.5, None, None),
    # 1 < delta < 1 + epsilon_high: another exact mapping (module docstring)
    "trl-delta-1.1-epsilon-high-0.28": ("trl", {"delta": 1.1, "epsilon_high": 0.28, "num_iterations": 2}, 0.3, None,
                                         None),
    # GSPO with delta: the straight-through sequence ratio through ppo_loss's dual clip
    "trl-gspo-delta": ("trl", dict(_GSPO, loss_type="grpo", delta=1.05), 0.3, None, None),
    # TRL's default epsilon_high=0.2 caps the CISPO weight below 1
    "trl-cispo-default": ("trl", {"loss_type": "cispo", "num_iterations": 2}, 0.3, None, None),
    "trl-cispo-sequence": ("trl", {"loss_type": "cispo", "importance_sampling_level": "sequence", "epsilon_high": 1.05,
                                   "num_iterations": 2}, 0.3, None, None),
    "trl-grpo-vllm-sequence-mask": ("trl", {"loss_type": "grpo", "num_iterations": 2}, 0.3, None, "sequence-mask"),
}


def check_options_engaged(stock, overrides, inputs):
    """Each TRL option under test changes the loss on this batch (a test where it did nothing could not fail)."""
    adv = inputs["advantages"][:, None]
    mask = inputs["completion_mask"]
    current = current_logprobs(stock, inputs)
    if "off_policy_mask_threshold" in overrides:
        keep = stock.get_off_policy_mask(adv, current, inputs["old_per_token_logps"], mask,
                                         overrides["off_policy_mask_threshold"])
        assert 0 < keep.sum() < keep.numel()  # some sequences dropped, some kept
    if "delta" in overrides:  # some negative-advantage tokens (sequences) have a ratio beyond delta
        log_ratio = current - inputs["old_per_token_logps"]
        if overrides.get("importance_sampling_level") == "sequence":
            log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)
        assert ((log_ratio.exp() > overrides["delta"]) & (adv < 0) & (mask > 0)).any()


# fused_linear=True shares the normaliser plumbing: a few cases suffice (the suite's time is counted).
@pytest.mark.parametrize("case, fused_linear", [(case, False) for case in sorted(PARITY_CASES)] + [
    (case, True) for case in ("dapo-default", "dapo-offpolicy-kl-temperature", "grpo", "cispo",
                              "gspo-dapo-offpolicy-kl-temperature-entropy", "gspo-grpo",
                              "trl-top-entropy-quantile-0.2")])
def test_reproduces_stock_grpo_gradient(tmp_path, case, fused_linear):
    """On one captured batch, LCOGRPOTrainer(policy_loss="ppo") gives stock GRPOTrainer's loss and gradient
    (TRL's formula for its loss_type), for every normaliser, off-policy, with KL and temperature; policy_loss="gspo"
    gives stock GRPOTrainer's with importance_sampling_level="sequence" (TRL's GSPO); and policy_loss="trl" gives
    stock GRPOTrainer's for whatever formula and options GRPOConfig selects."""
    policy_loss, overrides, old_shift, ref_shift, vllm = PARITY_CASES[case]
    overrides = dict(overrides, bf16=False)  # fp32 end to end: the comparison is exact up to fp32 rounding
    stock = make(GRPOTrainer, tmp_path, cfg=config(tmp_path, **overrides))
    ours = make(LCOGRPOTrainer, tmp_path, cfg=config(tmp_path, **overrides), policy_loss=policy_loss,
                fused_linear=fused_linear)
    inputs = captured_batch(stock, old_shift, ref_shift)
    for t in (stock, ours):
        t.model.train()  # from_pretrained leaves it in eval mode; TRL's training loop sets train mode
        t.current_gradient_accumulation_steps = 1
        if vllm is not None:
            t.use_vllm = t.vllm_importance_sampling_correction = True
    if vllm is not None:
        inputs["importance_sampling_ratio"] = vllm_ratio(vllm, inputs["completion_ids"].shape)
    check_options_engaged(stock, overrides, inputs)
    loss_stock, g_stock = grads(stock, inputs)
    loss_ours, g_ours = grads(ours, inputs)
    abs_diff, rel_diff = max_diff(g_ours, g_stock)
    print(f"{case} fused_linear={fused_linear}: loss {loss_ours.item():.6g} vs {loss_stock.item():.6g}, "
          f"gradient max abs diff {abs_diff:.2e}, relative to max |grad| {rel_diff:.2e}")
    torch.testing.assert_close(loss_ours, loss_stock, rtol=1e-5, atol=1e-7)
    assert rel_diff < 1e-5
    if old_shift is not None and "delta" not in overrides:  # the clip engaged, and our statistics say so as TRL's
        clipped = ours._metrics["train"]["clip_ratio/region_mean"][-1]
        assert clipped > 0
        # (TRL counts the tokens its off-policy and entropy masks drop too; ours only those with a gradient)
        if policy_loss in ("ppo", "gspo") or case == "trl-grpo-vllm-sequence-mask":
            assert clipped == pytest.approx(stock._metrics["train"]["clip_ratio/region_mean"][-1], abs=1e-6)


def test_lco_matches_the_log_prob_form_on_trl_log_probs(tmp_path):
    """LCO through the trainer (fused, from logits) vs LCO's log-prob form applied to TRL's own
    differentiable per-token log-probs, with TRL's dapo normaliser: the same loss and gradient."""
    cfg = config(tmp_path, temperature=0.8, bf16=False)
    stock = make(GRPOTrainer, tmp_path, cfg=cfg)
    ours = make(LCOGRPOTrainer, tmp_path, cfg=cfg, policy_loss="lco", rho_pos=1.5)
    for t in (stock, ours):
        t.model.train()
        t.current_gradient_accumulation_steps = 1
    inputs = captured_batch(stock)
    loss_ours, g_ours = grads(ours, inputs)

    stock.model.zero_grad()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logps, _, _ = stock._get_per_token_logps_and_entropies(stock.model, ids, attn, inputs["completion_ids"].size(1))
    count = inputs["num_items_in_batch"] / stock.args.steps_per_generation
    loss_ref = lco_kernels.lco_loss_from_logprobs(logps, inputs["advantages"][:, None], rho_pos=1.5, rho_neg=0.9,
                                                  loss_mask=inputs["completion_mask"], reduction="sum") / count
    loss_ref.backward()
    g_ref = {k: v.grad.clone() for k, v in stock.model.named_parameters()}
    abs_diff, rel_diff = max_diff(g_ours, g_ref)
    print(f"LCO trainer vs log-prob form on TRL's log-probs: gradient max abs diff {abs_diff:.2e}, rel {rel_diff:.2e}")
    torch.testing.assert_close(loss_ours, loss_ref.detach(), rtol=1e-5, atol=1e-8)
    # The log-prob form itself rounds to ~3e-5 of the largest gradient on a flat policy (p_i ~ 1/V; the fused
    # loss stays within ~6e-7 of the float64 reference there), so this comparison cannot be tighter.
    assert rel_diff < 1e-4


@pytest.mark.parametrize("overrides, kwargs, match", [
    ({"loss_type": "sapo"}, {}, "loss_type"),
    ({"loss_type": "sapo"}, {"policy_loss": "vespo"}, "loss_type"),
    ({"loss_type": "cispo"}, {"policy_loss": "lco"}, "cispo"),
    ({"importance_sampling_level": "sequence", "loss_type": "grpo"}, {}, "importance_sampling_level"),
    ({"importance_sampling_level": "sequence"}, {"policy_loss": "pg"}, "importance_sampling_level"),
    ({}, {"policy_loss": "gspo"}, "importance_sampling_level"),
    ({"importance_sampling_level": "sequence", "loss_type": "cispo"}, {"policy_loss": "gspo"}, "cispo"),
    ({"importance_sampling_level": "sequence", "beta": 0.04}, {"policy_loss": "trl"}, "use_bias_correction_kl"),
    ({"beta": 0.04}, {"policy_loss": "pg"}, "use_bias_correction_kl"),
    ({"top_entropy_quantile": 0.5, "entropy_coef": 0.01}, {"policy_loss": "trl"}, "entropy_coef"),
    ({"loss_type": "grpo", "entropy_coef": 0.01}, {}, "entropy_coef"),
    ({"loss_type": "sapo", "entropy_coef": 0.01}, {"policy_loss": "trl"}, "entropy_coef"),
    ({"use_adaptive_entropy": True}, {"policy_loss": "trl"}, "use_adaptive_entropy"),
    ({"delta": 1.0}, {"policy_loss": "trl"}, "delta"),
    ({"delta": 4.0}, {"policy_loss": "lco"}, "delta"),
    ({}, {"policy_loss": "gpg"}, "policy_loss"),
    ({}, {"policy_loss": "ppo", "rho_pos": 2.0}, "rho_pos"),
])
def test_unsupported_options_are_errors(tmp_path, overrides, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(LCOGRPOTrainer, tmp_path, cfg=config(tmp_path, **overrides), **kwargs)
