"""A real browser: JupyterLab in headless Chromium runs chapter 01 and chapter 07 (solutions), moves
the capacity explorer's slider and presses the ROME edit explorer's Edit button.

Run with `make test-browser` (not part of `make test`). Needs Chromium (Debian: apt-get install
chromium; or CHROMIUM=/path/to/chrome) and Playwright's Python package (`engramlib[browser]`).
Screenshots go to $BROWSER_SCREENSHOTS (default browser-screenshots/) for a person to look at."""
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from chromium import SHOTS, browser  # noqa: E402,F401  (browser: the fixture; skips without Chromium)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server (no token) on a copy of solutions/ (the lab saves what it runs: the
    repository's notebooks stay without outputs), kernels in FAST mode with the model unset, as a
    user's (TinyWorld on a machine without a large GPU)."""
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "solutions", root / "solutions")
    port = free_port()
    env = dict(os.environ, ENGRAM_FAST="1", JUPYTER_RUNTIME_DIR=str(tmp_path_factory.mktemp("runtime")))
    for name in ("ENGRAM_MODEL", "MPLBACKEND"):       # the default model; the inline backend draws the figures
        env.pop(name, None)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True", "--ServerApp.disable_check_xsrf=True"]
    if os.getuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp_path_factory.mktemp("log") / "lab.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/api/status", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.terminate()
        pytest.fail("JupyterLab did not start within 60 s")
    yield url
    server.terminate()
    server.wait(timeout=30)


def open_and_run_all(browser, lab, notebook: str, timeout_s: int = 600):
    """Open a notebook in JupyterLab, run all its cells, wait until the kernel is idle and every
    cell has run. Returns (page, console errors)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    workspace = Path(notebook).stem.replace("_", "-")      # one fresh workspace per notebook (?reset)
    page.goto(f"{lab}/lab/workspaces/{workspace}/tree/{notebook}?reset", wait_until="domcontentloaded")
    page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext.session "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext.session.kernel", timeout=120_000)
    page.wait_for_function("window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                           timeout=120_000)
    page.wait_for_function(f"window.jupyterapp.shell.currentWidget.context.path.endsWith('{Path(notebook).name}')",
                           timeout=60_000)
    page.evaluate("window.jupyterapp.shell.activateById(window.jupyterapp.shell.currentWidget.id)")
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    try:         # done when every code cell has run, or when one failed (run-all stops there)
        page.wait_for_function(
            """() => {
                const nb = window.jupyterapp.shell.currentWidget;
                const kernel = nb.sessionContext.session.kernel;
                const cells = nb.content.widgets.filter(c => c.model.type === 'code');
                const failed = cells.some(c => c.model.outputs.toJSON().some(o => o.output_type === 'error'));
                return kernel.status === 'idle' && (failed || cells.every(c => c.model.executionCount !== null));
            }""", timeout=timeout_s * 1000, polling=1000)
    finally:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / (Path(notebook).stem + "_after_run_all.png")))
    return page, errors


def tracebacks(page) -> list:
    """The error outputs (exceptions) of the open notebook's cells, as 'Name: message'."""
    return page.evaluate("""() => window.jupyterapp.shell.currentWidget.content.widgets
        .flatMap(c => c.model.type === 'code' ? c.model.outputs.toJSON() : [])
        .filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)""")


def run_without_errors(browser, lab, notebook: str):
    """open_and_run_all, then check that no cell raised. Returns (page, console errors)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page, errors = open_and_run_all(browser, lab, notebook)
    assert not tracebacks(page), tracebacks(page)[:1]
    return page, errors


def real_errors(errors: list) -> list:
    """Console errors, except the lab's own attempts to reach the internet (closed network here)."""
    benign = ("net::ERR_", "Failed to load resource", "ERR_NAME_NOT_RESOLVED", "pypi.org")
    return [e for e in errors if not any(b in e for b in benign)]


def test_chapter_01_runs_and_the_capacity_slider_redraws_the_figure(browser, lab):
    page, errors = run_without_errors(browser, lab, "solutions/01_hebbian_memory.ipynb")
    slider = page.locator(".widget-slider", has_text="memories n").first
    slider.scroll_into_view_if_needed()
    figure = slider.locator("xpath=ancestor::div[contains(@class, 'widget-vbox')][1]").locator("img").first
    figure.wait_for(timeout=60_000)
    before = figure.get_attribute("src")
    page.screenshot(path=str(SHOTS / "01_capacity_before.png"), full_page=False)
    handle = slider.locator(".noUi-handle").first
    handle.click()
    for _ in range(40):
        page.keyboard.press("ArrowRight")
    value = slider.locator(".widget-readout").inner_text()
    # every redraw has run once the kernel is idle again and the title shows the new n
    page.wait_for_timeout(1000)
    page.wait_for_function("window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                           timeout=120_000)
    page.wait_for_function("(old) => { const imgs = [...document.querySelectorAll('.widget-vbox img')];"
                           " return imgs.some(i => i.src !== old); }", arg=before, timeout=60_000)
    after = figure.get_attribute("src")
    assert value.strip() != "64", "the slider moved"
    page.screenshot(path=str(SHOTS / "01_capacity_after.png"), full_page=False)
    assert after != before, "moving the slider redraws the figure"
    assert not real_errors(errors), real_errors(errors)[:3]
    page.close()


def test_chapter_07_edit_button_raises_p_of_the_new_object(browser, lab):
    page, errors = run_without_errors(browser, lab, "solutions/07_rome.ipynb")
    button = page.locator("button.jupyter-button", has_text="Edit").last
    button.scroll_into_view_if_needed()
    output = button.locator("xpath=ancestor::div[contains(@class, 'widget-vbox')][1]").locator(".widget-output")
    button.click()
    output.get_by_text(re.compile(r"p\(.+\) on .+: [0-9.]+ -> [0-9.]+")).wait_for(timeout=180_000)
    text = output.inner_text()
    page.screenshot(path=str(SHOTS / "07_edit_explorer.png"), full_page=False)
    before, after = map(float, re.search(r": ([0-9.]+) -> ([0-9.]+)", text).groups())
    assert after > before, text
    page.locator("button.jupyter-button", has_text="Undo").last.click()
    output.get_by_text("undone").wait_for(timeout=60_000)
    assert not real_errors(errors), real_errors(errors)[:3]
    page.close()
