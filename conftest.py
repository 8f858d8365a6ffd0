"""Hooks for every test item, notebooks included (a conftest.py in tests/ would only see tests/)."""
import os

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Student notebooks (chapters/) run with ENGRAM_SMOKE=1: every cell must run with the exercises
    unsolved, at the smallest sizes (`Settings.size(..., smoke=...)`); the solutions run at the
    FAST sizes and assert the chapter's numbers. nbval starts a notebook's kernel while setting up
    its first cell, after this hook, so the kernel inherits the variable."""
    if item.path.suffix == ".ipynb" and item.path.parent.name == "chapters":
        os.environ["ENGRAM_SMOKE"] = "1"
    else:                                   # solutions and unit tests (a worker runs both kinds)
        os.environ.pop("ENGRAM_SMOKE", None)
