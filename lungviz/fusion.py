"""Two-view late fusion: fused logits = sum of per-view weights x the views' prior-adjusted logits + class bias,
optionally plus per-class weights x image-derived features: the log of the nodule's diameter measured on the image
by the outliner or the finder (as the fusion's ``size_source`` says) and, from the outliner, the outline's shape and
grey levels (:data:`lungviz.shape.OUTLINE_FEATURES`, standardised on the fitting split).

A view may be an ensemble: the spec's ``members`` names, per component, further networks of the same task whose
calibrated logits are averaged with the component's (equal weights, fixed) before the fusion weighs the view.

Fitted by maximum likelihood on the validation split (which also calibrates it), so the fused model
never sees the test split before its final report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lungviz.calibration import Calibration
from lungviz.errors import LungvizError
from lungviz.metrics import nll, softmax
from lungviz.shape import OUTLINE_FEATURES

#: The size feature: log of the nodule diameter (mm) measured on the image (never the readers' measurement).
SIZE_FEATURE = "log_diameter_mm"
#: Every feature a fusion can add: the size and the outline's shape and grey levels (these need the outliner).
FEATURES = (SIZE_FEATURE, *OUTLINE_FEATURES)
#: What measures that diameter: the outliner's outline (same-area circle) or the finder's localiser.
SIZE_SOURCES = {"outliner": "the nodule outliner", "finder": "the nodule finder's localiser"}


#: A fused model's task as the app names it.
FUSED_TASK_WORDS = {"binary": "benign/malignant", "score": "score"}


def fused_models_words(tasks: list[str]) -> str:
    """``["binary", "score"]`` -> "the fused benign/malignant and score models"."""
    words = [FUSED_TASK_WORDS.get(t, t) for t in tasks]
    if not words:
        return "no installed fused model"
    return f"the fused {' and '.join(words)} model" + ("s" if len(words) > 1 else "")


def size_feature(diameter_mm: float | np.ndarray) -> np.ndarray:
    """:data:`SIZE_FEATURE` of a diameter in mm (floored at 1 mm)."""
    return np.log(np.maximum(np.asarray(diameter_mm, np.float64), 1.0))


def feature_row(names: Sequence[str], diameter_mm: float, outline: dict[str, float] | None = None) -> np.ndarray:
    """``(1, F)`` fusion features ``names`` of one case: the size from ``diameter_mm``, the rest from the outline's
    measured features (NaN where nothing was outlined; the fusion then counts the feature at its mean)."""
    outline = outline or {}
    return np.array([[float(size_feature(diameter_mm)) if n == SIZE_FEATURE else float(outline.get(n, np.nan))
                      for n in names]], np.float64)


def component_networks(spec: dict) -> dict[str, list[str]]:
    """Per component of a fusion spec, the networks whose calibrated logits are averaged for it: the component
    itself, then the members the spec lists for it (a damaged list is a clear error)."""
    components, members = spec.get("components"), spec.get("members") or {}
    if (not isinstance(components, list) or not components or len(set(map(str, components))) != len(components)
            or not all(isinstance(c, str) and c for c in components)):
        raise LungvizError("the fused model's list of views is damaged (it must name each view's network once).")
    named = [n for m in members.values() for n in m] if isinstance(members, dict) and all(
        isinstance(m, list) for m in members.values()) else None
    if (named is None or any(c not in components for c in members)
            or not all(isinstance(n, str) and n for n in named)
            or len(set(named)) != len(named) or set(named) & set(components)):
        raise LungvizError("the fused model's ensemble members are damaged (each must list network names of one "
                           "of its components, each network once).")
    return {c: [c, *members.get(c, [])] for c in components}


def check_networks(fusion_spec: dict, network_specs: dict[str, dict]) -> None:
    """Refuse networks that do not fit a fusion: each must be a model of its task with its classes, see the view of
    its component, come from its split and (where the fusion recorded them) carry the very weights and calibration
    it was fitted on."""
    task = fusion_spec.get("task")
    hashes = fusion_spec.get("networks_sha256") or {}
    calibrations = fusion_spec.get("networks_calibration") or {}
    for comp, group in component_networks(fusion_spec).items():
        for name in group:
            net = network_specs[name]
            if (net.get("task") != task or list(net.get("classes") or []) != list(fusion_spec.get("classes") or [])
                    or net.get("view") != network_specs[comp].get("view")):
                raise LungvizError(f"the network '{name}' does not fit the fused {task} model (another task, classes "
                                   "or view).")
            split = fusion_spec.get("split_fingerprint")
            if split and net.get("split_fingerprint") != split:
                raise LungvizError(f"the network '{name}' was trained on another split than the fused {task} model.")
            if name in hashes and net.get("weights_sha256") != hashes[name]:
                raise LungvizError(f"it was fitted on other weights of '{name}'; refit it with "
                                   f"`python -m training fuse --task {task}`.")
            if name in calibrations and Calibration.from_spec(net).to_spec() != calibrations[name]:
                raise LungvizError(f"it was fitted on another calibration of '{name}' (its probabilities were "
                                   f"re-measured since); refit it with `python -m training fuse --task {task}`.")


def mean_logits(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The mean-logit ensemble of a view's networks (equal weights)."""
    return np.mean(np.stack([np.asarray(p, np.float64) for p in parts]), axis=0)


@dataclass
class Fusion:
    """Per-view weights ``(V,)``, a class bias ``(C,)`` and, optionally, per-class weights ``(F, C)`` of features,
    each feature first standardised as ``(x - centre) / scale`` (a missing value counts as the centre)."""

    views: list[str]
    weights: np.ndarray
    bias: np.ndarray
    features: list[str] = field(default_factory=list)
    feature_weights: np.ndarray | None = None
    size_source: str = "finder"  # what measures SIZE_FEATURE (a key of SIZE_SOURCES)
    feature_centre: np.ndarray | None = None  # (F,); None = 0 (the size feature is used as it is)
    feature_scale: np.ndarray | None = None  # (F,); None = 1

    def logits(self, view_logits: Sequence[np.ndarray], features: np.ndarray | None = None) -> np.ndarray:
        """``V`` arrays ``(N, C)`` (and ``(N, F)`` features when the fusion uses any) -> fused ``(N, C)``."""
        if len(view_logits) != len(self.weights):
            raise LungvizError(f"the fused model needs {len(self.weights)} views, got {len(view_logits)}.")
        out = sum(w * np.asarray(lg, np.float64) for w, lg in zip(self.weights, view_logits, strict=True))
        out = np.asarray(out + self.bias[None, :])
        if self.features:
            if features is None:
                raise LungvizError(f"the fused model also needs {', '.join(self.features)}.")
            f = np.asarray(features, np.float64).reshape(len(out), len(self.features))
            plain = np.array([n == SIZE_FEATURE for n in self.features])
            if np.isnan(f[:, plain]).any():
                raise LungvizError("the nodule's size could not be measured, so the fused model cannot weigh it.")
            if self.feature_centre is not None:
                f = (f - self.feature_centre[None, :]) / self.feature_scale[None, :]
                f = np.where(np.isnan(f) & ~plain[None, :], 0.0, f)  # an unmeasured outline feature: at the centre
            out = out + f @ np.asarray(self.feature_weights, np.float64).reshape(len(self.features), -1)
        return out

    def probabilities(self, view_logits: Sequence[np.ndarray], features: np.ndarray | None = None) -> np.ndarray:
        return softmax(self.logits(view_logits, features))

    def to_dict(self) -> dict:
        out = {"views": self.views, "weights": self.weights.tolist(), "bias": self.bias.tolist()}
        if self.features:
            out |= {"features": self.features, "feature_weights": np.asarray(self.feature_weights).tolist(),
                    "size_source": self.size_source}
            if self.feature_centre is not None:
                out |= {"feature_centre": self.feature_centre.tolist(), "feature_scale": self.feature_scale.tolist()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Fusion:
        """Read a fusion from its spec, checking it (a damaged spec is a clear error, not a crash later)."""
        try:
            views, weights = list(d["views"]), np.asarray(d["weights"], np.float64)
            bias = np.asarray(d["bias"], np.float64)
            features = [str(f) for f in d.get("features") or []]
            fw = np.asarray(d["feature_weights"], np.float64) if features else None
            source = str(d.get("size_source", "finder"))  # fusions written before the outliner used the finder
            centre = np.asarray(d["feature_centre"], np.float64) if "feature_centre" in d else None
            scale = np.asarray(d["feature_scale"], np.float64) if "feature_scale" in d else None
        except (KeyError, TypeError, ValueError) as err:
            raise LungvizError(f"the fused model's description is incomplete or damaged ({err}).") from err
        unknown = [f for f in features if f not in FEATURES]
        if unknown:
            raise LungvizError(f"the fused model uses unknown feature(s): {', '.join(unknown)}.")
        if source != "outliner" and set(features) - {SIZE_FEATURE}:
            raise LungvizError("the fused model's outline features need the nodule outliner as its size source.")
        if (centre is None and set(features) - {SIZE_FEATURE}) or (centre is None) != (scale is None) or (
                centre is not None and (
                centre.shape != (len(features),) or scale.shape != (len(features),) or not np.all(scale > 0)
                or not np.isfinite(centre).all() or not np.isfinite(scale).all()
                or any(n == SIZE_FEATURE and (c, s) != (0.0, 1.0) for n, c, s in zip(features, centre, scale,
                                                                                      strict=True)))):
            raise LungvizError("the fused model's feature standardisation does not match its features.")
        if source not in SIZE_SOURCES:
            raise LungvizError(f"the fused model measures the nodule with an unknown tool ('{source}').")
        if weights.shape != (len(views),) or bias.ndim != 1 or (fw is not None and fw.shape != (len(features),
                                                                                                   len(bias))):
            raise LungvizError("the fused model's weights do not match its views, classes and features.")
        return cls(views, weights, bias, features, fw, source, centre, scale)


def fit_fusion(views: list[str], view_logits: Sequence[np.ndarray], y: np.ndarray, l2: float = 1e-3,
               features: np.ndarray | None = None, feature_names: Sequence[str] = (),
               size_source: str = "finder") -> Fusion:
    """Maximum-likelihood weights and bias (small L2 on the bias and feature weights) on held-out logits.

    View weights are kept non-negative: a view's evidence for a class may count less, never against it
    (a negative weight on correlated views is an artefact of fitting on a small validation split).
    ``features`` ``(N, F)`` named ``feature_names`` get one free weight per class each; the outline features are
    standardised on these rows first (their mean and spread stored with the fusion; a missing value counts as the
    mean), the size feature is used as it is."""
    from scipy.optimize import minimize

    y = np.asarray(y, int)
    V, C, F = len(view_logits), view_logits[0].shape[1], len(feature_names)
    if F and (features is None or np.asarray(features).shape != (len(y), F)):
        raise LungvizError(f"expected features of shape ({len(y)}, {F}) for {', '.join(feature_names)}.")
    centre = scale = None
    if set(feature_names) - {SIZE_FEATURE}:
        x = np.asarray(features, np.float64)
        plain = np.array([n == SIZE_FEATURE for n in feature_names])
        if np.isnan(x).all(axis=0).any():
            raise LungvizError("a fusion feature was not measured on any of the fitting cases.")
        centre = np.where(plain, 0.0, np.nanmean(x, axis=0))
        spread = np.nanstd(x, axis=0)
        scale = np.where(plain | ~(spread > 0), 1.0, spread)

    def unpack(theta: np.ndarray) -> Fusion:
        fw = theta[V + C:].reshape(F, C) if F else None
        return Fusion(views, theta[:V], theta[V : V + C], list(feature_names), fw, size_source, centre, scale)

    def objective(theta: np.ndarray) -> float:
        f = unpack(theta)
        return nll(f.logits(view_logits, features), y) + l2 * float(np.sum(theta[V:] ** 2))

    theta0 = np.concatenate([np.full(V, 1.0 / V), np.zeros(C + F * C)])
    bounds = [(0.0, None)] * V + [(None, None)] * (C + F * C)
    res = minimize(objective, theta0, method="L-BFGS-B", bounds=bounds)
    return unpack(res.x)
