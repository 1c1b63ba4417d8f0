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
from lungviz.metrics import expected_rating

#: The factors, in order: the measured size, the characteristics that grade suspicion most directly, and the image.
FACTORS = ("size", "spiculation", "lobulation", "margin", "texture", "calcification", "image")
#: The direction radiology knows each factor pulls the estimate in (+1 raises suspicion, -1 lowers it, 0 left to
#: the data): larger, spiculated, lobulated and poorly defined nodules are more suspicious, calcified ones less. The
#: fit keeps each coefficient on its side, so an explanation never says "spiculated, therefore less suspicious" (two
#: correlated ratings can otherwise take opposite signs).
FACTOR_SIGNS = {"size": 1, "spiculation": 1, "lobulation": 1, "margin": -1, "texture": 0, "calcification": -1,
                "image": 1}
#: How each factor reads to a clinician.
FACTOR_LABELS = {"size": "size", "spiculation": "spiculation", "lobulation": "lobulation", "margin": "margin",
                 "texture": "texture", "calcification": "calcification", "image": "image evidence"}
#: Above this probability a nodule is in the high band (between the call point and it: raised).
HIGH_BAND = 0.5


def risk_band(p: float, threshold: float) -> str:
    """The band of a probability of the readers' suspicion (panel score 4-5) relative to the call point chosen for a
    second look: below it (low), from it to :data:`HIGH_BAND` (raised), above (high)."""
    if p < threshold:
        return f"low (below the {threshold:.0%} call point)"
    if p < HIGH_BAND:
        return f"raised ({threshold:.0%}-{HIGH_BAND:.0%})"
    return f"high (over {HIGH_BAND:.0%})"


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
            out[name] = float(expected_rating(np.asarray(p)))
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
        return float(self.probabilities([values])[0])

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


def _fit_logistic(z: np.ndarray, y: np.ndarray, c: float, signs: np.ndarray) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression on standardised ``z`` with each coefficient kept on its sign's side
    (``signs``: +1 >= 0, -1 <= 0, 0 free); the intercept is unpenalised. Returns (coef, intercept)."""
    from scipy.optimize import minimize

    k = z.shape[1]

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        t = z @ w[:k] + w[k]
        p = 1.0 / (1.0 + np.exp(-t))
        nll = np.sum(np.logaddexp(0.0, t) - y * t)
        grad = np.append(z.T @ (p - y), np.sum(p - y))
        return nll + 0.5 / c * float(w[:k] @ w[:k]), grad + np.append(w[:k] / c, 0.0)

    bounds = [(0.0, None) if s > 0 else (None, 0.0) if s < 0 else (None, None) for s in signs] + [(None, None)]
    res = minimize(loss, np.zeros(k + 1), jac=True, method="L-BFGS-B", bounds=bounds)
    return res.x[:k], float(res.x[k])


def fit_factor_model(rows: Sequence[Mapping[str, float]], y: np.ndarray, names: Sequence[str] = FACTORS,
                     groups: Sequence[str] | None = None, cs: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
                     folds: int = 5, seed: int = 0) -> tuple[FactorModel, dict]:
    """Fit the factor model on ``rows`` (one dict of factor values per nodule) and labels ``y`` (1 malignant):
    standardised inputs, each coefficient on the side :data:`FACTOR_SIGNS` gives it, the L2 strength chosen by
    patient-grouped cross-validated log-loss, refitted on all rows and mapped back to the factors' own units.
    Returns the model and the choice's record."""
    from sklearn.model_selection import GroupKFold

    names = tuple(names)
    signs = np.array([FACTOR_SIGNS.get(n, 0) for n in names])
    x = np.array([[r.get(n, np.nan) for n in names] for r in rows], np.float64)
    centre = np.nanmean(x, axis=0)
    x = np.where(np.isfinite(x), x, centre)
    scale = x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (x - centre) / scale
    y = np.asarray(y, np.float64)
    g = np.asarray(groups if groups is not None else np.arange(len(y)))
    rng = np.random.default_rng(seed)
    relabel = {u: i for i, u in enumerate(rng.permutation(np.unique(g)))}
    losses = {}
    for c in cs:
        pred = np.zeros(len(y))
        for tr, te in GroupKFold(n_splits=folds).split(z, y, [relabel[v] for v in g]):
            w, b = _fit_logistic(z[tr], y[tr], c, signs)
            pred[te] = 1.0 / (1.0 + np.exp(-(z[te] @ w + b)))
        p = np.clip(pred, 1e-12, 1 - 1e-12)
        losses[c] = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    best = min(losses, key=losses.get)
    w, b = _fit_logistic(z, y, best, signs)
    return (FactorModel(names=names, coef=w / scale, centre=centre, intercept=b),  # at the centre all add 0
            {"C": best, "cv_log_loss": {str(k): v for k, v in losses.items()}, "n": len(y),
             "signs": {n: int(s) for n, s in zip(names, signs, strict=True)}})


def factor_phrases(values: Mapping[str, float], contributions: Mapping[str, float], top: int = 4) -> list[str]:
    """The factors that moved the estimate most, as short phrases ("size 23 mm: +1.8 log-odds")."""
    order = sorted(contributions, key=lambda k: -abs(contributions[k]))[:top]
    out = []
    for k in order:
        v = values.get(k, float("nan"))
        if k == "size":
            shown = f"{np.exp(v):.0f} mm" if np.isfinite(v) else "not measured (counted as an average nodule's)"
        elif k == "image":
            shown = ""
        elif k == "calcification":
            shown = f"(calcified: {v:.0%} likely)" if np.isfinite(v) else "not rated"
        else:
            shown = f"{v:.1f}" if np.isfinite(v) else "not rated"
        label = FACTOR_LABELS.get(k, k)
        out.append(f"{label}{' ' + shown if shown else ''}: {contributions[k]:+.1f} log-odds")
    return out
