"""The "lco" policy loss registered with verl 0.9.1, called exactly as verl's actor calls policy losses
(``verl.workers.utils.losses.ppo_loss``), against the library's fused ``lco_loss`` on the same logits.

Skipped only when the "integrations" extra (and verl) is not installed; CI installs it.
"""
import sys
import warnings

import pytest
import torch

pytest.importorskip("verl.trainer.ppo.core_algos")
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils import torch_functional as verl_functional  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from tensordict import TensorDict  # noqa: E402

import lco_kernels  # noqa: E402
import lco_kernels.integrations.verl as lco_verl  # noqa: E402
from reference.lco import lco_rows_closed_form  # noqa: E402

# verl loss_agg_mode -> the library's reduction and the global count it takes from global_batch_info
AGG_MODES = {"token-mean": ("mean", "token_count"), "token-sum": ("sum", None),
             "seq-mean-token-mean": ("seq-mean-token-mean", "seq_count"),
             "seq-mean-token-sum": ("seq-mean-token-sum", "seq_count"),
             "seq-mean-token-sum-norm": ("seq-mean-token-sum-norm", "seq_count")}


def actor_config(loss_agg_mode, **kw):
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, loss_agg_mode=loss_agg_mode,
                       policy_loss=PolicyLossConfig(loss_mode="lco"), clip_ratio_low=0.2, clip_ratio_high=0.28, **kw)


def packed_batch(seed, batch=4, prompt_len=3, max_response=6, vocab=64):
    """verl's no-padding layout: the valid tokens of every sequence packed into one row of logits, plus the
    padded per-response tensors the actor's loss reads (old log-probs, advantages, masks)."""
    gen = torch.Generator().manual_seed(seed)
    resp_len = torch.tensor([max_response, 1, 4, max_response - 1][:batch])
    response_mask = (torch.arange(max_response)[None] < resp_len[:, None]).long()
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=gen)
    responses = torch.randint(0, vocab, (batch, max_response), generator=gen) * response_mask
    attention_mask = torch.cat([torch.ones_like(prompts), response_mask], 1)
    input_ids = torch.cat([prompts, responses], 1)[attention_mask.bool()]  # packed, sequence after sequence
    logits = (2 * torch.randn(input_ids.numel(), vocab, generator=gen)).requires_grad_()
    seq_start = torch.cat([torch.zeros(1, dtype=torch.long), attention_mask.sum(1).cumsum(0)[:-1]])
    # packed row that predicts response token j of sequence b (0 where j is padding)
    rows = (seq_start[:, None] + prompt_len - 1 + torch.arange(max_response)[None]) * response_mask
    labels = responses.masked_fill(response_mask == 0, -100)
    with torch.no_grad():
        current = torch.log_softmax(logits[rows], -1).gather(-1, responses[..., None])[..., 0]
    advantages = torch.randn(batch, max_response, generator=gen) * response_mask
    old = (current + 0.3 * torch.randn(current.shape, generator=gen)) * response_mask  # off-policy: the trust region acts
    weights = torch.rand(batch, max_response, generator=gen) + 0.5
    data = TensorDict({"prompts": prompts, "responses": responses, "attention_mask": attention_mask,
                       "response_mask": response_mask, "old_log_probs": old, "advantages": advantages,
                       "rollout_is_weights": weights}, batch_size=[batch])
    return logits, input_ids, rows, labels, data


@pytest.mark.parametrize("global_counts", [False, True])
@pytest.mark.parametrize("loss_agg_mode", sorted(AGG_MODES))
def test_registered_lco_as_verl_actor_calls_it(loss_agg_mode, global_counts):
    logits, input_ids, rows, labels, data = packed_batch(seed=len(loss_agg_mode) + global_counts)
    mask = data["response_mask"].bool()
    # A micro-batch of a larger step: the global counts are those of a batch twice as big.
    n_tokens, n_seqs = (2 * int(mask.sum()), 2 * mask.size(0)) if global_counts else (None, None)
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=n_tokens, global_batch_size=n_seqs)
    config = actor_config(loss_agg_mode)

    # verl's actor: log-probs of the packed logits (with this module imported: token_logprobs, its backward in
    # place as verl's engines ask, into a copy here since the logits are used again below), then ppo_loss
    log_probs = verl_functional.logprobs_from_logits(logits.clone(), torch.roll(input_ids, -1))
    loss_verl, metrics = ppo_loss(config, {"log_probs": log_probs}, data)
    (grad_verl,) = torch.autograd.grad(loss_verl, logits)

    reduction, count = AGG_MODES[loss_agg_mode]
    counts = {} if count is None or not global_counts else {count: n_tokens if count == "token_count" else n_seqs}
    loss_ours = lco_kernels.lco_loss(logits[rows], labels, data["advantages"] * data["rollout_is_weights"],
                                     old_logprobs=data["old_log_probs"], epsilon_low=0.2, epsilon_high=0.28,
                                     reduction=reduction, **counts)
    (grad_ours,) = torch.autograd.grad(loss_ours, logits)
    torch.testing.assert_close(loss_verl, loss_ours, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_verl, grad_ours, rtol=1e-4, atol=1e-7)
    clipfrac = metrics["actor/pg_clipfrac"].values[0]
    assert 0 < clipfrac < 1  # the trust region dropped some tokens, not all


def test_rho_from_config_environment_and_named_variants(monkeypatch):
    logits, input_ids, rows, labels, data = packed_batch(seed=3)
    log_probs = torch.log_softmax(logits[rows], -1).gather(-1, data["responses"][..., None])[..., 0]
    args = (data["old_log_probs"], log_probs, data["advantages"], data["response_mask"].bool(), "token-mean")

    def loss(fn, **rho):
        expected = lco_kernels.lco_loss(logits[rows], labels, data["advantages"], old_logprobs=data["old_log_probs"],
                                        epsilon_low=0.2, epsilon_high=0.28, **rho)
        got, _ = fn(*args, config=actor_config("token-mean"))
        return got.item(), expected.item()

    got, expected = loss(get_policy_loss_fn("lco"))
    assert got == pytest.approx(expected, rel=1e-5)
    monkeypatch.setenv("LCO_RHO_POS", "2.5")
    monkeypatch.setenv("LCO_RHO_NEG", "0.5")
    got, expected = loss(get_policy_loss_fn("lco"), rho_pos=2.5, rho_neg=0.5)
    assert got == pytest.approx(expected, rel=1e-5)
    lco_verl.register_lco_policy_loss("lco_test_r3", rho_pos=3.0, rho_neg=0.2)
    got, expected = loss(get_policy_loss_fn("lco_test_r3"), rho_pos=3.0, rho_neg=0.2)
    assert got == pytest.approx(expected, rel=1e-5)
    monkeypatch.setenv("LCO_RHO_POS", "high")
    with pytest.raises(ValueError, match="LCO_RHO_POS"):
        get_policy_loss_fn("lco")(*args, config=actor_config("token-mean"))


def confident_rows(lead, n=8, vocab=64, seed=0):
    """Rows whose sampled logit leads every other by about ``lead`` (p_i ≈ 1 − V·e^−lead), advantages of both signs."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=gen)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    logits[torch.arange(n), labels] = logits.max(-1).values + lead
    advantages = torch.randn(n, generator=gen)
    return logits, labels, advantages


def hook_gradient(logits, labels, advantages, logprobs_fn):
    """d(loss)/d(logits) of the registered hook, fed by ``logprobs_fn``, on-policy (old = current)."""
    logits = logits.clone().requires_grad_()
    log_prob = logprobs_fn(logits, labels)
    loss, _ = get_policy_loss_fn("lco")(log_prob.detach(), log_prob, advantages, torch.ones_like(labels, dtype=bool),
                                        "token-sum", config=actor_config("token-sum"))
    return torch.autograd.grad(loss, logits)[0]


@pytest.mark.parametrize("lead", [10.0, 16.0, 20.0, 30.0])
def test_precision_on_confident_tokens(lead):
    """verl's own log-probs (gather − logsumexp in fp32) lose 1 − p_i on confident tokens, so the hook's
    gradient is wrong there (from a lead of ~16 on, p_i rounds to 1 and the token's loss and gradient are lost);
    verl's log-probs as this module leaves them by default (lco_kernels.token_logprobs) match the float64 closed
    form as the fused loss does: every step is finite and exact. The errors printed here are the documented table."""
    logits, labels, advantages = confident_rows(lead)
    _, g_ref = lco_rows_closed_form(logits, labels, advantages)  # float64, log domain: exact at any lead
    scale = g_ref.abs().max().item()
    g_verl = hook_gradient(logits, labels, advantages, lco_verl.VERL_LOGPROBS_FROM_LOGITS)
    g_default = hook_gradient(logits, labels, advantages, verl_functional.logprobs_from_logits)
    z = logits.clone().requires_grad_()
    (g_fused,) = torch.autograd.grad(lco_kernels.lco_loss(z, labels, advantages, reduction="sum"), z)
    err = {name: ((g - g_ref).abs().max().item() / scale) for name, g in
           (("verl's own log-probs (LCO_VERL_EXACT_LOGPROBS=0)", g_verl), ("default (token_logprobs)", g_default),
            ("fused lco_loss", g_fused))}
    print(f"lead {lead}: max |grad error| / max |grad|: " + ", ".join(f"{k} {v:.1e}" for k, v in err.items()))
    assert verl_functional.logprobs_from_logits is lco_verl.exact_logprobs_from_logits  # the import's default
    assert torch.isfinite(g_default).all()
    assert err["fused lco_loss"] < 1e-5
    assert err["default (token_logprobs)"] < 1e-5
    if lead >= 16:  # what the default avoids: verl's own log-probs lose the confident tokens' gradient
        assert err["verl's own log-probs (LCO_VERL_EXACT_LOGPROBS=0)"] > 0.1


def verl_modules_with_own_logprobs(monkeypatch):
    """Every imported verl module holding ``logprobs_from_logits`` set back to verl's own, as in a process that
    has not imported this module (monkeypatch restores them after the test)."""
    with warnings.catch_warnings():  # its ray import warns about ray.experimental, not our concern
        warnings.simplefilter("ignore", DeprecationWarning)
        import verl.workers.rollout.naive.naive_rollout  # noqa: F401  imports logprobs_from_logits by name
    for name, module in list(sys.modules.items()):
        if name.startswith("verl") and hasattr(module, "logprobs_from_logits"):
            monkeypatch.setattr(module, "logprobs_from_logits", lco_verl.VERL_LOGPROBS_FROM_LOGITS)
    return sys.modules["verl.workers.rollout.naive.naive_rollout"]


@pytest.mark.parametrize("env, exact", [(None, True), ("1", True), ("0", False)])
def test_exact_logprobs_by_default_with_opt_out(monkeypatch, env, exact):
    """What importing the module does: verl's log-probs from token_logprobs unless LCO_VERL_EXACT_LOGPROBS=0."""
    naive = verl_modules_with_own_logprobs(monkeypatch)
    if env is None:
        monkeypatch.delenv("LCO_VERL_EXACT_LOGPROBS", raising=False)
    else:
        monkeypatch.setenv("LCO_VERL_EXACT_LOGPROBS", env)
    lco_verl._logprobs_from_environment()
    expected = lco_verl.exact_logprobs_from_logits if exact else lco_verl.VERL_LOGPROBS_FROM_LOGITS
    assert verl_functional.logprobs_from_logits is expected and naive.logprobs_from_logits is expected


def test_exact_logprobs_environment_is_checked(monkeypatch):
    monkeypatch.setenv("LCO_VERL_EXACT_LOGPROBS", "yes")
    with pytest.raises(ValueError, match="LCO_VERL_EXACT_LOGPROBS"):
        lco_verl._logprobs_from_environment()


def test_use_exact_logprobs_patches_verl_modules(monkeypatch):
    naive = verl_modules_with_own_logprobs(monkeypatch)
    lco_verl.use_exact_logprobs()
    assert verl_functional.logprobs_from_logits is lco_verl.exact_logprobs_from_logits
    assert naive.logprobs_from_logits is lco_verl.exact_logprobs_from_logits
