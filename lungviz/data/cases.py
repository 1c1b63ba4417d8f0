"""The case record every importer produces, and small helpers over collections of cases."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CHARACTERISTICS = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
)


def round_half_up(value: float) -> int:
    """Round a panel median to an integer score, halves upwards (3.5 -> 4), as LIDC practice does."""
    return math.floor(value + 0.5)


def panel_median(scores: Sequence[int]) -> float | None:
    """Median of the readers' scores, or None when nobody scored."""
    return float(np.median(scores)) if len(scores) else None


@dataclass(frozen=True)
class ImportReport:
    """What an importer did: how many records it produced and what it skipped, with reasons."""

    n_cases: int
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for _, why in self.skipped:
            reasons[why] = reasons.get(why, 0) + 1
        detail = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
        return f"{self.n_cases} cases imported, {self.n_skipped} skipped" + (f" ({detail})" if detail else "")


@dataclass(frozen=True)
class Case:
    """One nodule (or one labelled image) with its slices, masks and the readers' opinions.

    Images are ``(S, H, W) float32 in [0, 1]`` (lung-windowed), ordered from inferior to superior
    as stored; masks are ``(S, H, W) float32 in [0, 1]`` = fraction of readers who drew each pixel.
    They are either held in memory (``slices``/``masks``) or read lazily from ``image_paths``/``mask_paths``.
    """

    patient_id: str
    nodule_id: str
    source: str
    image_paths: tuple[Path, ...] = ()
    mask_paths: tuple[Path, ...] = ()
    mask_mode: str = "consensus"  # "consensus" (pixel = reader count) or "per-reader" (mask_paths per reader)
    reader_mask_paths: tuple[tuple[Path, ...], ...] = ()  # per reader, per slice (original layout)
    crop_paths: tuple[Path, ...] = ()  # an explicit nodule crop; else cut from the centre
    slices: np.ndarray | None = field(default=None, repr=False, compare=False)
    masks: np.ndarray | None = field(default=None, repr=False, compare=False)
    n_readers: int = 0
    reader_scores: tuple[int, ...] = ()
    reader_characteristics: tuple[dict[str, float], ...] = ()
    characteristics: dict[str, float] = field(default_factory=dict)
    malignancy_median: float | None = None
    malignancy: int | None = None
    diameter_mm: float | None = None
    volume_mm3: float | None = None
    pixel_spacing_mm: float | None = None
    slice_thickness_mm: float | None = None
    histology: str | None = None
    split_hint: str | None = None  # a split given by the source (e.g. train/valid/test folders)
    label_check: str = "ok"
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def case_id(self) -> str:
        """Unique key: ``patient/nodule``."""
        return f"{self.patient_id}/{self.nodule_id}"

    @property
    def malignant(self) -> int | None:
        """1 for panel score 4-5, 0 for 1-3, None when unscored."""
        return None if self.malignancy is None else int(self.malignancy >= 4)

    @property
    def n_slices(self) -> int:
        if self.slices is not None:
            return int(self.slices.shape[0])
        return len(self.image_paths)

    @property
    def reader_spread(self) -> str:
        """The readers' scores as a clinician reads them, e.g. ``"3, 4, 5, 5"``."""
        return ", ".join(str(s) for s in sorted(self.reader_scores))

    def load_slices(self) -> np.ndarray:
        """All slices as ``(S, H, W) float32 in [0, 1]``."""
        if self.slices is not None:
            return self.slices
        from lungviz.data.io import load_gray

        return np.stack([load_gray(p) for p in self.image_paths])

    def load_slice(self, index: int) -> np.ndarray:
        """One slice as ``(H, W) float32 in [0, 1]``."""
        if self.slices is not None:
            return self.slices[index]
        from lungviz.data.io import load_gray

        return load_gray(self.image_paths[index])

    def middle_index(self) -> int:
        """The slice with the largest mask area when masks are known, else the middle slice."""
        if self.has_masks:
            areas = self.load_masks().reshape(self.n_slices, -1).sum(axis=1)
            return int(np.argmax(areas))
        return self.n_slices // 2

    @property
    def has_masks(self) -> bool:
        return self.masks is not None or bool(self.mask_paths) or bool(self.reader_mask_paths)

    def load_masks(self) -> np.ndarray | None:
        """Reader-consensus masks ``(S, H, W) float32 in [0, 1]`` (fraction of readers), or None."""
        if self.masks is not None:
            return self.masks
        from lungviz.data.io import load_raw_gray

        if self.reader_mask_paths:
            per_reader = [np.stack([load_raw_gray(p) > 0 for p in paths]) for paths in self.reader_mask_paths]
            return np.mean(np.stack(per_reader).astype(np.float32), axis=0)
        if not self.mask_paths:
            return None
        counts = np.stack([load_raw_gray(p) for p in self.mask_paths]).astype(np.float32)
        return np.clip(counts / max(self.n_readers, 1), 0.0, 1.0)


def data_fingerprint(cases: Iterable[Case]) -> str:
    """A short hash of the case ids, slice counts and labels, to tie a split or a model to its data."""
    h = hashlib.sha256()
    for c in sorted(cases, key=lambda c: c.case_id):
        h.update(f"{c.case_id}|{c.n_slices}|{c.malignancy}|{c.histology}|{c.reader_scores}\n".encode())
    return h.hexdigest()[:16]


def by_patient(cases: Iterable[Case]) -> dict[str, list[Case]]:
    """Group cases by patient id, preserving order."""
    out: dict[str, list[Case]] = {}
    for c in cases:
        out.setdefault(c.patient_id, []).append(c)
    return out
