"""torch.compile: the registered custom ops (lco_kernels/ops.py, lco_kernels/fused_linear.py) pass opcheck;
every public loss (logits-level and fused-linear), token_logprobs, gspo_loss and lco_loss_from_logprobs
trace without a graph break; a small model compiled with fullgraph=True trains as in eager; meta / fake
tensors propagate shapes. Compilation is slow on CPU: tiny shapes, few steps, static shapes."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lco_kernels
from helpers import BACKENDS
from lco_kernels import fused_linear, ops
from lco_kernels._plumbing import loss_spec
from lco_kernels.stats import ROW

V, H = 11, 8


def _inputs(shape=(2, 3), device="cpu"):
    """(logits, labels with one ignored, advantages, old and reference log-probs near the current ones)."""
    logits = torch.randn(*shape, V) * 2
    labels = torch.randint(0, V, shape)
    labels.view(-1)[0] = -100
    adv = torch.randn(shape)
    old = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] + 0.3 * torch.randn(shape)
    return tuple(t.to(device) for t in (logits, labels, adv, old, old - 0.2))


# Every public logits-level entry point: name -> (call(logits, labels, adv, old, ref, **options), option sets).
_RL = ({}, {"reduction": "none", "return_stats": True}, {"reduction": "seq-mean-token-mean", "entropy_coef": 0.01,
                                                          "temperature": 0.7})
LOSSES = {
    "sft": (lambda z, y, a, o, r, **kw: lco_kernels.sft_loss(z, y, **kw), _RL),
    "pg": (lambda z, y, a, o, r, **kw: lco_kernels.pg_loss(z, y, a, ref_logprobs=r, beta=0.1, kl_type="k1", **kw),
           _RL),
    "ppo": (lambda z, y, a, o, r, **kw: lco_kernels.ppo_loss(z, y, a, o, ref_logprobs=r, beta=0.1, dual_clip=3.0,
                                                             **kw), _RL),
    "cispo": (lambda z, y, a, o, r, **kw: lco_kernels.cispo_loss(z, y, a, o, **kw), _RL),
    "sapo": (lambda z, y, a, o, r, **kw: lco_kernels.sapo_loss(z, y, a, o, ref_logprobs=r, beta=0.1,
                                                               bias_correction_kl=True, **kw), _RL),
    "dppo": (lambda z, y, a, o, r, **kw: lco_kernels.dppo_loss(z, y, a, o, divergence="kl", **kw), _RL),
    "dro": (lambda z, y, a, o, r, **kw: lco_kernels.dro_loss(z, y, a, o, dro_beta=0.5, **kw), _RL),
    "lco": (lambda z, y, a, o, r, **kw: lco_kernels.lco_loss(z, y, a, **kw), _RL),
    "ppo+lco": (lambda z, y, a, o, r, **kw: lco_kernels.lco_loss(z, y, a, old_logprobs=o, **kw), _RL),
    "token_logprobs": (lambda z, y, a, o, r, **kw: lco_kernels.token_logprobs(z, y, **kw),
                       ({}, {"return_entropy": True, "temperature": 0.7})),
    "gspo": (lambda z, y, a, o, r, **kw: lco_kernels.gspo_loss(z, y, a[..., :1], o, **kw), ({}, {"temperature": 0.7})),
}


def _linear_inputs(shape=(2, 3), device="cpu"):
    """(hidden, LM-head weight, bias, labels with one ignored, advantages, old and reference log-probs)."""
    h, w, b = torch.randn(*shape, H), torch.randn(V, H), torch.randn(V)
    _, y, a, o, r = _inputs(shape)
    return tuple(t.to(device) for t in (h, w, b, y, a, o, r))


# Every public fused-linear entry point, as LOSSES: name -> (call(hidden, weight, bias, labels, adv, old, ref,
# **options), option sets).
LINEAR_LOSSES = {
    "policy(ppo)": (lambda h, w, b, y, a, o, r, **kw: lco_kernels.fused_linear_policy_loss(
        h, w, y, a, loss="ppo", bias=b, old_logprobs=o, ref_logprobs=r, beta=0.1, **kw), _RL),
    "policy(sapo)": (lambda h, w, b, y, a, o, r, **kw: lco_kernels.fused_linear_policy_loss(
        h, w, y, a, loss="sapo", bias=b, old_logprobs=o, **kw), _RL),
    "lco": (lambda h, w, b, y, a, o, r, **kw: lco_kernels.fused_linear_lco_loss(h, w, y, a, bias=b, **kw), _RL),
    "token_logprobs": (lambda h, w, b, y, a, o, r, **kw: lco_kernels.fused_linear_token_logprobs(h, w, y, bias=b,
                                                                                                 **kw),
                       ({}, {"return_entropy": True, "temperature": 0.7})),
    "gspo": (lambda h, w, b, y, a, o, r, **kw: lco_kernels.fused_linear_gspo_loss(h, w, y, a[..., :1], o, bias=b,
                                                                                  **kw), ({},)),
}


def _policy_forward_args(backend, device, loss, need_entropy, with_stats):
    z, y, a, o, r = _inputs(device=device)
    spec = loss_spec(loss, old_logprobs=o, ref_logprobs=r, beta=0.1, entropy_coef=0.01 if need_entropy else 0.0)
    return (z.requires_grad_(True), y.reshape(-1), a.reshape(-1), o.reshape(-1) if spec.has_old else None,
            r.reshape(-1) if spec.has_ref else None, -100,
            *ops.policy_args(spec, need_entropy, with_stats, False, backend))


def _opcheck_cases(backend, device):
    forward = _policy_forward_args(backend, device, "ppo", need_entropy=True, with_stats=True)
    logits, labels, config = forward[0].detach(), forward[1], forward[6:]
    with torch.no_grad():
        _, _, rows, _ = ops.policy_forward(*forward)
    # coefficients as a backward makes them: alpha (and the entropy mask) times an upstream gradient
    coef, ent_coef = rows[:, ROW["alpha"]] * -1.3, rows[:, ROW["ent_mask"]] * 0.7
    return [
        (ops.policy_forward, forward),
        (ops.policy_forward, _policy_forward_args(backend, device, "lco", need_entropy=False, with_stats=False)),
        (ops.policy_backward, (logits, labels, coef, ent_coef, rows, *config)),
        (ops.policy_backward, (logits, labels, coef, None, rows, *config)),
        (ops.policy_backward_, (logits.clone(), labels, coef, ent_coef, rows, *config)),
    ] + _fused_linear_opcheck_cases(backend, device)


def _fused_linear_forward_args(backend, device, loss, bias, reduced, need_entropy, with_stats, frozen_weight=False):
    h, w, b, y, a, o, r = _linear_inputs(device=device)
    in_forward = [reduced, reduced and not frozen_weight, reduced and bias]
    rl = loss != "sft"
    spec = loss_spec(loss, old_logprobs=o if rl else None, ref_logprobs=r if rl else None, beta=0.1 if rl else 0.0,
                     entropy_coef=0.01 if reduced else 0.0)
    weights = torch.full((y.numel(),), 1 / y.numel(), device=device) if reduced else None
    return (h.requires_grad_(True), w.requires_grad_(not frozen_weight), b.requires_grad_(True) if bias else None,
            y.reshape(-1), a.reshape(-1), o.reshape(-1) if spec.has_old else None,
            r.reshape(-1) if spec.has_ref else None, weights, -100, 4, torch.float32, with_stats, need_entropy,
            in_forward, backend, *ops.spec_args(spec))


def _fused_linear_opcheck_cases(backend, device):
    # a scalar reduction (the forward forms the gradients, the backward scales them; also with a frozen LM
    # head, whose gradient is not formed) and per-token outputs (the backward op projects each chunk again)
    reduced = _fused_linear_forward_args(backend, device, "ppo", bias=True, reduced=True, need_entropy=False,
                                         with_stats=True)
    frozen = _fused_linear_forward_args(backend, device, "lco", bias=True, reduced=True, need_entropy=False,
                                        with_stats=False, frozen_weight=True)
    per_token = _fused_linear_forward_args(backend, device, "sft", bias=False, reduced=False, need_entropy=True,
                                           with_stats=False)
    with torch.no_grad():
        rows = fused_linear.fused_linear_forward(*reduced)[2]
    coef, ent_coef = rows[:, ROW["alpha"]] * -1.3, rows[:, ROW["ent_mask"]] * 0.7
    h, w, b, y = (t.detach() for t in reduced[:4])
    spec = reduced[15:]
    return [
        (fused_linear.fused_linear_forward, reduced),
        (fused_linear.fused_linear_forward, frozen),
        (fused_linear.fused_linear_forward, per_token),
        (fused_linear.fused_linear_backward, (h, w, b, y, rows, coef, ent_coef, 4, torch.float32, [True] * 3, backend,
                                              *spec)),
        (fused_linear.fused_linear_backward, (h, w, None, y, rows, coef, None, 4, torch.float32, [True, False, False],
                                              backend, *spec)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_every_registered_op(backend, device):
    cases = _opcheck_cases(backend, device)
    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("lco_kernels::")}
    assert {op._qualname for op, _ in cases} == registered, "every registered op needs an opcheck case"
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_no_graph_breaks(name, backend, device):
    fn, option_sets = LOSSES[name]
    inputs = _inputs(device=device)
    for kw in option_sets:
        explained = torch._dynamo.explain(lambda *t: fn(*t, backend=backend, **kw))(*inputs)
        assert explained.graph_break_count == 0, (kw, explained.break_reasons)
        assert explained.graph_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LINEAR_LOSSES)
def test_fused_linear_no_graph_breaks(name, backend, device):
    fn, option_sets = LINEAR_LOSSES[name]
    h, w, b, *rest = _linear_inputs(device=device)
    inputs = (h.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), *rest)
    for kw in option_sets:
        explained = torch._dynamo.explain(lambda *t: fn(*t, chunk_size=4, backend=backend, **kw))(*inputs)
        assert explained.graph_break_count == 0, (kw, explained.break_reasons)
        assert explained.graph_count == 1


def _train(step_fn, device, steps=3):
    """Losses and parameter gradients of ``steps`` SGD steps of embedding → linear → loss from one seed."""
    torch.manual_seed(1)
    emb, lin = torch.nn.Embedding(V, H).to(device), torch.nn.Linear(H, V).to(device)
    params = [emb.weight, lin.weight, lin.bias]
    opt = torch.optim.SGD(params, lr=0.5)
    tokens = torch.randint(0, V, (2, 4), device=device)
    labels = torch.randint(0, V, (2, 4), device=device)
    labels[0, 0] = -100
    adv = torch.randn(2, 4, device=device)
    history = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = step_fn(emb, lin, tokens, labels, adv)
        loss.backward()
        history.append((loss.detach().clone(), [p.grad.clone() for p in params]))
        opt.step()
    return history, adv


def _assert_same_training(eager, compiled):
    (eager, adv), (compiled, _) = eager, compiled
    atol = 1e-6 * float(adv.abs().max())
    for (loss_e, grads_e), (loss_c, grads_c) in zip(eager, compiled):
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=atol)
        for g_c, g_e in zip(grads_c, grads_e):
            torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("backend,inplace", [("torch", False), ("triton", True)])
def test_fullgraph_training_matches_eager(backend, inplace, device):
    def step(emb, lin, tokens, labels, adv):
        return lco_kernels.lco_loss(lin(emb(tokens)), labels, adv, entropy_coef=0.01, backend=backend,
                                    inplace_backward=inplace)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)  # Inductor
    _assert_same_training(_train(step, device), _train(compiled, device))


def test_fullgraph_token_logprobs_training_matches_eager(device):
    """A loss of the user's own on our log-probs and entropy, compiled with the model."""
    def step(emb, lin, tokens, labels, adv):
        logprobs, entropy = lco_kernels.token_logprobs(lin(emb(tokens)), labels, return_entropy=True)
        return -(adv * logprobs).mean() - 0.01 * entropy.mean()

    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager")
    _assert_same_training(_train(step, device), _train(compiled, device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_fused_linear_training_matches_eager(backend, device):
    """embedding → fused linear + LCO (the LM head's weight and bias, no logits), compiled whole. A scalar
    reduction: the forward forms the gradients, the compiled backward scales them out of place."""
    def step(emb, lin, tokens, labels, adv):
        return lco_kernels.fused_linear_lco_loss(emb(tokens), lin.weight, labels, adv, bias=lin.bias,
                                                 entropy_coef=0.01, chunk_size=3, backend=backend)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)  # Inductor
    _assert_same_training(_train(step, device), _train(compiled, device))


def test_fullgraph_fused_linear_token_logprobs_training_matches_eager(device):
    """Per-token outputs of the fused-linear form: the backward op projects each chunk again."""
    def step(emb, lin, tokens, labels, adv):
        logprobs, entropy = lco_kernels.fused_linear_token_logprobs(emb(tokens), lin.weight, labels, bias=lin.bias,
                                                                    return_entropy=True, chunk_size=3)
        return -(adv * logprobs).mean() - 0.01 * entropy.mean()

    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager")
    _assert_same_training(_train(step, device), _train(compiled, device))


@pytest.mark.parametrize("name", LINEAR_LOSSES)
def test_fused_linear_meta_and_fake_tensors(name):
    fn, _ = LINEAR_LOSSES[name]
    options = {"token_logprobs": [({}, (2, 3))], "gspo": [({}, ())]}.get(name, [({}, ()),
                                                                                ({"reduction": "none"}, (2, 3))])
    for kw, shape in options:
        h, w, b, y, a, o, r = (t.to("meta") for t in _linear_inputs())
        for t in (h, w, b):
            t.requires_grad_(True)
        loss = fn(h, w, b, y, a, o, r, backend="torch", **kw)
        assert loss.shape == shape and loss.device.type == "meta"
        loss.sum().backward()
        assert all(t.grad.shape == t.shape and t.grad.device.type == "meta" for t in (h, w, b))
    with FakeTensorMode():  # mixed dtypes: every gradient comes back in its input's dtype
        h, w, b, y, a, o, r = _linear_inputs()
        h = h.to(torch.bfloat16).requires_grad_(True)
        w.requires_grad_(True)
        loss = fn(h, w, None, y, a, o, r, backend="torch")
        loss = loss[0] if isinstance(loss, tuple) else loss
        loss.sum().backward()
        assert (h.grad.shape, h.grad.dtype, w.grad.shape, w.grad.dtype) == (h.shape, torch.bfloat16, w.shape,
                                                                            torch.float32)


@pytest.mark.parametrize("name", LOSSES)
def test_meta_and_fake_tensors(name):
    fn, _ = LOSSES[name]
    options = {"token_logprobs": [({}, (2, 3))], "gspo": [({}, ())]}.get(name, [({}, ()), ({"reduction": "none"}, (2, 3))])
    for kw, shape in options:
        z, y, a, o, r = (t.to("meta") for t in _inputs())
        z.requires_grad_(True)
        loss = fn(z, y, a, o, r, backend="torch", **kw)
        assert loss.shape == shape and loss.device.type == "meta"
        loss.sum().backward()
        assert z.grad.shape == z.shape and z.grad.device.type == "meta"
    with FakeTensorMode():
        z, y, a, o, r = _inputs()
        z.requires_grad_(True)
        if name == "token_logprobs":
            outputs = fn(z, y, a, o, r, return_entropy=True, backend="torch")
        elif name == "gspo":  # one scalar per call
            outputs = (fn(z, y, a, o, r, backend="torch"),)
        else:
            loss, stats = fn(z, y, a, o, r, reduction="none", return_stats=True, backend="torch")
            outputs = (loss, stats.entropy)
        sum(t.sum() for t in outputs).backward()
        assert all(t.shape == (() if name == "gspo" else y.shape) for t in outputs) and z.grad.shape == z.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_calls_skip_the_ops_with_identical_results(backend, device, monkeypatch):
    """An eager call on plain tensors runs autograd.LossFunction (the reduction inside), not the custom op;
    forced through the op, every output and gradient is bit-identical (stats, entropy, KL, in place, "mean"
    and "none"). Meta, fake and compiled calls keep the op."""
    plain = torch.zeros(2, 3, device=device)
    assert ops.runs_eagerly(plain) and not ops.runs_eagerly(plain.to("meta"))
    with FakeTensorMode():
        assert not ops.runs_eagerly(torch.zeros(2, 3))
    assert not torch.compile(lambda x: x + ops.runs_eagerly(x), fullgraph=True, backend="eager")(plain).any()

    op_calls = []
    policy_forward = ops.policy_forward
    monkeypatch.setattr(ops, "policy_forward", lambda *args: op_calls.append(1) or policy_forward(*args))
    z, y, a, o, r = _inputs((3, 4), device)
    cases = [("lco", {}), ("lco", {"old_logprobs": o, "entropy_coef": 0.01, "return_stats": True}),
             ("ppo", {"ref_logprobs": r, "beta": 0.1, "reduction": "none", "inplace_backward": True}),
             ("token_logprobs", {"return_entropy": True, "temperature": 0.7})]
    for name, options in cases:
        results = []
        for eager in (True, False):
            monkeypatch.setattr(ops, "runs_eagerly", lambda logits, eager=eager: eager)
            x = z.clone().requires_grad_(True)
            if name == "token_logprobs":
                outputs = lco_kernels.token_logprobs(x, y, backend=backend, **options)
            else:
                args = (o,) if name == "ppo" else ()
                outputs = getattr(lco_kernels, f"{name}_loss")(x, y, a, *args, backend=backend, **options)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            tensors = [t for out in outputs for t in (vars(out).values() if hasattr(out, "entropy") else (out,))
                       if t is not None]
            sum(t.sum() for t in tensors if t.requires_grad).backward()
            results.append([t.detach().clone() for t in tensors] + [x.grad.clone()])
            assert len(op_calls) == (0 if eager else 1)
            op_calls.clear()
        assert all(torch.equal(e, c) for e, c in zip(*results)), (name, options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_range_compiled(backend, device):
    """CPU: the check runs inside the op, so compiled code raises eager's ValueError. CUDA: no host
    read; the row with the bad label is NaN, the others are untouched."""
    z, y, a, _, _ = _inputs(device=device)
    y[1, 2] = V
    eager = lambda z, y, a: lco_kernels.lco_loss(z, y, a, reduction="none", backend=backend)  # noqa: E731
    compiled = torch.compile(eager, fullgraph=True, dynamic=False, backend="aot_eager")
    if device == "cpu":
        for fn in (eager, compiled):
            with pytest.raises(ValueError, match=f"labels must lie in \\[0, {V}\\).*found {V}"):
                fn(z, y, a)
    else:
        loss = compiled(z, y, a)
        assert torch.isnan(loss[1, 2]) and torch.isfinite(loss.view(-1)[:-1]).all()


def test_dynamic_shapes_compile_once(device):
    """With dynamic=True new batch/sequence sizes reuse the graph: nothing in the path specialises on them."""
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda z, y, a: lco_kernels.lco_loss(z, y, a, reduction="seq-mean-token-mean"),
                             fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for shape in ((2, 3), (3, 5), (4, 7)):
        z, y, a, _, _ = _inputs(shape, device)
        z.requires_grad_(True)
        loss = compiled(z, y, a)
        loss.backward()
        expected = lco_kernels.lco_loss(z, y, a, reduction="seq-mean-token-mean")
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
        frames.append(counter.frame_count)
    assert frames[0] > 0 and frames[1:] == frames[:1] * 2, f"recompiled for new shapes: frames compiled {frames}"


def test_from_logprobs_no_graph_breaks(device):
    """lco_loss_from_logprobs (a torch.autograd.Function over the torch heads) also traces in one graph."""
    z, y, a, _, _ = _inputs(device=device)
    logprobs = torch.log_softmax(z, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0].requires_grad_(True)
    explained = torch._dynamo.explain(lambda lp, a: lco_kernels.lco_loss_from_logprobs(lp, a))(logprobs, a)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
