"""Reading a nodule with the nodule model (:class:`lungviz.models.NoduleNet`): a view sized to the nodule, its outline
and size, and a calibrated distribution per head (malignancy, the 1-5 score, the eight LIDC characteristics).

The view's field follows the nodule (:class:`FieldRule`, from the bundle's spec): a first pass measures the
outline's long axis, and the second pass, whose outline, size and heads are kept, sees a few times that (within
limits). The image itself therefore does not tell the nodule's size: the size comes from the measured outline, in
millimetres. Over several slices of one nodule the heads' logits are averaged, the size is the largest
slice's and the volume sums the outlined areas times the slice thickness.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from lungviz.data.preprocess import crop_mm, mm_to_px, resize, spacing_or_default, to_model_input
from lungviz.errors import LungvizError
from lungviz.inference.outline import THRESHOLD, axes_px, central_region
from lungviz.metrics import expected_rating, softmax
from lungviz.models import NODULE_HEADS, Bundle, NoduleNet

#: The view's side is this many times the nodule's measured long axis ...
FIELD_FACTOR = 2.5
#: ... within these limits (mm): a 3 mm nodule is seen at 16 mm, a 40 mm mass at 64 mm.
FIELD_MM = (16.0, 64.0)
#: The first pass's field, which measures the nodule for the second.
FIRST_FIELD_MM = 40.0
#: Heads that are ratings on an LIDC scale (all but benign/malignant).
RATING_HEADS = tuple(h for h in NODULE_HEADS if h != "malignant")
#: Rating heads whose LIDC scale names categories rather than grades: shown as the most probable category.
NOMINAL_HEADS = ("internalStructure", "calcification")
#: The LIDC scales in the readers' words (the levels a reader chose from; unnamed levels lie between two named).
LEVEL_WORDS: dict[str, dict[int, str]] = {
    "malignancy": {1: "highly unlikely", 2: "moderately unlikely", 3: "indeterminate", 4: "moderately suspicious",
                   5: "highly suspicious"},
    "subtlety": {1: "extremely subtle", 2: "moderately subtle", 3: "fairly subtle", 4: "moderately obvious",
                 5: "obvious"},
    "internalStructure": {1: "soft tissue", 2: "fluid", 3: "fat", 4: "air"},
    "calcification": {1: "popcorn", 2: "laminated", 3: "solid", 4: "non-central", 5: "central", 6: "absent"},
    "sphericity": {1: "linear", 3: "ovoid", 5: "round"},
    "margin": {1: "poorly defined", 5: "sharp"},
    "lobulation": {1: "none", 5: "marked"},
    "spiculation": {1: "none", 5: "marked"},
    "texture": {1: "non-solid (ground glass)", 3: "part solid", 5: "solid"},
}


def rating_words(head: str, probabilities: np.ndarray) -> str:
    """A rating in the readers' words: a nominal scale's most probable category with its probability ("absent,
    88%"); a graded scale's expected rating with the named level it sits on, or the two it lies between
    ("4.6 of 5, highly suspicious"; "3.2 of 5, between none and marked")."""
    p = np.asarray(probabilities, np.float64)
    words = LEVEL_WORDS.get(head, {})
    if head in NOMINAL_HEADS:
        k = int(np.argmax(p)) + 1
        return f"{words.get(k, k)}, {p.max():.0%}"
    value = float(expected_rating(p))
    text = f"{value:.1f} of {len(p)}"
    if not words:
        return text
    levels = sorted(words)
    near = min(levels, key=lambda k: abs(k - value))
    if abs(near - value) <= 0.5:
        return f"{text}, {words[near]}"
    lower = max((k for k in levels if k < value), default=levels[0])
    upper = min((k for k in levels if k > value), default=levels[-1])
    return f"{text}, between {words[lower]} and {words[upper]}"


@dataclass(frozen=True)
class FieldRule:
    """How the nodule view's field follows the nodule: ``factor`` x the long axis within ``lo``-``hi`` mm, measured
    in a first pass at ``first`` mm. A bundle's spec carries its own (:func:`field_rule`)."""

    factor: float = FIELD_FACTOR
    lo: float = FIELD_MM[0]
    hi: float = FIELD_MM[1]
    first: float = FIRST_FIELD_MM

    def field_for(self, long_axis_mm: float) -> float:
        """The field (mm) for a nodule whose long axis is ``long_axis_mm`` (0 or NaN: the first field)."""
        if not np.isfinite(long_axis_mm) or long_axis_mm <= 0:
            return self.first
        return float(np.clip(self.factor * long_axis_mm, self.lo, self.hi))

    def to_spec(self) -> dict:
        return {"field_factor": self.factor, "field_mm_range": [self.lo, self.hi], "first_field_mm": self.first}


def field_rule(bundle: Bundle) -> FieldRule:
    """The field rule a nodule model was trained with, from its spec's preprocessing (the defaults where absent)."""
    pre = bundle.spec.preprocessing
    lo, hi = pre.get("field_mm_range") or FIELD_MM
    return FieldRule(float(pre.get("field_factor", FIELD_FACTOR)), float(lo), float(hi),
                     float(pre.get("first_field_mm", FIRST_FIELD_MM)))


def field_for(long_axis_mm: float) -> float:
    """The default rule's field (mm) for a nodule whose long axis is ``long_axis_mm``."""
    return FieldRule().field_for(long_axis_mm)


def cut(context01: np.ndarray, centre_rc: tuple[float, float], field_mm: float, spacing_mm: float | None,
        input_size: int) -> tuple[np.ndarray, float]:
    """The ``(input_size, input_size)`` view of ``field_mm`` around ``centre_rc``, and millimetres per view pixel."""
    view = resize(crop_mm(context01, centre_rc, field_mm, spacing_mm), input_size)
    return view, mm_to_px(field_mm, spacing_mm) * spacing_or_default(spacing_mm) / input_size


@dataclass(frozen=True, kw_only=True)
class SliceReading:
    """The nodule model on one slice: its view, outline (``(S, S)`` bool), sizes (mm) and raw head logits."""

    view: np.ndarray
    field_mm: float
    mm_per_px: float
    outline: np.ndarray
    long_axis_mm: float
    short_axis_mm: float
    area_mm2: float
    logits: np.ndarray  # (sum of head levels,)
    #: following a series (:func:`follow_series`): the slice read and the whole-slice pixel its context was cut around
    index: int | None = None
    centre_rc: tuple[float, float] | None = None
    embedding: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.float32))  # pooled (D,)


@torch.inference_mode()
def _run(bundle: Bundle, views: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Outline probabilities ``(N, S, S)``, head logits ``(N, sum of levels)`` and the pooled features the heads
    read ``(N, D)`` (the retrieval embedding) of a batch of views."""
    model = bundle.model
    if not isinstance(model, NoduleNet):
        raise LungvizError(f"model '{bundle.name}' is not a nodule model.")
    x = np.stack([to_model_input(v, bundle.mean, bundle.std, bundle.in_chans) for v in views])
    outline, pooled = model.pooled(torch.from_numpy(x).to(bundle.device))
    heads = model.head(pooled)
    return (torch.sigmoid(outline[:, 0].float()).cpu().numpy(), heads.float().cpu().numpy(),
            pooled.float().cpu().numpy())


def _outlines(probs: np.ndarray) -> list[np.ndarray]:
    return [central_region(p > THRESHOLD) for p in probs]


def _measured_fields(bundle: Bundle, todo: list[tuple[np.ndarray, tuple[float, float], float | None]],
                     field_mm: float, rule: FieldRule) -> list[float | None]:
    """Per (context, centre, spacing), the field that follows the nodule as outlined in a view of ``field_mm``,
    or None when nothing is outlined there."""
    views = [cut(c, rc, field_mm, sp, bundle.input_size) for c, rc, sp in todo]
    probs, _, _ = _run(bundle, np.stack([v for v, _ in views]))
    return [rule.field_for(axes_px(m)[0] * mmpx) if m.any() else None
            for m, (_, mmpx) in zip(_outlines(probs), views, strict=True)]


def read_slices(bundle: Bundle, contexts01: list[np.ndarray], spacing_mm: float | list[float | None] | None,
                centres_rc: list[tuple[float, float]] | None = None, batch: int = 256,
                look_closer: bool = True) -> list[SliceReading]:
    """Read each nodule-centred context crop (or the given centre on a larger slice) in two passes; see the module
    (with ``look_closer``, a first pass that outlines nothing is repeated at the smallest field before giving up).
    ``spacing_mm``: one pixel spacing for all, or one per crop."""
    size = bundle.input_size
    rule = field_rule(bundle)
    n = len(contexts01)
    spacings = list(spacing_mm) if isinstance(spacing_mm, list) else [spacing_mm] * n
    centres = centres_rc or [(c.shape[0] / 2.0, c.shape[1] / 2.0) for c in contexts01]
    out: list[SliceReading] = []
    for i in range(0, n, batch):
        part = slice(i, i + batch)
        todo = list(zip(contexts01[part], centres[part], spacings[part], strict=True))
        fields = _measured_fields(bundle, todo, rule.first, rule)
        missed = [j for j, f in enumerate(fields) if f is None and look_closer]  # nothing outlined: look closer
        if missed:
            closer = _measured_fields(bundle, [todo[j] for j in missed], rule.lo, rule)
            for j, f in zip(missed, closer, strict=True):
                fields[j] = f
        fields = [rule.first if f is None else f for f in fields]
        second = [cut(c, rc, f, sp, size) for (c, rc, sp), f in zip(todo, fields, strict=True)]
        probs, logits, pooled = _run(bundle, np.stack([v for v, _ in second]))
        for (view, mmpx), f, mask, z, e in zip(second, fields, _outlines(probs), logits, pooled, strict=True):
            long_px, short_px = axes_px(mask)
            out.append(SliceReading(view=view, field_mm=f, mm_per_px=mmpx, outline=mask, long_axis_mm=long_px * mmpx,
                                    short_axis_mm=short_px * mmpx, area_mm2=float(mask.sum()) * mmpx**2, logits=z,
                                    embedding=e))
    return out


def reading_embedding(readings: list[SliceReading], central: float = 1.0) -> np.ndarray:
    """A nodule's retrieval embedding ``(D,)``: its slices' L2-normalised pooled features averaged over the
    ``central`` share of the slices (the share the heads' logits are averaged over), then L2-normalised."""
    if not readings or any(r.embedding.size == 0 for r in readings):
        raise LungvizError("the nodule model's reading carries no embedding.")
    keep = max(1, int(np.ceil(len(readings) * min(max(central, 0.0), 1.0))))
    first = (len(readings) - keep) // 2
    e = np.stack([r.embedding for r in readings[first : first + keep]]).astype(np.float64)
    e = (e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)).mean(axis=0)
    return (e / max(float(np.linalg.norm(e)), 1e-12)).astype(np.float32)


@dataclass(frozen=True, kw_only=True)
class NoduleReading:
    """The nodule model's reading of one nodule over ``n_slices`` slices.

    ``probabilities``: per head, the calibrated distribution over its levels; ``ratings``: per rating head, the
    rating on its LIDC scale (:func:`predicted_rating`). Sizes in mm: the long and short axis of the slice with the
    longest outline and their mean (the Fleischner / Lung-RADS average diameter); ``volume_mm3`` when the slice
    thickness is known and more than one slice was read."""

    n_slices: int
    probabilities: dict[str, np.ndarray]
    ratings: dict[str, float]
    long_axis_mm: float  # NaN when no slice was outlined
    short_axis_mm: float
    mean_axes_mm: float
    volume_mm3: float | None
    logits: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))  # mean raw logits of the heads
    slices: list[SliceReading] = field(repr=False, default_factory=list)
    shown: int = 0  # the slice to show (the chosen one of a series), an index into ``slices``

    @property
    def outlined(self) -> bool:
        """Whether the model outlined the nodule on any slice (else its size is unknown)."""
        return bool(np.isfinite(self.long_axis_mm))

    @property
    def malignant_probability(self) -> float:
        return float(self.probabilities["malignant"][1])

    def slice_sizes(self) -> list[dict]:
        """Per slice read, in order: its series index (None unless a series was followed), long and short axis (mm)
        and outlined area (mm²), 0 where nothing was outlined."""
        return [{"index": s.index, "long_axis_mm": float(s.long_axis_mm), "short_axis_mm": float(s.short_axis_mm),
                 "area_mm2": float(s.area_mm2)} for s in self.slices]


def head_temperatures(bundle: Bundle) -> dict[str, float]:
    """Each head's temperature from the spec (1.0 where none was fitted)."""
    fitted = bundle.spec.head_temperatures
    return {h: float(fitted.get(h, 1.0)) for h in NODULE_HEADS}


def split_logits(logits: np.ndarray) -> dict[str, np.ndarray]:
    """``(..., sum of levels)`` -> per head ``(..., levels)``."""
    out, start = {}, 0
    for name, n in NODULE_HEADS.items():
        out[name] = logits[..., start : start + n]
        start += n
    return out


def predicted_rating(head: str, P: np.ndarray) -> np.ndarray:
    """The rating the model gives on ``head``'s LIDC scale from ``(..., levels)`` probabilities: the most probable
    category on a nominal scale (:data:`NOMINAL_HEADS`), the expected rating on a graded one."""
    P = np.asarray(P, np.float64)
    return np.argmax(P, axis=-1) + 1.0 if head in NOMINAL_HEADS else expected_rating(P)


def aggregate(bundle: Bundle, readings: list[SliceReading], slice_thickness_mm: float | None,
              central: float = 1.0, shown: int | None = None) -> NoduleReading:
    """One nodule from its slices' readings (in slice order): the heads' logits averaged over the ``central`` share
    of the slices (as the temperatures and the estimate were fitted), calibrated per head; the size of the slice
    with the longest outline; the volume over every outlined slice."""
    if not readings:
        raise LungvizError("no slice of the nodule was read.")
    keep = max(1, int(np.ceil(len(readings) * min(max(central, 0.0), 1.0))))
    first = (len(readings) - keep) // 2
    mean = np.mean([r.logits for r in readings[first : first + keep]], axis=0)
    temps = head_temperatures(bundle)
    probs = {h: softmax(z[None], temps[h])[0] for h, z in split_logits(mean).items()}
    outlined = [r for r in readings if r.outline.any()]
    biggest = max(outlined, key=lambda r: r.long_axis_mm) if outlined else None
    long_mm = biggest.long_axis_mm if biggest else float("nan")
    short_mm = biggest.short_axis_mm if biggest else float("nan")
    thick = slice_thickness_mm if slice_thickness_mm and np.isfinite(slice_thickness_mm) else None
    volume = float(sum(r.area_mm2 for r in outlined) * thick) if thick and len(outlined) > 1 else None
    return NoduleReading(n_slices=len(readings), probabilities=probs,
                         ratings={h: float(predicted_rating(h, probs[h])) for h in RATING_HEADS},
                         long_axis_mm=long_mm, short_axis_mm=short_mm, mean_axes_mm=(long_mm + short_mm) / 2.0,
                         volume_mm3=volume, logits=mean, slices=readings,
                         shown=len(readings) // 2 if shown is None else shown)


@dataclass(frozen=True, kw_only=True)
class Assessment:
    """What the nodule model says of one nodule, for the page, the report and the CLI: the size, each characteristic
    in the readers' words, and the estimate with the factors that moved it, its risk band and its call."""

    reading: NoduleReading
    factors: dict[str, float]
    contributions: dict[str, float]
    probability: float
    risk_band: str
    threshold: float
    intercept: float = 0.0  # the estimate's log-odds for an average nodule
    test_calls: dict | None = None

    @property
    def call(self) -> str:
        return "malignant" if self.probability >= self.threshold else "benign"

    @property
    def characteristics(self) -> dict[str, str]:
        """Each characteristic (and the 1-5 score) in the readers' words."""
        return {h: rating_words(h, self.reading.probabilities[h]) for h in RATING_HEADS}

    def top_factors(self, n: int = 4) -> list[str]:
        """The ``n`` factors that moved the estimate most, then what the others add together."""
        from lungviz.inference.factors import factor_phrases

        phrases = factor_phrases(self.factors, self.contributions, n)
        rest = sum(sorted(self.contributions.values(), key=abs)[: max(0, len(self.contributions) - n)])
        return [*phrases, f"the other factors together: {rest:+.1f} log-odds"] if len(self.contributions) > n \
            else phrases

    @property
    def baseline(self) -> float:
        """The probability of an average nodule of those the estimate was fitted on (every factor at its centre)."""
        return float(1.0 / (1.0 + np.exp(-self.intercept)))

    def to_dict(self) -> dict:
        r = self.reading

        def mm(v: float | None) -> float | None:
            return None if v is None or not np.isfinite(v) else round(float(v), 1)

        return {
            "slices_read": r.n_slices,
            "outlined": r.outlined,
            "size_mm": {"long_axis": mm(r.long_axis_mm), "short_axis": mm(r.short_axis_mm),
                        "mean_axes": mm(r.mean_axes_mm), "volume_mm3": mm(r.volume_mm3)},
            "characteristics": {h: {"rating": round(r.ratings[h], 2), "words": w,
                                    "probabilities": [round(float(p), 4) for p in r.probabilities[h]]}
                                for h, w in self.characteristics.items()},
            "malignant_probability": round(self.probability, 4),
            "probability_of": "malignant: the readers' panel score 4-5",
            "risk_band": self.risk_band,
            "call": self.call,
            "calls_malignant_from": round(self.threshold, 4),
            **({"test_calls": self.test_calls} if self.test_calls else {}),
            "factors": {k: {"value": None if not np.isfinite(v) else round(v, 3),
                            "log_odds": round(self.contributions.get(k, 0.0), 3)} for k, v in self.factors.items()},
            "average_nodule_probability": round(self.baseline, 4),
            "top_factors": self.top_factors(),
        }


#: A series is followed at most this many slices either side of the chosen one ...
FOLLOW_SLICES = 20
#: ... and only while the model outlines at least this many view pixels there, whose centre moved less than this
#: (or half the nodule's long axis) from the previous slice's.
MIN_OUTLINE_PX = 4
MAX_STEP_MM = 5.0


def follow_series(bundle: Bundle, series: list, index: int,
                  centre_rc: tuple[float, float] | None) -> tuple[list[SliceReading], list[int]]:
    """Follow a nodule through a DICOM series (:class:`lungviz.data.io.DicomSlice` list) from slice ``index`` at
    ``centre_rc``: read that slice, then each neighbour on either side while the model still outlines a nodule
    there, re-centring on the previous slice's outline. Returns the readings and their slice indices, in order."""
    from lungviz.data.upload import from_series

    start = from_series(series, index, centre_rc)
    first = replace(read_slices(bundle, [start.context], start.spacing_mm)[0], index=index, centre_rc=start.centre_rc)
    readings = {index: first}
    if int(first.outline.sum()) < MIN_OUTLINE_PX or start.centre_rc is None:
        return [first], [index]
    for step in (1, -1):
        prev, centre, k = first, start.centre_rc, index + step
        while 0 <= k < len(series) and abs(k - index) <= FOLLOW_SLICES:
            centre = _recentred(centre, prev, start.spacing_mm)
            case = from_series(series, k, centre)
            r = read_slices(bundle, [case.context], case.spacing_mm, look_closer=False)[0]  # does the nodule go on?
            if int(r.outline.sum()) < MIN_OUTLINE_PX:
                break
            moved = np.hypot(*np.subtract(_recentred(centre, r, start.spacing_mm), centre))
            if moved * spacing_or_default(start.spacing_mm) > max(MAX_STEP_MM, 0.5 * prev.long_axis_mm):
                break  # the outline jumped: another structure, not the same nodule
            readings[k], prev, k = replace(r, index=k, centre_rc=case.centre_rc), r, k + step
    order = sorted(readings)
    return [readings[k] for k in order], order


def _recentred(centre_rc: tuple[float, float], reading: SliceReading, spacing_mm: float | None) -> tuple[float, float]:
    """The whole-slice position of ``reading``'s outline centre (it was read around ``centre_rc``)."""
    rows, cols = np.nonzero(reading.outline)
    mid = (reading.outline.shape[0] - 1) / 2.0
    scale = reading.mm_per_px / spacing_or_default(spacing_mm)  # whole-slice pixels per view pixel
    return centre_rc[0] + (rows.mean() - mid) * scale, centre_rc[1] + (cols.mean() - mid) * scale


def assess(bundle: Bundle, contexts01: list[np.ndarray], spacing_mm: float | None,
           slice_thickness_mm: float | None = None, central: float = 1.0) -> Assessment:
    """Read a nodule over the given slices, in order, and explain the estimate (the spec's factor model): the heads
    over the ``central`` share of them (0.5 for all of a nodule's slices, as evaluation reads a nodule), the size
    and volume over all."""
    readings = read_slices(bundle, contexts01, spacing_mm)
    return explain(bundle, aggregate(bundle, readings, slice_thickness_mm, central=central))


def assess_series(bundle: Bundle, series: list, index: int, centre_rc: tuple[float, float] | None) -> Assessment:
    """:func:`assess` over the slices of a DICOM series the nodule reaches (:func:`follow_series`): the size and
    volume over all of them, the heads over their central half (as the model was calibrated); the chosen slice is
    the one shown."""
    readings, indices = follow_series(bundle, series, index, centre_rc)
    zs = [float(series[k].z_mm) for k in indices]
    thickness = float(np.median(np.abs(np.diff(zs)))) if len(zs) > 1 else None
    return explain(bundle, aggregate(bundle, readings, thickness, central=0.5, shown=indices.index(index)))


def explain(bundle: Bundle, reading: NoduleReading) -> Assessment:
    """The :class:`Assessment` of a nodule's reading: the spec's factor model, its call point and test figures."""
    from lungviz.inference.factors import FactorModel, factor_values, risk_band

    estimate = bundle.spec.estimate
    model = FactorModel.from_dict(estimate.get("model") or {})
    z = split_logits(reading.logits)["malignant"]
    image = float((z[1] - z[0]) / head_temperatures(bundle)["malignant"])
    values = factor_values(reading.mean_axes_mm, reading.probabilities, image)
    p = model.probability(values)
    threshold = float(estimate.get("threshold", 0.5))
    test = estimate.get("test")
    calls = None
    if isinstance(test, dict) and "sensitivity" in test:
        n = (bundle.spec.metrics.get("estimate") or {}).get("n_test")
        calls = {"sensitivity": test["sensitivity"], "specificity": test["specificity"], **({"n": n} if n else {}),
                 "ci95": estimate.get("test_ci95") or {},
                 "target_sensitivity": float(estimate.get("target_sensitivity", 0.9))}
    return Assessment(reading=reading, factors=values, contributions=model.contributions(values), probability=p,
                      risk_band=risk_band(p, threshold), threshold=threshold, intercept=model.intercept,
                      test_calls=calls)
