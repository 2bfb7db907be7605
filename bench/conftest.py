import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """pytest.ini spreads tests over processes (pytest-xdist), under which pytest-benchmark times nothing:
    the timings run in one process. (Before xdist's own hook, which turns the -n count into workers.)"""
    config.option.numprocesses = 0
