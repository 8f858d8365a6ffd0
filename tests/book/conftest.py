"""The book's fixtures: both editions built once per session by tools/build_book.py (the executed
notebooks are cached in _build/book/executed/, shared with `make book`)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import build_book  # noqa: E402

OUT = Path(os.environ.get("ENGRAM_BOOK_OUT", ROOT / "_build" / "book"))
ONLY = os.environ.get("CHAPTERS") or None


@pytest.fixture(scope="session")
def site():
    pytest.importorskip("myst_nb")
    return build_book.build(OUT, solutions=True, only=ONLY)


@pytest.fixture(scope="session")
def student_site(site):             # after `site`: the executed notebooks are cached by then
    return build_book.build(OUT, solutions=False, only=ONLY)
