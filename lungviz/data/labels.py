"""Label schemes: how a case's reader scores or histology become a class index.

``binary``: malignancy 1-3 benign, 4-5 malignant. ``binary-no3``: score-3 nodules left out.
``score``: the panel's rounded 1-5 score. ``histology``: the 4 chest CT classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lungviz.data.cases import Case
from lungviz.errors import LungvizError

HISTOLOGY_CLASSES = ("adenocarcinoma", "large.cell.carcinoma", "squamous.cell.carcinoma", "normal")


@dataclass(frozen=True)
class LabelScheme:
    """A named mapping from a case to a class index (None = the case is left out of this scheme)."""

    name: str
    classes: tuple[str, ...]
    label_of: Callable[[Case], int | None]
    ordinal: bool = False
    positive_class: int | None = None  # the class whose probability is "malignant"

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def labelled(self, cases: Iterable[Case]) -> list[tuple[Case, int]]:
        """Cases this scheme keeps, with their class index."""
        out = []
        for c in cases:
            y = self.label_of(c)
            if y is not None:
                out.append((c, y))
        return out


def _binary(case: Case) -> int | None:
    return None if case.malignancy is None else int(case.malignancy >= 4)


def _binary_no3(case: Case) -> int | None:
    if case.malignancy is None or case.malignancy == 3:
        return None
    return int(case.malignancy >= 4)


def _score(case: Case) -> int | None:
    return None if case.malignancy is None else int(case.malignancy) - 1


def _histology(case: Case) -> int | None:
    return HISTOLOGY_CLASSES.index(case.histology) if case.histology in HISTOLOGY_CLASSES else None


SCHEMES: dict[str, LabelScheme] = {
    "binary": LabelScheme("binary", ("benign", "malignant"), _binary, positive_class=1),
    "binary-no3": LabelScheme("binary-no3", ("benign", "malignant"), _binary_no3, positive_class=1),
    "score": LabelScheme("score", ("1", "2", "3", "4", "5"), _score, ordinal=True),
    "histology": LabelScheme("histology", HISTOLOGY_CLASSES, _histology),
}


def get_scheme(name: str) -> LabelScheme:
    """Look up a label scheme by name."""
    if name not in SCHEMES:
        raise LungvizError(f"unknown label scheme '{name}'; choose one of {', '.join(SCHEMES)}.")
    return SCHEMES[name]
