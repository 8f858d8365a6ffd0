"""The built book in a real browser (headless Chromium, `make test-book`): the front page and three
chapter pages, served over HTTP from the build folder; every image loads (naturalWidth > 0), MathJax
(served from the site) typesets the equations without errors, and no request leaves the site.
Screenshots go to $BROWSER_SCREENSHOTS (default browser-screenshots/) for a person to look at."""
import functools
import http.server
import os
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from chromium import SHOTS, browser  # noqa: E402,F401  (browser: the fixture; skips without Chromium)

sys.path.insert(0, str(ROOT / "tools"))
import build_book  # noqa: E402

CHAPTERS = build_book.notebooks(only=os.environ.get("CHAPTERS") or None)


def pages_to_open() -> list:
    """The front page and three chapters: the first two and the last of this build."""
    chapters = [p.stem for p in CHAPTERS]
    picked = chapters[1:3] + chapters[-1:] if len(chapters) > 3 else chapters
    return ["index"] + picked


@pytest.fixture(scope="module")
def server(site):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    handler = functools.partial(Quiet, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.parametrize("name", pages_to_open())
def test_page_images_load_and_math_renders(browser, server, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    outside, failed = [], []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((server, "data:", "about:", "blob:")) else None)
    # MathJax 2 probes for its own TeX AMS font (which the PyPI copy does not ship) before it uses the
    # STIX web fonts that it does ship: that probe may fail; nothing else may
    probe = "/_static/mathjax/fonts/HTML-CSS/TeX/"
    page.on("requestfailed", lambda r: failed.append(r.url) if not (r.url.startswith("about:") or probe in r.url)
            else None)
    page.goto(f"{server}/{name}.html", wait_until="load")
    # MathJax 2 typesets asynchronously: wait for its queue to drain (Sphinx loads it on pages with math)
    if page.locator(".math").count():
        page.wait_for_function("window.MathJax && MathJax.Hub && MathJax.Hub.queue && MathJax.Hub.queue.pending === 0 "
                               "&& MathJax.Hub.queue.running === 0", timeout=120_000)
    page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=60_000)
    page.screenshot(path=str(SHOTS / f"book_{name}.png"))
    images = page.evaluate("() => [...document.querySelectorAll('article img')].map(i => [i.src, i.naturalWidth])")
    # MathJax 2 turns each \\(...\\) / \\[...\\] into a <script type="math/tex"> and its rendering (.MathJax)
    math = page.evaluate("() => ({source: document.querySelectorAll('script[type^=\"math/tex\"]').length,"
                         " typeset: document.querySelectorAll('span.MathJax, div.MathJax_Display span.MathJax').length,"
                         " errors: document.querySelectorAll('.MathJax_Error, merror').length,"
                         " fonts: [...document.fonts].filter(f => f.status === 'loaded').map(f => f.family)})")
    if images:
        first = page.locator("article img").first
        first.scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / f"book_{name}_figure.png"))
    if name != "index":
        assert images, f"{name}: no figure on the page"
        toggle = page.locator("details.hide.above-input summary").first
        if toggle.count():
            toggle.scroll_into_view_if_needed()
            toggle.click()
            page.wait_for_timeout(800)              # the fold's opening animation
            page.screenshot(path=str(SHOTS / f"book_{name}_solution_unfolded.png"))
    assert all(width > 0 for _, width in images), f"{name}: images that did not load: " \
        f"{[src for src, w in images if not w]}"
    if name != "index":
        assert math["source"] > 0 and math["typeset"] >= math["source"], f"{name}: math not typeset: {math}"
        assert any("STIX" in f for f in math["fonts"]), f"{name}: MathJax's web fonts did not load: {math}"
    assert math["errors"] == 0, f"{name}: MathJax errors: {math}"
    assert not outside, f"{name}: requests outside the site: {outside[:5]}"
    assert not failed, f"{name}: failed requests: {failed[:5]}"
    page.close()
