"""Per-case report: the finding first, then the maps and similar library cases, the reviewer's verdict, and an
appendix with the validation figures and model versions.

:func:`report_content` turns a typed :class:`~lungviz.inference.predict.Prediction` into what the report says;
:func:`report_sections` lays the whole report out as one list of typed sections, which :func:`build_html` (one
self-contained page: images as base64 PNG data URIs, inline CSS, A4 print rules) and :func:`build_pdf` (reportlab)
both render, so the two cannot drift. Both show the research-use notice before any result and on every printed page,
and escape every piece of user text.
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
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape as xml_escape

import numpy as np
from PIL import Image

from lungviz import RESEARCH_NOTICE, __version__
from lungviz.data.preprocess import spacing_or_default
from lungviz.errors import LungvizError
from lungviz.files import atomic_write
from lungviz.metrics import reliability_bin, wilson_interval
from lungviz.models import spec_dict
from lungviz.present.text import call_words, shorten
from lungviz.reviews import MAX_REVIEWER_CHARS

if TYPE_CHECKING:
    from lungviz.inference.predict import Prediction

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
    #: what the model saw: view ("nodule", "slice") or a caption ("Nodule model outline") -> image
    images: dict[str, np.ndarray] = field(default_factory=dict)
    #: what the models said (the JSON form is read at its edge: :meth:`ReportContent.from_json`)
    prediction: Prediction | ReportContent | None = None
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
        if isinstance(self.prediction, Mapping):
            raise TypeError("CaseReport.prediction is a Prediction (or ReportContent.from_json of its JSON form), "
                            "not a dict.")
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
        spec = bundle if isinstance(bundle, Mapping) else spec_dict(getattr(bundle, "spec", {}))
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


# ---------------------------------------------------------------------------------------- typed report content


CALIBRATION_CAVEAT = (
    "Probabilities are calibrated on the LIDC validation split: they estimate how the LIDC radiologist panel would "
    "rate the nodule (a suspicion rating, not pathology) and may be miscalibrated on other scanners, protocols or "
    "populations."
)
#: The LIDC characteristics (and the 1-5 score) as a clinician reads them, in the nodule model's order.
CHARACTERISTIC_LABELS = {"malignancy": "malignancy score", "subtlety": "subtlety", "internalStructure":
                         "internal structure", "calcification": "calcification", "sphericity": "sphericity",
                         "margin": "margin", "lobulation": "lobulation", "spiculation": "spiculation",
                         "texture": "texture"}


def _num(v: Any) -> float | None:
    """A finite float, or None (NaN, None and text are unknown)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


@dataclass(frozen=True, kw_only=True)
class ViewEstimate:
    """One view's estimate as the report shows it: the malignant probability and its call, the 1-5 score."""

    label: str
    malignant: float | None = None
    call: str = "-"
    calls_malignant_from: float | None = None
    test_calls: dict | None = None  # :func:`lungviz.inference.predict.test_call_figures`
    score_classes: tuple[str, ...] = ()
    score_probs: tuple[float, ...] = ()
    score_call: str = "-"
    other: tuple[str, ...] = ()  # any other task, as text


@dataclass(frozen=True, kw_only=True)
class Finding:
    """The nodule model's finding: size in mm (None where not outlined), the characteristics in the readers' words,
    the estimate by its factors with its risk band, call and test figures, and the factors that moved it."""

    slices_read: int = 1
    outlined: bool = True
    long_axis_mm: float | None = None
    short_axis_mm: float | None = None
    mean_axes_mm: float | None = None
    volume_mm3: float | None = None
    characteristics: dict[str, str] = field(default_factory=dict)  # head -> the readers' words
    probability: float | None = None
    risk_band: str = "-"
    call: str = "-"
    threshold: float | None = None
    baseline: float | None = None  # an average nodule's probability
    top_factors: tuple[str, ...] = ()
    test_calls: dict | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Finding:
        """From :meth:`lungviz.inference.nodule.Assessment.to_dict` (the JSON edge: the CLI's output, a review log's
        summary)."""
        size = d.get("size_mm") or {}
        chars = d.get("characteristics") or {}
        return cls(slices_read=int(d.get("slices_read") or 1), outlined=bool(d.get("outlined", True)),
                   long_axis_mm=_num(size.get("long_axis")), short_axis_mm=_num(size.get("short_axis")),
                   mean_axes_mm=_num(size.get("mean_axes")), volume_mm3=_num(size.get("volume_mm3")),
                   characteristics={k: str(v.get("words")) for k, v in chars.items() if isinstance(v, Mapping)},
                   probability=_num(d.get("malignant_probability")), risk_band=str(d.get("risk_band") or "-"),
                   call=str(d.get("call") or "-"), threshold=_num(d.get("calls_malignant_from")),
                   baseline=_num(d.get("average_nodule_probability")),
                   top_factors=tuple(str(f) for f in d.get("top_factors") or []),
                   test_calls=d.get("test_calls") if isinstance(d.get("test_calls"), dict) else None)


@dataclass(frozen=True, kw_only=True)
class ReportContent:
    """What a report (and the page's notes) say of one prediction, typed: built from a
    :class:`lungviz.inference.predict.Prediction` by :func:`report_content`."""

    malignant_probability: float | None = None
    flags: tuple[str, ...] = ()
    views: tuple[ViewEstimate, ...] = ()  # the nodule model first
    finding: Finding | None = None
    assumed_spacing_mm: float | None = None  # sizes assume this pixel spacing (none came with the image)
    calibration_notes: tuple[str, ...] = ()

    @property
    def refer(self) -> bool:
        return bool(self.flags)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ReportContent:
        """From :meth:`lungviz.inference.predict.Prediction.to_dict` (the JSON edge)."""
        views = d.get("views") or {}
        rows = []
        for view in _view_order(views):
            row: dict[str, Any] = {"label": VIEW_LABELS.get(view, str(view)), "other": []}
            for task, tp in (views[view] or {}).items():
                tp = tp or {}
                classes, probs = [str(c) for c in tp.get("classes") or []], [float(p) for p in tp.get("probabilities")
                                                                             or []]
                if task == "binary":
                    i = _positive_index(classes)
                    row |= {"malignant": probs[i] if i is not None and i < len(probs) else None,
                            "call": str(tp.get("prediction", "-")),
                            "calls_malignant_from": _num(tp.get("calls_malignant_from")),
                            "test_calls": tp.get("test_calls") if isinstance(tp.get("test_calls"), dict) else None}
                elif task == "score":
                    row |= {"score_classes": tuple(classes), "score_probs": tuple(probs),
                            "score_call": str(tp.get("prediction", "-"))}
                else:
                    shown = ", ".join(f"{c} {prob_pct(p)}" for c, p in zip(classes, probs, strict=False))
                    row["other"].append(f"{task}: {tp.get('prediction', '-')} ({shown})")
            rows.append(ViewEstimate(**{**row, "other": tuple(row["other"])}))
        nodule = d.get("nodule_model")
        return cls(malignant_probability=_num(d.get("malignant_probability")),
                   flags=tuple(str(r) for r in d.get("reasons") or []), views=tuple(rows),
                   finding=Finding.from_json(nodule) if isinstance(nodule, Mapping) else None,
                   assumed_spacing_mm=_num(d.get("sizes_assume_spacing_mm")),
                   calibration_notes=tuple(str(n) for n in d.get("calibration_notes") or []))


def _view_order(views: Mapping[str, Any]) -> list[str]:
    return [v for v in VIEW_LABELS if v in views] + [v for v in views if v not in VIEW_LABELS]


def _positive_index(classes: Sequence[str]) -> int | None:
    names = [str(c).lower() for c in classes]
    if "malignant" in names:
        return names.index("malignant")
    return 1 if len(names) == 2 else None


def report_content(prediction: Prediction | ReportContent | Mapping[str, Any] | None) -> ReportContent | None:
    """The one function that turns a prediction into what the report says: from a
    :class:`~lungviz.inference.predict.Prediction` (the app), or from its JSON form (the CLI, a review log)."""
    if prediction is None or isinstance(prediction, ReportContent):
        return prediction
    if isinstance(prediction, Mapping):
        return ReportContent.from_json(prediction)
    p = prediction
    rows = []
    for view in _view_order(p.views):
        tasks = p.views[view] or {}
        b, s = tasks.get("binary"), tasks.get("score")
        i = _positive_index(b.classes) if b is not None else None
        other = tuple(f"{t}: {tp.top} (" + ", ".join(f"{c} {prob_pct(q)}" for c, q in zip(tp.classes, tp.probs,
                                                                                           strict=False)) + ")"
                      for t, tp in tasks.items() if t not in ("binary", "score"))
        rows.append(ViewEstimate(
            label=VIEW_LABELS.get(view, str(view)), other=other,
            **({"malignant": float(b.probs[i]) if i is not None and i < len(b.probs) else None, "call": b.top,
                "calls_malignant_from": float(b.threshold), "test_calls": b.test_calls} if b is not None else {}),
            **({"score_classes": tuple(str(c) for c in s.classes), "score_probs": tuple(float(q) for q in s.probs),
                "score_call": s.top} if s is not None else {})))
    finding = None
    if (a := p.assessment) is not None:
        r = a.reading

        def mm(v: float | None) -> float | None:
            return None if v is None or not np.isfinite(v) else float(v)

        finding = Finding(slices_read=r.n_slices, outlined=r.outlined, long_axis_mm=mm(r.long_axis_mm),
                          short_axis_mm=mm(r.short_axis_mm), mean_axes_mm=mm(r.mean_axes_mm),
                          volume_mm3=mm(r.volume_mm3), characteristics=dict(a.characteristics),
                          probability=float(a.probability), risk_band=a.risk_band, call=a.call,
                          threshold=float(a.threshold), baseline=a.baseline, top_factors=tuple(a.top_factors()),
                          test_calls=a.test_calls)
    return ReportContent(malignant_probability=p.malignant_probability(), flags=tuple(p.flags), views=tuple(rows),
                         finding=finding, assumed_spacing_mm=spacing_or_default(None) if p.spacing_assumed else None,
                         calibration_notes=tuple(p.calibration_notes))


# ------------------------------------------------------------------------------------------ wording, shared


def pct(p: float | None) -> str:
    return "-" if p is None else f"{float(p):.0%}"


def prob_pct(p: float | None) -> str:
    """A model probability for display: whole percent, but never a certain-looking 0% or 100%."""
    if p is None or not np.isfinite(p):
        return "-"
    return "<1%" if p < 0.005 else (">99%" if p > 0.995 else pct(p))


def band_sentence(bins: list[dict] | None, p: float | None) -> str | None:
    """How often the held-out test nodules the model placed in ``p``'s reliability bin were malignant, with the
    Wilson 95% interval: the estimate's measured meaning in one line. None without a table or a bin with cases."""
    band = reliability_bin(bins, p) if bins and p is not None else None
    if not band or not band.get("n"):
        return None
    n = int(band["n"])
    lo, hi = wilson_interval(band["observed"] * n, n)
    return (f"Of {n} test nodules also put at {pct(band['lo'])}-{pct(band['hi'])}, the readers' panel rated "
            f"{pct(band['observed'])} malignant (95% interval {pct(lo)}-{pct(hi)}).")


def test_rate(figures: dict, key: str) -> str:
    """``49% [39-60%]``: a measured rate of :func:`lungviz.inference.predict.test_call_figures` with its 95%
    interval."""
    lo_hi = (figures.get("ci95") or {}).get(key)
    value = pct(figures[key])
    if not (lo_hi and len(lo_hi) == 2 and all(isinstance(v, (int, float)) and np.isfinite(v) for v in lo_hi)):
        return value
    return f"{value} [{pct(lo_hi[0])[:-1]}-{pct(lo_hi[1])}]"


def _mm(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} mm"


def call_note(prediction: Prediction | ReportContent | Mapping[str, Any] | None) -> str | None:
    """How the calls are made from the probabilities: each view's malignant call point when any is not 50%, how the
    calls did on the held-out test nodules, and each score call that is not the most probable score."""
    content = report_content(prediction)
    if content is None:
        return None
    points = [(v.label.lower(), v.calls_malignant_from) for v in content.views if v.calls_malignant_from is not None]
    parts = []
    if any(abs(x - 0.5) > 5e-3 for _, x in points):
        parts.append("Each view calls a nodule malignant from its own operating point on its calibrated probability: "
                     + ", ".join(f"{name} from {prob_pct(x)}" for name, x in points)
                     + ". These are the calls the model card's sensitivity, specificity and F1 were measured with; "
                     "below 50% they favour sensitivity, as malignant nodules are the rarer class.")
    found = [(v.label.lower(), v.test_calls) for v in content.views if isinstance(v.test_calls, dict)]
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
    for v in content.views:
        if not v.score_probs:
            continue
        likeliest = v.score_classes[int(np.argmax(v.score_probs))] if len(v.score_classes) == len(v.score_probs) \
            else None
        if likeliest is not None and v.score_call != str(likeliest):
            parts.append(f"The {v.label.lower()}'s score call ({v.score_call}) is not its most probable score "
                         f"({likeliest}): a network's call leans towards the rarer scores, the rule its kappa was "
                         "measured with.")
    return " ".join(parts) or None


def finding_lines(finding: Finding | None) -> list[str]:
    """The nodule model's finding in three sentences: size, characteristics, and the estimate with its factors."""
    if finding is None:
        return []
    f, n = finding, finding.slices_read
    words = "; ".join(f"{k} {v}" for k, v in f.characteristics.items() if k != "malignancy")
    volume = f", volume {f.volume_mm3:.0f} mm3" if f.volume_mm3 else ""
    measured = (f"long axis {_mm(f.long_axis_mm)[:-3]} mm, short axis {_mm(f.short_axis_mm)[:-3]} mm, mean "
                f"{_mm(f.mean_axes_mm)[:-3]} mm{volume}" if f.outlined else
                "no outline found, so the size is unknown and the estimate counts an average nodule's size")
    return [f"Nodule model, over {n} slice{'s' if n != 1 else ''}: {measured}.",
            f"Characteristics (LIDC scales): {words}.",
            f"Nodule model's malignant probability (panel score 4-5), by its factors: {prob_pct(f.probability)} "
            f"({f.risk_band}; {call_words(f.call)} from {prob_pct(f.threshold)}). What moved it from an average "
            f"nodule's {prob_pct(f.baseline)}: {'; '.join(f.top_factors)}."]


def nodule_model_notes(reading: Mapping[str, Any] | None) -> list[str]:
    """:func:`finding_lines` of the JSON form of an assessment (the CLI's output)."""
    return finding_lines(Finding.from_json(reading)) if isinstance(reading, Mapping) else []


def estimate_notes(prediction: Prediction | ReportContent | Mapping[str, Any] | None) -> list[str]:
    """What a reader of the estimate must know: the nodule model's finding (three lines, when there is one), an
    assumed pixel spacing, how the calls are made, and the calibration."""
    content = report_content(prediction)
    if content is None:
        return [CALIBRATION_CAVEAT]
    call = call_note(content)
    spacing = ([f"No pixel spacing came with the image: sizes assume {content.assumed_spacing_mm:.2f} mm per pixel."]
               if content.assumed_spacing_mm else [])
    return [*finding_lines(content.finding), *spacing, *([call] if call else []), *content.calibration_notes,
            CALIBRATION_CAVEAT]


def evidence_notes(prediction: Prediction | ReportContent | Mapping[str, Any] | None) -> list[str]:
    """:func:`estimate_notes` less the finding's own lines: what sits behind "How sure is this?"."""
    content = report_content(prediction)
    notes = estimate_notes(content)
    return notes[len(finding_lines(content.finding)):] if content is not None else notes


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


def case_lines(report: CaseReport) -> list[tuple[str, str]]:
    """(label, value) lines identifying the case and its inputs."""
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


# ------------------------------------------------------------------------- sections: one list, two renderers


@dataclass(frozen=True)
class Text:
    """A paragraph. ``style``: body, small, missing (what the report lacks), headline (the estimate), refer / noflag
    (the one-line flag), label (bold) or note (user text, line breaks kept)."""

    text: str
    style: str = "body"


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class KeyValues:
    """Label / value pairs, ``columns`` pairs side by side on each row."""

    rows: tuple[tuple[str, str], ...]
    columns: int = 1

    def lines(self) -> list[list[str]]:
        """The pairs laid out as table rows of ``2 * columns`` cells (the last row padded)."""
        n = max(1, self.columns)
        out = [[x for pair in self.rows[i:i + n] for x in pair] for i in range(0, len(self.rows), n)]
        return [r + [""] * (2 * n - len(r)) for r in out]


@dataclass(frozen=True)
class Thumb:
    """A small image in a table cell."""

    image: np.ndarray = field(repr=False)
    alt: str = ""


@dataclass(frozen=True)
class Table:
    """A table with a header row; ``widths``: each column's share of the text width; ``numeric``: right-aligned
    columns."""

    header: tuple[str, ...]
    rows: tuple[tuple[str | Thumb, ...], ...]
    widths: tuple[float, ...] = ()
    numeric: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Gallery:
    """Captioned images side by side; ``large`` for the images the finding shows, else small (the maps)."""

    items: tuple[tuple[str, np.ndarray], ...] = field(repr=False)
    large: bool = True


Block = Text | Bullets | KeyValues | Table | Gallery
#: The parts of a report, in order: the finding (one page), the maps and similar cases, the review, the appendix.
PARTS = ("finding", "evidence", "review", "appendix")


@dataclass(frozen=True)
class Section:
    """One titled section of the report; ``new_page``: it starts a part that begins on a new printed page."""

    title: str
    blocks: tuple[Block, ...]
    part: str = "finding"
    new_page: bool = False


def _missing(text: str) -> tuple[Block, ...]:
    return (Text(text, "missing"),)


def _estimate_blocks(content: ReportContent | None) -> tuple[Block, ...]:
    if content is None or not content.views:
        return _missing("No model estimate is included in this report.")
    f, blocks = content.finding, []
    if f is not None and f.probability is not None:
        blocks.append(Text(f"Malignant probability: {prob_pct(f.probability)} - {f.risk_band} - second-look call: "
                           f"{call_words(f.call)} (from {prob_pct(f.threshold)})", "headline"))
        if f.test_calls and "sensitivity" in f.test_calls and "specificity" in f.test_calls:
            blocks.append(Text(f"On test this call found {test_rate(f.test_calls, 'sensitivity')} of malignant "
                               f"nodules and cleared {test_rate(f.test_calls, 'specificity')} of the others.",
                               "small"))
    else:
        v = content.views[0]
        blocks.append(Text(f"Malignant probability ({v.label.lower()}): {prob_pct(content.malignant_probability)} - "
                           f"call: {v.call} (from {prob_pct(v.calls_malignant_from)})", "headline"))
    blocks.append(Text(f"Refer / uncertain: {'; '.join(content.flags)}." if content.refer else
                       "No uncertainty flag (this does not make the estimate correct).",
                       "refer" if content.refer else "noflag"))
    blocks.append(Text("Malignant means the LIDC readers' panel score 4-5, a suspicion rating, not pathology.",
                       "small"))
    return tuple(blocks)


def _size_blocks(f: Finding | None) -> tuple[Block, ...]:
    if f is None:
        return _missing("The nodule model's reading is not included, so no size was measured.")
    if not f.outlined:
        return _missing("No outline found, so the size is unknown and the estimate counts an average nodule's size.")
    where = f"the largest of {f.slices_read} slices" if f.slices_read > 1 else "one slice"
    return (Table(("Long axis", "Short axis", "Mean of the axes", "Volume", "Measured on"),
                  ((_mm(f.long_axis_mm), _mm(f.short_axis_mm), _mm(f.mean_axes_mm),
                    f"{f.volume_mm3:.0f} mm3" if f.volume_mm3 else "-", where),),
                  (0.16, 0.16, 0.18, 0.16, 0.34), frozenset({0, 1, 2, 3})),)


def _characteristic_blocks(f: Finding | None) -> tuple[Block, ...]:
    if f is None or not f.characteristics:
        return _missing("No characteristics are included.")
    return (KeyValues(tuple((CHARACTERISTIC_LABELS.get(h, h), w) for h, w in f.characteristics.items()), columns=2),
            Text("The model's rating on each LIDC scale, in the readers' words.", "small"))


def _factor_blocks(f: Finding | None) -> tuple[Block, ...]:
    if f is None or not f.top_factors:
        return _missing("No factors are included.")
    return (Text(f"From an average nodule's {prob_pct(f.baseline)} (log-odds):"), Bullets(f.top_factors))


def _similar_blocks(similar: Sequence[Mapping[str, Any]]) -> tuple[Block, ...]:
    if not similar:
        return _missing("No similar cases are included in this report.")
    rows = []
    for s in similar:
        d, m, sim, thumb = s.get("diameter_mm"), s.get("malignancy"), s.get("similarity"), s.get("thumbnail")
        case = str(s.get("case_id", "-"))
        rows.append((Thumb(thumb, case) if thumb is not None else "", case, "-" if m is None or m == "" else str(m),
                     reader_spread(s.get("reader_scores")), "-" if d is None or d == "" else f"{float(d):.1f} mm",
                     "-" if sim is None or sim == "" else f"{float(sim):.2f}"))
    return (Table(("Image", "Case", "Panel score", "Reader scores", "Diameter", "Similarity"), tuple(rows),
                  (0.12, 0.3, 0.12, 0.18, 0.14, 0.14), frozenset({2, 4, 5})),)


def _review_blocks(report: CaseReport) -> tuple[Block, ...]:
    if not report.verdict and not report.note.strip():
        return _missing("This case has not been reviewed.")
    verdict = VERDICT_LABELS.get(str(report.verdict), str(report.verdict or "-"))
    blocks: list[Block] = [KeyValues((("Verdict", verdict), ("Reviewer", report.reviewer or "-")))]
    if report.note.strip():
        blocks += [Text("Note", "label"), Text(report.note, "note")]
    return tuple(blocks)


def _validation_blocks(content: ReportContent | None) -> tuple[Block, ...]:
    """The appendix: every view's probability, call, call point, test figures and score; then the notes on how the
    calls were chosen and how far the probabilities can be trusted."""
    if content is None or not content.views:
        return _missing("No model estimate is included in this report.")
    scores = next((v.score_classes for v in content.views if v.score_classes), ())
    rows = []
    for v in content.views:
        probs = dict(zip(v.score_classes, v.score_probs, strict=False))
        t = v.test_calls or {}
        rows.append((v.label + "".join(f"\n{o}" for o in v.other), prob_pct(v.malignant), v.call,
                     prob_pct(v.calls_malignant_from),
                     test_rate(t, "sensitivity") if "sensitivity" in t else "-",
                     test_rate(t, "specificity") if "specificity" in t else "-",
                     *[prob_pct(probs.get(c)) for c in scores], v.score_call))
    n = len(scores)
    table = Table(("View", "Malignant", "Call", "Calls malignant from", "Sensitivity on test", "Specificity on test",
                   *[f"Score {c}" for c in scores], "Score call"), tuple(rows),
                  (0.16, 0.09, 0.09, 0.1, 0.13, 0.13, *[0.045] * n, 0.07) if n else (0.2, 0.12, 0.12, 0.14, 0.2, 0.2),
                  frozenset({1, 3, *range(6, 6 + n)}))
    notes = evidence_notes(content)
    return (table, *[Text(note, "small") for note in notes])


def report_sections(report: CaseReport) -> list[Section]:
    """The report as one list of sections, in the page's order, that :func:`build_html` and :func:`build_pdf` both
    render: the finding (case and inputs, the images as the model saw them, the estimate with its band, call and
    flag, the size, the characteristics, the factors), the maps and similar cases, the review, and an appendix with
    the validation figures and the model versions."""
    content = report_content(report.prediction)
    f = content.finding if content is not None else None
    images = tuple((VIEW_LABELS.get(v, v), a) for v, a in report.images.items())
    maps = tuple(report.maps.items())
    models = (Table(("Model", "SHA-256 (prefix)"), tuple((n, sha[:SHA_PREFIX] or "-")
                                                         for n, sha in report.models.items()), (0.6, 0.4)),) \
        if report.models else _missing("No model versions were recorded.")
    return [
        Section("Case and inputs", (KeyValues(tuple(case_lines(report))),)),
        Section("Images, as the model saw them",
                (Gallery(images),) if images else _missing("No input images are included.")),
        Section("Malignancy estimate", _estimate_blocks(content)),
        Section("Size", _size_blocks(f)),
        Section("Characteristics", _characteristic_blocks(f)),
        Section("What moved the estimate", _factor_blocks(f)),
        Section("Where the model looked", (Gallery(maps, large=False),) if maps else
                _missing("No explanation maps are included."), part="evidence", new_page=True),
        Section("Similar library cases", _similar_blocks(report.similar), part="evidence"),
        Section("Review", _review_blocks(report), part="review"),
        Section("Appendix: how sure is this?", _validation_blocks(content), part="appendix", new_page=True),
        Section("Appendix: model versions", models, part="appendix"),
    ]


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
section.newpage{break-before:page;page-break-before:always}
figure,tr,.headline,.notice,.note,table.kv{break-inside:avoid;page-break-inside:avoid}
table{border-collapse:collapse;width:100%}th,td{border:1px solid #d0d7de;padding:4px 6px;text-align:left;
 vertical-align:middle}th{background:#f6f8fa}
table.kv{width:auto}table.kv th{width:160px}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;text-align:center}figure img{width:220px;height:auto;border:1px solid #d0d7de}
.small-grid figure img{width:160px}.small-grid figcaption{max-width:160px}
figcaption{font-size:12px;color:#57606a;margin-top:2px;max-width:220px}
img{image-rendering:pixelated}
img.thumb{width:64px;height:auto;border:1px solid #d0d7de}
.headline{font-size:16px;font-weight:600;padding:8px 12px;border-radius:6px;margin:0 0 8px;background:#f6f8fa;
 border:1px solid #d0d7de}
.flag{padding:6px 12px;border-radius:6px;margin:0 0 8px}
.refer{background:#fffaeb;border:1px solid #f79009}.noflag{background:#f2f4f7;border:1px solid #98a2b3}
.note{white-space:pre-wrap;border:1px solid #d0d7de;padding:8px;border-radius:4px;background:#fafbfc}
.missing{color:#57606a;font-style:italic}.small{font-size:12px;color:#57606a}
footer{color:#57606a;font-size:12px;border-top:1px solid #d0d7de;padding-top:6px}
@page{size:A4;margin:14mm}
@media print{body{padding:0;max-width:none;font-size:11px}figure img{width:170px}figcaption{max-width:170px}
 *{-webkit-print-color-adjust:exact;print-color-adjust:exact}}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_lines(text: str) -> str:
    """Escaped text whose line breaks show."""
    return "<br>".join(_e(line) for line in str(text).split("\n"))


def _html_cell(cell: str | Thumb, numeric: bool) -> str:
    klass = ' class="num"' if numeric else ""
    if isinstance(cell, Thumb):
        return f'<td><img class="thumb" src="{data_uri(cell.image)}" alt="{_e(cell.alt)}"></td>'
    return f"<td{klass}>{_html_lines(cell)}</td>"


def _html_block(block: Block) -> str:
    if isinstance(block, Text):
        if block.style == "headline":
            return f'<div class="headline">{_e(block.text)}</div>'
        if block.style in ("refer", "noflag"):
            return f'<p class="flag {block.style}">{_e(block.text)}</p>'
        if block.style == "label":
            return f"<p><strong>{_e(block.text)}</strong></p>"
        if block.style == "note":
            return f'<div class="note">{_e(block.text)}</div>'
        return f'<p class="{block.style}">{_e(block.text)}</p>' if block.style != "body" else f"<p>{_e(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in block.items) + "</ul>"
    if isinstance(block, KeyValues):
        rows = "".join("<tr>" + "".join(f"<th>{_e(c)}</th>" if i % 2 == 0 else f"<td>{_e(c)}</td>"
                                        for i, c in enumerate(r)) + "</tr>" for r in block.lines())
        return f'<table class="kv">{rows}</table>'
    if isinstance(block, Table):
        head = "".join(f"<th>{_e(h)}</th>" for h in block.header)
        rows = "".join("<tr>" + "".join(_html_cell(c, i in block.numeric) for i, c in enumerate(r)) + "</tr>"
                       for r in block.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    if isinstance(block, Gallery):
        figures = "".join(f'<figure><img src="{data_uri(a)}" alt="{_e(c)}"><figcaption>{_e(c)}</figcaption></figure>'
                          for c, a in block.items)
        return f'<div class="grid{"" if block.large else " small-grid"}">{figures}</div>'
    raise TypeError(f"not a report block: {type(block).__name__}")


def build_html(report: CaseReport) -> str:
    """The report as one self-contained HTML page (no external files; prints on A4): :func:`report_sections` after
    the research-use notice."""
    body = "".join(f'<section class="{s.part}{" newpage" if s.new_page else ""}"><h2>{_e(s.title)}</h2>'
                   + "".join(_html_block(b) for b in s.blocks) + "</section>" for s in report_sections(report))
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
    """The report as A4 PDF bytes (reportlab): :func:`report_sections`, the finding on the first page; the notice
    heads the first page and footers every page."""
    try:
        from reportlab.lib import colors
        from reportlab.lib.pagesizes import A4
        from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
        from reportlab.lib.units import cm, mm
        from reportlab.lib.utils import simpleSplit
        from reportlab.platypus import Image as RLImage
        from reportlab.platypus import (
            KeepTogether,
            ListFlowable,
            PageBreak,
            Paragraph,
            SimpleDocTemplate,
            Spacer,
            TableStyle,
        )
        from reportlab.platypus import Table as RLTable
    except ImportError as err:
        raise LungvizError("PDF reports need the reportlab package (pip install reportlab); "
                           "the HTML report works without it.") from err

    styles = getSampleStyleSheet()
    body = ParagraphStyle("body", parent=styles["Normal"], fontSize=9, leading=11.5)
    small = ParagraphStyle("small", parent=body, fontSize=8, leading=10, textColor=colors.HexColor("#57606a"))
    missing = ParagraphStyle("missing", parent=small, fontName="Helvetica-Oblique")
    bold = ParagraphStyle("label", parent=body, fontName="Helvetica-Bold")
    headline = ParagraphStyle("headline", parent=body, fontName="Helvetica-Bold", fontSize=10.5, leading=13,
                              spaceAfter=3)
    h1 = ParagraphStyle("h1", parent=styles["Title"], fontSize=18, alignment=0, spaceAfter=2)
    h2 = ParagraphStyle("h2", parent=styles["Heading2"], fontSize=12, spaceBefore=6, spaceAfter=3)
    notice = ParagraphStyle("notice", parent=body, fontName="Helvetica-Bold", textColor=colors.HexColor("#7a271a"))
    styles_by_name = {"body": body, "small": small, "missing": missing, "label": bold, "note": body,
                      "headline": headline, "refer": body, "noflag": body}
    flag_colours = {"refer": ("#fffaeb", "#f79009"), "noflag": ("#f2f4f7", "#98a2b3")}
    grid = colors.HexColor("#d0d7de")
    width = A4[0] - 36 * mm

    def p(text: Any, style: ParagraphStyle = body) -> Paragraph:
        return Paragraph(pdf_markup(text, bold="Bold" in style.fontName), style)

    def img(image: np.ndarray, side: float) -> RLImage:
        h, w = np.asarray(image).shape[:2]
        return RLImage(io.BytesIO(png_bytes(image)), width=side, height=side * h / w)

    def boxed(flowable: Any, fill: str, line: str) -> RLTable:
        t = RLTable([[flowable]], colWidths=[width])
        t.setStyle(TableStyle([("BOX", (0, 0), (-1, -1), 1, colors.HexColor(line)),
                               ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor(fill))]))
        return t

    def table(rows: list[list[Any]], widths: list[float], header: bool, numeric: frozenset[int] = frozenset()) -> Any:
        t = RLTable(rows, colWidths=widths, repeatRows=1 if header else 0, hAlign="LEFT")
        style = [("GRID", (0, 0), (-1, -1), 0.5, grid), ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
                 ("FONTSIZE", (0, 0), (-1, -1), 8.5), *[("ALIGN", (i, 1), (i, -1), "RIGHT") for i in numeric]]
        if header:
            style.append(("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#f6f8fa")))
        t.setStyle(TableStyle(style))
        return t

    def flowable(block: Block) -> Any:
        if isinstance(block, Text):
            par = p(block.text, styles_by_name.get(block.style, body))
            return boxed(par, *flag_colours[block.style]) if block.style in flag_colours else par
        if isinstance(block, Bullets):
            return ListFlowable([p(i) for i in block.items], bulletType="bullet", start="-", leftIndent=10)
        if isinstance(block, KeyValues):
            label = 4.2 * cm if block.columns == 1 else 2.6 * cm
            value = (width - block.columns * label) / block.columns
            return table([[p(c, bold) if i % 2 == 0 else p(c) for i, c in enumerate(r)] for r in block.lines()],
                         [label, value] * block.columns, header=False)
        if isinstance(block, Table):
            shares = block.widths or (1.0 / len(block.header),) * len(block.header)
            rows = [[p(h, small) for h in block.header]]
            rows += [[img(c.image, 1.6 * cm) if isinstance(c, Thumb) else p(c) for c in r] for r in block.rows]
            return table(rows, [s * width for s in shares], header=True, numeric=block.numeric)
        if isinstance(block, Gallery):
            side, per_row = (4.0 * cm, 3) if block.large else (3.6 * cm, 4)
            cells = [[img(a, side), p(c, small)] for c, a in block.items]
            rows = [cells[i:i + per_row] for i in range(0, len(cells), per_row)]
            rows[-1] += [""] * (per_row - len(rows[-1]))
            t = RLTable(rows, colWidths=[side + 0.4 * cm] * per_row, hAlign="LEFT")
            t.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("ALIGN", (0, 0), (-1, -1), "CENTER")]))
            return t
        raise TypeError(f"not a report block: {type(block).__name__}")

    story: list[Any] = [p(report.title, h1), p(f"{report.case_id} - {report.created_text}", small), Spacer(1, 6)]
    box = RLTable([[p(report.notice, notice)]], colWidths=[width])
    box.setStyle(TableStyle([("BOX", (0, 0), (-1, -1), 1.5, colors.HexColor("#b42318")),
                             ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#fef3f2")),
                             ("TOPPADDING", (0, 0), (-1, -1), 6), ("BOTTOMPADDING", (0, 0), (-1, -1), 6)]))
    story.append(box)
    for s in report_sections(report):
        if s.new_page:
            story.append(PageBreak())
        parts = [p(s.title, h2), *[flowable(b) for b in s.blocks]]
        # a long table may run over pages (its header repeats); anything else stays with its title
        story += parts if any(isinstance(b, Table) and len(b.rows) > 8 for b in s.blocks) else [KeepTogether(parts)]

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
