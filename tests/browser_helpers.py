"""Drive JupyterLab in headless Chromium: start a private server, open a notebook, run it.

Everything is bounded: the server is started in its own process group and killed on exit, every
wait has a timeout, and the browser is Debian's chromium (``/usr/bin/chromium``; Playwright's own
downloads are not used). Nothing here knows about AWQ; tests/test_browser.py does.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = os.environ.get("AWQ_NB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_START_S = 90


def missing_requirements() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not Path(CHROMIUM).exists():
        return f"no chromium at {CHROMIUM} (apt-get install -y chromium, or set AWQ_NB_CHROMIUM)"
    for module, pip in (("playwright", "playwright"), ("jupyterlab", "jupyterlab"), ("ipywidgets", "ipywidgets"),
                        ("ipykernel", "ipykernel")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install {pip})"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_notebook(path: Path, cells: list[str]) -> Path:
    """A minimal nbformat-4 notebook of code cells."""
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                     "source": src} for src in cells],
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb, indent=1))
    return path


def _lab_settings(root: Path) -> Path:
    """User settings that keep JupyterLab quiet: no news or update toasts over the page."""
    d = root / "settings" / "@jupyterlab" / "apputils-extension"
    d.mkdir(parents=True, exist_ok=True)
    (d / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    return root / "settings"


@contextlib.contextmanager
def jupyter_lab(root_dir: Path, work_dir: Path, env: dict | None = None, log_path: Path | None = None):
    """Start ``jupyter lab`` on 127.0.0.1 (free port, random token) serving ``root_dir``.

    Yields ``(base_url, token)``. Config, runtime and settings live under ``work_dir``; the kernel
    is this interpreter's. The whole process group is killed on exit, whatever happened.
    """
    port, token = free_port(), secrets.token_hex(16)
    full_env = dict(os.environ, **(env or {}))
    full_env.update(JUPYTER_CONFIG_DIR=str(work_dir / "config"), JUPYTER_RUNTIME_DIR=str(work_dir / "runtime"),
                    JUPYTERLAB_SETTINGS_DIR=str(_lab_settings(work_dir)),
                    JUPYTERLAB_WORKSPACES_DIR=str(work_dir / "workspaces"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root_dir}", "--LabApp.expose_app_in_browser=True",
           "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI runners
        cmd.append("--allow-root")
    log = open(log_path or work_dir / "jupyter.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"jupyter lab did not answer within {SERVER_START_S} s; see {log.name}")
            time.sleep(0.5)
        yield base, token
    finally:
        _kill_group(proc)
        log.close()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (server and kernels), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            time.sleep(0.2)
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def chromium_page(viewport=(1280, 1600)):
    """A Playwright page in headless Debian chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            yield page
        finally:
            browser.close()


def open_and_run_all(page, base: str, token: str, notebook: str, timeout_s: float = 120) -> None:
    """Open ``notebook`` (path relative to the server root) in JupyterLab and run all its cells."""
    page.goto(f"{base}/lab/tree/{notebook}?token={token}", timeout=timeout_s * 1000)
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                           timeout=timeout_s * 1000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")


def cell_errors(page) -> list[str]:
    """Text of error outputs shown in the notebook (tracebacks), if any."""
    return page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()

