"""The estimate that explains itself: benign/malignant from a few named factors the nodule model measures.

A logistic model over the measured size (log of the mean of the long and short axes), a few of the predicted
characteristics (expected ratings on the LIDC scales) and the image evidence (the nodule model's own malignant
log-odds). Each factor's contribution is its coefficient times its distance from the average nodule the model was
fitted on, in log-odds, so "size 23 mm: +1.8" reads as "this size moves the estimate 1.8 log-odds above an average
nodule's". The contributions and the intercept sum to the estimate's log-odds exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lungviz.errors import LungvizError

#: The factors, in order: the measured size, the characteristics that grade suspicion most directly, and the image.
FACTORS = ("size", "spiculation", "lobulation", "margin", "texture", "calcification", "image")
#: How each factor reads to a clinician.
FACTOR_LABELS = {"size": "size", "spiculation": "spiculation", "lobulation": "lobulation", "margin": "margin",
                 "texture": "texture", "calcification": "calcification", "image": "image evidence"}
#: Risk bands of the malignant probability (upper bounds), after the British Thoracic Society's nodule guideline.
RISK_BANDS = ((0.10, "low (under 10%)"), (0.70, "intermediate (10-70%)"), (1.01, "high (over 70%)"))


def risk_band(p: float) -> str:
    """The risk band a malignant probability falls in."""
    for upper, label in RISK_BANDS:
        if p < upper:
            return label
    return RISK_BANDS[-1][1]


def factor_values(mean_axes_mm: float, probabilities: Mapping[str, np.ndarray],
                  image_logodds: float) -> dict[str, float]:
    """The factors of one nodule from what the nodule model measured (NaN where unknown): the log of the mean axes,
    the expected rating of each graded characteristic, the probability of any calcification (a nominal scale whose
    last level is 'absent') and the image's malignant log-odds."""
    size = float(np.log(mean_axes_mm)) if mean_axes_mm and mean_axes_mm > 0 else float("nan")
    out = {"size": size, "image": float(image_logodds)}
    for name in FACTORS:
        p = probabilities.get(name)
        if name in out:
            continue
        if p is None:
            out[name] = float("nan")
        elif name == "calcification":
            out[name] = float(1.0 - np.asarray(p)[-1])
        else:
            out[name] = float((np.asarray(p) * np.arange(1, len(p) + 1)).sum())
    return out


@dataclass(frozen=True, kw_only=True)
class FactorModel:
    """A logistic model over :data:`FACTORS` (or a subset): ``logit = intercept + sum coef_k (x_k - centre_k)``.

    A factor that cannot be measured counts at its centre (contributes 0) and is said so."""

    names: tuple[str, ...]
    coef: np.ndarray
    centre: np.ndarray
    intercept: float

    def contributions(self, values: Mapping[str, float]) -> dict[str, float]:
        """Each factor's log-odds contribution (0 where the value is unknown)."""
        out = {}
        for name, c, m in zip(self.names, self.coef, self.centre, strict=True):
            v = values.get(name, float("nan"))
            out[name] = float(c * (v - m)) if np.isfinite(v) else 0.0
        return out

    def logit(self, values: Mapping[str, float]) -> float:
        return self.intercept + sum(self.contributions(values).values())

    def probability(self, values: Mapping[str, float]) -> float:
        return float(1.0 / (1.0 + np.exp(-self.logit(values))))

    def design(self, rows: Sequence[Mapping[str, float]]) -> np.ndarray:
        """``(N, K)`` values of the model's factors, unknown ones at their centre."""
        x = np.array([[r.get(n, np.nan) for n in self.names] for r in rows], np.float64).reshape(-1, len(self.names))
        return np.where(np.isfinite(x), x, self.centre)

    def probabilities(self, rows: Sequence[Mapping[str, float]]) -> np.ndarray:
        z = self.intercept + (self.design(rows) - self.centre) @ self.coef
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict:
        return {"names": list(self.names), "coef": [float(v) for v in self.coef],
                "centre": [float(v) for v in self.centre], "intercept": float(self.intercept)}

    @classmethod
    def from_dict(cls, data: Mapping) -> FactorModel:
        try:
            names = tuple(str(n) for n in data["names"])
            coef, centre = np.asarray(data["coef"], np.float64), np.asarray(data["centre"], np.float64)
            intercept = float(data["intercept"])
        except (KeyError, TypeError, ValueError) as err:
            raise LungvizError(f"the factor model's description is incomplete ({err}).") from err
        if not (len(names) == len(coef) == len(centre)) or not set(names) <= set(FACTORS):
            raise LungvizError("the factor model's description does not match its factors.")
        if not (np.isfinite(coef).all() and np.isfinite(centre).all() and np.isfinite(intercept)):
            raise LungvizError("the factor model's description holds a number that is not finite.")
        return cls(names=names, coef=coef, centre=centre, intercept=intercept)


def fit_factor_model(rows: Sequence[Mapping[str, float]], y: np.ndarray, names: Sequence[str] = FACTORS,
                     groups: Sequence[str] | None = None, cs: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
                     folds: int = 5, seed: int = 0) -> tuple[FactorModel, dict]:
    """Fit the factor model on ``rows`` (one dict of factor values per nodule) and labels ``y`` (1 malignant):
    standardised inputs, L2 strength chosen by patient-grouped cross-validated log-loss, refitted on all rows and
    mapped back to the factors' own units. Returns the model and the choice's record."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import GroupKFold

    names = tuple(names)
    x = np.array([[r.get(n, np.nan) for n in names] for r in rows], np.float64)
    centre = np.nanmean(x, axis=0)
    x = np.where(np.isfinite(x), x, centre)
    scale = x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (x - centre) / scale
    y = np.asarray(y, int)
    g = np.asarray(groups if groups is not None else np.arange(len(y)))
    rng = np.random.default_rng(seed)
    uniq = rng.permutation(np.unique(g))
    relabel = {u: i for i, u in enumerate(uniq)}
    splitter = GroupKFold(n_splits=folds)
    losses = {}
    for c in cs:
        pred = np.zeros(len(y))
        for tr, te in splitter.split(z, y, [relabel[v] for v in g]):
            m = LogisticRegression(C=c, max_iter=1000).fit(z[tr], y[tr])
            pred[te] = m.predict_proba(z[te])[:, 1]
        losses[c] = float(log_loss(y, pred, labels=[0, 1]))
    best = min(losses, key=losses.get)
    m = LogisticRegression(C=best, max_iter=1000).fit(z, y)
    coef = m.coef_[0] / scale
    intercept = float(m.intercept_[0])  # at the centre every contribution is 0
    return (FactorModel(names=names, coef=coef, centre=centre, intercept=intercept),
            {"C": best, "cv_log_loss": {str(k): v for k, v in losses.items()}, "n": len(y)})


def factor_phrases(values: Mapping[str, float], contributions: Mapping[str, float], top: int = 4) -> list[str]:
    """The factors that moved the estimate most, as short phrases ("size 23 mm: +1.8 log-odds")."""
    order = sorted(contributions, key=lambda k: -abs(contributions[k]))[:top]
    out = []
    for k in order:
        v = values.get(k, float("nan"))
        if k == "size":
            shown = f"{np.exp(v):.0f} mm" if np.isfinite(v) else "not measured"
        elif k == "image":
            shown = ""
        elif k == "calcification":
            shown = f"{v:.0%} likely" if np.isfinite(v) else "not rated"
        else:
            shown = f"{v:.1f}" if np.isfinite(v) else "not rated"
        label = FACTOR_LABELS.get(k, k)
        out.append(f"{label}{' ' + shown if shown else ''}: {contributions[k]:+.1f} log-odds")
    return out
