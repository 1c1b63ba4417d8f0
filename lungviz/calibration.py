"""A network's calibration: its probabilities and its call, both read from the bundle's spec.

Training upsamples every class to one count, so a network's logits ``z`` carry a balanced class prior.
``b = log(train prior / balanced prior)`` (the spec's ``prior_adjust``) restores the training data's class
frequencies and a temperature ``T`` fitted on the validation split by negative log-likelihood softens the network's
evidence: the calibrated probabilities are ``softmax(z / T + b)`` (``calibration: "prior-after-temperature"``).

The call (the class shown and scored) is the class of the prior-corrected logits, ``argmax(z + b)``, the rule every
shipped model's decision figures were measured and reported with. On the calibrated probabilities it reads
``argmax(log p + d)`` with ``d = -(1 - 1/T) b`` (:attr:`Calibration.decision_bias`); for a two-class model it is a
threshold on the positive class's probability (:meth:`Calibration.threshold`), below 50% when the positive class is
the rarer one and ``T > 1``, above it when ``T < 1``.

Specs written before the calibration key existed divided the prior by the temperature too, ``softmax((z + b) / T)``
(``"prior-before-temperature"``): that keeps the call at ``argmax(p)`` but divides the prior correction by the
temperature as well, so with ``T > 1`` a rarer class's probability comes out too high. They are read as written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lungviz import metrics
from lungviz.errors import LungvizError

PRIOR_AFTER_T = "prior-after-temperature"
PRIOR_BEFORE_T = "prior-before-temperature"
ORDERS = (PRIOR_AFTER_T, PRIOR_BEFORE_T)


@dataclass(frozen=True)
class Calibration:
    """Temperature ``T``, prior correction ``b`` (None = no correction) and the order they apply in."""

    temperature: float = 1.0
    prior: tuple[float, ...] | None = None
    order: str = PRIOR_AFTER_T

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise LungvizError(f"unknown calibration '{self.order}'; this version reads {', '.join(ORDERS)}.")
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise LungvizError(f"the calibration temperature must be a positive number, got {self.temperature!r}.")

    @classmethod
    def from_spec(cls, spec: Mapping) -> Calibration:
        """The calibration a network spec records (no ``calibration`` key = the older prior-before-temperature)."""
        prior = spec.get("prior_adjust")
        try:
            return cls(float(spec.get("temperature", 1.0)),
                       None if prior is None else tuple(float(v) for v in prior),
                       str(spec.get("calibration") or PRIOR_BEFORE_T))
        except (TypeError, ValueError) as err:
            raise LungvizError(f"the model's calibration is damaged ({err}).") from err

    @classmethod
    def fit(cls, logits: np.ndarray, y: np.ndarray, prior: Sequence[float] | None = None) -> Calibration:
        """The temperature minimising the NLL of ``softmax(z / T + b)`` on held-out logits."""
        offset = None if prior is None else np.asarray(prior, np.float64)
        return cls(metrics.fit_temperature(logits, y, offset=offset),
                   None if prior is None else tuple(float(v) for v in prior))

    def to_spec(self) -> dict:
        """The spec fields that record this calibration."""
        return {"temperature": self.temperature, "prior_adjust": None if self.prior is None else list(self.prior),
                "calibration": self.order}

    def _prior(self, n_classes: int) -> np.ndarray:
        if self.prior is None:
            return np.zeros(n_classes)
        b = np.asarray(self.prior, np.float64)
        if b.size != n_classes:
            raise LungvizError(f"the calibration has {b.size} prior values but the model has {n_classes} classes.")
        return b

    def logits(self, logits: np.ndarray) -> np.ndarray:
        """``(N, C)`` network logits -> calibrated logits (their plain softmax is the calibrated probability)."""
        z = np.asarray(logits, np.float64)
        b = self._prior(z.shape[-1])
        if self.order == PRIOR_BEFORE_T:
            return (z + b) / self.temperature
        return z / self.temperature + b

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """``(N, C)`` network logits -> calibrated probabilities."""
        return metrics.softmax(self.logits(np.atleast_2d(logits)))

    @property
    def decision_bias(self) -> np.ndarray | None:
        """``d`` such that the call is ``argmax(log p + d)`` of the calibrated probabilities (None = ``argmax(p)``)."""
        if self.prior is None or self.order == PRIOR_BEFORE_T:
            return None
        return -(1.0 - 1.0 / self.temperature) * np.asarray(self.prior, np.float64)

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        """The call for each row of calibrated probabilities ``(N, C)``."""
        return metrics.decide(probabilities, self.decision_bias)

    def threshold(self, positive: int = 1) -> float:
        """Two classes: the calibrated probability of ``positive`` from which the call is ``positive``."""
        return metrics.decision_threshold(self.decision_bias, positive)


def calibration_of(spec: Mapping) -> Calibration | None:
    """A network spec's :class:`Calibration`."""
    return Calibration.from_spec(spec)


def shared_order(specs: Iterable[Mapping]) -> str:
    """The calibration order a set of network specs share ("mixed" when they differ), for experiment records."""
    orders = {Calibration.from_spec(s).order for s in specs}
    return orders.pop() if len(orders) == 1 else "mixed"
