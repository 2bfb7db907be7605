"""``python -m bench stability [--quick] [--part PART]``: the paper's claims, reproduced with our own losses.

Experiments (each its own module; report.py turns what they measure into tables and plots):
  claims      1. single-state gradient dynamics and 2. logits convexity (claims.py)
  small-task  3. learning-rate robustness on a small cold-started RL task (small_task.py)
  warm-start  4. the learning-rate experiment fair to LCO: a warm-started GRU policy, each method's
              own learning-rate grid (warm_start.py)
"""
import os
import time

from bench.report import write_record

from . import claims, report, small_task, warm_start

PARTS = ("claims", "small-task", "warm-start")


def main(quick, out_dir, log, parts=PARTS):
    """Runs ``parts``, writes record.json and the plots under ``out_dir``; returns the Markdown sections."""
    os.makedirs(out_dir, exist_ok=True)
    sections, record, plots = [], {"quick": quick}, []
    t0 = time.perf_counter()
    if "claims" in parts:
        log("single-state gradient dynamics ...")
        record["dynamics"] = curves = claims.gradient_dynamics(steps=150 if quick else 300)
        sections.append("## Single-state gradient dynamics (plain gradient descent on a free logit vector, lr 1)\n\n"
                        + report.dynamics_table(curves))
        plots.append((report.plot_dynamics, curves, "dynamics.png"))
        log("Hessians w.r.t. the logits ...")
        record["hessian"] = eigs = claims.hessian_eigenvalues(points=5 if quick else 20)
        sections.append("## Logits convexity: Hessian eigenvalues at random points (float64, V = 12)\n\n"
                        + report.hessian_table(eigs))
    if "small-task" in parts:
        log("learning-rate sweep on the small RL task ...")
        lrs = (1e-3, 1e-2, 3e-2) if quick else (1e-3, 3e-3, 1e-2, 3e-2)
        seeds = (0,) if quick else (0, 1, 2)
        steps = 40 if quick else 150
        record["runs"] = runs = small_task.lr_sweep(lrs, seeds, steps, log)
        sections.append(f"## Learning-rate robustness: small RL task ({steps} steps × 256 sampled sequences, Adam; "
                        "final = mean success rate of the last 10 steps; collapse = the 10-step success rate ends "
                        "below half of its best, a best of at least 0.2)\n\n" + report.rl_table(runs))
        plots.append((report.plot_rl, runs, "rl_lr_sweep.png"))
    if "warm-start" in parts:
        log("learning-rate grids on the warm-started policy ...")
        record["warm_start"] = ws = warm_start.experiment(warm_start.settings(quick), log)
        sections.append(warm_start_section(ws))
        plots.append((report.plot_warm_start, ws, "warm_start_lr.png"))
    write_record(out_dir, record, indent=None)
    try:
        for plot, data, name in plots:
            plot(data, os.path.join(out_dir, name))
    except ImportError as e:  # matplotlib comes with the bench extra; the tables do not need it
        log(f"plots skipped: {e}")
    log(f"stability done in {time.perf_counter() - t0:.0f} s; wrote {out_dir}")
    return sections


def warm_start_section(ws):
    cfg = ws["settings"]
    warm = ", ".join(f"{w['success']:.2f}" for w in ws["warm_start"].values())
    return (f"## Learning rate, fair to LCO: warm-started GRU policy (V = {cfg['vocab']}, {cfg['out_len']}-token "
            f"outputs; SFT {cfg['sft_steps']} steps, then {cfg['rl_steps']} RL steps × 128 samples, Adam; seeds "
            f"{cfg['seeds']}; warm-start success {warm}; {ws['seconds']:.0f} s)\n\n"
            f"Final success = mean success rate of a run's last {cfg['tail']} steps. Collapse = final success below "
            f"{cfg['collapse_fraction']:g} × the warm start's, or a non-finite loss or gradient (a run also ends, "
            f"collapsed, after {cfg['zero_success_stop']} steps in a row without one success). Max stable lr = the "
            "highest rate without a collapse in any seed; stable-range width = max stable lr / the lowest rate whose "
            "mean final success reaches 90 % of the method's best; spikiness = max / median over the steps of a "
            "run (median over seeds).\n\n" + report.warm_start_table(ws) + "\n\n" + report.warm_start_runs_table(ws))
