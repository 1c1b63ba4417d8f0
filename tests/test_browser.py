"""End to end in a real headless Chromium: `streamlit run streamlit_app.py`, upload a real slice through the file
uploader, see the estimate, a Grad-CAM overlay and similar cases. Skipped when Chromium or Playwright is missing."""

from __future__ import annotations

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

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("LUNGVIZ_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(os.environ.get("LUNGVIZ_SCREENSHOT", "/tmp/lungviz-e2e-inspect.png"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"streamlit did not answer at {url} within {timeout_s:.0f} s")


def _wait_idle(page, timeout_ms: int = 60_000) -> None:
    """Wait until Streamlit has finished its current run (its "running" status widget is gone)."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=timeout_ms)


def _download(page, button: str, timeout_ms: int = 30_000) -> Path | None:
    """Click a deferred download button once and return the downloaded file, or None if nothing came.

    The app's download buttons do not rerun the page on a click (``on_click="ignore"``). Before, a click also
    reran the page, and the run's end revokes deferred files no longer on the page, so a download could be
    lost on a loaded machine (about 1 in 3 here); a single click must now be enough."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    _wait_idle(page)
    try:
        with page.expect_download(timeout=timeout_ms) as download:
            page.get_by_role("button", name=button).click()
    except PlaywrightTimeout:
        return None
    return Path(download.value.path())


@pytest.fixture
def app_server(app_weights: Path, tmp_path: Path):
    """The real app served by `streamlit run` on a free port, with the fixture weights; stopped afterwards."""
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"Chromium not found at {CHROMIUM}")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    port = _free_port()
    env = {**os.environ, "LUNGVIZ_WEIGHTS": str(app_weights), "LUNGVIZ_HOME": str(tmp_path / "home")}
    log = (tmp_path / "streamlit.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/_stcore/health", proc)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        print("streamlit log (tail):", *(tmp_path / "streamlit.log").read_text().splitlines()[-30:], sep="\n")


def test_upload_shows_estimate_gradcam_and_similar_cases(app_server: str, lidc_slices_dir: Path):
    from playwright.sync_api import expect, sync_playwright

    image = lidc_slices_dir / "LIDC-IDRI-0001" / "nodule-0" / "images" / "slice-4.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 3600})
            page.goto(app_server, wait_until="domcontentloaded")
            expect(page.get_by_role("heading", name="Inspect a nodule")).to_be_visible(timeout=60_000)
            expect(page.get_by_text("Research and education use only").first).to_be_visible()
            page.locator("input[type=file]").first.set_input_files(str(image))

            value = page.locator('[data-testid="stMetricValue"]').first
            expect(value).to_have_text(re.compile(r"^[<>]?\d+%$"), timeout=90_000)
            expect(page.get_by_text("Malignant probability: fused (both views)")).to_be_visible()
            cam = page.get_by_text("Grad-CAM, nodule view: evidence for")
            expect(cam).to_be_visible(timeout=60_000)
            overlay = page.locator('[data-testid="stImage"]', has=cam).locator("img")
            expect(overlay).to_have_count(1)
            expect(overlay).to_have_js_property("naturalWidth", 256, timeout=30_000)  # the 256 px overlay, loaded
            expect(page.get_by_text("LIDC-IDRI-0001/nodule-0").first).to_be_visible(timeout=60_000)
            # the five similar cases render one after another: on a loaded machine that takes more than 5 s
            expect(page.get_by_role("button", name="Open in library")).to_have_count(5, timeout=60_000)
            expect(page.get_by_text(re.compile(r"Readers: \d")).first).to_be_visible()
            # the upload is a library slice: its own patient's cases are left out of the similar cases, as it says
            expect(page.get_by_text("the cases of its patient (LIDC-IDRI-0001) are left out").first).to_be_visible()
            assert page.locator('[data-testid="stException"]').count() == 0
            page.wait_for_timeout(1000)  # let the charts finish drawing before the screenshot
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            html_file = _download(page, "HTML report", timeout_ms=60_000)  # the deferred report downloads
            assert html_file is not None
            html = html_file.read_text(encoding="utf-8")
            assert "Research and education use only" in html and "slice-4.png" in html
            assert "Grad-CAM, nodule view" in html and "LIDC-IDRI-0001/nodule-0" in html
            assert "are left out of the similar cases" in html
            assert "Outline (nodule outliner): about " in html and "long axis" in html  # the measured outline travels
            pdf_file = _download(page, "PDF report")
            pdf = pdf_file.read_bytes() if pdf_file else None
            assert pdf is not None and pdf[:5] == b"%PDF-"
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 50_000
