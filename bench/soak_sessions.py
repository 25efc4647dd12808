"""Soak test of the explorer's sessions: does the server give memory back after 50 sessions?

Starts ``panel serve apps/explorer.py`` on a free port with short session lifetimes
(``--unused-session-lifetime`` / ``--check-unused-sessions``, in ms), opens and closes N
sessions in headless Chromium (Debian's, never one Playwright downloads), each one waiting
until the example page is fully loaded (exact parameter count and a measured accuracy), then
waits until Bokeh has discarded every session and prints the server's RSS before (after one
warm-up session, so the baseline includes loaded libraries, the shared example and the
factor cache), at peak, and after, as a markdown table.

    TENSORSCOPE_CACHE_DIR=/tmp/tscache .venv/bin/python bench/soak_sessions.py
    ... --sessions 50 --parallel 2 --lifetime 2000 --check 1000
    ... --env MALLOC_ARENA_MAX=2          # environment for the server (allocator experiments)

Not part of the test run. Exit status 0 when the RSS after is within ``--tolerance`` (10%)
of the baseline, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("TENSORSCOPE_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
PAGE_TIMEOUT_MS = 180_000
DISCARD_RE = re.compile(r"Discarding session")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(proc: psutil.Process) -> int:
    """Resident memory of the server and any children it started."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class Sampler(threading.Thread):
    """Samples the server's RSS every ``interval`` s; keeps the peak."""

    def __init__(self, proc: psutil.Process, interval: float = 0.2):
        super().__init__(daemon=True)
        self.proc, self.interval = proc, interval
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss(self.proc))
            self.stop.wait(self.interval)


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--parallel", type=int, default=1, help="sessions open at the same time")
    ap.add_argument("--lifetime", type=int, default=2000, help="--unused-session-lifetime (ms)")
    ap.add_argument("--check", type=int, default=1000, help="--check-unused-sessions (ms)")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds to wait after the last discard")
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra server environment")
    ap.add_argument("--log", default=None, help="server log file (default: a temporary file)")
    ap.add_argument("--app", default=str(ROOT / "apps" / "explorer.py"),
                    help="the app script to serve (e.g. an instrumented wrapper named explorer.py)")
    args = ap.parse_args(argv)

    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}/explorer"
    log_path = Path(args.log or f"/tmp/tensorscope-soak-{port}.log")
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for kv in args.env:
        k, _, v = kv.partition("=")
        env[k] = v
    cmd = [sys.executable, "-m", "panel", "serve", args.app, "--port", str(port),
           "--address", "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{port}",
           "--unused-session-lifetime", str(args.lifetime), "--check-unused-sessions", str(args.check),
           "--log-level", "debug"]
    log = open(log_path, "wb")
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc = psutil.Process(server.pid)

    def discarded() -> int:
        return len(DISCARD_RE.findall(log_path.read_text(errors="replace")))

    def wait_discarded(n: int, timeout: float) -> float:
        t0 = time.time()
        while discarded() < n:
            if time.time() - t0 > timeout:
                raise RuntimeError(f"only {discarded()} of {n} sessions discarded after {timeout:.0f} s")
            time.sleep(0.2)
        return time.time() - t0

    try:
        deadline = time.time() + 180
        while "Bokeh app running at" not in log_path.read_text(errors="replace"):
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"panel serve did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        rows = [("server started", rss(proc))]
        load_times: list[float] = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)

            def session_batch(k: int) -> None:
                ctxs = [browser.new_context(viewport={"width": 1400, "height": 1100}) for _ in range(k)]
                pages = [c.new_page() for c in ctxs]
                t0 = time.time()
                for pg in pages:
                    pg.goto(url, timeout=PAGE_TIMEOUT_MS, wait_until="load")
                for pg in pages:  # fully loaded: the example's exact count and a measured accuracy
                    pg.locator(".ts-params-exact").filter(has_text="431,080").wait_for(timeout=PAGE_TIMEOUT_MS)
                    pg.locator(".ts-quality-value").filter(has_text=re.compile(r"\d+\.\d%")).wait_for(
                        timeout=PAGE_TIMEOUT_MS)
                    pg.locator(".ts-stat.ts-quality .ts-pending").wait_for(state="detached", timeout=PAGE_TIMEOUT_MS)
                load_times.append((time.time() - t0) / k)
                for c in ctxs:
                    c.close()

            session_batch(1)  # warm-up: libraries, the shared example, caches
            wait_discarded(1, 60)
            time.sleep(args.settle)
            base = rss(proc)
            rows.append(("baseline (after 1 warm-up session, discarded)", base))
            sampler = Sampler(proc)
            sampler.start()
            opened = 0
            t_soak = time.time()
            while opened < args.sessions:
                k = min(args.parallel, args.sessions - opened)
                session_batch(k)
                opened += k
                if opened % 10 == 0 or opened == args.sessions:
                    print(f"  {opened} sessions, rss {mb(rss(proc))} MB, discarded {discarded() - 1}", flush=True)
            soak_s = time.time() - t_soak
            browser.close()
        rows.append((f"after {args.sessions} sessions closed (before cleanup)", rss(proc)))
        wait_s = wait_discarded(1 + args.sessions, 120)
        time.sleep(args.settle)
        sampler.stop.set()
        after = rss(proc)
        rows.insert(2, (f"peak during {args.sessions} sessions", sampler.peak))
        rows.append((f"after all sessions discarded (+{args.settle:g} s)", after))
        growth = (after - base) / base
        ok = growth <= args.tolerance
        print()
        print(f"explorer soak: {args.sessions} sessions ({args.parallel} at a time), "
              f"--unused-session-lifetime {args.lifetime} --check-unused-sessions {args.check}"
              + (f", env {' '.join(args.env)}" if args.env else ""))
        print()
        print("| phase | server RSS (MB) |")
        print("|---|---:|")
        for name, value in rows:
            print(f"| {name} | {mb(value)} |")
        print()
        print(f"mean page load {sum(load_times) / len(load_times):.1f} s; soak {soak_s:.0f} s; "
              f"all sessions discarded {wait_s:.1f} s after the last close")
        print(f"after vs baseline: {growth:+.1%} -> {'back within' if ok else 'NOT within'} "
              f"{args.tolerance:.0%} of the start")
        print(f"server log: {log_path}")
        return 0 if ok else 1
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
