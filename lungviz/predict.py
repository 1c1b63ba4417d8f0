"""Calibrated predictions from the shipped bundles, per view and fused, with a refer/uncertain flag.

All preprocessing is read from each bundle's spec (view, field in mm, input size, mean/std); calibration
is the spec's temperature and prior correction, fitted on the validation split, and so is each model's call
(:mod:`lungviz.calibration`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lungviz import metrics, paths
from lungviz.errors import LungvizError
from lungviz.finder import Finder, centre_diameter_mm, centre_presence, load_finder
from lungviz.fusion import (
    SIZE_FEATURE,
    SIZE_SOURCES,
    Fusion,
    check_networks,
    component_networks,
    feature_row,
    mean_logits,
)
from lungviz.metrics import softmax
from lungviz.models import Bundle, file_sha256, load_bundle, read_spec
from lungviz.nodule_model import Assessment, assess, read_slices, reading_embedding
from lungviz.outline import Outline, load_outliner, outline_nodule
from lungviz.preprocess import (
    DEFAULT_SPACING_MM,
    spacing_or_default,
    to_model_input,
    valid_spacing,
    view_from_context,
    view_from_nodule_crop,
)

VIEW_NAMES = ("slice", "nodule")
#: The nodule model's bundle name (lungviz.models.NoduleNet).
NODULE_MODEL = "nodule"
TASKS = ("binary", "score")
#: A malignant probability in this band around a 50% call point is flagged, as are two views that disagree by more
#: than this; a model that calls malignant from another probability gets the band as wide in log-odds around it.
UNCERTAIN_BAND = (0.25, 0.75)
DISAGREEMENT = 0.35
#: Below this probability that a nodule sits at the centre of the crop (the finder's presence classifier), a case
#: is flagged. On the validation nodules' middle slices it flags 8.9% of crops centred on a nodule and 87% of the
#: same crops re-centred 20-30 pixels (about 15-25 mm) away. It flags large nodules more often (15% of the test
#: nodules over 20 mm in a review check), and cannot check a nodule crop uploaded without its slice.
PRESENCE_FLAG = 0.5


def uncertain_band(threshold: float = 0.5) -> tuple[float, float]:
    """The uncertain band around a call point: :data:`UNCERTAIN_BAND` moved in log-odds to centre on ``threshold``."""
    half = float(np.log(UNCERTAIN_BAND[1] / (1.0 - UNCERTAIN_BAND[1])))
    centre = float(np.log(threshold / (1.0 - threshold)))
    lo, hi = (1.0 / (1.0 + np.exp(-(centre + s * half))) for s in (-1.0, 1.0))
    return round(float(lo), 6), round(float(hi), 6)


@dataclass
class ModelSet:
    """The shipped bundles (``<view>-<task>``) and fusion specs (``fused-<task>``), loaded once, the nodule finder
    when installed (it checks that a nodule sits at the crop's centre) and the nodule outliner when installed (it
    outlines and measures the nodule; the size-aware fusion uses whichever of the two its spec names)."""

    bundles: dict[str, Bundle]
    fusions: dict[str, dict]
    folder: Path
    finder: Finder | None = None
    notes: list[str] = field(default_factory=list)  # what could not be loaded, for the user
    fusion_models: dict[str, Fusion] = field(default_factory=dict)  # fusions[task]["fusion"], read once
    outliner: Bundle | None = None
    members: dict[str, Bundle] = field(default_factory=dict)  # networks a fusion averages into one of its views
    nodule: Bundle | None = None  # the nodule model: size, characteristics and the estimate by its factors

    def bundle(self, view: str, task: str) -> Bundle | None:
        return self.bundles.get(f"{view}-{task}")

    @property
    def networks(self) -> dict[str, Bundle]:
        """Every network a prediction runs, by bundle name: the classifiers, a fusion's ensemble members, the nodule
        finder and the outliner."""
        finder = {b.name: b for b in (self.finder.presence, self.finder.locate)} if self.finder else {}
        outliner = {self.outliner.name: self.outliner} if self.outliner else {}
        nodule = {self.nodule.name: self.nodule} if self.nodule else {}
        return {**self.bundles, **self.members, **finder, **outliner, **nodule}

    @property
    def provenance(self) -> dict[str, dict]:
        """The spec of every model a prediction uses, by name: the networks and the fused models (for reports)."""
        return {**{n: b.spec for n, b in self.networks.items()}, **{f"fused-{t}": s for t, s in self.fusions.items()}}

    @property
    def device(self) -> torch.device:
        return next(iter(self.bundles.values())).device if self.bundles else torch.device("cpu")


def load_models(folder: Path | None = None, device: str | None = None) -> ModelSet:
    """Load every ``<view>-<task>`` bundle and ``fused-<task>`` spec that is installed."""
    folder = Path(folder) if folder else paths.weights_dir()
    bundles, fusions = {}, {}
    for view in VIEW_NAMES:
        for task in TASKS:
            name = f"{view}-{task}"
            if (folder / f"{name}.json").is_file():
                bundles[name] = load_bundle(folder, name, device)
    for task in TASKS:
        if (folder / f"fused-{task}.json").is_file():
            fusions[task] = {**read_spec(folder, f"fused-{task}"),
                             "spec_sha256": file_sha256(folder / f"fused-{task}.json")}
    if not bundles:
        raise LungvizError(f"no trained models are installed in {folder}; run `python -m training train --all`.")
    parsed, notes, members = {}, [], {}
    for task, spec in list(fusions.items()):
        try:
            parsed[task] = Fusion.from_dict(spec.get("fusion", {}))
            groups = component_networks(spec).values()
            for name in (n for group in groups for n in group[1:] if n not in members):  # ensemble members
                members[name] = load_bundle(folder, name, device)
            installed = {n: b.spec for n, b in (bundles | members).items()}
            if all(n in installed for group in groups for n in group):
                check_networks(spec, installed)
        except LungvizError as err:
            del fusions[task]
            parsed.pop(task, None)
            notes.append(f"The fused {task} model is not available: {err}")
    finder = outliner = None
    try:
        finder = load_finder(folder, device)
    except LungvizError as err:
        _drop_fusions_measured_by("finder", err, parsed, fusions, notes)
        notes.append("Without the nodule finder, nothing checks that the crop is centred on a nodule.")
    try:
        outliner = load_outliner(folder, device)
    except LungvizError as err:
        _drop_fusions_measured_by("outliner", err, parsed, fusions, notes)
    nodule = None
    if (folder / f"{NODULE_MODEL}.json").is_file():
        try:
            nodule = load_bundle(folder, NODULE_MODEL, device)
        except LungvizError as err:
            notes.append(f"The nodule model (size, characteristics and the estimate's factors) is not available: {err}")
    used = {n for spec in fusions.values() for nets in component_networks(spec).values() for n in nets[1:]}
    return ModelSet(bundles, fusions, folder, finder, notes, {t: parsed[t] for t in fusions}, outliner,
                    {n: b for n, b in members.items() if n in used}, nodule)


def _drop_fusions_measured_by(source: str, err: LungvizError, parsed: dict[str, Fusion], fusions: dict[str, dict],
                              notes: list[str]) -> None:
    """Remove the fused models whose size input ``source`` (which could not be loaded) measures, saying why."""
    for task in [t for t, f in parsed.items() if f.features and f.size_source == source]:
        fusions.pop(task, None)
        notes.append(f"The fused {task} model is not available: it measures the nodule with "
                     f"{SIZE_SOURCES[source]}, which could not be loaded ({err}).")


def view_image(bundle_spec: dict, context: np.ndarray | None, nodule_crop: np.ndarray | None,
               spacing_mm: float | None) -> np.ndarray:
    """The ``(S, S)`` image a bundle sees: its view cut from the context crop, or from an uploaded nodule crop
    (taken to span the default nodule field; see :func:`view_from_nodule_crop`)."""
    view, size = bundle_spec["view"], int(bundle_spec["input_size"])
    field_mm = bundle_spec.get("preprocessing", {}).get("field_mm")
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


def test_call_figures(spec: dict) -> dict | None:
    """A binary model's calls on the held-out test nodules, on one middle slice each as the app sees a case (else
    on the nodule's central slices): ``{"n", "sensitivity", "specificity", "ci95", "single_slice"}``; None for
    another task or when they were not measured."""
    if spec.get("task") != "binary":
        return None
    m = spec.get("metrics") or {}
    single = bool(m.get("test_single_slice"))
    t = m.get("test_single_slice") or m.get("test") or {}
    if not all(isinstance(t.get(k), (int, float)) for k in ("n", "sensitivity", "specificity")):
        return None
    ci = t.get("ci95") or {}
    return {"n": int(t["n"]), "sensitivity": float(t["sensitivity"]), "specificity": float(t["specificity"]),
            "ci95": {k: list(ci[k]) for k in ("sensitivity", "specificity") if k in ci}, "single_slice": single}


@dataclass
class TaskPrediction:
    """Calibrated class probabilities of one task from one view (or fused), and how the model calls them."""

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


@dataclass
class Prediction:
    """Everything the app and the CLI show for one case."""

    views: dict[str, dict[str, TaskPrediction]]  # view -> task -> prediction; view "fused" when both ran
    images: dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # view -> what the model saw
    flags: list[str] = field(default_factory=list)
    diameter_mm: float | None = None  # the nodule's diameter measured on the image, when a fusion used it
    presence: float | None = None  # the finder's probability that a nodule sits at the crop's centre
    spacing_assumed: bool = False  # the diameter was measured at the default pixel spacing (none was known)
    size_source: str | None = None  # what measured it (a key of lungviz.fusion.SIZE_SOURCES)
    outline: Outline | None = field(repr=False, default=None)  # the outliner's outline on the context crop
    calibration_notes: list[str] = field(default_factory=list)  # views whose malignant probability is off on test
    outline_features: dict[str, float] = field(default_factory=dict)  # the outline's features a fusion used
    outline_features_used_by: list[str] = field(default_factory=list)  # the tasks of the fusions that used them
    assessment: Assessment | None = None  # the nodule model's size, characteristics and explained estimate

    def malignant_probability(self, view: str = "fused") -> float | None:
        v = self.views.get(view) or self.views.get("nodule") or self.views.get("slice")
        if not v or "binary" not in v:
            return None
        return float(v["binary"].probs[1])

    @property
    def refer(self) -> bool:
        return bool(self.flags)

    def to_dict(self) -> dict:
        return {
            "views": {v: {t: {"classes": p.classes, "probabilities": [round(x, 4) for x in p.probs],
                              "prediction": p.top,
                              **({"calls_malignant_from": round(p.threshold, 4)} if t == "binary" else {}),
                              **({"test_calls": p.test_calls} if p.test_calls else {})}
                          for t, p in tasks.items()} for v, tasks in self.views.items()},
            "malignant_probability": self.malignant_probability(),
            "flag": "refer / uncertain" if self.refer else "no uncertainty flag",
            "reasons": self.flags,
            "estimated_diameter_mm": None if self.diameter_mm is None else round(self.diameter_mm, 1),
            "diameter_measured_by": self.size_source if self.diameter_mm is not None else None,
            "diameter_assumes_spacing_mm": DEFAULT_SPACING_MM if self.spacing_assumed and self.diameter_mm else None,
            "nodule_presence_at_centre": None if self.presence is None else round(self.presence, 3),
            "calibration_notes": self.calibration_notes,
            **({"outline_features": {k: None if not np.isfinite(v) else round(v, 3)
                                     for k, v in self.outline_features.items()},
                "outline_features_used_by": self.outline_features_used_by} if self.outline_features else {}),
            **({"nodule_model": self.assessment.to_dict()} if self.assessment is not None else {}),
        }


VIEW_NAMES_IN_TEXT = {"fused": "fused estimate", "nodule": "nodule view", "slice": "slice view"}


def calibration_notes(models: ModelSet, views: Iterable[str]) -> list[str]:
    """For each shown view whose malignant probability is miscalibrated on the held-out test nodules (the ECE of
    its malignant-probability curve above ``MALIGNANT_ECE_LIMIT``, on one middle slice each as the app sees a case),
    a note saying so with the measured figures."""
    notes = []
    for view in views:
        spec = models.fusions.get("binary") if view == "fused" else getattr(models.bundle(view, "binary"), "spec", None)
        reports = (spec or {}).get("metrics") or {}
        t = metrics.with_malignant_ece(reports.get("test_single_slice") or reports.get("test") or {})
        if t.get("ece_malignant") is None or not t["ece_malignant"] > metrics.MALIGNANT_ECE_LIMIT:
            continue
        rate = t["observed_malignant_rate"]
        errs = metrics.MISCALIBRATION_WORDS[metrics.miscalibration_direction(t.get("reliability_malignant") or [])]
        notes.append(f"The {VIEW_NAMES_IN_TEXT.get(view, view)}'s malignant probability {errs} on the held-out "
                     f"test nodules (mean "
                     f"{t['mean_malignant_p']:.0%} against {rate:.0%} malignant; calibration error "
                     f"{t['ece_malignant']:.2f}): read it as a ranking among cases rather than as a rate.")
    return notes


def uncertainty_flags(views: dict[str, dict[str, TaskPrediction]], presence: float | None = None) -> list[str]:
    """Reasons to refer: no nodule seen at the crop's centre, an uncertain malignant probability, or views that
    disagree."""
    reasons = []
    if presence is not None and presence < PRESENCE_FLAG:
        reasons.append(f"the nodule finder does not see a nodule at the centre of the crop (probability "
                       f"{presence:.0%}): check that the crop is centred on the nodule")
    main = views.get("fused") or views.get("nodule") or views.get("slice") or {}
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
                           f"nodule {n.probs[1]:.0%}, calls {n.top} from {n.threshold:.0%})")
    if "score" in main:
        probs = np.asarray(main["score"].probs)
        if probs.max() < 0.5:
            reasons.append(f"no panel score is likely (most likely score {int(np.argmax(probs)) + 1} at "
                           f"{probs.max():.0%})")
    return reasons


def predict(models: ModelSet, context: np.ndarray | None, nodule_crop: np.ndarray | None = None,
            spacing_mm: float | None = None) -> Prediction:
    """Calibrated predictions for every installed view and task, and the fused models (both views; fused-binary
    also the nodule diameter measured on the context crop by the tool its spec names, at the default spacing when
    it is unknown). With the outliner installed, the prediction carries its outline of the nodule.

    ``context``: the ~9 cm crop centred on the nodule (``(H, W) float32 in [0, 1]``, as the slices set);
    ``nodule_crop``: an optional zoomed crop; ``spacing_mm``: the context's pixel spacing when known.
    """
    if context is None and nodule_crop is None:
        raise LungvizError("upload a slice image (and optionally a nodule crop) to get a prediction.")
    views: dict[str, dict[str, TaskPrediction]] = {}
    logits: dict[tuple[str, str], np.ndarray] = {}
    images: dict[str, np.ndarray] = {}
    for name, bundle in models.bundles.items():
        view, task = name.split("-", 1)
        if view == "slice" and context is None:
            continue
        img = view_image(bundle.spec, context, nodule_crop, spacing_mm)
        images.setdefault(view, img)
        lg = calibrated_logits(bundle, img)
        logits[(view, task)] = lg
        bias = bundle.calibration.decision_bias
        views.setdefault(view, {})[task] = TaskPrediction(list(bundle.classes), softmax(lg[None])[0].tolist(),
                                                          lg.tolist(), None if bias is None else bias.tolist(),
                                                          test_call_figures(bundle.spec))
    outline = outline_nodule(models.outliner, context, spacing_mm) if models.outliner and context is not None else None
    diameter, source, used, users = None, None, {}, []
    for task, spec in models.fusions.items():
        comps = [(c.split("-", 1)[0], task) for c in spec["components"]]
        fusion = models.fusion_models.get(task) or Fusion.from_dict(spec["fusion"])
        if not all(c in logits for c in comps):
            continue
        features = None
        if fusion.features:  # the size (and any outline features), measured on the context crop
            if fusion.size_source == "outliner" and outline is not None:
                diameter, source = outline.diameter_mm, "outliner"
            elif fusion.size_source == "finder" and models.finder is not None and context is not None:
                diameter, source = centre_diameter_mm(models.finder, context, spacing_or_default(spacing_mm)), "finder"
            else:
                continue
            features = feature_row(fusion.features, diameter, outline.features if outline is not None else None)
            weighed = {n: outline.features.get(n, float("nan")) for n in fusion.features if n != SIZE_FEATURE}
            used |= weighed
            users += [task] if weighed else []
        view_logits = []
        for c, nets in zip(comps, component_networks(spec).values(), strict=True):
            extra = [models.members[m] for m in nets[1:]]  # the view's ensemble members, each with its own view
            view_logits.append(mean_logits([logits[c], *(calibrated_logits(b, view_image(
                b.spec, context, nodule_crop, spacing_mm)) for b in extra)])[None])
        fused = fusion.logits(view_logits, features)[0]
        probs = softmax(fused[None])[0].tolist()
        views.setdefault("fused", {})[task] = TaskPrediction(list(spec["classes"]), probs, fused.tolist(),
                                                             test_calls=test_call_figures(spec))
    presence = None
    if models.finder is not None and context is not None:
        presence = centre_presence(models.finder, context, spacing_or_default(spacing_mm))
    assessment = assess(models.nodule, [context], spacing_mm) if models.nodule and context is not None else None
    return Prediction(views, images, uncertainty_flags(views, presence), diameter, presence,
                      valid_spacing(spacing_mm) is None, source, outline,
                      calibration_notes(models, [v for v in views if "binary" in views[v]]), used, users,
                      assessment)


def embed_view(bundle: Bundle, image: np.ndarray) -> np.ndarray:
    """The L2-normalised penultimate-layer embedding ``(D,)`` of one view image (the retrieval query)."""
    x = torch.from_numpy(to_model_input(image, bundle.mean, bundle.std)[None]).to(bundle.device)
    with torch.inference_mode():
        e = bundle.model.embed(x).float().cpu().numpy()[0]
    return (e / max(float(np.linalg.norm(e)), 1e-12)).astype(np.float32)


def retrieval_query(models: ModelSet, model: str, context: np.ndarray | None, nodule_crop: np.ndarray | None,
                    spacing_mm: float | None) -> np.ndarray:
    """The L2-normalised query ``(D,)`` for an index built with ``model``, embedded as its library cases were: the
    nodule model reads the slice as it does for its estimate (the view's field follows the nodule; an uploaded
    nodule crop alone is read as the slice), a classifier embeds its view."""
    if models.nodule is not None and model == models.nodule.name:
        image, spacing = (context, spacing_mm) if context is not None else (nodule_crop, None)
        if image is None:
            raise LungvizError("upload a slice image (or a nodule crop) to find similar cases.")
        return reading_embedding(read_slices(models.nodule, [image], spacing))
    bundle = models.bundles.get(model)
    if bundle is None:
        raise LungvizError(f"the similar-case index was built with model '{model}', which is not installed.")
    return embed_view(bundle, view_image(bundle.spec, context, nodule_crop, spacing_mm))
