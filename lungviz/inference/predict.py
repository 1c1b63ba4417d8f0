"""Calibrated predictions from the shipped bundles: the nodule model (outline, size, characteristics, the estimate by
its factors and the 1-5 score), the slice view beside it, and a refer/uncertain flag.

All preprocessing is read from each bundle's spec (view, field in mm, input size, mean/std); calibration is the
spec's, fitted on the validation split, and so is each call (:mod:`lungviz.calibration`,
:mod:`lungviz.inference.factors`).
The headline estimate keeps the outside name ``fused-binary`` (the nodule model's factor estimate: size,
characteristics and image evidence) and the 1-5 score the name ``nodule-score`` (the nodule model's score head).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lungviz import metrics, paths
from lungviz.data.preprocess import (
    VIEWS,
    spacing_or_default,
    to_model_input,
    valid_spacing,
    view_from_context,
    view_from_nodule_crop,
)
from lungviz.errors import LungvizError
from lungviz.inference.finder import Finder, load_finder, presence_patch, presence_scores
from lungviz.inference.nodule import Assessment, NoduleReading, assess, read_slices, reading_embedding
from lungviz.metrics import softmax
from lungviz.models import Bundle, ModelSpec, load_bundle

#: The nodule model's bundle name (lungviz.models.NoduleNet).
NODULE_MODEL = "nodule"
#: The slice view's bundles, by task.
SLICE_TASKS = ("binary", "score")
#: The outside names of the nodule model's estimate and score (``python -m training evaluate --model NAME``).
ESTIMATE_NAME = "fused-binary"
SCORE_NAME = "nodule-score"
#: A malignant probability in this band around a 50% call point is flagged, as are two views that disagree by more
#: than this; a model that calls malignant from another probability gets the band as wide in log-odds around it.
UNCERTAIN_BAND = (0.25, 0.75)
DISAGREEMENT = 0.35
#: Below this probability that a nodule sits at the centre of the crop (the finder's presence classifier), a case
#: is flagged. It cannot check a nodule crop uploaded without its slice.
PRESENCE_FLAG = 0.5


def uncertain_band(threshold: float = 0.5) -> tuple[float, float]:
    """The uncertain band around a call point: :data:`UNCERTAIN_BAND` moved in log-odds to centre on ``threshold``."""
    half = float(np.log(UNCERTAIN_BAND[1] / (1.0 - UNCERTAIN_BAND[1])))
    centre = float(np.log(threshold / (1.0 - threshold)))
    lo, hi = (1.0 / (1.0 + np.exp(-(centre + s * half))) for s in (-1.0, 1.0))
    return round(float(lo), 6), round(float(hi), 6)


@dataclass(kw_only=True)
class ModelSet:
    """The shipped bundles, loaded once: the nodule model, the slice view (``slice-<task>``) and the nodule finder
    (it checks that a nodule sits at the crop's centre), each when installed."""

    folder: Path
    nodule: Bundle | None = None
    bundles: dict[str, Bundle] = field(default_factory=dict)  # the slice view's, by bundle name
    finder: Finder | None = None
    notes: list[str] = field(default_factory=list)  # what could not be loaded, for the user

    def bundle(self, view: str, task: str) -> Bundle | None:
        return self.bundles.get(f"{view}-{task}")

    @property
    def networks(self) -> dict[str, Bundle]:
        """Every network a prediction runs, by bundle name."""
        finder = {b.name: b for b in (self.finder.presence, self.finder.locate)} if self.finder else {}
        nodule = {self.nodule.name: self.nodule} if self.nodule else {}
        return {**nodule, **self.bundles, **finder}

    @property
    def provenance(self) -> dict[str, dict]:
        """The spec of every model a prediction uses, by name (for reports)."""
        return {n: b.spec.to_dict() for n, b in self.networks.items()}

    @property
    def device(self) -> torch.device:
        return next(iter(self.networks.values())).device if self.networks else torch.device("cpu")


def load_models(folder: Path | None = None, device: str | None = None) -> ModelSet:
    """Load the nodule model, the slice view and the finder, each when installed."""
    folder = Path(folder) if folder else paths.weights_dir()
    notes: list[str] = []
    nodule = None
    if (folder / f"{NODULE_MODEL}.json").is_file():
        try:
            nodule = load_bundle(folder, NODULE_MODEL, device)
        except LungvizError as err:
            notes.append(f"The nodule model (outline, size, characteristics and the estimate) is not available: {err}")
    bundles = {}
    for task in SLICE_TASKS:
        name = f"slice-{task}"
        if (folder / f"{name}.json").is_file():
            try:
                bundles[name] = load_bundle(folder, name, device)
            except LungvizError as err:
                notes.append(f"The slice view's {task} model is not available: {err}")
    if nodule is None and not bundles:
        raise LungvizError(f"no trained models are installed in {folder}; run `python -m training train --all`.")
    finder = None
    try:
        finder = load_finder(folder, device)
    except LungvizError:
        notes.append("Without the nodule finder, nothing checks that the crop is centred on a nodule.")
    return ModelSet(folder=folder, nodule=nodule, bundles=bundles, finder=finder, notes=notes)


def view_image(spec: ModelSpec, context: np.ndarray | None, nodule_crop: np.ndarray | None,
               spacing_mm: float | None) -> np.ndarray:
    """The ``(S, S)`` image a bundle sees: its view cut from the context crop, or from an uploaded nodule crop
    (taken to span the default nodule field; see :func:`view_from_nodule_crop`)."""
    view, size = spec.view, int(spec.input_size)
    field_mm = spec.preprocessing.get("field_mm")
    if view == "nodule" and nodule_crop is not None:
        return view_from_nodule_crop(nodule_crop, size, field_mm)
    if context is None:
        raise LungvizError(f"the {view} model needs a slice image around the nodule.")
    return view_from_context(context, view, size, spacing_mm, field_mm if view == "nodule" else None)


def calibrated_logits(bundle: Bundle, image: np.ndarray) -> np.ndarray:
    """``(C,)`` calibrated logits of one ``(S, S)`` view image (the calibration its spec records)."""
    x = torch.from_numpy(to_model_input(image, bundle.mean, bundle.std)[None]).to(bundle.device)
    with torch.inference_mode():
        logits = bundle.model(x).float().cpu().numpy()
    return bundle.calibration.logits(logits)[0]


def test_call_figures(task: str, metrics: dict) -> dict | None:
    """A binary model's calls on the held-out test nodules, on one middle slice each as the app sees a case (else
    on the nodule's central slices), from its spec's ``metrics``: ``{"n", "sensitivity", "specificity", "ci95",
    "single_slice"}``; None for another task or when they were not measured."""
    if task != "binary":
        return None
    m = metrics or {}
    single = bool(m.get("test_single_slice"))
    t = m.get("test_single_slice") or m.get("test") or {}
    if not all(isinstance(t.get(k), (int, float)) for k in ("n", "sensitivity", "specificity")):
        return None
    ci = t.get("ci95") or {}
    return {"n": int(t["n"]), "sensitivity": float(t["sensitivity"]), "specificity": float(t["specificity"]),
            "ci95": {k: list(ci[k]) for k in ("sensitivity", "specificity") if k in ci}, "single_slice": single}


@dataclass(kw_only=True)
class TaskPrediction:
    """Calibrated class probabilities of one task from one view, and how the model calls them."""

    classes: list[str]
    probs: list[float]
    logits: list[float] = field(repr=False, default_factory=list)
    decision_bias: list[float] | None = None  # the call is argmax(log p + bias); None = the most probable class
    #: binary: how this call did on the held-out test nodules (:func:`test_call_figures`), None when not measured
    test_calls: dict | None = None

    @property
    def top(self) -> str:
        """The model's call (see :mod:`lungviz.calibration`)."""
        bias = None if self.decision_bias is None else np.asarray(self.decision_bias)
        return self.classes[int(metrics.decide(np.asarray(self.probs)[None], bias)[0])]

    @property
    def threshold(self) -> float:
        """Two classes: the probability of the second class from which the model calls it."""
        return metrics.decision_threshold(self.decision_bias) if len(self.classes) == 2 else 0.5


def estimate_prediction(assessment: Assessment) -> TaskPrediction:
    """The nodule model's estimate by its factors (``fused-binary``) as a two-class prediction with its call."""
    p = float(np.clip(assessment.probability, 1e-9, 1 - 1e-9))
    t = float(np.clip(assessment.threshold, 1e-9, 1 - 1e-9))
    calls = None
    if assessment.test_calls:
        calls = {k: assessment.test_calls[k] for k in ("sensitivity", "specificity", "ci95", "n")
                 if k in assessment.test_calls} | {"single_slice": False}
    return TaskPrediction(classes=["benign", "malignant"], probs=[1.0 - p, p], logits=[0.0, float(np.log(p / (1 - p)))],
                          decision_bias=[float(np.log(t / (1 - t))), 0.0], test_calls=calls)


def score_prediction(assessment: Assessment) -> TaskPrediction:
    """The nodule model's 1-5 panel score (``nodule-score``), calibrated on validation."""
    P = np.asarray(assessment.reading.probabilities["malignancy"], np.float64)
    return TaskPrediction(classes=[str(k) for k in range(1, len(P) + 1)], probs=P.tolist())


@dataclass(kw_only=True)
class Prediction:
    """Everything the app and the CLI show for one case."""

    views: dict[str, dict[str, TaskPrediction]]  # "nodule" (the nodule model) and "slice" -> task -> prediction
    images: dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # view -> what the model saw
    flags: list[str] = field(default_factory=list)
    presence: float | None = None  # the finder's probability that a nodule sits at the crop's centre
    spacing_assumed: bool = False  # sizes were measured at the default pixel spacing (none was known)
    calibration_notes: list[str] = field(default_factory=list)  # views whose malignant probability is off on test
    assessment: Assessment | None = None  # the nodule model's size, characteristics and explained estimate

    def malignant_probability(self, view: str = "nodule") -> float | None:
        v = self.views.get(view) or self.views.get("nodule") or self.views.get("slice")
        if not v or "binary" not in v:
            return None
        return float(v["binary"].probs[1])

    @property
    def refer(self) -> bool:
        return bool(self.flags)

    def to_dict(self) -> dict:
        """The JSON form, for the CLI, the review log and the report."""
        names = {("nodule", "binary"): ESTIMATE_NAME, ("nodule", "score"): SCORE_NAME}
        return {
            "views": {v: {t: {"model": names.get((v, t), f"{v}-{t}"), "classes": p.classes,
                              "probabilities": [round(x, 4) for x in p.probs], "prediction": p.top,
                              **({"calls_malignant_from": round(p.threshold, 4)} if t == "binary" else {}),
                              **({"test_calls": p.test_calls} if p.test_calls else {})}
                          for t, p in tasks.items()} for v, tasks in self.views.items()},
            "malignant_probability": self.malignant_probability(),
            "flag": "refer / uncertain" if self.refer else "no uncertainty flag",
            "reasons": self.flags,
            "sizes_assume_spacing_mm": spacing_or_default(None) if self.spacing_assumed else None,
            "nodule_presence_at_centre": None if self.presence is None else round(self.presence, 3),
            "calibration_notes": self.calibration_notes,
            **({"nodule_model": self.assessment.to_dict()} if self.assessment is not None else {}),
        }


VIEW_NAMES_IN_TEXT = {"nodule": "nodule model's estimate", "slice": "slice view"}


def calibration_notes(models: ModelSet, views: list[str]) -> list[str]:
    """For each shown slice view whose malignant probability is miscalibrated on the held-out test nodules (the ECE
    of its malignant-probability curve above ``MALIGNANT_ECE_LIMIT``, on one middle slice each as the app sees a
    case), a note saying so with the measured figures."""
    notes = []
    for view in views:
        bundle = models.bundle(view, "binary")
        reports = bundle.spec.metrics if bundle is not None else {}
        t = metrics.with_malignant_ece(reports.get("test_single_slice") or reports.get("test") or {})
        if t.get("ece_malignant") is None or not t["ece_malignant"] > metrics.MALIGNANT_ECE_LIMIT:
            continue
        rate = t["observed_malignant_rate"]
        errs = metrics.MISCALIBRATION_WORDS[metrics.miscalibration_direction(t.get("reliability_malignant") or [])]
        notes.append(f"The {VIEW_NAMES_IN_TEXT.get(view, view)}'s malignant probability {errs} on the held-out "
                     f"test nodules (mean {t['mean_malignant_p']:.0%} against {rate:.0%} malignant; calibration "
                     f"error {t['ece_malignant']:.2f}): read it as a ranking among cases rather than as a rate.")
    return notes


def uncertainty_flags(views: dict[str, dict[str, TaskPrediction]], presence: float | None = None,
                      outlined: bool = True) -> list[str]:
    """Reasons to refer: no nodule seen at the crop's centre, none outlined, an uncertain malignant probability, or
    views that disagree."""
    reasons = []
    if presence is not None and presence < PRESENCE_FLAG:
        reasons.append(f"the nodule finder does not see a nodule at the centre of the crop (probability "
                       f"{presence:.0%}): check that the crop is centred on the nodule")
    if not outlined:
        reasons.append("the nodule model outlined no nodule at the centre, so its size is unknown")
    main = views.get("nodule") or views.get("slice") or {}
    if "binary" in main:
        p, threshold = main["binary"].probs[1], main["binary"].threshold
        lo, hi = uncertain_band(threshold)
        if lo < p < hi:
            around = "" if abs(threshold - 0.5) < 5e-3 else f" around its call point, {threshold:.0%}"
            reasons.append(f"malignant probability {p:.0%} is in the uncertain band ({lo:.0%}-{hi:.0%}{around})")
    if "slice" in views and "nodule" in views and "binary" in views["slice"] and "binary" in views["nodule"]:
        s, n = views["slice"]["binary"], views["nodule"]["binary"]
        if abs(s.probs[1] - n.probs[1]) > DISAGREEMENT or s.top != n.top:
            reasons.append(f"the views disagree (slice {s.probs[1]:.0%}, calls {s.top} from {s.threshold:.0%}; "
                           f"nodule model {n.probs[1]:.0%}, calls {n.top} from {n.threshold:.0%})")
    if "score" in main:
        probs = np.asarray(main["score"].probs)
        if probs.max() < 0.5:
            reasons.append(f"the 1-5 panel score is spread over several values (the most likely, "
                           f"{int(np.argmax(probs)) + 1}, at {probs.max():.0%})")
    return reasons


#: Each refer / uncertain reason in a few words, by how its sentence starts (:func:`uncertainty_flags`).
FLAG_WORDS = (("the nodule finder does not see", "no nodule seen at the centre"),
              ("the nodule model outlined no nodule", "nothing outlined"),
              ("malignant probability", "estimate near its call point"),
              ("the views disagree", "the views disagree"),
              ("the 1-5 panel score is spread", "1-5 score spread out"))


def short_flag(reason: str) -> str:
    """A refer / uncertain reason in a few words, for the one-line flag; the sentence itself otherwise."""
    return next((words for start, words in FLAG_WORDS if reason.startswith(start)), reason)


def crop_as_context(nodule_crop: np.ndarray) -> tuple[np.ndarray, float]:
    """A nodule crop uploaded without its slice, as a context the nodule model can read: the crop and its pixel
    spacing, taking it to span the default nodule field (:data:`lungviz.data.preprocess.VIEWS`)."""
    side = max(np.asarray(nodule_crop).shape[:2])
    return nodule_crop, VIEWS["nodule"].field_mm / max(side, 1)


@dataclass(frozen=True, kw_only=True)
class CaseViews:
    """Every view of one case the networks read, cut once from the upload by each bundle's spec.

    ``nodule_input``: what the nodule model reads (it cuts its own two views, the second sized to the nodule it
    measures in the first): the context, or an uploaded nodule crop taken as the context, with its spacing.
    ``slice``: each slice-view bundle's ``(S, S)`` image by bundle name (bundles with the same view spec share one).
    ``presence_patch``: the finder's patch at the centre of the context."""

    nodule_input: tuple[np.ndarray, float | None] | None
    slice: dict[str, np.ndarray] = field(default_factory=dict)
    presence_patch: np.ndarray | None = field(repr=False, default=None)
    spacing_assumed: bool = False


def cut_views(models: ModelSet, context: np.ndarray | None, nodule_crop: np.ndarray | None,
              spacing_mm: float | None) -> CaseViews:
    """:class:`CaseViews` of an upload: ``context`` ``(H, W) float32 in [0, 1]`` (the ~9 cm crop around the
    nodule), an optional ``nodule_crop``, and the context's pixel spacing when known."""
    if context is None and nodule_crop is None:
        raise LungvizError("upload a slice image (and optionally a nodule crop) to get a prediction.")
    read = (context, spacing_mm) if context is not None else crop_as_context(nodule_crop)
    shared: dict[tuple, np.ndarray] = {}
    slice_views = {}
    if context is not None:
        for name, bundle in models.bundles.items():
            key = (bundle.spec.view, bundle.spec.input_size, bundle.spec.preprocessing.get("field_mm"))
            slice_views[name] = shared.setdefault(key, view_image(bundle.spec, context, None, spacing_mm))
    patch = None
    if models.finder is not None and context is not None:
        patch = presence_patch(models.finder, context, spacing_or_default(spacing_mm))
    return CaseViews(nodule_input=read, slice=slice_views, presence_patch=patch,
                     spacing_assumed=valid_spacing(read[1]) is None)


def predict(models: ModelSet, context: np.ndarray | None, nodule_crop: np.ndarray | None = None,
            spacing_mm: float | None = None, assessment: Assessment | None = None) -> Prediction:
    """The nodule model's reading (size, characteristics, the estimate by its factors, the 1-5 score) and the slice
    view beside it, with the uncertainty flags; every view cut once (:func:`cut_views`).

    ``context``: the ~9 cm crop centred on the nodule (``(H, W) float32 in [0, 1]``, as the slices set);
    ``nodule_crop``: an optional zoomed crop (read alone when no context is given); ``spacing_mm``: the context's
    pixel spacing when known; ``assessment``: the nodule model's reading when the caller has it already (a series
    followed through its slices), else it reads ``context``.
    """
    cut = cut_views(models, context, nodule_crop, spacing_mm)
    views: dict[str, dict[str, TaskPrediction]] = {}
    images: dict[str, np.ndarray] = {}
    if models.nodule is not None and assessment is None and cut.nodule_input is not None:
        assessment = assess(models.nodule, [cut.nodule_input[0]], cut.nodule_input[1])
    if assessment is not None:
        views["nodule"] = {"binary": estimate_prediction(assessment), "score": score_prediction(assessment)}
        images["nodule"] = assessment.reading.slices[assessment.reading.shown].view
    for name, img in cut.slice.items():
        bundle = models.bundles[name]
        images.setdefault("slice", img)
        lg = calibrated_logits(bundle, img)
        bias = bundle.calibration.decision_bias
        views.setdefault("slice", {})[name.split("-", 1)[1]] = TaskPrediction(
            classes=list(bundle.classes), probs=softmax(lg[None])[0].tolist(), logits=lg.tolist(),
            decision_bias=None if bias is None else bias.tolist(),
            test_calls=test_call_figures(bundle.spec.task, bundle.spec.metrics))
    presence = None
    if cut.presence_patch is not None and models.finder is not None:
        presence = float(presence_scores(models.finder.presence, cut.presence_patch)[0])
    outlined = assessment is None or assessment.reading.outlined
    return Prediction(views=views, images=images, flags=uncertainty_flags(views, presence, outlined),
                      presence=presence, spacing_assumed=cut.spacing_assumed,
                      calibration_notes=calibration_notes(models, [v for v in views if v == "slice"]),
                      assessment=assessment)


def with_assessment(pred: Prediction, assessment: Assessment) -> Prediction:
    """``pred`` with the nodule model's reading replaced (a series followed through its slices): its estimate,
    score, view and the flags that follow from them."""
    views = {**pred.views, "nodule": {"binary": estimate_prediction(assessment), "score": score_prediction(assessment)}}
    images = {**pred.images, "nodule": assessment.reading.slices[assessment.reading.shown].view}
    return dataclasses.replace(pred, views=views, images=images, assessment=assessment,
                               flags=uncertainty_flags(views, pred.presence, assessment.reading.outlined))


def embed_view(bundle: Bundle, image: np.ndarray) -> np.ndarray:
    """The L2-normalised penultimate-layer embedding ``(D,)`` of one view image (the retrieval query)."""
    x = torch.from_numpy(to_model_input(image, bundle.mean, bundle.std)[None]).to(bundle.device)
    with torch.inference_mode():
        e = bundle.model.embed(x).float().cpu().numpy()[0]
    return (e / max(float(np.linalg.norm(e)), 1e-12)).astype(np.float32)


def retrieval_query(models: ModelSet, model: str, context: np.ndarray | None, nodule_crop: np.ndarray | None,
                    spacing_mm: float | None, reading: NoduleReading | None = None) -> np.ndarray:
    """The L2-normalised query ``(D,)`` for an index built with ``model``, embedded as its library cases were: the
    nodule model reads the slice as it does for its estimate (the view's field follows the nodule; an uploaded
    nodule crop alone is read as the slice), a classifier embeds its view. ``reading``: the nodule model's reading
    of this very input when the caller has it (the prediction's), so the slice is not read twice."""
    if models.nodule is not None and model == models.nodule.name:
        if reading is not None:
            return reading_embedding(reading.slices)
        if context is None and nodule_crop is None:
            raise LungvizError("upload a slice image (or a nodule crop) to find similar cases.")
        image, spacing = (context, spacing_mm) if context is not None else crop_as_context(nodule_crop)
        return reading_embedding(read_slices(models.nodule, [image], spacing))
    bundle = models.bundles.get(model)
    if bundle is None:
        raise LungvizError(f"the similar-case index was built with model '{model}', which is not installed.")
    return embed_view(bundle, view_image(bundle.spec, context, nodule_crop, spacing_mm))
