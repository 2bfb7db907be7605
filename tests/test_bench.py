"""The fixed-cost benchmark's runner on a tiny shape: every variant timed in every part, and the tables
that ``python -m bench.fixed_cost`` prints (timings here only have to exist: this is not a timed test)."""
import re

from bench import fixed_cost, report


def test_fixed_cost_times_each_part_apart(capsys):
    assert fixed_cost.main(["--apart", "--repeats", "2", "--shapes", "4x16"]) == 0
    out = capsys.readouterr().out.split("| N × V | variant | forward alone µs")
    assert len(out) == 2, "no table of the parts"
    rows = re.findall(r"^\| 4 × 16 \| (\S[^|]*?) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \|$", out[1], re.M)
    assert sorted(r[0] for r in rows) == sorted(report._LABELS[v] for v in fixed_cost.VARIANTS if v != "torch.compile")
    for _, fwd, bwd, total, both, ratio in rows:
        assert int(total) in (int(fwd) + int(bwd) - 1, int(fwd) + int(bwd), int(fwd) + int(bwd) + 1)  # each rounded
        assert float(ratio) > 0 and int(both) > 0


def test_apart_table_marks_a_missing_part():
    records = [dict(N=4, V=16, variant="ours", part="step", times_s=[2e-6]),
               dict(N=4, V=16, variant="ours", part="forward", times_s=[1e-6]),
               dict(N=4, V=16, variant="ours", part="backward", error="RuntimeError: x")]
    table = report.fixed_cost_apart_table(records)
    assert table.splitlines()[-1] == "| 4 × 16 | lco_loss | – | – | – | – | – |"
