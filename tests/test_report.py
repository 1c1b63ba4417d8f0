"""Per-case reports: one list of sections, the finding first, rendered as self-contained HTML (escaped, one data URI
per image) and as PDF, from a typed prediction, with and without optional parts."""

from __future__ import annotations

import base64
import html
import io
import re
import sys
import zlib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungviz import RESEARCH_NOTICE
from lungviz.errors import LungvizError
from lungviz.inference.nodule import Assessment, NoduleReading
from lungviz.inference.predict import (
    Prediction,
    TaskPrediction,
    estimate_prediction,
    score_prediction,
    uncertainty_flags,
)
from lungviz.models import NODULE_HEADS
from lungviz.present.report import (
    CaseReport,
    ReportContent,
    Section,
    Text,
    build_html,
    build_pdf,
    model_versions,
    reader_spread,
    report_filename,
    report_sections,
    save_report,
    to_rgb8,
)
from lungviz.present.text import call_words

RNG = np.random.default_rng(0)
SHA = "0123456789abcdef" * 4
NOTE = 'Looks benign <script>alert("x")</script>\nsecond line & more'
BINARY, SCORE = ["benign", "malignant"], ["1", "2", "3", "4", "5"]
FLAG = "malignant probability 72% is in the uncertain band (25%-75%)"
FINDING_TITLES = ["Case and inputs", "Images, as the model saw them", "Malignancy estimate", "Size", "Characteristics",
                  "What moved the estimate"]
TITLES = [*FINDING_TITLES, "Where the model looked", "Similar library cases", "Review", "Appendix: how sure is this?",
          "Appendix: model versions"]


def _probs(n: int, top: int, p: float = 0.6) -> np.ndarray:
    out = np.full(n, (1.0 - p) / (n - 1))
    out[top] = p
    return out


def assessment(probability: float = 0.72, outlined: bool = True) -> Assessment:
    """A nodule model's assessment as :func:`lungviz.inference.nodule.explain` makes one, on made-up figures."""
    probs = {h: _probs(n, n - 1) for h, n in NODULE_HEADS.items()}
    probs["malignancy"] = np.array([0.03, 0.07, 0.24, 0.41, 0.25])
    nan = float("nan")
    reading = NoduleReading(n_slices=3, probabilities=probs, ratings={h: 3.0 for h in NODULE_HEADS},
                            long_axis_mm=14.26 if outlined else nan, short_axis_mm=9.04 if outlined else nan,
                            mean_axes_mm=11.65 if outlined else nan, volume_mm3=812.0 if outlined else None)
    return Assessment(reading=reading, factors={"size": float(np.log(11.65)), "spiculation": 4.2, "image": 0.9},
                      contributions={"size": 0.8, "spiculation": 1.3, "image": -0.4}, probability=probability,
                      risk_band="high (over 50%)", threshold=0.3, intercept=-1.2,
                      test_calls={"sensitivity": 0.9, "specificity": 0.61, "n": 180,
                                  "ci95": {"sensitivity": [0.82, 0.95], "specificity": [0.52, 0.69]}})


def prediction(a: Assessment | None = None, slice_view: bool = True, flags: list[str] | None = None,
               spacing_assumed: bool = False) -> Prediction:
    """A typed prediction as :func:`lungviz.inference.predict.predict` makes one: nodule model and slice view."""
    a = assessment() if a is None else a
    views = {"nodule": {"binary": estimate_prediction(a), "score": score_prediction(a)}}
    if slice_view:
        views["slice"] = {"binary": TaskPrediction(classes=BINARY, probs=[0.4, 0.6]),
                          "score": TaskPrediction(classes=SCORE, probs=[0.05, 0.1, 0.3, 0.35, 0.2])}
    return Prediction(views=views, flags=[FLAG] if flags is None else flags, assessment=a,
                      spacing_assumed=spacing_assumed)


def _gray(side: int = 32) -> np.ndarray:
    return RNG.random((side, side)).astype(np.float32)


def _rgb(side: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, (side, side, 3), dtype=np.uint8)


def full_report() -> CaseReport:
    """Two views, three maps, three similar cases (two with thumbnails): seven images in all."""
    return CaseReport(
        case_id="LIDC-IDRI-0001/nodule-0",
        source="library",
        created=datetime(2025, 1, 31, 14, 5, tzinfo=UTC),
        images={"nodule": _gray(), "slice": _gray()},
        prediction=prediction(),
        maps={"Grad-CAM, nodule view": _rgb(), "Grad-CAM++, nodule view": _rgb(), "LIME <nodule> view": _rgb()},
        similar=[
            {"case_id": "LIDC-IDRI-0042/nodule-1", "malignancy": 4, "reader_scores": [5, 3, 4, 5],
             "diameter_mm": 12.54, "similarity": 0.931, "thumbnail": _gray(16)},
            {"case_id": "LIDC-IDRI-0007/nodule-0", "malignancy": 2, "reader_scores": "2 1 2",
             "diameter_mm": 6.0, "similarity": 0.874, "thumbnail": _rgb(16)},
            {"case_id": "LIDC-IDRI-0099/nodule-2", "malignancy": 3, "reader_scores": [3],
             "diameter_mm": None, "similarity": 0.8, "thumbnail": None},
        ],
        verdict="disagree",
        note=NOTE,
        reviewer="Dr. O'Neil & <team>",
        models={"nodule (nodule-net)": SHA, "slice-binary (tf_efficientnet_lite0)": "fedcba9876543210" * 4},
    )


N_IMAGES = 7


def _h2(page: str) -> list[str]:
    return [html.unescape(t) for t in re.findall(r"<h2>(.*?)</h2>", page)]


# ------------------------------------------------------------------------------------------------------ HTML


def test_html_has_notice_case_and_the_finding() -> None:
    page = build_html(full_report())
    assert page.startswith("<!DOCTYPE html>")
    first_result = min(page.index(t) for t in ("72%", "Malignant probability", "<h2>"))
    assert RESEARCH_NOTICE in page and page.index(RESEARCH_NOTICE) < first_result  # the notice before any result
    assert "LIDC-IDRI-0001/nodule-0" in page and "2025-01-31 14:05 UTC" in page
    for text in ("Malignant probability: 72% - high (over 50%) - second-look call: flag for a second look (from 30%)",
                 "On test this call found 90% [82-95%] of malignant nodules and cleared 61% [52-69%] of the others.",
                 f"Refer / uncertain: {FLAG}.", "14.3 mm", "9.0 mm", "11.7 mm", "812 mm3", "largest of 3 slices",
                 "spiculation", "marked", "From an average nodule&#x27;s 23%", "spiculation 4.2: +1.3 log-odds",
                 "60%", "41%", "35%", "Nodule model", "Slice view", "Disagree with the model"):
        assert text in page, text
    assert SHA[:12] in page and SHA not in page  # a prefix, not the whole hash
    assert "tf_efficientnet_lite0" in page


def test_html_escapes_user_text() -> None:
    report = full_report()
    report.file_names = ["<img src=x onerror=alert(1)>.png"]
    report.source = "upload"
    page = build_html(report)
    assert "<script" not in page.lower() and "onerror=alert(1)>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "second line &amp; more" in page
    assert "Dr. O&#x27;Neil &amp; &lt;team&gt;" in page
    assert "LIME &lt;nodule&gt; view" in page
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in page


def test_html_one_data_uri_per_image_and_they_decode_to_the_inputs() -> None:
    report = full_report()
    page = build_html(report)
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert page.count("data:image/png;base64,") == len(uris) == N_IMAGES
    assert not re.search(r'src="(?!data:)', page)  # nothing fetched from outside the page
    given = [*report.images.values(), *report.maps.values(), report.similar[0]["thumbnail"],
             report.similar[1]["thumbnail"]]
    for uri, image in zip(uris, given, strict=True):
        decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB"))
        assert np.array_equal(decoded, to_rgb8(image))


def test_html_similar_cases_table() -> None:
    page = build_html(full_report())
    for text in ("LIDC-IDRI-0042/nodule-1", "3, 4, 5, 5", "1, 2, 2", "12.5 mm", "0.93", "0.87", "6.0 mm"):
        assert text in page, text


def test_minimal_report_builds_and_says_what_is_missing() -> None:
    report = CaseReport(case_id="upload-1", source="upload", file_names=["slice.png", "crop.png"])
    page = build_html(report)
    assert RESEARCH_NOTICE in page
    assert "data:image/png;base64," not in page
    assert "slice.png, crop.png" in page
    for text in ("No model estimate", "no size was measured", "No characteristics", "No explanation maps",
                 "No similar cases", "has not been reviewed", "No model versions"):
        assert text in page, text
    assert _h2(page) == TITLES  # the same sections, in the same order, whatever is missing
    assert report.created is not None and report.created.tzinfo is not None


def test_prediction_without_the_nodule_model_score_or_slice_view() -> None:
    views = {"nodule": {"binary": TaskPrediction(classes=BINARY, probs=[0.9, 0.1])}}
    pred = Prediction(views=views, flags=uncertainty_flags(views))
    page = build_html(CaseReport(case_id="c", prediction=pred, images={"nodule": _gray()}))
    assert "Malignant probability (nodule model): 10% - call: benign (from 50%)" in page
    assert "Score 1" not in page and "no size was measured" in page
    assert "No uncertainty flag (this does not make the estimate correct)" in page and 'class="flag noflag"' in page
    assert "calibrated on the LIDC validation split" in page and "assume" not in page
    assert page.count("data:image/png;base64,") == 1


def test_model_probabilities_never_read_as_certain_and_an_assumed_spacing_is_said() -> None:
    a = assessment(probability=0.001)
    pred = prediction(a, slice_view=False, flags=[])
    pred.views["nodule"]["score"] = TaskPrediction(classes=SCORE, probs=[0.9968, 0.001, 0.001, 0.0011, 0.0001])
    report = CaseReport(case_id="c", prediction=pred, images={"nodule": _gray()})
    page = build_html(report)
    assert "Malignant probability: &lt;1%" in page and "&gt;99%" in page  # the score 1 column
    shown = re.sub(r"<style>.*?</style>", "", page, flags=re.DOTALL)
    assert not re.search(r"(?<![\d.])0%", shown) and "100%" not in shown  # never a certain-looking 0% or 100%
    assert "assume" not in page
    pdf = build_pdf(report)  # "<1%" must not break the PDF's paragraph markup
    assert "Malignant probability: <1%" in _pdf_text(pdf)
    assert "sizes assume 0.70 mm per pixel" in build_html(CaseReport(
        case_id="c", prediction=prediction(a, spacing_assumed=True)))  # a PNG without spacing: the sizes assumed one


def test_the_report_takes_a_typed_prediction_and_reads_json_only_at_its_edge() -> None:
    """A dict is refused; the JSON form (the CLI's output, a review log's summary) is read by
    :meth:`ReportContent.from_json` into the same report as the prediction it came from."""
    pred = prediction()
    with pytest.raises(TypeError, match="not a dict"):
        CaseReport(case_id="c", prediction=pred.to_dict())
    when = datetime(2025, 1, 31, 14, 5, tzinfo=UTC)
    typed = build_html(CaseReport(case_id="c", created=when, prediction=pred))
    edge = build_html(CaseReport(case_id="c", created=when, prediction=ReportContent.from_json(pred.to_dict())))
    assert typed == edge and "Malignant probability: 72%" in typed


def test_a_real_prediction_of_the_nodule_model_renders(tmp_path: Path) -> None:
    """The report reads the exact typed prediction :func:`lungviz.inference.predict.predict` makes (a tiny untrained
    nodule model)."""
    from conftest import build_nodule_weights

    from lungviz.inference.predict import load_models, predict
    from lungviz.present.report import prob_pct

    models = load_models(build_nodule_weights(tmp_path), device="cpu")
    pred = predict(models, np.random.default_rng(3).random((128, 128)).astype(np.float32), spacing_mm=0.7)
    a = pred.assessment
    report = CaseReport(case_id="c", prediction=pred, images=pred.images, models=model_versions(models.networks))
    page = build_html(report)
    assert f"Malignant probability: {html.escape(prob_pct(a.probability))} - {html.escape(a.risk_band)}" in page
    assert f"second-look call: {call_words(a.call)} (from 12%)" in page
    assert "found 90% [80-95%] of malignant nodules" in page
    assert all(html.escape(w) in page for w in a.characteristics.values())
    assert all(html.escape(f) in page for f in a.top_factors())
    assert ("No uncertainty flag" in page) != pred.refer and all(html.escape(f) in page for f in pred.flags)
    text = _pdf_text(build_pdf(report))
    assert f"Malignant probability: {prob_pct(a.probability)}" in text and TITLES[-1] in text


# -------------------------------------------------------------------------------------------------- sections


def test_the_finding_comes_first_then_maps_and_similar_cases_then_review_then_the_appendix() -> None:
    sections = report_sections(full_report())
    assert [s.title for s in sections] == TITLES
    assert [s.part for s in sections] == ["finding"] * 6 + ["evidence"] * 2 + ["review"] + ["appendix"] * 2
    assert [s.title for s in sections if s.new_page] == ["Where the model looked", "Appendix: how sure is this?"]
    # the validation figures are in the appendix, not in the finding
    appendix = build_html(full_report()).split("Appendix: how sure is this?")[1]
    assert "Sensitivity on test" in appendix and "calibrated on the LIDC validation split" in appendix
    assert "Calls malignant from" in appendix and "On each of the 180 held-out test nodules" in appendix
    finding = build_html(full_report()).split("Where the model looked")[0]
    assert "calibrated on the LIDC validation split" not in finding and "Sensitivity on test" not in finding


def test_html_and_pdf_render_the_same_sections_in_the_same_order() -> None:
    pytest.importorskip("reportlab")
    report = full_report()
    titles = [s.title for s in report_sections(report)]
    assert _h2(build_html(report)) == titles
    text = _pdf_text(build_pdf(report))
    at = [text.find(t) for t in titles]
    assert -1 not in at and at == sorted(at), dict(zip(titles, at, strict=True))


def test_both_renderers_draw_only_the_one_section_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever :func:`report_sections` says is what both formats show: neither has content of its own."""
    pytest.importorskip("reportlab")
    from lungviz.present import report as module

    made = [Section("Alpha section", (Text("alpha text"),)), Section("Beta section", (Text("beta text"),),
                                                                     part="appendix", new_page=True)]
    consumed: list[list[Section]] = []

    def spy(report: CaseReport) -> list[Section]:
        consumed.append(made)
        return made

    monkeypatch.setattr(module, "report_sections", spy)
    page, pdf = build_html(full_report()), build_pdf(full_report())
    assert len(consumed) == 2 and _h2(page) == ["Alpha section", "Beta section"]
    text = _pdf_text(pdf)
    assert text.index("Alpha section") < text.index("alpha text") < text.index("Beta section") < text.index("beta text")
    for title in TITLES:
        assert title not in page and title not in text, title
    assert "72%" not in page and "72%" not in text  # no result drawn outside the sections


def test_pdf_puts_the_finding_on_the_first_page() -> None:
    pytest.importorskip("reportlab")
    pages = _page_texts(build_pdf(full_report()))
    assert len(pages) >= 3
    assert all(t in pages[0] for t in FINDING_TITLES), [t for t in FINDING_TITLES if t not in pages[0]]
    assert "Malignant probability: 72%" in pages[0] and "Refer / uncertain" in pages[0]
    assert pages[0].index("Research and education use only") < pages[0].index("Malignant probability")
    assert not any(t in pages[0] for t in TITLES[6:])
    assert "Where the model looked" in pages[1]


# ------------------------------------------------------------------------------------------------ helpers

RGB8_CASES = [
    (np.array([[0.0, 1.0]], np.float32), [[0, 0, 0], [255, 255, 255]]),
    (np.array([[-1.0, np.nan]], np.float64), [[0, 0, 0], [0, 0, 0]]),
    (np.array([[7, 200]], np.uint8), [[7, 7, 7], [200, 200, 200]]),
    (np.array([[[1, 2, 3, 255]]], np.uint8), [[1, 2, 3]]),
    (np.array([[[0.0, 0.5, 1.0]]], np.float32), [[0, 128, 255]]),
]


@pytest.mark.parametrize(("image", "expected"), RGB8_CASES)
def test_to_rgb8(image: np.ndarray, expected: list) -> None:
    out = to_rgb8(image)
    assert out.dtype == np.uint8 and out.shape == (*image.shape[:2], 3)
    assert out.reshape(-1, 3).tolist() == expected


@pytest.mark.parametrize("bad", [np.zeros((4,)), np.zeros((2, 2, 2)), np.zeros((0, 3)), np.zeros((2, 2, 3, 1))])
def test_to_rgb8_rejects_bad_shapes(bad: np.ndarray) -> None:
    with pytest.raises(LungvizError, match="shape"):
        to_rgb8(bad)


@pytest.mark.parametrize(("scores", "expected"), [
    ([5, 3, 4, 5], "3, 4, 5, 5"), ("5 4 3 5", "3, 4, 5, 5"), ((4.0, 2.0), "2, 4"), ("3,1", "1, 3"),
    ([], "-"), (None, "-"), ("", "-"),
])
def test_reader_spread(scores, expected: str) -> None:
    assert reader_spread(scores) == expected


def test_model_versions_from_bundles_or_specs() -> None:
    class FakeBundle:
        def __init__(self) -> None:
            self.spec = {"arch": "tf_efficientnet_lite2", "weights_sha256": SHA}

    out = model_versions({"slice-binary": FakeBundle(), "nodule": {"weights_sha256": "ab" * 32}})
    assert out == {"slice-binary (tf_efficientnet_lite2)": SHA, "nodule": "ab" * 32}


def test_report_filename_is_safe() -> None:
    report = CaseReport(case_id="../LIDC 0001/nodule:0", created=datetime(2025, 1, 31, 14, 5, tzinfo=UTC))
    name = report_filename(report, "pdf")
    assert name == "lungviz-report-LIDC_0001_nodule_0-20250131-1405.pdf"


# ------------------------------------------------------------------------------------------------------- PDF


def _pdf_text(pdf: bytes) -> str:
    """Every decoded stream of the PDF as Latin-1 text (enough to find drawn strings without pypdf).

    reportlab writes streams as ``/Filter [/ASCII85Decode /FlateDecode]`` (or Flate alone)."""
    parts = []
    for m in re.finditer(rb"/Filter\s*(\[[^\]]*\]|/\w+)[^>]*>>\s*stream\r?\n(.*?)\s*endstream", pdf, re.DOTALL):
        filters, data = m.group(1), m.group(2).strip()
        try:
            if b"ASCII85Decode" in filters:
                data = base64.a85decode(data, adobe=data.startswith(b"<~") or data.endswith(b"~>"))
            if b"FlateDecode" in filters:
                data = zlib.decompress(data)
        except (ValueError, zlib.error):
            continue
        parts.append(data.decode("latin-1"))
    text = re.sub(r"\)\s*Tj\s*\(", "", "\n".join(parts))  # runs of one line drawn piece by piece
    return text.replace("\\(", "(").replace("\\)", ")")


def _decoded(filters: bytes, data: bytes) -> str | None:
    try:
        if b"ASCII85Decode" in filters:
            data = base64.a85decode(data, adobe=data.startswith(b"<~") or data.endswith(b"~>"))
        if b"FlateDecode" in filters:
            data = zlib.decompress(data)
    except (ValueError, zlib.error):
        return None
    text = re.sub(r"\)\s*Tj\s*\(", "", data.decode("latin-1"))
    return text.replace("\\(", "(").replace("\\)", ")")


def _page_texts(pdf: bytes) -> list[str]:
    """The drawn text of each page, in page order (the page tree's ``/Kids``, each page's ``/Contents`` stream)."""
    objects = {int(n): body for n, body in re.findall(rb"(\d+) 0 obj(.*?)endobj", pdf, re.DOTALL)}
    kids = re.search(rb"/Kids\s*\[([^\]]*)\]", pdf)
    assert kids is not None
    out = []
    for page in (int(k) for k in re.findall(rb"(\d+) 0 R", kids.group(1))):
        contents = re.search(rb"/Contents\s+(\d+) 0 R", objects[page])
        m = re.search(rb"/Filter\s*(\[[^\]]*\]|/\w+)[^>]*>>\s*stream\r?\n(.*?)\s*endstream",
                      objects[int(contents.group(1))], re.DOTALL)
        out.append(_decoded(m.group(1), m.group(2).strip()) or "")
    return out


def _pages(pdf: bytes) -> int:
    return len(re.findall(rb"/Type\s*/Page(?![s\w])", pdf))


def test_pdf_full_report() -> None:
    pytest.importorskip("reportlab")
    pdf = build_pdf(full_report())
    assert pdf.startswith(b"%PDF") and pdf.rstrip().endswith(b"%%EOF")
    pages = _pages(pdf)
    assert pages >= 2
    text = _pdf_text(pdf)
    # the notice heads the first page and footers every page
    assert text.count("Research and education use only. lungviz is not a medical device") >= pages + 1
    for s in ("LIDC-IDRI-0042/nodule-1", "3, 4, 5, 5", "72%", "Refer / uncertain", "12.5 mm", SHA[:12]):
        assert s in text, s
    assert "<script>alert" in text  # the note is drawn as text, not read as markup
    assert len(re.findall(rb"/Subtype\s*/Image", pdf)) >= N_IMAGES
    assert RESEARCH_NOTICE.encode() in pdf  # document metadata (subject)


def test_pdf_minimal_report() -> None:
    pytest.importorskip("reportlab")
    pdf = build_pdf(CaseReport(case_id="upload <1>", source="upload"))
    assert pdf.startswith(b"%PDF") and _pages(pdf) == 3  # the finding; maps, similar cases and review; appendix
    text = _pdf_text(pdf)
    assert "Research and education use only" in text and "upload <1>" in text
    assert "No explanation maps" in text


MANY_SCRIPTS = "Dr. Müller: Ωμέγα, Узел 8 мм, 肺结节，边缘毛刺。 결절 ノジュール"


def test_pdf_sets_text_in_any_script_in_a_font_that_draws_it() -> None:
    """A note or a name in Greek, Cyrillic or CJK must print, not come out as empty boxes in Helvetica."""
    pytest.importorskip("reportlab")
    from lungviz.present.report import pdf_markup

    markup = pdf_markup(MANY_SCRIPTS)
    outside = re.sub(r'<font name="[^"]+">.*?</font>', "", markup)
    outside.encode("cp1252")  # only what Helvetica draws is left in it
    assert outside.startswith("Dr. Müller: ") and " 8 " in outside
    fonts = set(re.findall(r'<font name="([^"]+)">', markup))
    assert "DejaVuSans" in fonts and len(fonts) >= 2
    pdf = build_pdf(CaseReport(case_id="上传-Ω", note=MANY_SCRIPTS, reviewer="Иванов 李", verdict="agree"))
    base_fonts = {f.split(b"+")[-1].decode() for f in re.findall(rb"/BaseFont\s*/([\w+-]+)", pdf)}
    assert fonts <= {f.removesuffix("-0") for f in base_fonts}  # every font the markup names is in the PDF
    assert pdf_markup("<b>&", bold=True) == "&lt;b&gt;&amp;" and pdf_markup("a\nb") == "a<br/>b"
    assert pdf_markup("Ω", bold=True) == '<font name="DejaVuSans-Bold">Ω</font>'


def test_pdf_without_a_cjk_font_file_uses_the_readers_cjk_fonts(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("reportlab")
    from lungviz.present import report

    monkeypatch.setattr(report, "EMBEDDED_FONTS", {b: fonts[:1] for b, fonts in report.EMBEDDED_FONTS.items()})
    report._embedded_fonts.cache_clear()
    try:
        markup = report.pdf_markup("肺 결 ノ Ω \ue000")
        assert markup == ('<font name="STSong-Light">肺</font> <font name="HYGothic-Medium">결</font> '
                          '<font name="HeiseiKakuGo-W5">ノ</font> <font name="DejaVuSans">Ω</font> '
                          '<font name="DejaVuSans">\ufffd</font>')  # no font has U+E000: the replacement sign
        pdf = build_pdf(CaseReport(case_id="c", note="肺 결 ノ"))
        for name in (b"STSong-Light", b"HYGothic-Medium", b"HeiseiKakuGo-W5"):
            assert b"/BaseFont /" + name in pdf
    finally:
        report._embedded_fonts.cache_clear()


def test_pdf_without_reportlab_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "reportlab" or m.startswith("reportlab.")] + ["reportlab"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(LungvizError, match="reportlab"):
        build_pdf(CaseReport(case_id="c"))


def test_save_report_by_suffix(tmp_path: Path) -> None:
    report = CaseReport(case_id="c", prediction=prediction())
    html_path = save_report(report, tmp_path / "out" / "r.html")
    assert "72%" in html_path.read_text(encoding="utf-8")
    with pytest.raises(LungvizError, match=r"\.html or \.pdf"):
        save_report(report, tmp_path / "r.docx")
    pytest.importorskip("reportlab")
    assert save_report(report, tmp_path / "r.pdf").read_bytes().startswith(b"%PDF")


def test_a_30000_character_name_no_longer_breaks_the_pdf() -> None:
    """A table row taller than a page stopped reportlab (LayoutError): the reviewer's name, the case id, the file
    names and the input notes are bounded in the report."""
    pytest.importorskip("reportlab")
    from lungviz.present.report import MAX_FIELD_CHARS
    from lungviz.reviews import MAX_REVIEWER_CHARS

    long = "Dr " + "R" * 30_000
    report = CaseReport(case_id="C" * 30_000, source="upload", file_names=["F" * 30_000, "slice.png"],
                        input_notes=["N " * 15_000] * 3, verdict="agree", reviewer=long, note="fine")
    assert report.reviewer == long[: MAX_REVIEWER_CHARS - 1] + "…"
    assert report.case_id == "C" * (MAX_FIELD_CHARS - 1) + "…" and report.file_names[1] == "slice.png"
    assert all(len(n) == MAX_FIELD_CHARS for n in report.input_notes)
    pdf = build_pdf(report)
    assert pdf.startswith(b"%PDF") and "Dr RRRRRRRRRR" in _pdf_text(pdf)  # the name is there, cut
    html = build_html(report)
    assert long[: MAX_REVIEWER_CHARS - 1] + "…" in html and "R" * MAX_REVIEWER_CHARS not in html


def test_save_report_is_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lungviz import files

    path = save_report(CaseReport(case_id="first", prediction=prediction()), tmp_path / "r.html")
    before = path.read_bytes()

    def disk_full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(LungvizError, match="cannot write the report"):
        save_report(CaseReport(case_id="second", prediction=prediction()), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["r.html"]


def test_nothing_outlined_is_reported_and_input_notes_reach_the_report() -> None:
    pred = prediction(assessment(probability=0.01, outlined=False), slice_view=False, flags=[])
    warning = "This image is `slice-4.png` of library case LIDC-IDRI-0001/nodule-0. Train case: optimistic."
    report = CaseReport(case_id="slice-4.png", source="upload", file_names=["slice-4.png"], prediction=pred,
                        images={"nodule": _gray()}, input_notes=[warning, "Nodule centre used: row 3, column 4."])
    page = build_html(report)
    assert "No outline found, so the size is unknown" in page and "Long axis" not in page
    assert "LIDC-IDRI-0001/nodule-0. Train case: optimistic." in page and "Nodule centre used: row 3" in page
    assert build_pdf(report).startswith(b"%PDF")


def test_band_sentence_quotes_the_bins_observed_rate_with_its_interval() -> None:
    from lungviz.present.report import band_sentence

    bins = [{"lo": 0.0, "hi": 0.1, "n": 50, "observed": 0.04, "mean_p": 0.05},
            {"lo": 0.1, "hi": 0.2, "n": 36, "observed": 5 / 36, "mean_p": 0.14},
            {"lo": 0.2, "hi": 1.0, "n": 0, "observed": 0.0, "mean_p": 0.0}]
    assert band_sentence(bins, 0.15) == ("Of 36 test nodules also put at 10%-20%, the readers' panel rated 14% "
                                         "malignant (95% interval 6%-29%).")
    assert band_sentence(bins, 0.1).startswith("Of 50 test nodules also put at 0%-10%")  # bins are (lo, hi]
    assert band_sentence(bins, 0.5) is None and band_sentence(None, 0.5) is None and band_sentence(bins, None) is None
