"""The paper's claims, asserted on what bench/stability/ measures with our own losses (torch backend)."""
import pytest
import torch

from bench.stability import claims, small_task


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

