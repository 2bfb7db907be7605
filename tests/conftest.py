"""Run the Triton kernels through the interpreter on CPU-only machines; on a GPU they run for real.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of this file.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # an xdist worker: the workers share the cores (torch's threads
    # would otherwise outnumber them, and spin waiting for one another)
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """pytest.ini spreads the test files over two processes (pytest-xdist, ``-n 2``), whose prints never
    reach the terminal: ``-s`` is asked for to read what the tests print, so such a run stays in one process.
    (Before xdist's own hook, which turns the -n count into workers.)"""
    if config.getoption("capture") == "no":
        config.option.numprocesses = 0


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def poison_fresh_buffers(monkeypatch):
    """Every torch.empty / empty_like made from Python during a test is filled with NaN (or a
    huge integer), so an output element the code forgets to write cannot pass as a plausible value."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool and not t.is_complex():
            t.fill_(torch.iinfo(t.dtype).max)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    yield


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A different seed per test (but reproducible from its name): fresh inputs, never the same draw."""
    import zlib
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
