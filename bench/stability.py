"""``python -m bench stability [--quick]``: the paper's claims, reproduced with our own fused losses.

1. Single-state gradient dynamics (paper §3, §4.3): a free logit vector z, one sampled action,
   plain gradient descent on SFT, PG (Ψ = ±1), PG-IS (Ψ = ±1) and LCO (Ψ = ±1) through the public
   losses; per step the loss, ‖∂L/∂z‖, the sampled action's probability and the entropy.
2. Logits convexity (Propositions 3-6): extreme eigenvalues of the Hessian w.r.t. the logits of the
   float64 references (autograd; LCO's target is a constant, as in the paper) at random points.
3. Learning-rate robustness on a small RL task (Figure 7 analogue): a ~280k-parameter MLP policy
   emits 3 tokens; reward +1 if they are strictly increasing and above the prompt token, else −1;
   REINFORCE, PPO (PG-IS + clip) and REINFORCE+LCO at several learning rates and seeds.
"""
import math
import statistics
import time

import torch

import reference
from lco_kernels import lco_loss, pg_loss, ppo_loss, sft_loss

# ---------------------------------------------------------------- 1. single-state gradient dynamics

DYNAMICS_V = 1000
DYNAMICS_P0 = 0.9     # the sampled action starts likely: PG-IS with Ψ < 0 then shows its rise and fall


def _dynamics_loss(method, z, label, p_old_log):
    kind, sign = method.rsplit(" ", 1) if " " in method else (method, "+")
    adv = torch.tensor([1.0 if sign == "+" else -1.0])
    if kind == "SFT":
        return sft_loss(z, label, reduction="sum", backend="torch", return_stats=True)
    if kind == "PG":
        return pg_loss(z, label, adv, reduction="sum", backend="torch", return_stats=True)
    if kind == "PG-IS":   # the importance ratio against the starting policy, unclipped
        return ppo_loss(z, label, adv, p_old_log, epsilon_low=1 - 1e-12, epsilon_high=1e12, reduction="sum",
                        backend="torch", return_stats=True)
    return lco_loss(z, label, adv, reduction="sum", backend="torch", return_stats=True)


DYNAMICS_METHODS = ("SFT", "PG +", "PG -", "PG-IS +", "PG-IS -", "LCO +", "LCO -")


def gradient_dynamics(steps=300, lr=1.0, seed=0):
    """{method: {"loss", "grad_norm", "prob", "entropy": [per step]}} from one shared random start."""
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(1, DYNAMICS_V, generator=g, dtype=torch.float64).float()
    label = torch.tensor([int(torch.randint(0, DYNAMICS_V, (1,), generator=g))])
    # raise the sampled logit so that its probability starts at DYNAMICS_P0
    rest = torch.logsumexp(torch.cat([z0[0, :label], z0[0, label + 1:]]), 0)
    z0[0, label] = rest + math.log(DYNAMICS_P0 / (1 - DYNAMICS_P0))
    p_old_log = torch.log_softmax(z0, -1)[:, label[0]]
    curves = {}
    for method in DYNAMICS_METHODS:
        z = z0.clone()
        rec = {"loss": [], "grad_norm": [], "prob": [], "entropy": []}
        for _ in range(steps):
            z.requires_grad_(True)
            loss, stats = _dynamics_loss(method, z, label, p_old_log)
            (grad,) = torch.autograd.grad(loss, z)
            rec["loss"].append(loss.item())
            rec["grad_norm"].append(grad.norm().item())
            rec["prob"].append(stats.logprobs.exp().item())
            rec["entropy"].append(stats.entropy.item())
            z = (z - lr * grad).detach()
        curves[method] = rec
    return curves


# ---------------------------------------------------------------- 2. logits convexity

HESSIAN_CASES = (("SFT", "sft", 1.0), ("PG, Ψ > 0", "pg", 1.0), ("PG, Ψ < 0", "pg", -1.0),
                 ("PG-IS, Ψ > 0", "ppo", 1.0), ("PG-IS, Ψ < 0", "ppo", -1.0), ("LCO, Ψ > 0", "lco", 1.0),
                 ("LCO, Ψ > 0, clamped", "lco", 1.0), ("LCO, Ψ < 0", "lco", -1.0))


def hessian_eigenvalues(points=20, V=12, seed=0):
    """{case: (min eigenvalue, max eigenvalue) over ``points`` random logit vectors} (float64)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, kind, sign in HESSIAN_CASES:
        lo, hi = math.inf, -math.inf
        for _ in range(points):
            z = torch.randn(1, V, generator=g, dtype=torch.float64) * 2
            label = torch.randint(0, V, (1,), generator=g)
            if "clamped" in name:
                z[0, label] = z.max() + 3.0       # p_i > 1/ρ: one-hot target
            adv = torch.tensor([sign], dtype=torch.float64)
            old = (torch.log_softmax(z, -1)[:, label[0]] + torch.randn(1, generator=g, dtype=torch.float64)).detach()
            big = 1e12  # PG-IS: no clipping

            def f(x):
                return reference.policy_loss_reference(
                    kind, x, label, None if kind == "sft" else adv, old if kind == "ppo" else None,
                    reduction="sum", epsilon_low=1 - 1e-12, epsilon_high=big)[1]
            eig = torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, z).reshape(V, V))
            lo, hi = min(lo, eig.min().item()), max(hi, eig.max().item())
        out[name] = (lo, hi)
    return out


def curvature(lo, hi, tol=1e-10):
    if lo >= -tol:
        return "PSD (convex)"
    if hi <= tol:
        return "NSD (concave)"
    return "indefinite"


# ---------------------------------------------------------------- 3. learning-rate robustness

TASK_V, TASK_LEN, TASK_PROMPTS = 12, 3, 4


class Policy(torch.nn.Module):
    """p(token | prompt, previous token, position): an MLP over one-hot features (~280k parameters)."""

    def __init__(self, width=512):
        super().__init__()
        n_in = TASK_PROMPTS + (TASK_V + 1) + TASK_LEN
        self.net = torch.nn.Sequential(torch.nn.Linear(n_in, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                       torch.nn.ReLU(), torch.nn.Linear(width, TASK_V))

    def features(self, prompts, prev, pos):
        f = torch.zeros(prompts.shape[0], TASK_PROMPTS + TASK_V + 1 + TASK_LEN)
        rows = torch.arange(prompts.shape[0])
        f[rows, prompts] = 1
        f[rows, TASK_PROMPTS + prev] = 1
        f[rows, TASK_PROMPTS + TASK_V + 1 + pos] = 1
        return f

    def logits(self, prompts, tokens):
        """Teacher-forced logits (B, TASK_LEN, V) for sampled ``tokens`` (B, TASK_LEN)."""
        bos = torch.full((tokens.shape[0], 1), TASK_V)
        prev = torch.cat([bos, tokens[:, :-1]], 1)
        feats = torch.stack([self.features(prompts, prev[:, t], torch.full_like(prompts, t)) for t in range(TASK_LEN)], 1)
        return self.net(feats)

    @torch.no_grad()
    def sample(self, prompts, generator):
        tokens = torch.zeros(prompts.shape[0], TASK_LEN, dtype=torch.long)
        prev = torch.full_like(prompts, TASK_V)
        for t in range(TASK_LEN):
            probs = torch.softmax(self.net(self.features(prompts, prev, torch.full_like(prompts, t))), -1)
            tokens[:, t] = torch.multinomial(probs, 1, generator=generator)[:, 0]
            prev = tokens[:, t]
        return tokens


def reward(prompts, tokens):
    """+1 when the tokens strictly increase and the first exceeds the prompt token, else −1."""
    ok = (tokens[:, 0] > prompts) & (tokens[:, 1:] > tokens[:, :-1]).all(1)
    return ok.float() * 2 - 1


RL_METHODS = ("REINFORCE", "PPO", "REINFORCE+LCO")


def train(method, lr, seed, steps, prompts_per_step=32, group=8, minibatches=2):
    """One run; per step: success rate, mean parameter-gradient norm, mean entropy, mean sampled prob."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    policy = Policy()
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    hist = {"success": [], "param_grad_norm": [], "logit_grad_norm": [], "entropy": [], "sampled_prob": []}
    for _ in range(steps):
        prompts = torch.randint(0, TASK_PROMPTS, (prompts_per_step,), generator=gen).repeat_interleave(group)
        tokens = policy.sample(prompts, gen)
        r = reward(prompts, tokens)
        # group-centred advantage (GRPO without the std division), the same for every token of a sequence
        adv = (r - r.view(-1, group).mean(1).repeat_interleave(group))[:, None].expand(-1, TASK_LEN)
        with torch.no_grad():
            old = torch.log_softmax(policy.logits(prompts, tokens), -1).gather(-1, tokens[..., None])[..., 0]
        norms, lg, ent, prob = [], [], [], []
        for idx in torch.randperm(prompts.shape[0], generator=gen).chunk(minibatches):
            logits = policy.logits(prompts[idx], tokens[idx])
            if method == "REINFORCE":
                loss, stats = pg_loss(logits, tokens[idx], adv[idx], backend="torch", return_stats=True)
            elif method == "PPO":
                loss, stats = ppo_loss(logits, tokens[idx], adv[idx], old[idx], backend="torch", return_stats=True)
            else:
                loss, stats = lco_loss(logits, tokens[idx], adv[idx], backend="torch", return_stats=True)
            opt.zero_grad()
            loss.backward()
            norms.append(torch.nn.utils.clip_grad_norm_(policy.parameters(), math.inf).item())
            opt.step()
            lg.append(stats.logit_grad_norm.mean().item())
            ent.append(stats.entropy.mean().item())
            prob.append(stats.logprobs.exp().mean().item())
        hist["success"].append((r > 0).float().mean().item())
        hist["param_grad_norm"].append(statistics.mean(norms))
        hist["logit_grad_norm"].append(statistics.mean(lg))
        hist["entropy"].append(statistics.mean(ent))
        hist["sampled_prob"].append(statistics.mean(prob))
    return hist


def smooth(xs, k=10):
    return [statistics.mean(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]


def summarize_run(hist, tail=10):
    """Final success rate (mean of the last ``tail`` steps) and whether the run collapsed: its smoothed
    success rate ended below half of its best (a best of at least 0.2) and never came back."""
    s = smooth(hist["success"])
    best = max(s)
    final = statistics.mean(hist["success"][-tail:])
    return {"final_success": final, "best_smoothed": best, "collapsed": best >= 0.2 and s[-1] < best / 2}


def lr_sweep(lrs, seeds, steps, log=print):
    runs = []
    total = len(RL_METHODS) * len(lrs) * len(seeds)
    for method in RL_METHODS:
        for lr in lrs:
            for seed in seeds:
                t0 = time.perf_counter()
                hist = train(method, lr, seed, steps)
                runs.append(dict(method=method, lr=lr, seed=seed, history=hist, **summarize_run(hist)))
                log(f"[{len(runs)}/{total}] {method:>13} lr={lr:g} seed={seed}: final success "
                    f"{runs[-1]['final_success']:.2f}{' COLLAPSED' if runs[-1]['collapsed'] else ''} "
                    f"({time.perf_counter() - t0:.1f} s)")
    return runs


# ---------------------------------------------------------------- report

def trend(xs, tol=1e-9):
    if all(b <= a + tol for a, b in zip(xs, xs[1:])):
        return "falls monotonically"
    if all(b >= a - tol for a, b in zip(xs, xs[1:])):
        return "grows monotonically"
    peak = max(range(len(xs)), key=xs.__getitem__)
    if 0 < peak < len(xs) - 1:
        return f"rises (to step {peak}) then falls"
    return "mixed"


def dynamics_table(curves):
    lines = ["| method | loss: start → end | ‖∂L/∂z‖: start / peak / end | ‖∂L/∂z‖ trend | p(sampled): start → end "
             "| entropy: start → end |", "| --- | --- | --- | --- | --- | --- |"]
    for method, r in curves.items():
        g = r["grad_norm"]
        lines.append(f"| {method} | {r['loss'][0]:.3g} → {r['loss'][-1]:.3g} | {g[0]:.3g} / {max(g):.3g} / {g[-1]:.3g} "
                     f"| {trend(g)} | {r['prob'][0]:.3f} → {r['prob'][-1]:.3g} | {r['entropy'][0]:.2f} → "
                     f"{r['entropy'][-1]:.2f} |")
    return "\n".join(lines)


PAPER_CURVATURE = {"SFT": "convex (Prop. 3)", "PG, Ψ > 0": "convex (Prop. 4)", "PG, Ψ < 0": "concave (Prop. 4)",
                   "PG-IS, Ψ > 0": "not convex (Prop. 5)", "PG-IS, Ψ < 0": "not convex (Prop. 5)",
                   "LCO, Ψ > 0": "convex (Prop. 6)", "LCO, Ψ > 0, clamped": "convex (Prop. 6)",
                   "LCO, Ψ < 0": "convex (Prop. 6)"}


def hessian_table(eigs):
    lines = ["| loss | min eigenvalue | max eigenvalue | measured | paper |", "| --- | --- | --- | --- | --- |"]
    for name, (lo, hi) in eigs.items():
        lines.append(f"| {name} | {lo:.3g} | {hi:.3g} | {curvature(lo, hi)} | {PAPER_CURVATURE[name]} |")
    return "\n".join(lines)


def rl_table(runs):
    lines = ["| method | learning rate | final success rate: mean (min–max over seeds) | collapses "
             "| never learned (best < 0.2) | runs |", "| --- | --- | --- | --- | --- | --- |"]
    keys = dict.fromkeys((r["method"], r["lr"]) for r in runs)
    for method, lr in keys:
        rs = [r for r in runs if r["method"] == method and r["lr"] == lr]
        fs = [r["final_success"] for r in rs]
        lines.append(f"| {method} | {lr:g} | {statistics.mean(fs):.2f} ({min(fs):.2f}–{max(fs):.2f}) | "
                     f"{sum(r['collapsed'] for r in rs)} | {sum(r['best_smoothed'] < 0.2 for r in rs)} | {len(rs)} |")
    return "\n".join(lines)


def plot_dynamics(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for (key, title, scale), ax in zip((("loss", "loss", "symlog"), ("grad_norm", "‖∂L/∂z‖₂", "log"),
                                        ("prob", "p(sampled action)", "linear"), ("entropy", "entropy", "linear")),
                                       axes):
        for method, r in curves.items():
            ax.plot(r[key], label=method, ls="--" if method.endswith("-") else "-")
        ax.set(title=title, xlabel="gradient-descent step", yscale=scale)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"single-state gradient dynamics, V = {DYNAMICS_V}, p(sampled) starts at {DYNAMICS_P0}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rl(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lrs = sorted({r["lr"] for r in runs})
    metrics = (("success", "success rate (10-step mean)"), ("param_grad_norm", "‖∇θ L‖"),
               ("entropy", "entropy"), ("sampled_prob", "p(sampled token)"))
    fig, axes = plt.subplots(len(metrics), len(lrs), figsize=(4 * len(lrs), 2.6 * len(metrics)), squeeze=False)
    for j, lr in enumerate(lrs):
        for method in RL_METHODS:
            rs = [r for r in runs if r["method"] == method and r["lr"] == lr]
            for i, (key, label) in enumerate(metrics):
                series = [smooth(r["history"][key]) for r in rs]
                mean = [statistics.mean(v) for v in zip(*series)]
                axes[i][j].plot(mean, label=method)
                axes[i][j].set(ylabel=label if j == 0 else None, title=f"lr = {lr:g}" if i == 0 else None)
                if key == "param_grad_norm":
                    axes[i][j].set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(quick, out_dir, log):
    import json
    import os
    sections = []
    t0 = time.perf_counter()
    log("1/3 single-state gradient dynamics ...")
    curves = gradient_dynamics(steps=150 if quick else 300)
    sections.append("## Single-state gradient dynamics (plain gradient descent on a free logit vector, lr 1)\n\n"
                    + dynamics_table(curves))
    log("2/3 Hessians w.r.t. the logits ...")
    eigs = hessian_eigenvalues(points=5 if quick else 20)
    sections.append("## Logits convexity: Hessian eigenvalues at random points (float64, V = 12)\n\n"
                    + hessian_table(eigs))
    log("3/3 learning-rate sweep on the small RL task ...")
    lrs = (1e-3, 1e-2, 3e-2) if quick else (1e-3, 3e-3, 1e-2, 3e-2)
    seeds = (0,) if quick else (0, 1, 2)
    steps = 40 if quick else 150
    runs = lr_sweep(lrs, seeds, steps, log)
    sections.append(f"## Learning-rate robustness: small RL task ({steps} steps × 256 sampled sequences, Adam; "
                    "final = mean success rate of the last 10 steps; collapse = the 10-step success rate ends below "
                    "half of its best, a best of at least 0.2)\n\n" + rl_table(runs))
    os.makedirs(out_dir, exist_ok=True)
    plot_dynamics(curves, os.path.join(out_dir, "dynamics.png"))
    plot_rl(runs, os.path.join(out_dir, "rl_lr_sweep.png"))
    with open(os.path.join(out_dir, "record.json"), "w") as f:
        json.dump({"dynamics": curves, "hessian": eigs, "runs": runs, "quick": quick}, f)
    log(f"stability done in {time.perf_counter() - t0:.0f} s; wrote {out_dir}")
    return sections
