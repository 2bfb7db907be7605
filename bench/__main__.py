"""``python -m bench [--quick]``: the benchmark suite, on CPU or on the GPU it finds.
``python -m bench stability [--quick] [--part PART]``: the paper's claims reproduced with our losses (bench/stability/).

Sections: the fixed cost per call at small shapes (``python -m bench.fixed_cost`` alone), forward +
backward at large shapes (on a CPU with glibc's default allocator and with heap allocations forced),
fused linear + loss, a compiled model step, then on a CPU memory traffic and tensor parallel, and the
ahead-of-time compile report. Each table's header says what its variants are and how its ratios read.
Prints Markdown tables (stdout), progress with elapsed time and an estimate (stderr), and writes
record.json, table.md and PNG plots under bench/results/<time>-<device>/ (or --out).
"""
import argparse
import os
import sys
import time

import torch

from bench import fixed_cost, report, suite


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", nargs="?", default="kernels", choices=("kernels", "stability"),
                        help="kernels (default): the benchmark tables; stability: the paper's claims")
    parser.add_argument("--quick", action="store_true", help="one small shape and a subset of the static report "
                        "(under 2 minutes on 2 CPU cores; what CI smoke-runs)")
    parser.add_argument("--out", help="directory for record.json, table.md and plots")
    parser.add_argument("--part", action="append", choices=("claims", "small-task", "warm-start"),
                        help="stability: run only this experiment (repeatable; default all)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case on CPU (default 5, quick 3)")
    args = parser.parse_args(argv)

    if args.job == "stability":
        return stability_main(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = suite.environment()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or os.path.join(suite.ROOT, "bench", "results",
                                       f"{stamp}-{device}{'-quick' if args.quick else ''}")
    os.makedirs(out_dir, exist_ok=True)
    repeats = args.repeats or (3 if args.quick else 5)
    suite.log(f"lco-kernels benchmark on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
              f"commit {env['commit']}); results in {out_dir}")

    record = dict(environment=env, quick=args.quick, load_start=os.getloadavg())
    sections = []

    # quick: without torch.compile, whose compilation would take most of this section's time
    fixed_repeats = 7 if args.quick else fixed_cost.REPEATS
    fixed_variants = [v for v in fixed_cost.VARIANTS if not (args.quick and v == "torch.compile")]
    suite.log("fixed cost per call (a fresh process) ...")
    fixed = record["fixed_cost"] = dict(load_start=os.getloadavg(), threads=1, records=fixed_cost.run(
        fixed_repeats, device, variants=fixed_variants))
    fixed["load_end"] = os.getloadavg()
    sections.append(report.fixed_cost_header(device, 1, fixed_repeats, fixed["load_start"], fixed["load_end"],
                                             fixed_variants) + "\n" + report.fixed_cost_table(fixed["records"]))

    copy_bw = None
    if device == "cuda":
        copy_bw = suite.copy_bandwidth(device)
        record["copy_bandwidth_bytes_per_s"] = copy_bw
        suite.log(f"device-to-device copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
        cases = suite.cuda_plan(args.quick)
    else:
        cases = suite.cpu_plan(args.quick)
    suite.log(f"timing and memory: {len(cases)} cases")
    record["cases"] = suite.run_cases(cases, device, repeats)
    sections.append(report.timing_header(record["cases"], device, repeats, copy_bw) + "\n\n"
                    + report.timing_table(record["cases"], device, copy_bw))

    linear = suite.linear_cases(args.quick, device)
    suite.log(f"fused linear + loss: {len(linear)} cases (minutes each on a CPU)")
    record["linear"] = suite.run_linear(linear, device, repeats)
    sections.append("## Fused linear + LCO from hidden states vs `lco_loss(hidden @ weight.T)` (one forward + "
                    "backward; extra memory = beyond hidden and weight, "
                    + ("peak RSS of a fresh process)" if device == "cpu" else "torch.cuda.max_memory_allocated)")
                    + f"\n\nTimes: {repeats} calls after a warm-up; a ratio ÷ unfused is of medians (below 1: faster "
                    "than the projection followed by `lco_loss`); spread = max ÷ min, above 2 **noisy**.\n\n"
                    + report.linear_table(record["linear"], device))

    compiled = suite.compiled_step_cases(args.quick, device)
    suite.log(f"compiled model step: {len(compiled)} cases")
    record["compiled"] = suite.run_compiled_steps(compiled, device, repeats)
    sections.append("## `torch.compile(fullgraph=True)` model step (embedding → linear → loss, forward + backward): "
                    f"our loss vs the plain PyTorch LCO compiled with the model\n\nTimes: {repeats} steps after the "
                    "compiling one; time ÷ ours is of medians (below 1: faster than the step with our loss); "
                    "spread = max ÷ min, above 2 **noisy**.\n\n"
                    + report.compiled_step_table(record["compiled"], device))

    reports = ([("traffic", "memory traffic under the Triton interpreter", _traffic),
                ("tensor_parallel", "vocabulary-parallel LCO on 2 gloo ranks", _tensor_parallel)]
               if device == "cpu" else [])
    reports.append(("static", "ahead-of-time compile for sm_80 and sm_90" + (", a subset" if args.quick else "")
                    + " (minutes)", _static))
    progress = suite.Progress("report", len(reports))
    for key, what, section in reports:
        with progress.step(what):
            sections.append(section(record, key, args.quick, repeats))

    record["load_end"] = os.getloadavg()
    sections.insert(0, f"# lco-kernels benchmark — {env['device']}\n\n`{' '.join(['python -m bench'] + sys.argv[1:])}` "
                       f"· torch {env['torch']} · triton {env['triton']} · commit {env['commit']} · {env['time']}\n\n"
                       f"{report.load_line(record['load_start'], record['load_end'])} of the whole run "
                       f"({os.cpu_count()} cores); a load above the core count means other work shared the "
                       "machine, and every timing below is then slower and noisier (the ratios less so: each comes "
                       "from one run).\n")
    text = "\n\n".join(sections) + "\n"
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(text)
    report.write_record(out_dir, record)
    try:
        written = report.plots(record["cases"], out_dir, env["device"])
    except ImportError as e:  # matplotlib comes with the bench extra; the tables do not need it
        written = []
        suite.log(f"plots skipped: {e}")
    print(text)
    suite.log(f"wrote {out_dir}/record.json, table.md" + (f" and {len(written)} plots" if written else ""))
    failed = [c for c in record["cases"] + record["linear"] + record["compiled"] + fixed["records"]
              if "error" in c and c["variant"] in ("ours", "ours-inplace", "fused-linear", "compiled-ours",
                                                   "compiled-ours-fused-linear", "ours-sft")]
    return 1 if failed else 0


def _traffic(record, key, quick, repeats):
    try:
        record[key] = suite.traffic_table()
        return ("## Memory traffic per forward + backward (counted under the Triton interpreter)\n\n"
                + report.traffic_table(record[key]))
    except Exception as e:  # noqa: BLE001
        return f"## Memory traffic\n\nnot measured: {e}"


def _tensor_parallel(record, key, quick, repeats):
    try:
        record[key] = suite.tp_table(quick, repeats)
        return ("## Tensor parallel: LCO over a vocabulary split across 2 gloo ranks (one thread per rank and for the "
                "single process; torch backend; collectives counted by wrapping torch.distributed)\n\n"
                + report.tp_table(record[key]))
    except Exception as e:  # noqa: BLE001
        return f"## Tensor parallel\n\nnot measured: {e}"


def _static(record, key, quick, repeats):
    record[key] = suite.static_report(quick)
    return ("## Kernels compiled ahead of time for sm_80 and sm_90 (worst case over dtypes, block sizes, "
            "targets)\n\n" + report.static_table(record[key]))


def stability_main(args):
    from bench import stability
    env = suite.environment()
    parts = args.part or stability.PARTS
    name = "stability-lr" if parts == ["warm-start"] else "stability"
    out_dir = args.out or os.path.join(suite.ROOT, "bench", "results",
                                       f"{time.strftime('%Y%m%d-%H%M%S')}-{name}{'-quick' if args.quick else ''}")
    sections = [f"# Does LCO stabilise training? — {env['device']}\n\n"
                f"`{' '.join(['python -m bench'] + sys.argv[1:])}` · torch {env['torch']} · commit {env['commit']}\n"]
    sections += stability.main(args.quick, out_dir, suite.log, parts)
    text = "\n\n".join(sections) + "\n"
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
