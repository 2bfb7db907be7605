"""Vocabulary-parallel losses: the combine of per-row partials, then the losses over
torch.distributed (gloo, spawned processes) against the single-process result on the whole vocabulary."""
import os
import subprocess
import sys

import pytest
import torch
from helpers import spawn

from lco_kernels import torch_backend
from lco_kernels._plumbing import loss_spec
from lco_kernels.autograd import as_rows3d
from lco_kernels.stats import PART, PARTIALS
from lco_kernels.tensor_parallel import _BASE_K, combine_partials


def shard_partials(z, labels, vocab_start, with_entropy=True, ignore_index=-100):
    """(N, len(PARTIALS)) float64 partials of one shard's rows, straight from the definitions."""
    z = z.double()
    N, V = z.shape
    local = labels - vocab_start
    owned = (local >= 0) & (local < V) & (labels != ignore_index)
    idx = torch.where(owned, local, 0)[:, None]
    z = z.clone()
    out = torch.zeros(N, len(PARTIALS), dtype=torch.float64)
    if V:
        out[:, PART["z_i"]] = torch.where(owned, z.gather(1, idx)[:, 0], 0.0)
        z.scatter_(1, idx, torch.where(owned[:, None], -torch.inf, z.gather(1, idx)))
    m = z.amax(dim=1) if V else torch.full((N,), -torch.inf, dtype=torch.float64)
    m_ref = torch.where(m == -torch.inf, 0.0, m)
    e = torch.exp(z - m_ref[:, None])
    out[:, PART["m"]], out[:, PART["s"]], out[:, PART["owned"]] = m, e.sum(1), owned.double()
    if with_entropy:
        out[:, PART["u"]] = torch.where(e == 0, 0.0, e * (z - m_ref[:, None])).sum(1)
        out[:, PART["q"]] = (e * e).sum(1)
    return out


def test_the_columns_sent_without_entropy_are_the_first_four():
    assert [PART[name] for name in ("m", "s", "z_i", "owned")] == list(range(_BASE_K))


@pytest.mark.parametrize("with_entropy", [False, True])
def test_combine_equals_whole_vocabulary(with_entropy):
    N, V = 12, 29
    z = torch.randn(N, V, dtype=torch.float64) * 4
    labels = torch.randint(0, V, (N,))
    labels[0] = -100                        # ignored
    labels[1], z[1, :9] = 3, -torch.inf     # the first shard [0, 9) is all −inf, label included
    z[2, 9:] = -torch.inf                   # the last two shards are all −inf
    labels[2] = 4
    z[3] = -torch.inf                       # every logit −inf
    z[4, 5] = 0.0                           # a label column (labels[4] = 5) whose logit is exactly 0
    labels[4] = 5
    z[5, 20] = float("nan")                 # NaN on another shard than the label's
    labels[5] = 1
    z[6] = -torch.inf
    z[6, 7] = 1.0                           # only the label is finite: lse₋ᵢ = −inf
    labels[6] = 7
    starts, ends = [0, 9, 10], [9, 10, V]   # uneven, one shard of a single column
    k = len(PARTIALS) if with_entropy else _BASE_K
    expected = shard_partials(z, labels, 0, with_entropy)
    gathered = torch.stack([shard_partials(z[:, a:b], labels, a, with_entropy)[:, :k] for a, b in zip(starts, ends)])
    combined = combine_partials(gathered)
    valid = labels != -100
    assert combined[:, PART["owned"]].tolist() == valid.double().tolist()  # each valid label on exactly one rank
    torch.testing.assert_close(combined, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert combined[5].isnan().any() and not combined[:5].isnan().any()
    lse_excl = combined[:, PART["m"]] + combined[:, PART["s"]].log()
    full = z.clone()
    full[valid, labels[valid]] = -torch.inf
    torch.testing.assert_close(lse_excl[valid], torch.logsumexp(full[valid], dim=1), equal_nan=True)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_a_shard_owning_every_label_sends_the_same_partials(with_entropy):
    """On CPU tensors the PyTorch backend sweeps a shard whose columns hold every label without its ownership
    masks. The partials it sends are those of the same rows swept beside a row whose label lies on another
    shard (the masked path), bit for bit, with ``owned`` = 1."""
    z = torch.randn(7, 40) * 3
    labels = torch.randint(50, 90, (7,))
    labels[6] = 10                          # another shard's label: the masked path
    spec = loss_spec("lco")
    alone = torch_backend.sweep_rows(as_rows3d(z[:6]), labels[:6], spec, -100, with_entropy, 50)
    beside = torch_backend.sweep_rows(as_rows3d(z), labels, spec, -100, with_entropy, 50)
    assert torch.equal(alone, beside[:6])
    assert alone[:, PART["owned"]].tolist() == [1.0] * 6 and beside[6, PART["owned"]].item() == 0.0


def test_combine_is_identity_for_one_shard():
    z = torch.randn(6, 11, dtype=torch.float64)
    z[0] = -torch.inf
    partials = shard_partials(z, torch.randint(0, 11, (6,)), 0)
    torch.testing.assert_close(combine_partials(partials[None]), partials, rtol=0, atol=0)


def test_two_ranks_equal_split(tmp_path):
    """Every loss × reduction × backend with stats, the edge rows, a NaN row and DTensor logits over two
    equal shards (the default vocab_start_index); labels no rank holds, or two hold, raise on every rank;
    the Triton path's launches and traffic on a shard."""
    spawn(tmp_path, 2, ("parity", [(0, 8), 16, str(tmp_path)]), ("bad_input", [10]), ("traffic", [6000]))


def test_three_ranks_uneven_shards(tmp_path):
    """The same over shards of 1, 8 and 14 columns (explicit vocab_start_index), and DTensor's 8/8/7 split;
    the fused linear loss over the same rows of an LM head."""
    # Triton (interpreted: slow) for two losses here; the two-rank test runs it for all five
    spawn(tmp_path, 3, ("parity", [(0, 1, 9), 23, str(tmp_path), ("lco", "ppo")]), ("fused_linear", [(0, 1, 9), 23, 6]))


def test_torchrun_two_processes(tmp_path):
    """The launch users run: ``torchrun --nproc_per_node 2`` (as python -m torch.distributed.run), env:// init."""
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
           '[["smoke", [16]]]']
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("largest deviations from one process") == 2, out.stdout


def test_options_without_a_group_are_errors():
    import lco_kernels
    logits, labels, adv = torch.randn(4, 7), torch.randint(0, 7, (4,)), torch.randn(4)
    with pytest.raises(ValueError, match="vocab_start_index"):
        lco_kernels.lco_loss(logits, labels, adv, vocab_start_index=3)
    with pytest.raises(ValueError, match="not initialised"):  # no init_process_group in this process
        lco_kernels.sft_loss(logits, labels, process_group=object())
    with pytest.raises(ValueError, match="all_reduce_grad_hidden"):
        lco_kernels.fused_linear_policy_loss(torch.randn(4, 3), torch.randn(7, 3), labels, adv,
                                             all_reduce_grad_hidden=True)
