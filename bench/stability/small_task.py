"""The first learning-rate experiment (Figure 7 analogue, cold start): a small RL task.

A ~280k-parameter MLP policy emits 3 tokens; reward +1 if they are strictly increasing and above the
prompt token, else −1; REINFORCE, PPO (PG-IS + clip) and REINFORCE+LCO at several learning rates and
seeds. bench/stability/warm_start.py is the second one, fair to LCO.
"""
import math
import statistics
import time

import torch

from lco_kernels import lco_loss, pg_loss, ppo_loss

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

