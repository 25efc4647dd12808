"""Fixtures shared by the browser tests: ``panel serve apps/explorer.py`` once per test module
(each module's sessions start from a quiet server; starting it takes 10-15 s here) and one
headless Chromium for the whole run.

Chromium is Debian's (``/usr/bin/chromium``, or ``$TENSORSCOPE_CHROMIUM``), never one
Playwright downloads; without it, or without Playwright, the tests that use these skip.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("TENSORSCOPE_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
START_TIMEOUT = 120  # s: server start and first page on a busy 2-core machine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``panel serve apps/explorer.py`` on a free port, with the example cache warmed first."""
    from tensorscope import examples

    cache = examples.resolve_cache_dir()
    examples.load_example("lenet5", cache_dir=cache)  # trains once on a fresh machine, else reads the cache
    log_path = tmp_path_factory.mktemp("serve") / "panel.log"
    with socket.socket() as sock:  # a free port (the OS may hand it out again, but not in this instant)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "TENSORSCOPE_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "panel", "serve", str(ROOT / "apps" / "explorer.py"), "--port", str(port),
             "--address", "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{port}",
             "--websocket-max-message-size", str(100 * 1024 * 1024)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        url = None
        deadline = time.time() + START_TIMEOUT
        while time.time() < deadline and url is None:
            if proc.poll() is not None:
                raise RuntimeError(f"panel serve exited with {proc.returncode}:\n{log_path.read_text()}")
            if "Bokeh app running at" in log_path.read_text(errors="replace"):
                url = f"http://127.0.0.1:{port}/explorer"
            time.sleep(0.2)
        if url is None:
            raise RuntimeError(f"panel serve did not start in {START_TIMEOUT} s:\n{log_path.read_text()}")
        while time.time() < deadline:  # the port is open once the app answers
            try:
                urllib.request.urlopen(url, timeout=30).read(100)
                break
            except OSError:
                time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def browser():
    playwright_sync = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()
