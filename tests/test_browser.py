"""End to end in a real headless Chromium: `streamlit run streamlit_app.py`, upload a real slice through the file
uploader, see the estimate, a Grad-CAM overlay and similar cases; with the shipped weights, check that the first
screen (1440x900) is the finding, for a slice PNG, a DICOM slice and a zipped DICOM series, and that the DICOM SR and
SEG download. Skipped when Chromium or Playwright is missing. Slow (a minute or more each): `pytest -m "not slow"`
leaves them out."""

from __future__ import annotations

import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("LUNGVIZ_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(os.environ.get("LUNGVIZ_SCREENSHOT", "/tmp/lungviz-e2e-inspect.png"))
#: Where the first screen of the Inspect page after the slice upload is saved (docs/inspect.png is made from it).
FIRST_SCREEN = Path(os.environ.get("LUNGVIZ_FIRST_SCREEN", "/tmp/lungviz-e2e-first-screen.png"))
SHIPPED_WEIGHTS = REPO / "weights"
FOLD = 900  # the first screen: a 1440x900 window at scroll 0
MAX_PROSE_WORDS = 150


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


def _inspect_upload(browser, server: str, upload: Path):
    """A new 1440 x 900 page on the Inspect page with ``upload`` uploaded, once its estimate is shown and the page
    has finished running."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1440, "height": FOLD})
    page.goto(server, wait_until="domcontentloaded")
    expect(page.get_by_role("heading", name="Inspect a nodule")).to_be_visible(timeout=90_000)
    page.locator("input[type=file]").first.set_input_files(str(upload))
    expect(page.locator('[data-testid="stMetricValue"]').first).to_have_text(re.compile(r"\d+%"), timeout=180_000)
    _wait_idle(page, timeout_ms=120_000)
    return page


def _browser_available() -> None:
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"Chromium not found at {CHROMIUM}")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


@contextmanager
def _serve(weights: Path, home: Path) -> Iterator[str]:
    """The real app served by `streamlit run` on a free port with the weights in ``weights``; stopped afterwards."""
    from lungviz.cli.serve import app_server

    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "streamlit.log"
    with log_path.open("w") as log:
        try:
            with app_server({"LUNGVIZ_WEIGHTS": str(weights), "LUNGVIZ_HOME": str(home)}, log) as (url, _):
                yield url
        finally:
            print("streamlit log (tail):", *log_path.read_text().splitlines()[-30:], sep="\n")


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory):
    """The real app with the shipped weights (weights/), one server for every test here (the tiny fixture weights
    have no trained nodule model, so its outline, size and maps would not be exercised)."""
    _browser_available()
    if not (SHIPPED_WEIGHTS / "nodule.safetensors").is_file():
        pytest.skip("the shipped nodule model is not in weights/")
    with _serve(SHIPPED_WEIGHTS, tmp_path_factory.mktemp("shipped") / "home") as url:
        yield url


def test_upload_shows_estimate_gradcam_and_similar_cases(shipped_server: str, lidc_slices_dir: Path):
    from playwright.sync_api import expect, sync_playwright

    image = lidc_slices_dir / "LIDC-IDRI-0001" / "nodule-0" / "images" / "slice-4.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 3600})
            page.goto(shipped_server, wait_until="domcontentloaded")
            expect(page.get_by_role("heading", name="Inspect a nodule")).to_be_visible(timeout=60_000)
            expect(page.get_by_text("Research and education use only").first).to_be_visible()
            page.locator("input[type=file]").first.set_input_files(str(image))

            value = page.locator('[data-testid="stMetricValue"]').first
            expect(value).to_have_text(re.compile(r"^[<>]?\d+%$"), timeout=90_000)
            expect(page.locator('[data-testid="stMetricLabel"]').first).to_have_text("Malignant probability")
            cam = page.get_by_text("Grad-CAM, nodule model: evidence for")
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
            assert "Grad-CAM, nodule model" in html and "LIDC-IDRI-0001/nodule-0" in html
            assert "are left out of the similar cases" in html
            # the measured outline travels: the report's size table, in millimetres
            assert re.search(r"Long axis</th>.*?<td[^>]*>[\d.]+ mm</td>", html, re.S)
            pdf_file = _download(page, "PDF report")
            pdf = pdf_file.read_bytes() if pdf_file else None
            assert pdf is not None and pdf[:5] == b"%PDF-"
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 50_000


# ------------------------------------------------------------------------------------ the first screen is the finding

#: Text that is not prose: table cells, metrics, widgets (labels, uploader, buttons, inputs, their icons), charts,
#: Material icon names (rendered as glyphs) and the research-use badge.
NOT_PROSE = ", ".join([
    'table', '[data-testid="stDataFrame"]', '[data-testid="stTable"]', '[data-testid="stMetric"]',
    '[data-testid="stWidgetLabel"]', '[data-testid="stFileUploader"]', 'button', '[role="button"]', 'input',
    'textarea', '[data-testid="stSelectbox"]', '[data-testid="stSlider"]', '[data-testid="stNumberInput"]',
    '[data-testid="stCheckbox"]', '[data-testid="stButtonGroup"]', '[data-testid="stRadio"]',
    '[data-testid="stTooltipIcon"]', '[data-testid="stIconMaterial"]', '[data-testid="stAlertDynamicIcon"]',
    '[data-testid="stIconEmoji"]', '[role="img"]', '.js-plotly-plot', 'svg',
    '[data-testid="stProgress"]',
])

PROSE_JS = """([fold, notProse, notice]) => {
  const main = document.querySelector('[data-testid="stMain"]');
  const walker = document.createTreeWalker(main, NodeFilter.SHOW_TEXT);
  const words = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!el || el.closest(notProse) || !node.textContent.trim()) continue;
    const badge = el.closest('[data-testid="stMarkdown"]');
    if (badge && badge.innerText.includes(notice)) continue;  // the research-use notice
    const style = getComputedStyle(el);
    if (style.visibility === 'hidden' || style.display === 'none' || +style.opacity === 0) continue;
    const range = document.createRange();
    range.selectNodeContents(node);
    const visible = [...range.getClientRects()].some(r => r.width > 0 && r.height > 0 && r.top < fold && r.bottom > 0);
    if (!visible) continue;
    words.push(...node.textContent.split(/\\s+/).filter(w => /[\\p{L}\\p{N}]/u.test(w)));
  }
  return words;
}"""


def _prose_words(page) -> list[str]:
    """The words of prose visible on the first screen (see :func:`test_first_screen_is_the_finding`)."""
    return page.evaluate(PROSE_JS, [FOLD, NOT_PROSE, "Research and education use only"])


def _first_screen(page) -> dict[str, object]:
    """The first-screen elements of the finding, as Playwright locators (each must be a single visible element)."""
    main = page.locator('[data-testid="stMain"]')
    view = main.locator('[data-testid="stImage"]', has_text="The nodule model's view").filter(has_text="outline")
    return {
        "view with outline": view.locator("img"),
        "malignancy estimate": main.locator('[data-testid="stMetric"]', has_text="Malignant probability"),
        "band and call": main.locator('[data-testid="stMarkdown"]', has_text="second-look call:"),
        "size": main.locator('[data-testid="stMarkdown"]', has_text=re.compile(r"Size.*mm, mean")),
        "characteristics table": main.locator('[data-testid="stColumn"]').filter(  # the innermost such column
            has=page.locator('[data-testid="stMarkdown"]', has_text=re.compile(r"^Characteristics"))).last.locator(
            '[data-testid="stTable"]'),
        "top factors": main.locator('[data-testid="stMarkdown"]', has=page.locator("li")).filter(
            has_text="log-odds"),
        "flag line": main.locator('[data-testid="stAlert"], [data-testid="stCaptionContainer"]').filter(
            has_text=re.compile(r"Refer / uncertain|No uncertainty flag"), visible=True),  # the expander's is hidden
    }


def _lidc_series_zip(folder: Path, out: Path, first: int, last: int) -> Path:
    """The slices of ``folder`` with instance numbers ``first``..``last`` (consecutive), zipped into ``out``."""
    import pydicom

    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(folder.glob("*.dcm")):
            if first <= int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) <= last:
                zf.write(p, f"series/{p.name}")
    return out


#: The three inputs: a LIDC slice PNG (a crop centred on the nodule), one whole DICOM slice (the app opens on the
#: finder's best candidate) and five consecutive slices of the same nodule's series, zipped. LIDC-IDRI-0001's
#: nodule spans z = -105 ... -125 mm, instances 39-47.
INPUTS = {
    "slice-png": lambda data, tmp: data / "lidc-slices" / "LIDC-IDRI-0001" / "nodule-0" / "images" / "slice-4.png",
    "dicom-slice": lambda data, tmp: data / "lidc-dicom" / "LIDC-IDRI-0001" / "000041.dcm",  # instance 43, z -115
    "dicom-series": lambda data, tmp: _lidc_series_zip(data / "lidc-dicom" / "LIDC-IDRI-0001",
                                                       tmp / "LIDC-IDRI-0001-series.zip", 42, 46),
}
SOP_CLASS = {"sr": {"1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR", "1.2.840.10008.5.1.4.1.1.88.22":
                    "Enhanced SR"},
             "seg": {"1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage"}}


@pytest.mark.parametrize("kind", list(INPUTS))
def test_first_screen_is_the_finding(shipped_server: str, data_dir: Path, tmp_path: Path, kind: str):
    """After an upload, with the shipped weights, in Chromium at 1440x900 and before anything is opened:

    - the finding's elements (the nodule model's view with its outline, the malignancy estimate, its risk band and
      call, the size, the characteristics table, the top factors, the refer / uncertain line) lie entirely within
      the first 900 px of the page (their bounding boxes at scroll 0);
    - at most 150 words of prose are visible. Prose: every word of visible text in the main area (the sidebar is
      navigation and the research notice) whose line is at least partly within the first 900 px at scroll 0,
      except table cells, metrics (label and value), widgets (their labels, the file uploader, buttons, inputs,
      sliders, selects), charts, icon glyphs and the research-use badge; headings, captions, alerts, image
      captions and the expander's title count. A word is a run of non-space characters holding a letter or digit;
    - no exception box and no traceback anywhere on the page once it has finished running;
    - for the DICOM inputs, the findings as DICOM SR and the outline as DICOM SEG download and read back with
      pydicom as a Comprehensive 3D SR / Enhanced SR and a Segmentation Storage object.
    """
    from playwright.sync_api import expect, sync_playwright

    upload = INPUTS[kind](data_dir, tmp_path)
    if not upload.is_file():
        pytest.skip(f"real input not found: {upload}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": FOLD}, accept_downloads=True)
            page.goto(shipped_server, wait_until="domcontentloaded")
            expect(page.get_by_role("heading", name="Inspect a nodule")).to_be_visible(timeout=90_000)
            started = time.perf_counter()
            page.locator("input[type=file]").first.set_input_files(str(upload))
            value = page.locator('[data-testid="stMetricValue"]').first
            expect(value).to_have_text(re.compile(r"^[<>]?\d+%$"), timeout=180_000)
            # recorded, not asserted: the speed a user feels (issue 27 asks <= 3 s with warm caches)
            print(f"{kind}: upload to first estimate {time.perf_counter() - started:.1f} s")
            # the whole page has run: the similar cases come last before the review and report
            expect(page.get_by_role("button", name="Open in library").first).to_be_attached(timeout=120_000)
            _wait_idle(page, timeout_ms=120_000)
            page.wait_for_timeout(1000)  # images and the table finish drawing

            body = page.locator("body").inner_text()
            assert page.locator('[data-testid="stException"]').count() == 0
            assert "Traceback" not in body and not re.search(r"\b\w*(Error|Exception):", body), body[:2000]
            expect(page.get_by_text("Research and education use only").first).to_be_visible()

            page.evaluate("window.scrollTo(0, 0)")
            page.locator('[data-testid="stMain"]').evaluate("el => el.scrollTo(0, 0)")
            boxes = {}
            for name, element in _first_screen(page).items():
                expect(element, f"{kind}: {name}").to_have_count(1)
                expect(element, f"{kind}: {name}").to_be_visible()
                box = element.bounding_box()
                boxes[name] = (round(box["y"]), round(box["y"] + box["height"]))
            words = _prose_words(page)
            print(f"{kind}: first-screen elements (top, bottom px): {boxes}")
            print(f"{kind}: {len(words)} words of prose above the fold: {' '.join(words)}")
            if kind == "slice-png":
                page.screenshot(path=str(FIRST_SCREEN))
            below = {name: box for name, box in boxes.items() if box[1] > FOLD}
            assert not below, f"{kind}: below the first {FOLD} px: {below}"
            assert len(words) <= MAX_PROSE_WORDS, f"{kind}: {len(words)} words of prose: {' '.join(words)}"

            if kind != "slice-png":
                import pydicom

                for button, what in (("Findings as DICOM SR", "sr"), ("Outline as DICOM SEG", "seg")):
                    got = _download(page, button, timeout_ms=120_000)
                    assert got is not None, f"{kind}: {button} did not download"
                    ds = pydicom.dcmread(got)
                    assert str(ds.SOPClassUID) in SOP_CLASS[what], (button, ds.SOPClassUID)
                    assert ds.Modality == ("SR" if what == "sr" else "SEG")
        finally:
            browser.close()


def test_the_picker_stays_zoomed_after_a_click(shipped_server: str, data_dir: Path):
    """A whole DICOM slice, the picker magnified 4x around the centre: a click on the image moves the centre there
    and the page reruns, and the picker still shows a quarter of the slice's width, around the new centre."""
    from playwright.sync_api import expect, sync_playwright

    upload = INPUTS["dicom-slice"](data_dir, None)
    if not upload.is_file():
        pytest.skip(f"real input not found: {upload}")
    # the ranges Plotly drew (it widens one axis to keep the pixels square): the shorter span is the zoom's.
    shown = "el => el._fullLayout ? [el._fullLayout.xaxis.range, el._fullLayout.yaxis.range] : null"

    def drawn(plot, ok, timeout_s: float = 60.0) -> tuple[float, tuple[float, float]]:
        """The picker's (span, x range) once ``ok`` holds for them, or the last drawn if it never does: a rerun
        replaces the figure some time after the click that asked for it, longer on a loaded machine."""
        deadline, got = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            if (ranges := plot.evaluate(shown)) is not None:
                (x0, x1), (y0, y1) = ranges
                got = min(abs(x1 - x0), abs(y1 - y0)), (min(x0, x1), max(x0, x1))
                if ok(*got):
                    break
            time.sleep(0.25)
        assert got is not None, "the picker was never drawn"
        return got

    def zoomed(span: float, _x: tuple[float, float]) -> bool:
        return abs(span - 128.0) <= 1.0

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = _inspect_upload(browser, shipped_server, upload)
            page.locator('[data-testid="stButtonGroup"] button').filter(has_text=re.compile(r"^4x$")).click()
            _wait_idle(page, timeout_ms=120_000)
            plot = page.locator('[class*="st-key-pick-"] .js-plotly-plot').first  # the picker, by its key
            assert drawn(plot, zoomed)[0] == pytest.approx(128.0, abs=1.0)
            col = page.get_by_label("Nodule centre: column")
            before = int(col.input_value())
            for attempt in range(2):  # a click that lands while Plotly is still redrawing is lost; try once more
                _wait_idle(page, timeout_ms=120_000)
                box = plot.locator(".nsewdrag").first.bounding_box()  # the plotting area
                page.mouse.click(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.5)
                try:
                    expect(col).not_to_have_value(str(before), timeout=30_000 * (attempt + 1))
                    break
                except AssertionError:
                    if attempt:
                        raise
            _wait_idle(page, timeout_ms=120_000)
            after = int(col.input_value())
            span, (x0, x1) = drawn(plot, lambda sp, x: zoomed(sp, x) and x[0] - 1 <= after <= x[1] + 1)
            assert span == pytest.approx(128.0, abs=1.0)  # still magnified after the rerun
            assert x0 - 1 <= after <= x1 + 1  # around the new centre
        finally:
            browser.close()


def test_the_centre_stays_while_the_slices_are_stepped_through_fast(shipped_server: str, data_dir: Path,
                                                                    tmp_path: Path):
    """A whole zipped series (LIDC-IDRI-0001, 17 slices): the page opens on the finder's best candidate; the slice
    slider is then stepped with the arrow key faster than the page reruns (as a reader scrolls through a series),
    and the nodule centre stays where it was, as the page promises. Each slice's candidate list is drawn anew while
    runs are cut short, and that once moved the centre to the new slice's first candidate."""
    from playwright.sync_api import sync_playwright

    upload = _lidc_series_zip(data_dir / "lidc-dicom" / "LIDC-IDRI-0001", tmp_path / "series.zip", 1, 10_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = _inspect_upload(browser, shipped_server, upload)
            row, col = page.get_by_label("Nodule centre: row"), page.get_by_label("Nodule centre: column")
            start = (row.input_value(), col.input_value())
            thumb = page.locator('[data-testid="stSlider"] input[type="range"]').first
            first = int(thumb.input_value())
            for direction in ("ArrowRight", "ArrowLeft", "ArrowRight"):
                for _ in range(5):
                    thumb.focus()
                    page.keyboard.press(direction)
                    page.wait_for_timeout(150)
                _wait_idle(page, timeout_ms=120_000)
                assert (row.input_value(), col.input_value()) == start, direction
            assert int(thumb.input_value()) != first  # the slices did change
        finally:
            browser.close()
