"""Bad input raises ValueError / TypeError naming the argument, before any kernel runs (SPEC §2)."""
import pytest
import torch

from helpers import BACKENDS
from lco_kernels import (LCOLoss, LinearLCOLoss, cispo_loss, dppo_loss, dro_loss, fused_linear_lco_loss,
                         fused_linear_policy_loss, lco_loss, ppo_loss, sapo_loss)
from lco_kernels.diagnostics.traffic import count_traffic


def good(device="cpu"):
    return torch.randn(2, 3, 10, device=device), torch.randint(0, 10, (2, 3), device=device), torch.randn(2, 3, device=device)


CASES = [
    ("label out of range", lambda z, l, a: (z, l.index_fill(1, torch.tensor([1]), 10), a), {}, ValueError, "labels"),
    ("negative label", lambda z, l, a: (z, l.index_fill(1, torch.tensor([0]), -5), a), {}, ValueError, "labels"),
    ("labels shape", lambda z, l, a: (z, l[:, :2], a), {}, ValueError, "labels"),
    ("float labels", lambda z, l, a: (z, l.float(), a), {}, TypeError, "labels"),
    ("int logits", lambda z, l, a: (z.long(), l, a), {}, TypeError, "logits"),
    ("logits not a tensor", lambda z, l, a: (z.tolist(), l, a), {}, TypeError, "logits"),
    ("empty vocabulary", lambda z, l, a: (z[..., :0], l, a), {}, ValueError, "logits"),
    ("advantages shape", lambda z, l, a: (z, l, torch.randn(3, 2)), {}, ValueError, "advantages"),
    ("advantages too big", lambda z, l, a: (z, l, torch.randn(4, 2, 3)), {}, ValueError, "advantages"),
    ("advantages type", lambda z, l, a: (z, l, "1.0"), {}, TypeError, "advantages"),
    ("rho_pos < 1", None, {"rho_pos": 0.9}, ValueError, "rho_pos"),
    ("rho_pos nan", None, {"rho_pos": float("nan")}, ValueError, "rho_pos"),
    ("rho_neg > 1", None, {"rho_neg": 1.5}, ValueError, "rho_neg"),
    ("rho_neg < 0", None, {"rho_neg": -0.1}, ValueError, "rho_neg"),
    ("rho_neg type", None, {"rho_neg": "0.9"}, TypeError, "rho_neg"),
    ("reduction", None, {"reduction": "avg"}, ValueError, "reduction"),
    ("backend", None, {"backend": "cuda"}, ValueError, "backend"),
    ("ignore_index type", None, {"ignore_index": 1.5}, TypeError, "ignore_index"),
    ("inplace type", None, {"inplace_backward": 1}, TypeError, "inplace_backward"),
    ("float64 on triton", lambda z, l, a: (z.double(), l, a), {"backend": "triton"}, TypeError, "triton"),
    ("advantages None", lambda z, l, a: (z, l, None), {}, ValueError, "advantages is required"),
    ("advantages bool", lambda z, l, a: (z, l, a > 0), {}, TypeError, "advantages"),
    ("advantages per sequence without the token axis", lambda z, l, a: (z, l, a[:, 0]), {}, ValueError,
     r"advantages\[\.\.\., None\]"),
    ("ignore_index too big", None, {"ignore_index": 2 ** 70}, ValueError, "ignore_index"),
    ("temperature 0", None, {"temperature": 0.0}, ValueError, "temperature"),
    ("temperature inf", None, {"temperature": float("inf")}, ValueError, "temperature"),
    ("entropy_coef type", None, {"entropy_coef": "0.1"}, TypeError, "entropy_coef"),
    ("kl_type", None, {"kl_type": "k4", "beta": 0.1, "ref_logprobs": torch.zeros(2, 3)}, ValueError, "kl_type"),
    ("kl_type unhashable", None, {"kl_type": ["k3"], "beta": 0.1, "ref_logprobs": torch.zeros(2, 3)}, ValueError,
     "kl_type"),
    ("beta without ref", None, {"beta": 0.1}, ValueError, "ref_logprobs"),
    ("token_count <= 0", None, {"token_count": 0}, ValueError, "token_count"),
    ("token_count shape", None, {"token_count": torch.ones(2)}, ValueError, "token_count"),
    ("token_count with sum", None, {"token_count": 4, "reduction": "sum"}, ValueError, "token_count"),
    ("seq_count with mean", None, {"seq_count": 4}, ValueError, "seq_count"),
    ("counts with sign-mean", None, {"seq_count": 4, "reduction": "sign-mean"}, ValueError, "sign-mean"),
    ("inplace into overlapping logits", lambda z, l, a: (z[:1].expand(2, 3, 10), l, a), {"inplace_backward": True},
     ValueError, "inplace_backward"),
]


@pytest.mark.parametrize("name,transform,kwargs,error,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, transform, kwargs, error, match):
    z, l, a = good()
    if transform is not None:
        z, l, a = transform(z, l, a)
    for _ in range(2):  # the option checks keep what they passed, never an error: a refusal repeats
        with count_traffic() as launches, pytest.raises(error, match=match):
            lco_loss(z, l, a, **kwargs)
        assert launches == [], "validation must happen before any kernel runs"


FAMILY_CASES = [
    ("epsilon_low >= 1", lambda z, l, a: ppo_loss(z, l, a, a, epsilon_low=1.0), ValueError, "epsilon_low"),
    ("epsilon_high < 0", lambda z, l, a: cispo_loss(z, l, a, a, epsilon_high=-0.1), ValueError, "epsilon_high"),
    ("dual_clip <= 1", lambda z, l, a: ppo_loss(z, l, a, a, dual_clip=0.5), ValueError, "dual_clip"),
    ("beta < 0", lambda z, l, a: ppo_loss(z, l, a, a, ref_logprobs=a, beta=-1.0), ValueError, "beta"),
    ("old_logprobs shape", lambda z, l, a: ppo_loss(z, l, a, a[:, :2]), ValueError, "old_logprobs"),
    ("old_logprobs number", lambda z, l, a: ppo_loss(z, l, a, -1.0), TypeError, "old_logprobs"),
    ("ref_logprobs shape", lambda z, l, a: ppo_loss(z, l, a, a, ref_logprobs=a[:, :2], beta=0.1), ValueError, "ref_logprobs"),
    ("lco old_logprobs shape", lambda z, l, a: lco_loss(z, l, a, old_logprobs=a.t()), ValueError, "old_logprobs"),
    ("loss_mask shape", lambda z, l, a: lco_loss(z, l, a, loss_mask=a[:, :1].t()), ValueError, "loss_mask"),
    ("max_length", lambda z, l, a: lco_loss(z, l, a, reduction="seq-mean-token-sum-norm", max_length=0),
     ValueError, "max_length"),
    ("return_stats type", lambda z, l, a: lco_loss(z, l, a, return_stats=1), TypeError, "return_stats"),
    ("cispo epsilon_low >= 1", lambda z, l, a: cispo_loss(z, l, a, a, epsilon_low=1.0), ValueError, "epsilon_low"),
    ("cispo epsilon_low < 0", lambda z, l, a: cispo_loss(z, l, a, a, epsilon_low=-0.1), ValueError, "epsilon_low"),
    ("tau_pos <= 0", lambda z, l, a: sapo_loss(z, l, a, a, tau_pos=0.0), ValueError, "tau_pos"),
    ("tau_neg <= 0", lambda z, l, a: sapo_loss(z, l, a, a, tau_neg=-1.0), ValueError, "tau_neg"),
    ("tau_pos nan", lambda z, l, a: sapo_loss(z, l, a, a, tau_pos=float("nan")), ValueError, "tau_pos"),
    ("divergence js", lambda z, l, a: dppo_loss(z, l, a, a, divergence="js"), ValueError, "divergence"),
    ("divergence unhashable", lambda z, l, a: dppo_loss(z, l, a, a, divergence=["tv"]), ValueError, "divergence"),
    ("delta_low < 0", lambda z, l, a: dppo_loss(z, l, a, a, delta_low=-0.1), ValueError, "delta_low"),
    ("delta_high < 0", lambda z, l, a: dppo_loss(z, l, a, a, divergence="kl", delta_high=-1.0), ValueError,
     "delta_high"),
    ("clip_ratio_c <= 0", lambda z, l, a: dppo_loss(z, l, a, a, clip_ratio_c=0.0), ValueError, "clip_ratio_c"),
    ("dro_beta <= 0", lambda z, l, a: dro_loss(z, l, a, a, dro_beta=0.0), ValueError, "dro_beta"),
    ("dro_beta type", lambda z, l, a: dro_loss(z, l, a, a, dro_beta="1"), TypeError, "dro_beta"),
    ("dro_beta missing", lambda z, l, a: fused_linear_policy_loss(z, torch.randn(10, 10), l, a, loss="dro",
                                                                  old_logprobs=a), ValueError, "dro_beta"),
    ("bias_correction_kl type", lambda z, l, a: ppo_loss(z, l, a, a, ref_logprobs=a, beta=0.1, bias_correction_kl=1),
     TypeError, "bias_correction_kl"),
    ("bias_correction_kl without old_logprobs", lambda z, l, a: lco_loss(z, l, a, ref_logprobs=a, beta=0.1,
                                                                         bias_correction_kl=True),
     ValueError, "bias_correction_kl"),
    ("sapo without old_logprobs", lambda z, l, a: fused_linear_policy_loss(z, torch.randn(10, 10), l, a, loss="sapo"),
     ValueError, "old_logprobs"),
]


@pytest.mark.parametrize("name,call,error,match", FAMILY_CASES, ids=[c[0] for c in FAMILY_CASES])
def test_bad_family_input(name, call, error, match):
    z, l, a = good()
    with count_traffic() as launches, pytest.raises(error, match=match):
        call(z, l, a)
    assert launches == []


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="rho_pos"):
        LCOLoss(rho_pos=0.5)
    with pytest.raises(ValueError, match="reduction"):
        LCOLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="chunk_size"):
        LinearLCOLoss(chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        LinearLCOLoss(temperature=-1.0)


def test_fused_linear_bad_input():
    h, w, l, a = torch.randn(2, 3, 8), torch.randn(10, 8), torch.randint(0, 10, (2, 3)), torch.randn(2, 3)
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_lco_loss(torch.tensor(1.0), w, l, a)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_lco_loss(h, w[:, :4], l, a)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_lco_loss(h, w, l, a, chunk_size=0)


def test_double_backward_raises_instead_of_a_silent_first_order_answer():
    z, l, a = good()
    x = z.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(lco_loss(x, l, a), x, create_graph=True)
    h = torch.randn(2, 3, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(fused_linear_lco_loss(h, torch.randn(10, 8), l, a), h, create_graph=True)


def test_device_mismatch_meta():
    """Devices are compared before anything is computed (the meta device stands in for a GPU here)."""
    z, l, a = good()
    with pytest.raises(ValueError, match="labels"):
        lco_loss(z, l.to("meta"), a)
    with pytest.raises(ValueError, match="advantages"):
        lco_loss(z, l, a.to("meta"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_edge_values_are_accepted(backend):
    z, l, a = good()
    l[0, 0] = 9
    l[1, 2] = -100
    for rho_pos, rho_neg in ((1.0, 0.0), (1.0, 1.0), (100.0, 0.5)):
        assert torch.isfinite(lco_loss(z, l, a, rho_pos=rho_pos, rho_neg=rho_neg, backend=backend))
