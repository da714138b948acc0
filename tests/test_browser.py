"""A learner's first minutes, in a real browser: JupyterLab opens 00_setup, runs all cells, shows the results.

Uses Debian's /usr/bin/chromium through the Playwright Python package (never
`playwright install`); skips with the reason when either is missing.
"""

import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import free_port

pytestmark = [pytest.mark.browser, pytest.mark.timeout(420)]

CHROMIUM = os.environ.get("WORKSHOP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
]


def _wait_for_server(url, proc, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer at {url} within {timeout} s")


def test_setup_lab_runs_all_cells_in_jupyterlab(root, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install chromium` (make test does it when run as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

    # Serve a copy: JupyterLab saves the notebook it runs, and solutions/ must not change.
    work = tmp_path / "course"
    shutil.copytree(root / "solutions", work)
    port, token = free_port(), secrets.token_hex(16)
    settings = tmp_path / "settings"
    # Render every cell (no windowing) so the whole notebook's text can be read; no news toast.
    (settings / "@jupyterlab" / "notebook-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"), JUPYTERLAB_SETTINGS_DIR=str(settings),
               NUMBA_NUM_THREADS="2")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "jupyter.log", "w"), start_new_session=True,
    )
    artifacts = root / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_server(f"{base}/api/status?token={token}", server)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            try:
                page.goto(f"{base}/lab/tree/00_setup.ipynb?token={token}", timeout=90_000)
                page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
                # First open: JupyterLab may ask which kernel to use. Accept its proposal.
                try:
                    page.locator(".jp-Dialog .jp-mod-accept").click(timeout=8_000)
                except sync_api.TimeoutError:
                    pass
                page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle'], "
                                       "[data-status='idle']", timeout=90_000, state="attached")
                page.locator(".lm-MenuBar-item", has_text="Run").first.click()
                page.locator(".lm-Menu-item:visible", has_text="Run All Cells").first.click()
                page.locator(".jp-OutputArea-output", has_text="Exercise passed.").wait_for(timeout=300_000)
                text = "\n".join(page.locator(".jp-OutputArea-output").all_inner_texts())
            finally:
                page.screenshot(path=str(artifacts / "00_setup_jupyterlab.png"), full_page=False)
                browser.close()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
    assert "Traceback" not in text, "a cell raised an error in JupyterLab"
    for expected in ("avx512_vnni", "MPI library", "rank 1 of 2", "engines ready", "cluster stopped", "Exercise passed."):
        assert expected in text, f"{expected!r} did not appear in the notebook"
