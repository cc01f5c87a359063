"""A notebook in JupyterLab, driven by a real browser: the routing explorer of notebook 02 and the
attention explorer of notebook 07 render as widgets and react to a changed input (what a reader does,
which nbclient cannot show).

Needs Debian's ``chromium``, ``playwright`` and ``jupyterlab`` (``[dev]``; ``.ci/run`` installs
chromium). Outside CI it skips when one is missing; under CI (``CI=true``) it fails. About 30-40 s:
JupyterLab starts, the kernel loads the toy model, the widget renders, then the text is changed (per
notebook).
"""

from __future__ import annotations

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

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TIMEOUT_MS = 120_000


def _tools() -> str | None:
    """The chromium executable when chromium, playwright and jupyterlab are all there, else None."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    have = all(importlib.util.find_spec(m) is not None for m in ("playwright", "jupyterlab"))
    return browser if browser and have else None


def _explorer_notebook(folder: Path, source: str, call: str) -> Path:
    """The setup cell of notebook ``source`` and its cell calling ``call``, as a notebook in ``folder``."""
    nb = nbformat.read(NOTEBOOKS / source, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    nb.cells = [code[0], next(c for c in code if call in c.source)]
    path = folder / "explorer.ipynb"
    nbformat.write(nb, path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {server.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer at {url}")


CASES = {
    "routing": ("02_routing_statistics.ipynb", "routing_explorer(", ".widget-html-content"),
    "attention": ("07_from_transformerlens.ipynb", "attention_explorer(", ".widget-html-content"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_explorer_renders_and_reacts_in_jupyterlab(tmp_path, case):
    source, call, output = CASES[case]
    browser_path = _tools()
    if browser_path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the JupyterLab test: chromium, playwright and jupyterlab are needed")
        pytest.skip("needs the chromium package, playwright and jupyterlab (pip install -e '.[dev]')")
    from playwright.sync_api import sync_playwright

    notebook = _explorer_notebook(tmp_path, source, call)
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1"]
    command += [f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}"]
    command += [f"--LabApp.workspaces_dir={tmp_path}", "--LabApp.news_url=None"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", server)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])  # CI runs as root
            try:
                page = browser.new_page()
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{notebook.name}?token={token}")
                page.get_by_text("| Idle").wait_for()  # the kernel is up: a run now is not dropped
                page.get_by_role("menuitem", name="Run", exact=True).click()
                page.get_by_text("Run All Cells", exact=True).click()
                text_box = page.wait_for_selector(".jp-OutputArea .widget-textarea textarea")
                tokens = page.locator(f".jp-OutputArea {output}").first
                assert "Mirren" in tokens.inner_html()  # the default text, tokens coloured
                if case == "attention":  # the head's pattern is drawn as an image too
                    assert page.locator(".jp-OutputArea .widget-image").count() == 1
                text_box.fill("The capital of Pellune")
                text_box.press("Tab")  # continuous_update=False: the value is sent when the box loses focus
                page.wait_for_function(
                    f"() => [...document.querySelectorAll('.jp-OutputArea {output}')]"
                    ".some(e => e.innerHTML.includes('Pellune'))"
                )
                assert "Mirren" not in tokens.inner_html()
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
