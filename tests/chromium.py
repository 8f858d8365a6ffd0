"""Headless Chromium for the browser suites (tests/browser: JupyterLab; tests/book: the built book).

Where Chromium is ($CHROMIUM, else Debian's `chromium`), the flags for a closed network, where
screenshots go ($BROWSER_SCREENSHOTS, default browser-screenshots/), and a module-scoped `browser`
fixture. Importing this module skips the importing test module when Playwright's Python package
(`engramlib[browser]`) or Chromium is missing."""
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
SHOTS = Path(os.environ.get("BROWSER_SCREENSHOTS", ROOT / "browser-screenshots"))
# no background connections, no sandbox (CI runs as root)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

playwright = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()
