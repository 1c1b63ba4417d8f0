"""Per-case report: what the model saw and said, its maps, similar library cases and the reviewer's verdict.

:func:`build_html` writes one self-contained page (images as base64 PNG data URIs, inline CSS, A4 print rules);
:func:`build_pdf` the same content as a PDF through reportlab. Both show the research-use notice first and on every
printed page, and escape every piece of user text.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as xml_escape

import numpy as np
from PIL import Image

from lungviz import RESEARCH_NOTICE, __version__
from lungviz.errors import LungvizError
from lungviz.files import atomic_write
from lungviz.present.text import shorten
from lungviz.reviews import MAX_REVIEWER_CHARS

#: Order and names of the prediction views in the report.
VIEW_LABELS = {"nodule": "Nodule model", "slice": "Slice view"}
VERDICT_LABELS = {"agree": "Agree with the model", "disagree": "Disagree with the model", "unsure": "Unsure"}
SHA_PREFIX = 12
#: The longest case id, file name or input note a report prints (cut with an ellipsis beyond).
MAX_FIELD_CHARS = 1000


@dataclass
class CaseReport:
    """Everything one case report shows; only ``case_id`` is required, missing parts are reported as missing.

    Images are ``(H, W) float in [0, 1]`` or ``(H, W, 3) uint8`` (as :mod:`lungviz.explain` overlays are).
    """

    case_id: str  # the library case id, or a label for an upload
    source: str = "library"  # "library" | "upload"
    file_names: list[str] = field(default_factory=list)  # uploaded files, when source is "upload"
    #: what the app said about the input (conversions, the centre used, a library training case's warning)
    input_notes: list[str] = field(default_factory=list)
    created: datetime | None = None  # defaults to now (UTC)
    images: dict[str, np.ndarray] = field(default_factory=dict)  # view ("slice", "nodule") -> what the model saw
    prediction: dict | None = None  # Prediction.to_dict()
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # caption ("Grad-CAM, nodule view") -> overlay
    #: dicts with case_id, malignancy (panel score), reader_scores, diameter_mm, similarity, thumbnail (or None)
    similar: list[dict] = field(default_factory=list)
    verdict: str | None = None  # "agree" | "disagree" | "unsure"
    note: str = ""
    reviewer: str = ""
    models: dict[str, str] = field(default_factory=dict)  # model -> SHA-256 of its weights
    title: str = "lungviz case report"
    notice: str = RESEARCH_NOTICE

    def __post_init__(self) -> None:
        if self.created is None:
            self.created = datetime.now(UTC)
        # outside text on one line and bounded: a table row of the PDF must fit on one page
        self.case_id = shorten(self.case_id, MAX_FIELD_CHARS)
        self.reviewer = shorten(self.reviewer, MAX_REVIEWER_CHARS)
        self.file_names = [shorten(n, MAX_FIELD_CHARS) for n in self.file_names]
        self.input_notes = [shorten(n, MAX_FIELD_CHARS) for n in self.input_notes]

    @property
    def created_utc(self) -> datetime:
        """The report time in UTC (a naive ``created`` is taken as UTC)."""
        when = self.created or datetime.now(UTC)
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)

    @property
    def created_text(self) -> str:
        return f"{self.created_utc:%Y-%m-%d %H:%M} UTC"


def spec_version(spec: Mapping[str, Any]) -> str:
    """What identifies a model's version: its weights' SHA-256."""
    return str(spec.get("weights_sha256") or "")


def model_versions(bundles: Mapping[str, Any]) -> dict[str, str]:
    """``{name (arch): SHA-256}`` from loaded bundles or their spec dicts (``ModelSet.provenance``): the weights'
    digest."""
    out = {}
    for name, bundle in bundles.items():
        spec = bundle if isinstance(bundle, Mapping) else getattr(bundle, "spec", {})
        label = f"{name} ({spec['arch']})" if spec.get("arch") else str(name)
        out[label] = spec_version(spec)
    return out


# ------------------------------------------------------------------------------------------------ images


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """Any report image as ``(H, W, 3) uint8``: ``(H, W)`` or ``(H, W, 3|4)``, floats taken as ``[0, 1]``."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.size == 0 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3))):
        raise LungvizError(f"a report image has shape {tuple(a.shape)}; expected height x width (x 3 colours).")
    if a.dtype != np.uint8:
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    return np.ascontiguousarray(np.broadcast_to(a, (*a.shape[:2], 3)))


def png_bytes(image: np.ndarray) -> bytes:
    """The image as PNG file bytes."""
    buf = io.BytesIO()
    Image.fromarray(to_rgb8(image), "RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def data_uri(image: np.ndarray) -> str:
    """The image as a ``data:image/png;base64,...`` URI for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


# ------------------------------------------------------------------------------------- content, shared by both


CALIBRATION_CAVEAT = (
    "Probabilities are calibrated on the LIDC validation split: they estimate how the LIDC radiologist panel would "
    "rate the nodule (a suspicion rating, not pathology) and may be miscalibrated on other scanners, protocols or "
    "populations."
)


def test_rate(figures: dict, key: str) -> str:
    """``49% [39-60%]``: a measured rate of :func:`lungviz.inference.predict.test_call_figures` with its 95%
    interval."""
    lo_hi = (figures.get("ci95") or {}).get(key)
    value = pct(figures[key])
    if not (lo_hi and len(lo_hi) == 2 and all(isinstance(v, (int, float)) and np.isfinite(v) for v in lo_hi)):
        return value
    return f"{value} [{pct(lo_hi[0])[:-1]}-{pct(lo_hi[1])}]"


def call_note(prediction: dict | None) -> str | None:
    """How the calls are made from the probabilities: each view's malignant call point when any is not 50%, and
    each score call that is not the most probable score."""
    views = (prediction or {}).get("views") or {}
    points = [(VIEW_LABELS.get(v, str(v)).lower(), float(t["binary"]["calls_malignant_from"]))
              for v, t in views.items() if isinstance((t or {}).get("binary"), dict)
              and t["binary"].get("calls_malignant_from") is not None]
    parts = []
    if any(abs(x - 0.5) > 5e-3 for _, x in points):
        parts.append("Each view calls a nodule malignant from its own operating point on its calibrated probability: "
                     + ", ".join(f"{name} from {prob_pct(x)}" for name, x in points)
                     + ". These are the calls the model card's sensitivity, specificity and F1 were measured with; "
                     "below 50% they favour sensitivity, as malignant nodules are the rarer class.")
    found = [(VIEW_LABELS.get(v, str(v)).lower(), t["binary"]["test_calls"]) for v, t in views.items()
             if isinstance((t or {}).get("binary"), dict) and isinstance(t["binary"].get("test_calls"), dict)]
    if found:
        ns = {c.get("n") for _, c in found}
        where = "one middle slice of each of" if all(c.get("single_slice") for _, c in found) else "each of"
        count = f"{ns.pop()} " if len(ns) == 1 and None not in ns else ""
        parts.append(f"On {where} the {count}held-out test nodules these calls found "
                     "this share of the nodules the panel rated malignant: "
                     + ", ".join(f"{name} {test_rate(c, 'sensitivity')}" for name, c in found)
                     + "; and cleared this share of the benign ones: "
                     + ", ".join(f"{name} {test_rate(c, 'specificity')}" for name, c in found)
                     + ". A benign call does not rule malignancy out.")
    for v, t in views.items():
        score = (t or {}).get("score")
        if not isinstance(score, dict) or not score.get("probabilities"):
            continue
        classes, probs = list(score.get("classes") or []), [float(q) for q in score["probabilities"]]
        likeliest = classes[int(np.argmax(probs))] if len(classes) == len(probs) else None
        if likeliest is not None and str(score.get("prediction")) != str(likeliest):
            parts.append(f"The {VIEW_LABELS.get(v, str(v)).lower()}'s score call ({score.get('prediction')}) is not "
                         f"its most probable score ({likeliest}): a network's call leans towards the rarer scores, "
                         "the rule its kappa was measured with.")
    return " ".join(parts) or None


def nodule_model_notes(reading: Mapping[str, Any] | None) -> list[str]:
    """The nodule model's finding in three sentences: size, characteristics, and the estimate with its factors."""
    if not isinstance(reading, Mapping):
        return []
    size = reading.get("size_mm") or {}
    n = reading.get("slices_read", 1)
    words = "; ".join(f"{k} {v.get('words')}" for k, v in (reading.get("characteristics") or {}).items()
                      if isinstance(v, Mapping) and k != "malignancy")
    factors = "; ".join(str(f) for f in reading.get("top_factors") or [])
    p = reading.get("malignant_probability")
    volume = f", volume {size['volume_mm3']:.0f} mm3" if size.get("volume_mm3") else ""
    measured = (f"long axis {size.get('long_axis')} mm, short axis {size.get('short_axis')} mm, mean "
                f"{size.get('mean_axes')} mm{volume}" if reading.get("outlined", True) else
                "no outline found, so the size is unknown and the estimate counts an average nodule's size")
    return [f"Nodule model, over {n} slice{'s' if n != 1 else ''}: {measured}.",
            f"Characteristics (LIDC scales): {words}.",
            f"Nodule model's malignant probability (panel score 4-5), by its factors: {prob_pct(p)} "
            f"({reading.get('risk_band')}; call {reading.get('call')} from "
            f"{prob_pct(reading.get('calls_malignant_from'))}). What moved it from an average nodule's "
            f"{prob_pct(reading.get('average_nodule_probability'))}: {factors}."]


def estimate_notes(prediction: dict | None) -> list[str]:
    """What a reader of the estimate must know: the nodule model's finding, how the calls are made, and the
    calibration."""
    call = call_note(prediction)
    nodule = nodule_model_notes((prediction or {}).get("nodule_model"))
    assumed = (prediction or {}).get("sizes_assume_spacing_mm")
    spacing = [f"No pixel spacing came with the image: sizes assume {float(assumed):.2f} mm per pixel."] \
        if assumed else []
    return [*nodule, *spacing, *([call] if call else []),
            *[str(n) for n in (prediction or {}).get("calibration_notes") or []], CALIBRATION_CAVEAT]


def pct(p: float | None) -> str:
    return "-" if p is None else f"{float(p):.0%}"


def prob_pct(p: float | None) -> str:
    """A model probability for display: whole percent, but never a certain-looking 0% or 100%."""
    if p is None or not np.isfinite(p):
        return "-"
    return "<1%" if p < 0.005 else (">99%" if p > 0.995 else pct(p))


def reader_spread(scores: Sequence[Any] | str | None) -> str:
    """Reader scores as a clinician reads them, sorted: ``[5, 3, 4, 5]`` or ``"5 3 4 5"`` -> ``"3, 4, 5, 5"``."""
    if scores is None:
        return "-"
    items = re.split(r"[\s,;]+", scores.strip()) if isinstance(scores, str) else list(scores)
    values = []
    for s in items:
        if s == "" or s is None:
            continue
        try:
            v = float(s)
        except (TypeError, ValueError):
            return ", ".join(str(x) for x in items if x not in ("", None))
        values.append(int(v) if v.is_integer() else v)
    return ", ".join(str(v) for v in sorted(values)) or "-"


def _positive_index(classes: Sequence[str]) -> int | None:
    names = [str(c).lower() for c in classes]
    if "malignant" in names:
        return names.index("malignant")
    return 1 if len(names) == 2 else None


def prediction_rows(prediction: dict | None) -> list[dict]:
    """One row per view (the nodule model first): label, malignant probability, binary call, score classes and
    probabilities, the called score, and any other task as text."""
    rows = []
    views = (prediction or {}).get("views") or {}
    order = [v for v in VIEW_LABELS if v in views] + [v for v in views if v not in VIEW_LABELS]
    for view in order:
        tasks = views[view] or {}
        row: dict[str, Any] = {"view": VIEW_LABELS.get(view, str(view)), "malignant": None, "call": "-",
                               "score_classes": [], "score_probs": [], "score_top": "-", "other": []}
        for task, tp in tasks.items():
            classes, probs = list(tp.get("classes", [])), [float(p) for p in tp.get("probabilities", [])]
            if task == "binary" and probs:
                i = _positive_index(classes)
                row["malignant"] = probs[i] if i is not None and i < len(probs) else None
                row["call"] = str(tp.get("prediction", "-"))
            elif task == "score" and probs:
                row["score_classes"], row["score_probs"] = classes, probs
                row["score_top"] = str(tp.get("prediction", "-"))
            else:
                shown = ", ".join(f"{c} {prob_pct(p)}" for c, p in zip(classes, probs, strict=False))
                row["other"].append(f"{task}: {tp.get('prediction', '-')} ({shown})")
        rows.append(row)
    return rows


def score_classes(rows: list[dict]) -> list[str]:
    """The score columns of the predictions table (normally 1-5)."""
    for r in rows:
        if r["score_classes"]:
            return [str(c) for c in r["score_classes"]]
    return []


def similar_rows(similar: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Similar cases as display text (and the thumbnail array or None)."""
    rows = []
    for s in similar:
        d, m, sim = s.get("diameter_mm"), s.get("malignancy"), s.get("similarity")
        rows.append({
            "case_id": str(s.get("case_id", "-")),
            "malignancy": "-" if m is None or m == "" else str(m),
            "readers": reader_spread(s.get("reader_scores")),
            "diameter": "-" if d is None or d == "" else f"{float(d):.1f} mm",
            "similarity": "-" if sim is None or sim == "" else f"{float(sim):.2f}",
            "thumbnail": s.get("thumbnail"),
        })
    return rows


def case_lines(report: CaseReport) -> list[tuple[str, str]]:
    """(label, value) lines identifying the case."""
    lines = [("Case", report.case_id or "-")]
    if report.source == "upload":
        lines.append(("Source", "uploaded by the user"))
        lines.append(("Files", ", ".join(report.file_names) or "-"))
        lines += [("Input note", n) for n in report.input_notes]
    else:
        lines.append(("Source", "lungviz library (LIDC-IDRI)" if report.source == "library" else report.source))
    lines.append(("Report date", report.created_text))
    lines.append(("lungviz version", __version__))
    return lines


# ------------------------------------------------------------------------------------------------------ HTML

_CSS = """
*{box-sizing:border-box}
body{font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#1d2329;margin:0 auto;
 max-width:960px;padding:24px;font-size:14px;line-height:1.4}
h1{font-size:24px;margin:0 0 4px}h2{font-size:17px;margin:0 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:3px}
.meta{color:#57606a;margin:0 0 12px}
.notice{border:2px solid #b42318;background:#fef3f2;color:#7a271a;padding:10px 14px;border-radius:6px;
 font-weight:600;margin:0 0 18px}
section{margin:0 0 20px}h2{break-after:avoid;page-break-after:avoid}
figure,tr,.headline,.notice,.note,table.kv{break-inside:avoid;page-break-inside:avoid}
table{border-collapse:collapse;width:100%}th,td{border:1px solid #d0d7de;padding:4px 6px;text-align:left;
 vertical-align:middle}th{background:#f6f8fa}
table.kv{width:auto}table.kv th{width:160px}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{position:relative}.bar span{position:absolute;left:0;top:0;bottom:0;background:#cfe2ff;z-index:0}
.bar b{position:relative;z-index:1;font-weight:normal}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;text-align:center}figure img{width:220px;height:auto;border:1px solid #d0d7de}
figcaption{font-size:12px;color:#57606a;margin-top:2px;max-width:220px}
img{image-rendering:pixelated}
img.thumb{width:64px;height:auto;border:1px solid #d0d7de}
.headline{font-size:16px;padding:8px 12px;border-radius:6px;margin:0 0 8px}
.refer{background:#fffaeb;border:1px solid #f79009}.noflag{background:#f2f4f7;border:1px solid #98a2b3}
.note{white-space:pre-wrap;border:1px solid #d0d7de;padding:8px;border-radius:4px;background:#fafbfc}
.missing{color:#57606a;font-style:italic}.small{font-size:12px;color:#57606a}
code{font-size:12px}
footer{color:#57606a;font-size:12px;border-top:1px solid #d0d7de;padding-top:6px}
@page{size:A4;margin:14mm}
@media print{body{padding:0;max-width:none;font-size:11px}figure img{width:170px}figcaption{max-width:170px}
 *{-webkit-print-color-adjust:exact;print-color-adjust:exact}}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _figure(image: np.ndarray, caption: str, cls: str = "") -> str:
    klass = f' class="{cls}"' if cls else ""
    return (f'<figure><img{klass} src="{data_uri(image)}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _missing(text: str) -> str:
    return f'<p class="missing">{_e(text)}</p>'


def _html_prediction(prediction: dict | None) -> str:
    rows = prediction_rows(prediction)
    if not rows:
        return _missing("No model estimate is included in this report.")
    pred = prediction or {}
    p, flag, reasons = pred.get("malignant_probability"), str(pred.get("flag") or ""), pred.get("reasons") or []
    refer = bool(reasons) or "refer" in flag.lower()
    parts = [f'<div class="headline {"refer" if refer else "noflag"}">Malignant probability: '
             f"<strong>{_e(prob_pct(p))}</strong> &middot; Flag: <strong>{_e(flag or '-')}</strong>"
             + ("" if refer else " (this does not make the estimate correct)") + "</div>"]
    if reasons:
        parts.append("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in reasons) + "</ul>")
    scores = score_classes(rows)
    head = "".join(f"<th>Score {_e(c)}</th>" for c in scores)
    parts.append(f"<table><thead><tr><th>View</th><th>Malignant probability</th><th>Call</th>{head}"
                 "<th>Score call</th></tr></thead><tbody>")
    for r in rows:
        cells = []
        probs = dict(zip(r["score_classes"], r["score_probs"], strict=False))
        for c in scores:
            q = probs.get(c)
            cells.append('<td class="num">-</td>' if q is None else
                         f'<td class="num bar"><span style="width:{100 * q:.0f}%"></span><b>{_e(prob_pct(q))}</b></td>')
        other = "".join(f"<br><small>{_e(o)}</small>" for o in r["other"])
        parts.append(f"<tr><td>{_e(r['view'])}{other}</td><td class=\"num\">{_e(prob_pct(r['malignant']))}</td>"
                     f"<td>{_e(r['call'])}</td>{''.join(cells)}<td>{_e(r['score_top'])}</td></tr>")
    parts.append("</tbody></table>")
    parts += [f'<p class="small">{_e(n)}</p>' for n in estimate_notes(prediction)]
    return "".join(parts)


def _html_similar(similar: list[dict]) -> str:
    rows = similar_rows(similar)
    if not rows:
        return _missing("No similar cases are included in this report.")
    out = ["<table><thead><tr><th>Image</th><th>Case</th><th>Panel score</th><th>Reader scores</th>"
           "<th>Diameter</th><th>Similarity</th></tr></thead><tbody>"]
    for r in rows:
        thumb = "" if r["thumbnail"] is None else (f'<img class="thumb" src="{data_uri(r["thumbnail"])}" '
                                                   f'alt="{_e(r["case_id"])}">')
        out.append(f"<tr><td>{thumb}</td><td>{_e(r['case_id'])}</td><td class=\"num\">{_e(r['malignancy'])}</td>"
                   f"<td>{_e(r['readers'])}</td><td class=\"num\">{_e(r['diameter'])}</td>"
                   f"<td class=\"num\">{_e(r['similarity'])}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _html_review(report: CaseReport) -> str:
    if not report.verdict and not report.note.strip():
        return _missing("This case has not been reviewed.")
    verdict = VERDICT_LABELS.get(str(report.verdict), str(report.verdict or "-"))
    out = [f'<table class="kv"><tr><th>Verdict</th><td>{_e(verdict)}</td></tr>'
           f"<tr><th>Reviewer</th><td>{_e(report.reviewer or '-')}</td></tr></table>"]
    if report.note.strip():
        out.append(f'<p><strong>Note</strong></p><div class="note">{_e(report.note)}</div>')
    return "".join(out)


def _html_models(models: dict[str, str]) -> str:
    if not models:
        return _missing("No model versions were recorded.")
    rows = "".join(f"<tr><td>{_e(n)}</td><td><code>{_e(sha[:SHA_PREFIX] or '-')}</code></td></tr>"
                   for n, sha in models.items())
    head = "<tr><th>Model</th><th>SHA-256 (prefix)</th></tr>"
    return f"<table><thead>{head}</thead><tbody>{rows}</tbody></table>"


def build_html(report: CaseReport) -> str:
    """The report as one self-contained HTML page (no external files; prints on A4)."""
    views = [_figure(img, VIEW_LABELS.get(v, v)) for v, img in report.images.items()]
    maps = [_figure(img, caption) for caption, img in report.maps.items()]
    case = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in case_lines(report))
    sections = [
        ("Case", f'<table class="kv">{case}</table>'),
        ("Input images, as the model saw them",
         f'<div class="grid">{"".join(views)}</div>' if views else _missing("No input images are included.")),
        ("Model estimate", _html_prediction(report.prediction)),
        ("Explanation maps",
         f'<div class="grid">{"".join(maps)}</div>' if maps else _missing("No explanation maps are included.")),
        ("Similar library cases", _html_similar(report.similar)),
        ("Review", _html_review(report)),
        ("Models", _html_models(report.models)),
    ]
    body = "".join(f"<section><h2>{_e(h)}</h2>{content}</section>" for h, content in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(report.title)} - {_e(report.case_id)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_e(report.title)}</h1><p class=\"meta\">{_e(report.case_id)} &middot; "
        f"{_e(report.created_text)}</p></header>"
        f'<div class="notice" role="note">{_e(report.notice)}</div>'
        f"{body}<footer>{_e(report.notice)} Generated by lungviz {_e(__version__)}.</footer></body></html>\n"
    )


# ------------------------------------------------------------------------------------------------------- PDF

#: Fonts the PDF embeds (subset), in order, for characters Helvetica (WinAnsi, Western European) cannot draw:
#: ``{bold: ((reportlab name, file name), ...)}``. DejaVu Sans (Greek, Cyrillic, Hebrew, symbols) comes with
#: matplotlib, a dependency; a CJK font (Debian's fonts-droid-fallback or fonts-wqy-zenhei) where the system has one.
EMBEDDED_FONTS = {
    False: (("DejaVuSans", "DejaVuSans.ttf"), ("DroidSansFallback", "DroidSansFallbackFull.ttf"),
            ("WenQuanYiZenHei", "wqy-zenhei.ttc")),
    True: (("DejaVuSans-Bold", "DejaVuSans-Bold.ttf"), ("DroidSansFallback", "DroidSansFallbackFull.ttf"),
           ("WenQuanYiZenHei", "wqy-zenhei.ttc")),
}
SYSTEM_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")
#: Without an embedded CJK font, Adobe's CJK fonts, which PDF readers supply: (first, last code point, font).
CJK_RANGES = ((0x1100, 0x11FF, "HYGothic-Medium"), (0x3130, 0x318F, "HYGothic-Medium"),
              (0xAC00, 0xD7AF, "HYGothic-Medium"), (0x3040, 0x30FF, "HeiseiKakuGo-W5"),
              (0x31F0, 0x31FF, "HeiseiKakuGo-W5"), (0x2E80, 0x303F, "STSong-Light"), (0x3400, 0x9FFF, "STSong-Light"),
              (0xF900, 0xFAFF, "STSong-Light"), (0xFF00, 0xFFEF, "STSong-Light"))
REPLACEMENT = 0xFFFD  # drawn for a character no font has


@cache
def _font_file(file_name: str) -> Path | None:
    """``file_name`` in matplotlib's fonts or the system's font folders, or None."""
    try:
        import matplotlib

        found = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / file_name
        if found.is_file():
            return found
    except ImportError:
        pass
    for root in map(Path, SYSTEM_FONT_DIRS):
        if root.is_dir():
            found = next(root.rglob(file_name), None)
            if found is not None:
                return found
    return None


@cache
def _embedded_fonts(bold: bool) -> tuple[tuple[str, frozenset[int]], ...]:
    """Register the embedded fonts found with reportlab: ``((name, the code points it draws), ...)`` in order."""
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFError, TTFont

    out = []
    for name, file_name in EMBEDDED_FONTS[bold]:
        path = _font_file(file_name)
        if path is None:
            continue
        try:
            font = TTFont(name, str(path), subfontIndex=0)
        except (OSError, TTFError):
            continue
        pdfmetrics.registerFont(font)
        out.append((name, frozenset(font.face.charToGlyph)))
    return tuple(out)


@cache
def _cid_font(name: str) -> str:
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont

    pdfmetrics.registerFont(UnicodeCIDFont(name))
    return name


def _pdf_font(ch: str, bold: bool) -> tuple[str | None, str]:
    """The font that draws ``ch`` (None: the paragraph's own Helvetica) and the character drawn (U+FFFD, or '?',
    where no font has it)."""
    try:
        ch.encode("cp1252")
        return None, ch
    except UnicodeEncodeError:
        pass
    code, fonts = ord(ch), _embedded_fonts(bold)
    for name, codes in fonts:
        if code in codes:
            return name, ch
    for first, last, font in CJK_RANGES:
        if first <= code <= last:
            return _cid_font(font), ch
    return next(((name, chr(REPLACEMENT)) for name, codes in fonts if REPLACEMENT in codes), (None, "?"))


def pdf_markup(text: Any, bold: bool = False) -> str:
    """``text`` as reportlab paragraph markup: escaped, line breaks kept, and each run of characters Helvetica cannot
    draw (Greek, Cyrillic, CJK, ...) set in a font that can, so a note or a name in any script prints."""
    runs: list[tuple[str | None, str]] = []
    for ch in str(text):
        font, drawn = _pdf_font(ch, bold) if ch != "\n" else (None, ch)
        if runs and runs[-1][0] == font:
            runs[-1] = (font, runs[-1][1] + drawn)
        else:
            runs.append((font, drawn))
    parts = []
    for font, run in runs:
        escaped = xml_escape(run).replace("\n", "<br/>")
        parts.append(f'<font name="{font}">{escaped}</font>' if font else escaped)
    return "".join(parts)


def build_pdf(report: CaseReport) -> bytes:
    """The report as A4 PDF bytes (reportlab); the notice heads the first page and footers every page."""
    try:
        from reportlab.lib import colors
        from reportlab.lib.pagesizes import A4
        from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
        from reportlab.lib.units import cm, mm
        from reportlab.lib.utils import simpleSplit
        from reportlab.platypus import Image as RLImage
        from reportlab.platypus import KeepTogether, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle
    except ImportError as err:
        raise LungvizError("PDF reports need the reportlab package (pip install reportlab); "
                           "the HTML report works without it.") from err

    styles = getSampleStyleSheet()
    body = ParagraphStyle("body", parent=styles["Normal"], fontSize=9, leading=11.5)
    small = ParagraphStyle("small", parent=body, fontSize=8, leading=10, textColor=colors.HexColor("#57606a"))
    h1 = ParagraphStyle("h1", parent=styles["Title"], fontSize=18, alignment=0, spaceAfter=2)
    h2 = ParagraphStyle("h2", parent=styles["Heading2"], fontSize=12, spaceBefore=8, spaceAfter=4)
    notice = ParagraphStyle("notice", parent=body, fontName="Helvetica-Bold", textColor=colors.HexColor("#7a271a"))
    grid = colors.HexColor("#d0d7de")
    head_bg = colors.HexColor("#f6f8fa")

    def p(text: Any, style: ParagraphStyle = body) -> Paragraph:
        return Paragraph(pdf_markup(text, bold="Bold" in style.fontName), style)

    def img(image: np.ndarray, width: float) -> RLImage:
        h, w = np.asarray(image).shape[:2]
        return RLImage(io.BytesIO(png_bytes(image)), width=width, height=width * h / w)

    def table(rows: list[list[Any]], widths: list[float] | None = None, header: bool = True) -> Table:
        t = Table(rows, colWidths=widths, repeatRows=1 if header else 0, hAlign="LEFT")
        style = [("GRID", (0, 0), (-1, -1), 0.5, grid), ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
                 ("FONTSIZE", (0, 0), (-1, -1), 8.5)]
        if header:
            style.append(("BACKGROUND", (0, 0), (-1, 0), head_bg))
        t.setStyle(TableStyle(style))
        return t

    def gallery(items: list[tuple[str, np.ndarray]], width: float, per_row: int) -> Table:
        cells = [[img(a, width), p(c, small)] for c, a in items]
        rows = [cells[i:i + per_row] for i in range(0, len(cells), per_row)]
        rows[-1] += [""] * (per_row - len(rows[-1]))
        t = Table(rows, colWidths=[width + 0.4 * cm] * per_row, hAlign="LEFT")
        t.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("ALIGN", (0, 0), (-1, -1), "CENTER")]))
        return t

    def section(title: str, *flowables: Any) -> list[Any]:
        return [KeepTogether([p(title, h2), *flowables])]

    story: list[Any] = [p(report.title, h1), p(f"{report.case_id} - {report.created_text}", small), Spacer(1, 6)]
    box = Table([[p(report.notice, notice)]], colWidths=[A4[0] - 36 * mm])
    box.setStyle(TableStyle([("BOX", (0, 0), (-1, -1), 1.5, colors.HexColor("#b42318")),
                             ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#fef3f2")),
                             ("TOPPADDING", (0, 0), (-1, -1), 6), ("BOTTOMPADDING", (0, 0), (-1, -1), 6)]))
    story.append(box)
    story += section("Case", table([[p(k), p(v)] for k, v in case_lines(report)], [4 * cm, 12 * cm], header=False))

    views = [(VIEW_LABELS.get(v, v), a) for v, a in report.images.items()]
    story += section("Input images, as the model saw them",
                     gallery(views, 5.2 * cm, 3) if views else p("No input images are included.", small))

    rows = prediction_rows(report.prediction)
    if rows:
        pred = report.prediction or {}
        flag, reasons = str(pred.get("flag") or "-"), [str(r) for r in pred.get("reasons") or []]
        scores = score_classes(rows)
        data = [["View", "Malignant", "Call", *[f"Score {c}" for c in scores], "Score call"]]
        for r in rows:
            probs = dict(zip(r["score_classes"], r["score_probs"], strict=False))
            view = r["view"] + "".join(f"\n{o}" for o in r["other"])
            data.append([p(view), prob_pct(r["malignant"]), p(r["call"]), *[prob_pct(probs.get(c)) for c in scores],
                         r["score_top"]])
        headline = p(f"Malignant probability: {prob_pct(pred.get('malignant_probability'))} - Flag: {flag}",
                     ParagraphStyle("headline", parent=body, fontName="Helvetica-Bold", fontSize=10.5, spaceAfter=3))
        story += section("Model estimate", headline, *[p(f"- {r}") for r in reasons], Spacer(1, 4),
                         table(data, [3.6 * cm, 1.9 * cm, 2 * cm] + [1.4 * cm] * len(scores) + [1.9 * cm]),
                         *[p(n, small) for n in estimate_notes(pred)])
    else:
        story += section("Model estimate", p("No model estimate is included in this report.", small))

    maps = list(report.maps.items())
    story += section("Explanation maps", gallery(maps, 3.6 * cm, 4) if maps else
                     p("No explanation maps are included.", small))

    srows = similar_rows(report.similar)
    if srows:
        data = [["Image", "Case", "Panel score", "Reader scores", "Diameter", "Similarity"]]
        data += [[img(r["thumbnail"], 1.6 * cm) if r["thumbnail"] is not None else "", p(r["case_id"]),
                  r["malignancy"], p(r["readers"]), r["diameter"], r["similarity"]] for r in srows]
        story += [p("Similar library cases", h2),
                  table(data, [2 * cm, 5 * cm, 2 * cm, 3 * cm, 2 * cm, 2 * cm])]
    else:
        story += section("Similar library cases", p("No similar cases are included in this report.", small))

    if report.verdict or report.note.strip():
        verdict = VERDICT_LABELS.get(str(report.verdict), str(report.verdict or "-"))
        review = [table([[p("Verdict"), p(verdict)], [p("Reviewer"), p(report.reviewer or "-")]],
                        [4 * cm, 12 * cm], header=False)]
        if report.note.strip():
            review += [Spacer(1, 4), p("Note", ParagraphStyle("b", parent=body, fontName="Helvetica-Bold")),
                       p(report.note)]
        story += section("Review", *review)
    else:
        story += section("Review", p("This case has not been reviewed.", small))

    if report.models:
        data = [["Model", "SHA-256 (prefix)"]] + [[p(n), sha[:SHA_PREFIX] or "-"]
                                                          for n, sha in report.models.items()]
        story += section("Models", table(data, [10 * cm, 6 * cm]))
    else:
        story += section("Models", p("No model versions were recorded.", small))

    def footer(canvas: Any, doc: Any) -> None:
        canvas.saveState()
        canvas.setFont("Helvetica", 7)
        canvas.setFillColor(colors.HexColor("#57606a"))
        lines = simpleSplit(report.notice, "Helvetica", 7, A4[0] - 60 * mm)[:2]
        for i, line in enumerate(lines):
            canvas.drawString(18 * mm, 10 * mm + (len(lines) - 1 - i) * 8, line)
        canvas.drawRightString(A4[0] - 18 * mm, 10 * mm, f"page {doc.page}")
        canvas.restoreState()

    buf = io.BytesIO()
    doc = SimpleDocTemplate(buf, pagesize=A4, leftMargin=18 * mm, rightMargin=18 * mm, topMargin=16 * mm,
                            bottomMargin=20 * mm, title=f"{report.title} - {report.case_id}",
                            subject=report.notice, author=f"lungviz {__version__}", creator="lungviz")
    doc.build(story, onFirstPage=footer, onLaterPages=footer)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- saving


def report_filename(report: CaseReport, ext: str = "html") -> str:
    """A safe file name such as ``lungviz-report-LIDC-IDRI-0001_nodule-0-20250131-1400.html``."""
    case = re.sub(r"[^A-Za-z0-9._-]+", "_", report.case_id).strip("._") or "case"
    return f"lungviz-report-{case[:80]}-{report.created_utc:%Y%m%d-%H%M}.{ext.lstrip('.')}"


def save_report(report: CaseReport, path: str | Path) -> Path:
    """Write the report as HTML (``.html``/``.htm``) or PDF (``.pdf``), chosen by the file's suffix, whole or not at
    all (a failed write leaves an earlier file of that name as it was)."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        data = build_html(report).encode("utf-8")
    elif suffix == ".pdf":
        data = build_pdf(report)
    else:
        raise LungvizError(f"a report is saved as .html or .pdf, not '{path.suffix or path.name}'.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    except OSError as err:
        raise LungvizError(f"cannot write the report ({err.strerror}).", source=path) from err
    return path
