"""The paper's claims, asserted on what bench/stability/ measures with our own losses (torch backend)."""
import math

import pytest
import torch

from bench.stability import claims, report, small_task, warm_start
from lco_kernels import ppo_loss


@pytest.fixture(scope="module")
def curves():
    return claims.gradient_dynamics(steps=200)


def _monotone_down(xs):
    return all(b <= a + 1e-9 for a, b in zip(xs, xs[1:]))


@pytest.mark.parametrize("method", ["SFT", "PG +", "PG-IS +", "LCO +", "LCO -"])
def test_gradient_norm_falls_towards_zero_as_the_loss_converges(curves, method):
    r = curves[method]
    assert _monotone_down(r["grad_norm"]) and _monotone_down(r["loss"])
    assert r["grad_norm"][-1] < 0.15 * r["grad_norm"][0]


def test_pg_negative_gradient_norm_grows_while_its_loss_falls(curves):
    r = curves["PG -"]
    assert _monotone_down(r["loss"])
    assert all(b >= a - 1e-9 for a, b in zip(r["grad_norm"], r["grad_norm"][1:]))
    assert r["grad_norm"][-1] > 10 * r["grad_norm"][0]


def test_pg_is_negative_gradient_norm_rises_then_falls(curves):
    g = curves["PG-IS -"]["grad_norm"]
    peak = max(range(len(g)), key=g.__getitem__)
    assert 0 < peak < len(g) - 1
    assert g[peak] > 2 * g[0] and g[-1] < g[0]


def test_lco_negative_lowers_the_sampled_probability_smoothly(curves):
    p = curves["LCO -"]["prob"]
    assert _monotone_down(p) and p[-1] < 0.2


def test_logits_convexity():
    eigs = claims.hessian_eigenvalues(points=4)
    for name in ("SFT", "PG, Ψ > 0", "LCO, Ψ > 0", "LCO, Ψ > 0, clamped", "LCO, Ψ < 0"):
        assert claims.curvature(*eigs[name]) == "PSD (convex)", name
    assert claims.curvature(*eigs["PG, Ψ < 0"]) == "NSD (concave)"
    for name in ("PG-IS, Ψ > 0", "PG-IS, Ψ < 0"):
        assert claims.curvature(*eigs[name]) == "indefinite", name


def test_task_reward():
    prompts = torch.tensor([0, 0, 2, 3])
    tokens = torch.tensor([[1, 2, 3], [1, 1, 3], [2, 5, 9], [4, 5, 11]])
    assert small_task.reward(prompts, tokens).tolist() == [1.0, -1.0, -1.0, 1.0]


@pytest.mark.parametrize("method", small_task.RL_METHODS)
def test_rl_runs_reproduce_from_their_seed(method):
    a = small_task.train(method, 1e-3, seed=3, steps=3)
    b = small_task.train(method, 1e-3, seed=3, steps=3)
    assert a == b
    assert all(0.0 <= s <= 1.0 for s in a["success"]) and all(x > 0 for x in a["param_grad_norm"])


# ---------------------------------------------------------------- the warm-started experiment

def test_warm_start_rule_and_reward():
    prompts = torch.tensor([[250, 3], [7, 1]])
    assert warm_start.rule(prompts).tolist() == [[253, 0, 3, 6, 9, 12, 15, 18], [8, 9, 10, 11, 12, 13, 14, 15]]
    good = warm_start.rule(prompts)
    bad = good.clone()
    bad[1, 7] = 16
    assert warm_start.reward(prompts, good).tolist() == [1.0, 1.0]
    assert warm_start.reward(prompts, bad).tolist() == [1.0, -1.0]


def test_pg_is_epsilons_disable_the_clip():
    """PG-IS is ppo_loss with PG_IS_EPSILONS: the loss must be −Ψ·r even for ratios far outside any clip."""
    logits = torch.randn(4, 16, dtype=torch.float64)
    labels = torch.tensor([1, 2, 3, 4])
    logp = torch.log_softmax(logits, -1).gather(1, labels[:, None])[:, 0]
    old = logp - torch.log(torch.tensor([20.0, 0.01, 3.0, 0.3], dtype=torch.float64))   # r = 20, 0.01, 3, 0.3
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    loss = ppo_loss(logits, labels, adv, old, reduction="none", backend="torch", **warm_start.PG_IS_EPSILONS)
    torch.testing.assert_close(loss, -adv * torch.exp(logp - old))


def test_collapse_definition():
    ok = {"success": [0.3] * 12, "logit_grad_norm": [1.0] * 12, "param_grad_norm": [2.0] * 12, "finite": True}
    assert not warm_start.summarize_run(ok, warm_success=0.59)["collapsed"]
    assert warm_start.summarize_run(ok, warm_success=0.61)["collapsed"]          # 0.3 < 0.5 × 0.61
    assert warm_start.summarize_run(dict(ok, finite=False), warm_success=0.1)["collapsed"]


def test_method_summary_definitions():
    def run(lr, final, collapsed, spiky=1.0):
        return dict(lr=lr, final_success=final, collapsed=collapsed, logit_grad_spikiness=spiky,
                    param_grad_spikiness=2 * spiky)
    runs = [run(1e-3, 0.40, False), run(1e-3, 0.44, False), run(3e-3, 0.60, False), run(3e-3, 0.62, False, 3.0),
            run(1e-2, 0.70, False), run(1e-2, 0.10, True, 9.0), run(3e-2, 0.0, True, 5.0), run(3e-2, 0.0, True, 7.0)]
    s = warm_start.summarize_method(runs)
    assert s["best_lr"] == 3e-3 and s["best_final_success"] == pytest.approx(0.61)
    assert s["max_stable_lr"] == 3e-3 and s["first_collapse_lr"] == 1e-2 and s["above_max_stable_lr"] == 1e-2
    assert s["min_lr_reaching_90pct_of_best"] == 3e-3 and s["stable_range_width"] == 1.0
    assert s["logit_grad_spikiness"] == [2.0, 5.0] and s["param_grad_spikiness"] == [4.0, 10.0]


@pytest.fixture(scope="module")
def tiny_record():
    """The experiment end to end on a tiny budget: the quick run's warm start, 3 RL steps per run."""
    config = dict(warm_start.settings(quick=True), rl_steps=3)
    return warm_start.experiment(config, log=lambda *_: None)


def test_warm_start_policy_is_competent_before_rl(tiny_record):
    """The quick run's SFT (150 steps) must give a policy that already solves part of the RL task (chance: 256⁻⁸)."""
    (warm,) = tiny_record["warm_start"].values()
    assert warm["success"] >= 0.1
    assert warm["sft_loss"][-1] < 0.5 * warm["sft_loss"][0]


def test_warm_start_record_has_every_field(tiny_record):
    assert {r["method"] for r in tiny_record["runs"]} == set(warm_start.METHODS)
    for r in tiny_record["runs"]:
        assert r["steps_run"] == 3 and all(len(v) == 3 for v in r["history"].values()), r["method"]
        assert math.isfinite(r["final_success"]) and r["logit_grad_spikiness"] >= 1 and r["param_grad_spikiness"] >= 1
    for method, s in tiny_record["summary"].items():
        assert s["lrs"] == tiny_record["settings"]["lrs"][method]
        assert {"best_final_success", "best_lr", "max_stable_lr", "min_lr_reaching_90pct_of_best", "stable_range_width",
                "first_collapse_lr", "logit_grad_spikiness", "param_grad_spikiness"} <= set(s)
    table = report.warm_start_table(tiny_record)
    assert all(f"| {m} |" in table for m in warm_start.METHODS)
