"""The real app served by ``streamlit run`` on a free local port, for the bench and the browser tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from lungviz import paths
from lungviz.errors import LungvizError


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def app_server(env: dict[str, str] | None = None, log: IO | int = subprocess.DEVNULL,
               timeout_s: float = 90.0) -> Iterator[tuple[str, float]]:
    """Start the app with ``env`` added to this process's environment; yield its URL and the seconds until its
    health endpoint answered; stop it afterwards."""
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--browser.gatherUsageStats", "false"], cwd=str(paths.REPO_ROOT),
                            env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                raise LungvizError(f"the app's server exited with status {proc.returncode}.")
            if time.perf_counter() - t0 > timeout_s:
                raise LungvizError(f"the app's server did not answer within {timeout_s:.0f} s.")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/", time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def chromium_path() -> Path:
    """Where the browser tests and the bench find Chromium (``LUNGVIZ_CHROMIUM``, default Debian's)."""
    return Path(os.environ.get("LUNGVIZ_CHROMIUM", "/usr/bin/chromium"))
