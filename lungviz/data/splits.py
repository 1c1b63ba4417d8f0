"""Deterministic, patient-level, stratified splits (70/15/15 and k-fold), saved with a data fingerprint."""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungviz.data.cases import Case, by_patient, data_fingerprint
from lungviz.errors import LungvizError

SPLIT_NAMES = ("train", "val", "test")


def patient_stratum(cases: Sequence[Case]) -> int:
    """A patient's stratum: the highest panel score among their nodules (0 when unscored)."""
    scores = [c.malignancy for c in cases if c.malignancy is not None]
    if scores:
        return int(max(scores))
    hist = [c.histology for c in cases if c.histology]
    return 10 + zlib.crc32(hist[0].encode()) % 1000 if hist else 0


def _stratum_key(cases: Sequence[Case]) -> tuple[int, int, int, int]:
    """Highest score, then counts of malignant (0-3+) and score-3 (0-3+) nodules and of all nodules (1-4+).

    Splits are by patient but metrics are by nodule: a patient with many malignant (or indeterminate)
    nodules moves a split's nodule-level mix more than a patient with one, so such patients are spread too.
    """
    n_malignant = sum(c.malignant or 0 for c in cases)
    n_three = sum(c.malignancy == 3 for c in cases)
    return patient_stratum(cases), min(n_malignant, 3), min(n_three, 3), min(len(cases), 4)


def _strata(cases: Sequence[Case]) -> dict[tuple[int, int, int, int], list[str]]:
    groups = by_patient(cases)
    strata: dict[tuple[int, int, int, int], list[str]] = {}
    for pid in sorted(groups):
        strata.setdefault(_stratum_key(groups[pid]), []).append(pid)
    return strata


@dataclass
class Split:
    """Assignment of every patient to a split (``train``/``val``/``test``) or a fold (``0``..``k-1``)."""

    assignment: dict[str, str]
    fingerprint: str
    seed: int
    kind: str  # "holdout", or "given" (the histology set's own folders)
    params: dict = field(default_factory=dict)

    def patients(self, name: str) -> set[str]:
        return {p for p, s in self.assignment.items() if s == name}

    def select(self, cases: Sequence[Case], name: str | Sequence[str]) -> list[Case]:
        """The cases whose patient is in the split (or any of several splits)."""
        names = {name} if isinstance(name, str) else set(name)
        missing = {c.patient_id for c in cases} - set(self.assignment)
        if missing:
            raise LungvizError(
                f"{len(missing)} patients (e.g. {sorted(missing)[0]}) are not in this split file; "
                "the data changed since the split was made."
            )
        return [c for c in cases if self.assignment[c.patient_id] in names]

    @property
    def names(self) -> list[str]:
        return sorted(set(self.assignment.values()))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "fingerprint": self.fingerprint, "params": self.params,
                "assignment": dict(sorted(self.assignment.items()))}

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> Split:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
            if not isinstance(d["assignment"], dict) or not isinstance(d.get("params", {}), dict):
                raise TypeError("'assignment' and 'params' must be JSON objects")
            split = cls(dict(d["assignment"]), str(d["fingerprint"]), int(d["seed"]), str(d["kind"]),
                        dict(d.get("params", {})))
        except FileNotFoundError as err:
            raise LungvizError("split file not found.", source=path) from err
        except OSError as err:
            raise LungvizError(f"the split file cannot be read ({err}).", source=path) from err
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise LungvizError(f"this is not a lungviz split file ({err!r}).", source=path) from err
        return split

    def check(self, cases: Sequence[Case]) -> None:
        """Raise if the split was made on different data than ``cases``."""
        fp = data_fingerprint(cases)
        if fp != self.fingerprint:
            raise LungvizError(
                f"the split was made for data with fingerprint {self.fingerprint}, but this data has {fp}."
            )


def holdout_split(
    cases: Sequence[Case], fractions: tuple[float, float, float] = (0.70, 0.15, 0.15), seed: int = 42
) -> Split:
    """Patient-level train/val/test split, stratified by each patient's highest panel score and nodule counts.

    Each stratum is shuffled with ``seed`` and cut at the running totals, so the split sizes are the
    fractions of the patient count (rounded) even when there are many small strata.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise LungvizError(f"split fractions must be non-negative and sum to 1, got {fractions}.")
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    # Round the running totals, not each stratum: many small strata would otherwise all round val/test to 0.
    seen = done_test = done_val = 0
    for _stratum, pids in sorted(_strata(cases).items()):
        order = [pids[i] for i in rng.permutation(len(pids))]
        seen += len(order)
        n_test = min(len(order), max(0, round(seen * fractions[2]) - done_test))
        want_val = round(seen * (fractions[1] + fractions[2])) - done_test - n_test - done_val
        n_val = min(len(order) - n_test, max(0, want_val))
        done_test, done_val = done_test + n_test, done_val + n_val
        for i, pid in enumerate(order):
            assignment[pid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return Split(assignment, data_fingerprint(cases), seed, "holdout", {"fractions": list(fractions)})
