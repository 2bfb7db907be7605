"""The learning-rate experiment fair to LCO: a warm-started autoregressive policy, RL after SFT.

Task. A prompt (a, d), a ∈ [0, 256), d ∈ {1, …, 4}, asks for the 8 tokens x_k = (a + k·d) mod 256 from a
vocabulary of 256. Warm start: ``sft_loss`` on demonstrations of that rule in which each token was
replaced by a uniformly random one with probability 0.1 (a perfect imitator of them gets each token right
with p ≈ 0.9, about 0.9⁸ ≈ 43 % of whole sequences; 300 SFT steps reach 28-29 %). RL then asks for the
harder thing the demonstrations never showed: all 8 tokens exactly right (reward +1, else −1).

Policy: a GRU (embedding 96, hidden 192, 241k parameters). RL: GRPO-style, 16 prompts × a group
of 8 samples per step, advantages (r − group mean) / (group std + 1e-6) for every token of a sample,
the rollout used for 2 Adam minibatch steps (so the second is off-policy and the importance ratio of
PG-IS and PPO is not 1), every loss through the library (backend="torch", reduction "mean").

Collapse: a run whose final success rate (mean of its last 10 steps' samples) ends below half of the
warm start's success rate, or whose loss or gradient became non-finite (the run stops there).
"""
import math
import statistics
import time

import torch

from lco_kernels import lco_loss, pg_loss, ppo_loss, sft_loss

VOCAB, OUT_LEN, MAX_STEP = 256, 8, 4
NOISE = 0.1
COLLAPSE_FRACTION = 0.5
TAIL = 10
ZERO_STOP = 20   # a run whose samples all failed for this many steps in a row has stopped learning (every
                 # group-normalised advantage is 0); it ends there as collapsed

# PG-IS is ppo_loss with the clip switched off: the validation wants epsilon_low in [0, 1), so the ratio
# is clipped to [1e-12, 1 + 1e12], which no ratio reaches (ppo_loss clamps |log r| at 20).
PG_IS_EPSILONS = dict(epsilon_low=1 - 1e-12, epsilon_high=1e12)
METHODS = ("REINFORCE", "PG-IS", "PPO", "REINFORCE+LCO")


class GRUPolicy(torch.nn.Module):
    """p(x_k | a, d, x_<k): embedding → one-layer GRU → linear head over the vocabulary."""

    def __init__(self, embed=96, hidden=192):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, embed)
        self.gru = torch.nn.GRU(embed, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, VOCAB)

    def logits(self, prompts, tokens):
        """Teacher-forced logits (B, OUT_LEN, V) of ``tokens`` (B, OUT_LEN) after ``prompts`` (B, 2)."""
        h, _ = self.gru(self.embed(torch.cat([prompts, tokens[:, :-1]], 1)))
        return self.head(h[:, prompts.shape[1] - 1:])

    @torch.no_grad()
    def sample(self, prompts, generator):
        """(tokens, their log-probabilities), both (B, OUT_LEN), sampled token by token."""
        h, state = self.gru(self.embed(prompts))
        last, tokens, logprobs = h[:, -1], [], []
        for _ in range(OUT_LEN):
            logp = torch.log_softmax(self.head(last), -1)
            tok = torch.multinomial(logp.exp(), 1, generator=generator)
            tokens.append(tok)
            logprobs.append(logp.gather(1, tok))
            h, state = self.gru(self.embed(tok), state)
            last = h[:, -1]
        return torch.cat(tokens, 1), torch.cat(logprobs, 1)


def draw_prompts(n, generator):
    a = torch.randint(0, VOCAB, (n,), generator=generator)
    d = torch.randint(1, MAX_STEP + 1, (n,), generator=generator)
    return torch.stack([a, d], 1)


def rule(prompts):
    k = torch.arange(1, OUT_LEN + 1)
    return (prompts[:, :1] + k * prompts[:, 1:]) % VOCAB


def reward(prompts, tokens):
    """+1 when all OUT_LEN tokens follow the rule, else −1."""
    return (tokens == rule(prompts)).all(1).float() * 2 - 1


def demonstrations(prompts, generator):
    """The rule's outputs with each token replaced by a uniformly random one with probability NOISE."""
    target = rule(prompts)
    noise = torch.rand(target.shape, generator=generator) < NOISE
    return torch.where(noise, torch.randint(0, VOCAB, target.shape, generator=generator), target)


def success_rate(policy, generator, n=1024):
    prompts = draw_prompts(n, generator)
    return (reward(prompts, policy.sample(prompts, generator)[0]) > 0).float().mean().item()


def warm_start(seed, steps=300, batch=128, lr=1e-2):
    """SFT on noisy demonstrations; returns (state_dict, {"sft_loss": [...], "success": rate on the RL task})."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(20_000 + seed)
    policy = GRUPolicy()
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        prompts = draw_prompts(batch, gen)
        demo = demonstrations(prompts, gen)
        loss = sft_loss(policy.logits(prompts, demo), demo, backend="torch")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return policy.state_dict(), {"sft_loss": losses, "success": success_rate(policy, gen)}


def method_loss(method, logits, tokens, adv, old):
    if method == "REINFORCE":
        return pg_loss(logits, tokens, adv, backend="torch", return_stats=True)
    if method == "PG-IS":
        return ppo_loss(logits, tokens, adv, old, backend="torch", return_stats=True, **PG_IS_EPSILONS)
    if method == "PPO":
        return ppo_loss(logits, tokens, adv, old, backend="torch", return_stats=True)
    return lco_loss(logits, tokens, adv, backend="torch", return_stats=True)


def train(method, lr, seed, state, steps, prompts_per_step=16, group=8, minibatches=2):
    """One RL run from the warm start ``state``; per step: success rate of its samples, ‖∂L/∂z‖ and ‖∇θ L‖
    (mean over its minibatches), mean entropy. Stops at the first non-finite loss or gradient."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(30_000 + seed)
    policy = GRUPolicy()
    policy.load_state_dict(state)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    hist = {"success": [], "logit_grad_norm": [], "param_grad_norm": [], "entropy": [], "finite": True}
    for _ in range(steps):
        prompts = draw_prompts(prompts_per_step, gen).repeat_interleave(group, 0)
        tokens, old = policy.sample(prompts, gen)   # the old log-probs of PG-IS and PPO
        r = reward(prompts, tokens).view(-1, group)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1, 1).expand(-1, OUT_LEN)
        z_norms, p_norms, ent = [], [], []
        for idx in torch.randperm(prompts.shape[0], generator=gen).chunk(minibatches):
            logits = policy.logits(prompts[idx], tokens[idx])
            logits.retain_grad()
            loss, stats = method_loss(method, logits, tokens[idx], adv[idx], old[idx])
            opt.zero_grad()
            loss.backward()
            p_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), math.inf).item()
            if not (math.isfinite(loss.item()) and math.isfinite(p_norm)):
                hist["finite"] = False
                break
            opt.step()
            z_norms.append(logits.grad.norm().item())
            p_norms.append(p_norm)
            ent.append(stats.entropy.mean().item())
        if not hist["finite"]:
            break
        hist["success"].append((r > 0).float().mean().item())
        hist["logit_grad_norm"].append(statistics.mean(z_norms))
        hist["param_grad_norm"].append(statistics.mean(p_norms))
        hist["entropy"].append(statistics.mean(ent))
        if len(hist["success"]) >= ZERO_STOP and not any(hist["success"][-ZERO_STOP:]):
            break
    return hist


def _spikiness(xs):
    """max / median over the steps of a run (1 = flat; large = rare spikes)."""
    return max(xs) / statistics.median(xs) if xs and statistics.median(xs) > 0 else math.nan


def summarize_run(hist, warm_success):
    finals = hist["success"][-TAIL:]
    final = statistics.mean(finals) if finals else 0.0
    return {"final_success": final, "steps_run": len(hist["success"]),
            "collapsed": not hist["finite"] or final < COLLAPSE_FRACTION * warm_success,
            "logit_grad_spikiness": _spikiness(hist["logit_grad_norm"]),
            "param_grad_spikiness": _spikiness(hist["param_grad_norm"])}


def lr_grid_runs(method, lrs, seeds, warm, steps, past_collapse=3, log=print):
    """Runs at the rates ``lrs`` in increasing order, stopping ``past_collapse`` rates after the first rate at
    which any seed collapsed."""
    runs, first_collapse = [], None
    for k, lr in enumerate(lrs):
        for seed in seeds:
            t0 = time.perf_counter()
            hist = train(method, lr, seed, warm[seed]["state"], steps)
            run = dict(method=method, lr=lr, seed=seed, **summarize_run(hist, warm[seed]["success"]),
                       history={key: [round(x, 5) for x in v] for key, v in hist.items() if key != "finite"},
                       finite=hist["finite"])
            runs.append(run)
            log(f"{method:>13} lr={lr:g} seed={seed}: final success {run['final_success']:.2f} (warm start "
                f"{warm[seed]['success']:.2f}){' COLLAPSED' if run['collapsed'] else ''} "
                f"({run['steps_run']} steps, {time.perf_counter() - t0:.1f} s)")
        if first_collapse is None and any(r["collapsed"] for r in runs if r["lr"] == lr):
            first_collapse = k
        if first_collapse is not None and k >= first_collapse + past_collapse:
            break
    return runs


def summarize_method(runs):
    """Best mean final success and its rate, max stable rate, stable-range width, spikiness (median over
    seeds) at the max stable rate and the rate above it."""
    lrs = sorted({r["lr"] for r in runs})
    at = {lr: [r for r in runs if r["lr"] == lr] for lr in lrs}
    mean_final = {lr: statistics.mean(r["final_success"] for r in rs) for lr, rs in at.items()}
    best_lr = max(lrs, key=mean_final.__getitem__)
    stable = [lr for lr in lrs if not any(r["collapsed"] for r in at[lr])]
    max_stable = max(stable) if stable else None
    reach90 = min(lr for lr in lrs if mean_final[lr] >= 0.9 * mean_final[best_lr])
    above = [lr for lr in lrs if max_stable is not None and lr > max_stable]

    def spikes(lr, key):
        return statistics.median(r[key] for r in at[lr]) if lr is not None else None
    return {"lrs": lrs, "mean_final_success": [mean_final[lr] for lr in lrs], "best_final_success": mean_final[best_lr],
            "best_lr": best_lr, "max_stable_lr": max_stable, "min_lr_reaching_90pct_of_best": reach90,
            "stable_range_width": max_stable / reach90 if max_stable else None,
            "first_collapse_lr": min((lr for lr in lrs if lr not in stable), default=None),
            "above_max_stable_lr": above[0] if above else None,
            "logit_grad_spikiness": [spikes(max_stable, "logit_grad_spikiness"),
                                     spikes(above[0] if above else None, "logit_grad_spikiness")],
            "param_grad_spikiness": [spikes(max_stable, "param_grad_spikiness"),
                                     spikes(above[0] if above else None, "param_grad_spikiness")]}


# Each method's grid climbs this ladder (×3 and ×3.33 steps) from its own first rate, where it learns slowly.
LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)


# Each method's first full-run rate: where it learns slowly (a pilot: REINFORCE, PG-IS and PPO gained
# about 0.08 success in 60 steps at 3e-4; REINFORCE+LCO gained 0.14 there, so it starts a rate lower).
FIRST_LR = {"REINFORCE": 3e-4, "PG-IS": 3e-4, "PPO": 3e-4, "REINFORCE+LCO": 1e-4}


def settings(quick):
    first = {m: 3e-3 for m in METHODS} if quick else FIRST_LR
    return dict(quick=quick, seeds=[0] if quick else [0, 1, 2], sft_steps=150 if quick else 300,
                rl_steps=20 if quick else 120, past_collapse=0 if quick else 3,
                lrs={m: [lr for lr in LADDER if lr >= first[m]][:2 if quick else None] for m in METHODS},
                vocab=VOCAB, out_len=OUT_LEN, noise=NOISE, collapse_fraction=COLLAPSE_FRACTION, tail=TAIL,
                zero_success_stop=ZERO_STOP)


def experiment(config, log=print):
    """The whole experiment under ``config`` (see ``settings``); returns a JSON-able record. Runs on one
    thread: under a shared CPU the GRU's small matrix products run faster on one than fighting for two
    (the previous setting is restored)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        warm = {}
        for seed in config["seeds"]:
            state, info = warm_start(seed, steps=config["sft_steps"])
            warm[seed] = dict(state=state, **info)
            log(f"warm start seed {seed}: SFT loss {info['sft_loss'][0]:.2f} → {info['sft_loss'][-1]:.2f}, "
                f"success on the RL task {info['success']:.3f}")
        runs = []
        for method in METHODS:
            runs += lr_grid_runs(method, config["lrs"][method], config["seeds"], warm, config["rl_steps"],
                                 config["past_collapse"], log=log)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"settings": config, "seconds": seconds,
            "warm_start": {seed: {"success": w["success"], "sft_loss": w["sft_loss"][::10]} for seed, w in warm.items()},
            "runs": runs, "summary": {m: summarize_method([r for r in runs if r["method"] == m]) for m in METHODS}}
