"""The fixed-cost benchmark's runner on a tiny shape: every variant timed in every part, and the tables
that ``python -m bench.fixed_cost`` prints (timings here only have to exist: this is not a timed test)."""
import re

import torch

from bench import fixed_cost, report, suite, variants


def test_fixed_cost_times_each_part_apart(capsys):
    assert fixed_cost.main(["--apart", "--repeats", "2", "--shapes", "4x16"]) == 0
    out = capsys.readouterr().out.split("| N × V | variant | forward alone µs")
    assert len(out) == 2, "no table of the parts"
    rows = re.findall(r"^\| 4 × 16 \| (\S[^|]*?) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \|$", out[1], re.M)
    assert sorted(r[0] for r in rows) == sorted(report._LABELS[v] for v in fixed_cost.VARIANTS if v != "torch.compile")
    for _, fwd, bwd, total, both, ratio in rows:
        assert int(total) in (int(fwd) + int(bwd) - 1, int(fwd) + int(bwd), int(fwd) + int(bwd) + 1)  # each rounded
        assert float(ratio) > 0 and int(both) > 0


def test_cpu_description_names_the_processor(monkeypatch):
    """The processor's model name from /proc/cpuinfo where there is one, else platform.processor()."""
    name = suite.cpu_name()
    assert name and name != "unknown processor"
    assert suite.cpu_description().startswith(f"{name} (") and torch.backends.cpu.get_cpu_capability() in \
        suite.cpu_description()
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    monkeypatch.setattr(suite.platform, "processor", lambda: "x86_64")
    assert suite.cpu_name() == "x86_64"


def test_apart_table_marks_a_missing_part():
    records = [dict(N=4, V=16, variant="ours", part="step", times_s=[2e-6]),
               dict(N=4, V=16, variant="ours", part="forward", times_s=[1e-6]),
               dict(N=4, V=16, variant="ours", part="backward", error="RuntimeError: x")]
    table = report.fixed_cost_apart_table(records)
    assert table.splitlines()[-1] == "| 4 × 16 | lco_loss | – | – | – | – | – |"


def test_padded_variants_compute_the_masked_losses():
    """``--padded``: with the last labels padding, the plain PyTorch LCO's masked mean is ``lco_loss``'s loss and
    the unpadded tokens' plain LCO; ``sft_loss`` is ``F.cross_entropy``'s (both skip -100 themselves)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 50, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 50, (16,), generator=g)
    labels[-2:] = -100
    adv = torch.randn(16, generator=g, dtype=torch.float64)
    plain = variants.make("eager", "torch", padded=True)(logits, labels, adv)
    assert torch.allclose(plain, variants.make("ours", "torch", padded=True)(logits, labels, adv), rtol=1e-10)
    assert torch.allclose(plain, variants.plain_lco(logits[:-2], labels[:-2], adv[:-2]), rtol=1e-12)
    sft = variants.make("ours-sft", "torch", padded=True)(logits, labels, adv)
    assert torch.allclose(sft, variants.make("cross-entropy", "torch", padded=True)(logits, labels, adv), rtol=1e-10)


def test_fixed_cost_padded_prints_its_table(capsys):
    assert fixed_cost.main(["--padded", "--no-compile", "--repeats", "2", "--shapes", "8x16"]) == 0
    out = capsys.readouterr().out
    # the command and the machine first: ratios at these shapes depend on the processor
    assert out.startswith(f"`python -m bench.fixed_cost --padded --no-compile --repeats 2 --shapes 8x16` · "
                          f"CPU: {suite.cpu_description()} · torch {torch.__version__} · commit "), out[:300]
    assert "The last N / 8 labels are padding (-100)" in out
    row = re.search(r"^\| 8 × 16 \| (\d+) \| (\d+) \| – \| ([\d.]+) \| – \| (\d+) \| (\d+) \| ([\d.]+) \|$", out, re.M)
    assert row and all(float(x) > 0 for x in row.groups()), out
