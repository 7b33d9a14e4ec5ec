"""A real browser: JupyterLab on localhost, a notebook run in Debian's headless Chromium.

Needs the Debian packages ``chromium`` and ``chromium-driver`` and the pip packages ``playwright``
and ``jupyterlab`` (Playwright drives /usr/bin/chromium; no browser download). Run with
``pytest -m browser tests/notebook/test_browser.py``. The screenshot of the fine-tuning panel is
kept in ``$SLOTHNB_ARTIFACTS`` (default ``artifacts/``) as ``finetune-panel.png``.
"""
import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
NOTEBOOK = "05_export.ipynb"  # the shortest run that shows a fine-tuning panel
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-extensions", "--no-first-run"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _require_browser_stack():
    missing = [what for what, ok in (("chromium (apt-get install chromium chromium-driver)", os.path.exists(CHROMIUM)),
                                     ("jupyterlab (pip)", importlib.util.find_spec("jupyterlab") is not None))
               if not ok]
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip)")
    if missing:
        message = "browser test needs " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must have them: never pass by skipping there
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    _require_browser_stack()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, tmp_path / NOTEBOOK)
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-runtime"))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
           "--LabApp.expose_app_in_browser=True", "--ServerApp.allow_root=True"]
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.terminate()
                pytest.fail("JupyterLab did not start:\n" + (tmp_path / "jupyterlab.log").read_text()[-3000:])
            time.sleep(1)
    yield f"{url}/lab/tree/{NOTEBOOK}?token={token}"
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def test_finetune_panel_renders_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    artifacts = Path(os.environ.get("SLOTHNB_ARTIFACTS", ROOT / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(lab, wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget "
                                   "&& window.jupyterapp.shell.currentWidget.sessionContext "
                                   "&& window.jupyterapp.shell.currentWidget.sessionContext.session", timeout=120_000)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            panel = page.locator(".slothnb-panel").first
            panel.wait_for(state="attached", timeout=300_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.slothnb-panel')].some(e => e.innerText.includes('[done]'))",
                timeout=600_000, polling=1000)
            panel.scroll_into_view_if_needed()
            # JupyterLab's "news" toast would cover part of the panel in the screenshot
            page.evaluate("() => document.querySelectorAll('.Toastify').forEach(e => e.remove())")
            time.sleep(1)  # let the last image update paint
            panel.screenshot(path=str(artifacts / "finetune-panel.png"))
            page.screenshot(path=str(artifacts / "jupyterlab-page.png"))
            found = page.evaluate("""() => {
                const panel = [...document.querySelectorAll('.slothnb-panel')].find(e => e.innerText.includes('[done]'));
                const size = sel => { const img = panel.querySelector(sel);
                                      return img ? [img.naturalWidth, img.naturalHeight] : null; };
                return {text: panel.innerText, loss: size('.slothnb-loss-plot'), memory: size('.slothnb-memory-bars')};
            }""")
        finally:
            browser.close()
    assert "step 3/3" in found["text"] and "loss" in found["text"], found["text"]
    assert found["loss"] and found["loss"][0] > 100 and found["loss"][1] > 100, found
    assert found["memory"] and found["memory"][0] > 100 and found["memory"][1] > 100, found
    png = (artifacts / "finetune-panel.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
