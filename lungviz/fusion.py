"""Two-view late fusion: fused logits = sum of per-view weights x the views' prior-adjusted logits + class bias.

Fitted by maximum likelihood on the validation split (which also calibrates it), so the fused model
never sees the test split before its final report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lungviz.errors import LungvizError
from lungviz.metrics import nll, softmax


@dataclass
class Fusion:
    """Per-view weights ``(V,)`` and a class bias ``(C,)``."""

    views: list[str]
    weights: np.ndarray
    bias: np.ndarray

    def logits(self, view_logits: Sequence[np.ndarray]) -> np.ndarray:
        """``V`` arrays ``(N, C)`` -> fused ``(N, C)``."""
        if len(view_logits) != len(self.weights):
            raise LungvizError(f"the fused model needs {len(self.weights)} views, got {len(view_logits)}.")
        out = sum(w * np.asarray(lg, np.float64) for w, lg in zip(self.weights, view_logits, strict=True))
        return np.asarray(out + self.bias[None, :])

    def probabilities(self, view_logits: Sequence[np.ndarray]) -> np.ndarray:
        return softmax(self.logits(view_logits))

    def to_dict(self) -> dict:
        return {"views": self.views, "weights": self.weights.tolist(), "bias": self.bias.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Fusion:
        return cls(list(d["views"]), np.asarray(d["weights"], np.float64), np.asarray(d["bias"], np.float64))


def fit_fusion(views: list[str], view_logits: Sequence[np.ndarray], y: np.ndarray, l2: float = 1e-3) -> Fusion:
    """Maximum-likelihood weights and bias (small L2 on the bias) on held-out logits.

    View weights are kept non-negative: a view's evidence for a class may count less, never against it
    (a negative weight on correlated views is an artefact of fitting on a small validation split)."""
    from scipy.optimize import minimize

    y = np.asarray(y, int)
    V, C = len(view_logits), view_logits[0].shape[1]

    def unpack(theta: np.ndarray) -> Fusion:
        return Fusion(views, theta[:V], theta[V:])

    def objective(theta: np.ndarray) -> float:
        f = unpack(theta)
        return nll(f.logits(view_logits), y) + l2 * float(np.sum(theta[V:] ** 2))

    theta0 = np.concatenate([np.full(V, 1.0 / V), np.zeros(C)])
    bounds = [(0.0, None)] * V + [(None, None)] * C
    res = minimize(objective, theta0, method="L-BFGS-B", bounds=bounds)
    return unpack(res.x)
