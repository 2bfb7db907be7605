"""Markdown tables, the JSON record and the PNG plots of a benchmark run."""
import collections
import json
import math
import os
import statistics

MiB = 2 ** 20


def _by_shape(records):
    groups = collections.OrderedDict()
    for r in records:
        groups.setdefault((r["dtype"], r["N"], r["V"]), {})[r["variant"]] = r
    return groups


def timing_header(records, device_kind, repeats, copy_bw=None):
    """The main table's title and how to read it: what each variant is, what "time ÷ ours" means."""
    from bench.variants import DESCRIPTIONS
    variants = list(dict.fromkeys(r["variant"] for r in records))
    if device_kind == "cpu":
        head = ("## Forward + backward at large shapes, side by side (CPU)\n\n"
                f"float32, one thread. Each shape's variants are timed in {repeats} interleaved rounds in one fresh "
                "process (each round times every variant once), then again in a second fresh process with heap "
                "allocations forced (`MALLOC_MMAP_THRESHOLD_` = `MALLOC_TRIM_THRESHOLD_` = 4e9). **time ÷ ours** = "
                "the variant's fastest time ÷ ours's fastest time in the same process: below 1 the variant is "
                "faster than ours, above 1 slower. Read the heap-forced column for the arithmetic: with glibc's "
                "defaults an allocation above its mmap threshold (32 MiB at most) is freshly mapped and faulted in "
                "on every call, which slows eager PyTorch's N×V temporaries but not ours (a gradient and 4 MiB "
                "chunk buffers); a long-running trainer's allocator keeps such memory, as the heap-forced setting "
                "does. min / median / max: the variant's own times with glibc's defaults; spread = max ÷ min, "
                f"above {NOISY:g} the case was disturbed (**noisy**) and its ratios are less sure. Extra memory: "
                "peak RSS of a fresh process beyond its inputs.")
    else:
        head = (f"## Forward + backward on the GPU (triton.testing.do_bench; copy bandwidth {copy_bw / 1e9:.0f} GB/s "
                "measured in this run)\n\n"
                "**time ÷ ours** = the variant's median ÷ ours's median: below 1 the variant is faster, above 1 "
                "slower. GB/s counts 3·N·V elements (read the logits, write the gradient, read them once more); "
                "× copy-bound = time ÷ the time to move those bytes at copy bandwidth (1 = as fast as a copy). "
                f"min / median / max over do_bench's timings; spread = max ÷ min, above {NOISY:g} **noisy**.")
    return head + "\n\n" + "\n".join(f"- {v}: {DESCRIPTIONS.get(v, v)}" for v in variants)


def _ms(seconds):
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.3g}"


def _min_med_max(r):
    return " / ".join(_ms(r[k]) for k in ("min_s", "median_s", "max_s"))


def timing_table(records, device_kind, copy_bw=None):
    """CPU: time (glibc's default and heap allocations forced) and extra memory as ratios to ours, with
    min / median / max and the spread. CUDA: absolute figures from the GPU as well."""
    lines = []
    if device_kind == "cpu":
        lines.append("| dtype | N | V | variant | time ÷ ours | time ÷ ours, heap forced | min / median / max ms "
                     "| spread | extra memory ÷ ours | extra memory |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    else:
        lines.append("| dtype | N | V | variant | min / median / max ms | spread | time ÷ ours | GB/s (3·N·V) "
                     "| × copy-bound time | peak extra memory |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (dtype, n, vocab), variants in _by_shape(records).items():
        ours = variants.get("ours", {})
        for name, r in variants.items():
            if "error" in r:
                lines.append(f"| {dtype} | {n} | {vocab} | {name} | {r['error']} |" + " |" * 5)
                continue
            mem = r.get("extra_bytes")
            mem_s = f"{mem / MiB:.1f} MiB" if mem is not None else "–"
            if device_kind == "cpu":
                t_ratio = r["min_s"] / ours["min_s"] if "min_s" in ours else float("nan")
                heap, ours_heap = r.get("heap_times_s"), ours.get("heap_times_s")
                h_ratio = f"{min(heap) / min(ours_heap):.2f}" if heap and ours_heap else "–"
                m_ratio = (mem / ours["extra_bytes"]) if mem is not None and ours.get("extra_bytes") else float("nan")
                lines.append(f"| {dtype} | {n} | {vocab} | {name} | {t_ratio:.2f} | {h_ratio} | {_min_med_max(r)} | "
                             f"{spread_cell(r)} | {m_ratio:.2f} | {mem_s} |")
            else:
                t_ratio = r["median_s"] / ours["median_s"] if "median_s" in ours else float("nan")
                elem = 2 if dtype in ("bfloat16", "float16") else 4
                moved = 3 * n * vocab * elem
                bw = moved / r["median_s"]
                bound = r["median_s"] / (moved / copy_bw)
                lines.append(f"| {dtype} | {n} | {vocab} | {name} | {_min_med_max(r)} | {spread_cell(r)} | "
                             f"{t_ratio:.2f} | {bw / 1e9:.0f} | {bound:.2f} | {mem_s} |")
    return "\n".join(lines)


NOISY = 2.0  # a case whose slowest timing exceeds twice its fastest is flagged


def spread(r):
    """max ÷ min of a record's timings; a case above ``NOISY`` was disturbed (a shared, loaded machine)."""
    times = r.get("times_s") or []
    return max(times) / min(times) if times and min(times) > 0 else float("nan")


def spread_cell(r):
    s = spread(r)
    return f"{s:.1f}" + (" **noisy**" if s > NOISY else "")


def load_line(start, end):
    """The machine's load average (1, 5, 15 minutes) at the start and the end of a measurement."""
    fmt = lambda t: " / ".join(f"{x:.2f}" for x in t)  # noqa: E731
    return f"Machine load average (1 / 5 / 15 min) {fmt(start)} at the start, {fmt(end)} at the end"


def fixed_cost_header(device_kind, threads, repeats, load_start, load_end, variants=None, padded=False):
    from bench.fixed_cost import VARIANTS
    from bench.variants import DESCRIPTIONS
    where = f"CPU, {threads} thread{'s' if threads != 1 else ''}" if device_kind == "cpu" else "GPU"
    return ("## Fixed cost per call: forward + backward at small shapes\n\n"
            f"µs per forward + backward of one call ({where}, float32), the minimum over {repeats} interleaved "
            "rounds in one fresh process (each round times every variant once; a timing is the mean of enough "
            "back-to-back calls to last about 10 ms). At these shapes host work (argument checks, op dispatch, "
            "the per-row head) weighs as much as the arithmetic. A ratio is our time ÷ the other's: below 1 "
            "we are faster, above 1 slower. "
            + ("The last N / 8 labels are padding (-100), masked by every variant. " if padded else "")
            + load_line(load_start, load_end) + ".\n\n"
            + "\n".join(f"- {_LABELS[v]}: {DESCRIPTIONS[v]}" for v in variants or VARIANTS) + "\n")


_LABELS = {"ours": "lco_loss", "eager": "eager", "torch.compile": "torch.compile(plain LCO)",
           "ours-sft": "sft_loss", "cross-entropy": "F.cross_entropy", "ours-inplace": "lco_loss in place",
           "reference": "float64 reference"}


def fixed_cost_table(records):
    """The summary (minimum µs and our ratios, one line per shape), then every variant's min / median / max."""
    by = _by_shape(records)

    def us(r):
        return f"{min(r['times_s']) * 1e6:.0f}" if r.get("times_s") else r.get("error", "–")

    def ratio(a, b):
        return f"{min(a['times_s']) / min(b['times_s']):.2f}" if a.get("times_s") and b.get("times_s") else "–"
    lines = ["| N × V | lco_loss µs | plain LCO µs | torch.compile µs | lco_loss ÷ plain LCO "
             "| lco_loss ÷ torch.compile | sft_loss µs | F.cross_entropy µs | sft_loss ÷ F.cross_entropy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (_, n, vocab), v in by.items():
        ours, eager, comp, sft, ce = (v.get(k, {}) for k in ("ours", "eager", "torch.compile", "ours-sft",
                                                              "cross-entropy"))
        lines.append(f"| {n} × {vocab} | {us(ours)} | {us(eager)} | {us(comp)} | {ratio(ours, eager)} | "
                     f"{ratio(ours, comp)} | {us(sft)} | {us(ce)} | {ratio(sft, ce)} |")
    lines += ["", "| N × V | variant | min µs | median µs | max µs | calls per timing | spread (max ÷ min) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for (_, n, vocab), v in by.items():
        for name, r in v.items():
            if not r.get("times_s"):
                lines.append(f"| {n} × {vocab} | {_LABELS.get(name, name)} | {r.get('error', '–')} | | | | |")
                continue
            t = sorted(r["times_s"])
            lines.append(f"| {n} × {vocab} | {_LABELS.get(name, name)} | {t[0] * 1e6:.0f} | "
                         f"{statistics.median(t) * 1e6:.0f} | {t[-1] * 1e6:.0f} | {r['inner']} | {spread_cell(r)} |")
    return "\n".join(lines)


def fixed_cost_apart_table(records):
    """Per shape and variant: the forward alone, the backward alone, their sum, the two in turn and the
    in-turn time ÷ the sum (minima, µs)."""
    parts = collections.defaultdict(dict)
    for r in records:
        parts[r["N"], r["V"], r["variant"]][r["part"]] = min(r["times_s"]) * 1e6 if r.get("times_s") else None
    lines = ["| N × V | variant | forward alone µs | backward alone µs | sum µs | in turn µs | in turn ÷ sum |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (n, vocab, name), t in parts.items():
        fwd, bwd, both = t.get("forward"), t.get("backward"), t.get("step")
        if None in (fwd, bwd, both):
            lines.append(f"| {n} × {vocab} | {_LABELS.get(name, name)} | – | – | – | – | – |")
            continue
        lines.append(f"| {n} × {vocab} | {_LABELS.get(name, name)} | {fwd:.0f} | {bwd:.0f} | {fwd + bwd:.0f} | "
                     f"{both:.0f} | {both / (fwd + bwd):.2f} |")
    return "\n".join(lines)


def linear_table(records, device_kind):
    """Fused linear + LCO vs projection then lco_loss: peak extra memory and time, as ratios (CPU: of medians)
    and min / median / max ms with the spread."""
    lines = ["| variant | N | H | V | dtype | extra memory | memory ÷ unfused | "
             + ("time ÷ unfused | " if device_kind == "cpu" else "") + "min / median / max ms | spread |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if device_kind == "cpu" else "")]
    unfused = next((r for r in records if r["variant"] == "unfused-linear"), {})
    for r in records:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['N']} | {r['H']} | {r['V']} | {r['dtype']} | {r['error']} | | | |"
                         + (" |" if device_kind == "cpu" else ""))
            continue
        mem = r["extra_bytes"] / unfused["extra_bytes"] if unfused.get("extra_bytes") else float("nan")
        ratio = (f"{r['median_s'] / unfused['median_s']:.2f} | " if unfused.get("median_s") else "– | ") \
            if device_kind == "cpu" else ""
        lines.append(f"| {r['variant']} | {r['N']} | {r['H']} | {r['V']} | {r['dtype']} | "
                     f"{r['extra_bytes'] / MiB:.0f} MiB | {mem:.3f} | {ratio}{_min_med_max(r)} | {spread_cell(r)} |")
    return "\n".join(lines)


def compiled_step_table(records, device_kind):
    """Compiled model step with our loss vs with the plain PyTorch LCO: time as a ratio of medians to ours,
    and min / median / max ms with the spread."""
    lines = ["| variant | N | H | V | dtype | time ÷ ours | min / median / max ms | spread |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    ours = next((r for r in records if r["variant"] == "compiled-ours"), {})
    for r in records:
        head = f"| {r['variant']} | {r['N']} | {r['H']} | {r['V']} | {r['dtype']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | |")
            continue
        ratio = r["median_s"] / ours["median_s"] if ours.get("median_s") else float("nan")
        lines.append(f"{head} {ratio:.2f} | {_min_med_max(r)} | {spread_cell(r)} |")
    return "\n".join(lines)


def traffic_table(rows):
    """One line per kernel and dtype: our figures hold in all four modes (in-place or not, stats or not)."""
    lines = ["| kernel | dtype | launches (fwd+bwd) | N·V elements moved | side bytes / row | note |",
             "| --- | --- | --- | --- | --- | --- |"]
    groups = collections.OrderedDict()
    for r in rows:
        groups.setdefault((r["kernel"], r["dtype"], str(r.get("grad_output", ""))), []).append(r)
    for (kernel, dtype, grad_output), rs in groups.items():
        if "skipped" in rs[0]:
            lines.append(f"| {kernel} | {dtype} | – | – | – | skipped: {rs[0]['skipped']} |")
            continue
        launches = sorted({r["launches"] for r in rs})
        moved = sorted({round(r["vocab_elements_per_NV"], 4) for r in rs})
        side = sorted({r["side_bytes_per_row"] for r in rs})
        if kernel.startswith("ours"):
            note = "default and in-place, with and without stats; any upstream gradient"
        else:
            note = (f"upstream gradient {grad_output}" + (" (skips its backward pass after a host sync on "
                                                          "grad_output == 1)" if grad_output == "1.0" else ""))
        lines.append(f"| {kernel} | {dtype} | {'/'.join(map(str, launches))} | {'/'.join(map(str, moved))} | "
                     f"{'–'.join(f'{s:.0f}' for s in (side[0], side[-1])) if len(side) > 1 else f'{side[0]:.0f}'} "
                     f"| {note} |")
    return "\n".join(lines)


def tp_table(r):
    """Vocabulary-parallel LCO vs one process holding the whole vocabulary (bench.tp_worker)."""
    lines = ["| ranks | N | V | collectives fwd / bwd | bytes / row sent, gathered (per rank) | time per rank "
             "÷ one process (median, min) | one process median ms | per rank median ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| {r['world']} | {r['N']} | {r['V']} | {len(r['forward_collectives'])} "
             f"({', '.join(r['forward_collectives']) or '–'}) / {len(r['backward_collectives'])} | "
             f"{r['sent_bytes_per_row']:.0f}, {r['received_bytes_per_row']:.0f} | {r['ratio_median']:.2f}, "
             f"{r['ratio_min']:.2f} | {r['single_median_s'] * 1e3:.1f} | {r['rank_median_s'] * 1e3:.1f} |"]
    return "\n".join(lines)


def static_table(rows):
    """Per kernel / head / stats / variant: the worst registers and spills over dtypes, block sizes and
    targets. Variant: the entropy-gradient backward or entropy-term forward, the vocabulary-parallel
    sweep-only / head-only modes, fp64 hyperparameters."""
    from lco_kernels.triton_backend import HEAD, SWEEP
    modes = {SWEEP: "sweep only", HEAD: "head only (no logits read)"}
    groups = collections.OrderedDict()
    for r in rows:
        variant = ", ".join(v for v in (modes.get(r.get("mode")), "entropy" if r.get("entropy") else None,
                                        "fp64 scalars" if r.get("scalars") == "fp64" else None) if v) or "–"
        groups.setdefault((r["kernel"].replace("_kernel", "").lstrip("_"), r["head"] or "–", r["stats"], variant),
                          []).append(r)
    lines = ["| kernel | head | stats | variant | configurations | max registers | spill instructions | stack "
             "| max shared B | 128-bit loads when aligned |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (kernel, head, stats, variant), rs in groups.items():
        aligned = [r for r in rs if r["aligned"]]
        vec = "all" if aligned and all(r["ldg128"] > 0 for r in aligned) else "no"
        if variant.startswith("head only"):
            vec = "–"
        lines.append(f"| {kernel} | {head} | {stats} | {variant} | {len(rs)} | {max(r['registers'] for r in rs)} | "
                     f"{sum(r['spill_instructions'] for r in rs)} | {max(r['stack'] for r in rs)} | "
                     f"{max(r['shared'] for r in rs)} | {vec} |")
    return "\n".join(lines)


def plots(records, out_dir, device_name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ok = [r for r in records if "median_s" in r]
    for dtype in sorted({r["dtype"] for r in ok}):
        rs = [r for r in ok if r["dtype"] == dtype]
        n_fixed = collections.Counter(r["N"] for r in rs).most_common(1)[0][0]
        v_fixed = collections.Counter(r["V"] for r in rs).most_common(1)[0][0]
        for axis, fixed_key, fixed in (("V", "N", n_fixed), ("N", "V", v_fixed)):
            sel = [r for r in rs if r[fixed_key] == fixed]
            if len({r[axis] for r in sel}) < 2:
                continue
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
            for variant in dict.fromkeys(r["variant"] for r in sel):
                pts = sorted((r[axis], r["median_s"] * 1e3, r.get("extra_bytes")) for r in sel if r["variant"] == variant)
                ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
                mem = [(p[0], p[2] / MiB) for p in pts if p[2] is not None]
                if mem:
                    ax_m.plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=variant)
            ax_t.set(xlabel=axis, ylabel="forward + backward, median ms", yscale="log",
                     title=f"time, {fixed_key} = {fixed}, {dtype}")
            ax_m.set(xlabel=axis, ylabel="extra memory, MiB", yscale="log", title="memory beyond the inputs")
            ax_t.legend(fontsize=8)
            fig.suptitle(device_name, fontsize=9)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{dtype}_vs_{axis}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def write_record(out_dir, record, indent=1):
    """``out_dir``/record.json in strict JSON: a NaN or infinite value (a ratio with no successes, a
    failed measurement) is written as null, which every JSON parser reads."""
    path = os.path.join(out_dir, "record.json")
    with open(path, "w") as f:
        json.dump(_finite_or_none(record), f, indent=indent, allow_nan=False)
    return path


def _finite_or_none(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x
