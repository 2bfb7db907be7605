"""Tables (Markdown) and plots (PNG) of what bench/stability's experiments measured."""
import statistics

from . import warm_start
from .claims import DYNAMICS_P0, DYNAMICS_V, curvature
from .small_task import RL_METHODS, smooth


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



def _lr(x):
    return "—" if x is None else f"{x:g}"


def _ratio(x):
    return "—" if x is None else f"{x:.2f}"


def warm_start_table(record):
    """Per method: the summary of its own learning-rate grid."""
    lines = ["| method | rates tried | best final success (at lr) | first collapse | max stable lr | min lr reaching "
             "90 % of best | stable-range width | ‖∂L/∂z‖ spikiness: max stable / one above | ‖∇θL‖ spikiness: "
             "max stable / one above |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method, s in record["summary"].items():
        lines.append(f"| {method} | {_lr(s['lrs'][0])} … {_lr(s['lrs'][-1])} ({len(s['lrs'])}) | "
                     f"{s['best_final_success']:.2f} ({_lr(s['best_lr'])}) | {_lr(s['first_collapse_lr'])} | "
                     f"{_lr(s['max_stable_lr'])} | {_lr(s['min_lr_reaching_90pct_of_best'])} | "
                     f"{_ratio(s['stable_range_width'])} | {_ratio(s['logit_grad_spikiness'][0])} / "
                     f"{_ratio(s['logit_grad_spikiness'][1])} | {_ratio(s['param_grad_spikiness'][0])} / "
                     f"{_ratio(s['param_grad_spikiness'][1])} |")
    return "\n".join(lines)


def warm_start_runs_table(record):
    """Per method and rate: final success over the seeds, collapses, steps run, spikiness."""
    lines = ["| method | lr | final success: mean (min–max over seeds) | collapses | steps run | ‖∂L/∂z‖ spikiness "
             "(median over seeds) | ‖∇θL‖ spikiness |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for method, lr in dict.fromkeys((r["method"], r["lr"]) for r in record["runs"]):
        rs = [r for r in record["runs"] if r["method"] == method and r["lr"] == lr]
        fs = [r["final_success"] for r in rs]
        lines.append(f"| {method} | {lr:g} | {statistics.mean(fs):.2f} ({min(fs):.2f}–{max(fs):.2f}) | "
                     f"{sum(r['collapsed'] for r in rs)}/{len(rs)} | {'/'.join(str(r['steps_run']) for r in rs)} | "
                     f"{statistics.median(r['logit_grad_spikiness'] for r in rs):.2f} | "
                     f"{statistics.median(r['param_grad_spikiness'] for r in rs):.2f} |")
    return "\n".join(lines)


def plot_warm_start(record, path):
    """Per method (columns): success, ‖∂L/∂z‖ and ‖∇θL‖ vs step at its max stable rate and the rate above."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(record["summary"])
    rows = (("success", "success rate (5-step mean)", "linear"), ("logit_grad_norm", "‖∂L/∂z‖", "log"),
            ("param_grad_norm", "‖∇θ L‖", "log"))
    fig, axes = plt.subplots(len(rows), len(methods), figsize=(4.2 * len(methods), 2.8 * len(rows)), squeeze=False)
    warm = statistics.mean(w["success"] for w in record["warm_start"].values())
    for j, method in enumerate(methods):
        s = record["summary"][method]
        for lr, color in ((s["max_stable_lr"], "tab:blue"), (s["above_max_stable_lr"], "tab:red")):
            if lr is None:
                continue
            for k, r in enumerate(r for r in record["runs"] if r["method"] == method and r["lr"] == lr):
                for i, (key, _, _) in enumerate(rows):
                    ys = smooth(r["history"][key], 5) if key == "success" else r["history"][key]
                    axes[i][j].plot(ys, color=color, lw=1, alpha=0.8,
                                    label=f"lr {lr:g}" + (" (max stable)" if color == "tab:blue" else "")
                                    if k == 0 else None)
        axes[0][j].axhline(warm, color="grey", ls="--", lw=0.8)
        axes[0][j].axhline(warm * warm_start.COLLAPSE_FRACTION, color="grey", ls=":", lw=0.8)
        axes[0][j].set_title(method)
        axes[0][j].legend(fontsize=7)
        for i, (_, label, scale) in enumerate(rows):
            axes[i][j].set(yscale=scale, xlabel="RL step" if i == len(rows) - 1 else None,
                           ylabel=label if j == 0 else None)
    fig.suptitle("warm-started GRU policy, one line per seed; dashed: warm start's success, dotted: collapse "
                 "threshold", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
