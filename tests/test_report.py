"""Per-case reports: self-contained HTML (escaped, one data URI per image) and PDF, with and without optional parts."""

from __future__ import annotations

import base64
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
from lungviz.present.report import (
    CaseReport,
    build_html,
    build_pdf,
    model_versions,
    reader_spread,
    report_filename,
    save_report,
    to_rgb8,
)

RNG = np.random.default_rng(0)
SHA = "0123456789abcdef" * 4
NOTE = 'Looks benign <script>alert("x")</script>\nsecond line & more'


def _task(classes: list[str], probs: list[float]) -> dict:
    return {"classes": classes, "probabilities": probs, "prediction": classes[int(np.argmax(probs))]}


BINARY, SCORE = ["benign", "malignant"], ["1", "2", "3", "4", "5"]
PREDICTION = {
    "views": {
        "slice": {"binary": _task(BINARY, [0.4, 0.6]), "score": _task(SCORE, [0.05, 0.1, 0.3, 0.35, 0.2])},
        "nodule": {"binary": _task(BINARY, [0.28, 0.72]), "score": _task(SCORE, [0.03, 0.07, 0.24, 0.41, 0.25])},
    },
    "malignant_probability": 0.72,
    "flag": "refer / uncertain",
    "reasons": ["malignant probability 72% is in the uncertain band (25%-75%)"],
}


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
        images={"slice": _gray(), "nodule": _gray()},
        prediction=PREDICTION,
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
        models={"nodule-binary (tf_efficientnet_lite0)": SHA, "slice-binary": "fedcba9876543210" * 4},
    )


N_IMAGES = 7


# ------------------------------------------------------------------------------------------------------ HTML


def test_html_has_notice_case_and_probabilities() -> None:
    page = build_html(full_report())
    assert page.startswith("<!DOCTYPE html>")
    assert RESEARCH_NOTICE in page
    assert page.index(RESEARCH_NOTICE) < page.index("Model estimate")  # the notice comes before any result
    assert "LIDC-IDRI-0001/nodule-0" in page and "2025-01-31 14:05 UTC" in page
    for text in ("72%", "60%", "41%", "35%", "refer / uncertain", "uncertain band (25%-75%)",
                 "Nodule model", "Slice view", "Disagree with the model"):
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
    for text in ("No model estimate", "No explanation maps", "No similar cases", "has not been reviewed",
                 "No model versions"):
        assert text in page, text
    assert report.created is not None and report.created.tzinfo is not None


def test_prediction_without_score_or_slice_view() -> None:
    pred = {"views": {"nodule": {"binary": _task(BINARY, [0.9, 0.1])}}, "malignant_probability": 0.1,
            "flag": "no uncertainty flag", "reasons": []}
    page = build_html(CaseReport(case_id="c", prediction=pred, images={"nodule": _gray()}))
    assert "10%" in page and "no uncertainty flag" in page and "Score 1" not in page
    assert "this does not make the estimate correct" in page and 'class="headline noflag"' in page
    assert "calibrated on the LIDC validation split" in page and "assume" not in page
    assert page.count("data:image/png;base64,") == 1


def test_model_probabilities_never_read_as_certain_and_an_assumed_spacing_is_said() -> None:
    pred = {"views": {"nodule": {"binary": _task(BINARY, [0.999, 0.001])}}, "malignant_probability": 0.001,
            "flag": "no uncertainty flag", "reasons": []}
    report = CaseReport(case_id="c", prediction=pred, images={"nodule": _gray()})
    page = build_html(report)
    assert "&lt;1%" in page and ">99%" not in page and "<strong>0%</strong>" not in page
    assert "assume" not in page
    assert build_pdf(report).startswith(b"%PDF")  # "<1%" must not break the PDF's paragraph markup
    pred["sizes_assume_spacing_mm"] = 0.7  # a PNG without spacing: the sizes assumed one
    assert "sizes assume 0.70 mm per pixel" in build_html(report)


def test_real_prediction_to_dict_renders() -> None:
    """The report reads the exact dict :meth:`Prediction.to_dict` makes."""
    from lungviz.inference.predict import Prediction, TaskPrediction, uncertainty_flags

    views = {"slice": {"binary": TaskPrediction(classes=BINARY, probs=[0.3, 0.7])},
             "nodule": {"binary": TaskPrediction(classes=BINARY, probs=[0.6, 0.4]),
                        "score": TaskPrediction(classes=SCORE, probs=[.1] * 4 + [.6])}}
    pred = Prediction(views=views, flags=uncertainty_flags(views)).to_dict()
    page = build_html(CaseReport(case_id="c", prediction=pred))
    assert "70%" in page and "40%" in page and "60%" in page
    assert pred["flag"] in page and pred["reasons"] and all(r in page for r in pred["reasons"])


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
    for s in ("LIDC-IDRI-0042/nodule-1", "3, 4, 5, 5", "72%", "refer / uncertain", "12.5 mm", SHA[:12]):
        assert s in text, s
    assert "<script>alert" in text  # the note is drawn as text, not read as markup
    assert len(re.findall(rb"/Subtype\s*/Image", pdf)) >= N_IMAGES
    assert RESEARCH_NOTICE.encode() in pdf  # document metadata (subject)


def test_pdf_minimal_report() -> None:
    pytest.importorskip("reportlab")
    pdf = build_pdf(CaseReport(case_id="upload <1>", source="upload"))
    assert pdf.startswith(b"%PDF") and _pages(pdf) == 1
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
    report = CaseReport(case_id="c", prediction=PREDICTION)
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

    path = save_report(CaseReport(case_id="first", prediction=PREDICTION), tmp_path / "r.html")
    before = path.read_bytes()

    def disk_full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(LungvizError, match="cannot write the report"):
        save_report(CaseReport(case_id="second", prediction=PREDICTION), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["r.html"]


def test_nothing_outlined_is_reported_and_input_notes_reach_the_report() -> None:
    pred = {"views": {"nodule": {"binary": _task(BINARY, [0.99, 0.01])}}, "malignant_probability": 0.01,
            "flag": "no uncertainty flag", "reasons": [],
            "nodule_model": {"slices_read": 1, "outlined": False, "size_mm": {}, "characteristics": {},
                             "top_factors": [], "malignant_probability": 0.01}}
    warning = "This image is `slice-4.png` of library case LIDC-IDRI-0001/nodule-0. Train case: optimistic."
    report = CaseReport(case_id="slice-4.png", source="upload", file_names=["slice-4.png"], prediction=pred,
                        images={"nodule": _gray()}, input_notes=[warning, "Nodule centre used: row 3, column 4."])
    page = build_html(report)
    assert "no outline found, so the size is unknown" in page
    assert "LIDC-IDRI-0001/nodule-0. Train case: optimistic." in page and "Nodule centre used: row 3" in page
    assert build_pdf(report).startswith(b"%PDF")
