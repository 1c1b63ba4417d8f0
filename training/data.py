"""Training data: every slice of every nodule in memory, balanced epoch plans, and batches of model inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from lungviz.data.cases import CHARACTERISTICS, Case
from lungviz.data.labels import LabelScheme
from lungviz.data.preprocess import to_model_input, view_from_context
from lungviz.models import ModelSpec, spec_dict
from training.augment import AugmentConfig, augment, augment_pair


@dataclass
class ViewConfig:
    """How a case's stored context crop becomes a model input (read from the bundle spec downstream)."""

    view: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    field_mm: float | None = None
    central_fraction: float = 1.0  # evaluate on the central share of a nodule's slices (by position)


class SliceStore:
    """All slices of a list of cases, held as ``uint8`` stacks (about 16 KB per 128 px slice)."""

    def __init__(self, cases: Sequence[Case], progress: bool = True, masks: bool = False) -> None:
        self.cases = list(cases)
        self.stacks: list[np.ndarray] = []
        self.masks: list[np.ndarray | None] = []  # readers' consensus per slice (fraction x 255), when asked for
        for c in tqdm(self.cases, desc="loading slices", unit="case", disable=not progress):
            self.stacks.append(np.round(c.load_slices() * 255.0).astype(np.uint8))
            m = c.load_masks() if masks else None
            self.masks.append(None if m is None else np.round(m * 255.0).astype(np.uint8))

    def __len__(self) -> int:
        return len(self.cases)

    def slice01(self, case_index: int, slice_index: int) -> np.ndarray:
        """One slice as ``(H, W) float32 in [0, 1]``."""
        return self.stacks[case_index][slice_index].astype(np.float32) / 255.0

    def mask01(self, case_index: int, slice_index: int) -> np.ndarray:
        """The readers' consensus on one slice, ``(H, W) float32`` fraction of readers (zeros when unknown)."""
        m = self.masks[case_index] if self.masks else None
        if m is None:
            return np.zeros_like(self.slice01(case_index, slice_index))
        return m[slice_index].astype(np.float32) / 255.0

    def n_slices(self, case_index: int) -> int:
        return int(self.stacks[case_index].shape[0])

    def eval_slices(self, case_index: int, max_slices: int = 0, central: float = 1.0) -> list[int]:
        """Slices used to evaluate a nodule: those in the central ``central`` share of its z range (by
        position only, no reader mask), thinned to ``max_slices`` evenly spaced ones when set."""
        return central_slices(self.n_slices(case_index), max_slices, central)

    def train_slice(self, case_index: int, rng: np.random.Generator) -> int:
        """A random slice, favouring the nodule's centre (triangular weights; edge slices keep some weight)."""
        n = self.n_slices(case_index)
        if n <= 2:
            return int(rng.integers(n))
        return int(rng.choice(n, p=centre_weights(n)))


def centre_weights(n: int) -> np.ndarray:
    """Probabilities over ``n`` ordered slices favouring the middle (triangular; the ends keep some weight)."""
    w = 1.0 - np.abs(np.arange(n) - (n - 1) / 2.0) / (n / 2.0 + 1.0)
    return w / w.sum()


def central_slices(n: int, max_slices: int = 0, central: float = 1.0) -> list[int]:
    """Indices of the central ``central`` share of ``n`` slices (at least the middle one), optionally thinned."""
    keep = max(1, int(np.ceil(n * min(max(central, 0.0), 1.0))))
    start = (n - keep) // 2
    idx = list(range(start, start + keep))
    if max_slices and len(idx) > max_slices:
        idx = sorted({idx[int(round(v))] for v in np.linspace(0, len(idx) - 1, max_slices)})
    return idx


def epoch_plan(
    labels: np.ndarray, rng: np.random.Generator, balance: str = "upsample", extra: int = 200, max_samples: int = 0
) -> np.ndarray:
    """Case indices for one epoch.

    ``upsample`` (as published): every class is brought to the size of the largest class + ``extra`` —
    each case of a class at least once, topped up with random repeats (augmentation makes them differ).
    ``none``: each case once (use with a weighted loss). ``max_samples`` caps the epoch with a uniform
    subsample of the plan, which keeps the class balance.
    """
    labels = np.asarray(labels)
    if balance == "upsample":
        classes, counts = np.unique(labels, return_counts=True)
        target = int(counts.max()) + extra
        parts = []
        for c in classes:
            members = np.flatnonzero(labels == c)
            reps = target // len(members)
            parts.append(np.concatenate([np.tile(members, reps), rng.choice(members, target - reps * len(members))]))
        plan = np.concatenate(parts)
    elif balance == "none":
        plan = np.arange(len(labels))
    else:
        raise ValueError(f"unknown balance '{balance}'")
    plan = rng.permutation(plan)
    if max_samples and len(plan) > max_samples:
        plan = plan[:max_samples]
    return plan


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency class weights normalised to mean 1 (for the weighted-loss alternative)."""
    counts = np.bincount(np.asarray(labels), minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0)
    return (w / w[counts > 0].mean()).astype(np.float32)


def make_input(
    store: SliceStore,
    case_index: int,
    slice_index: int,
    vc: ViewConfig,
    rng: np.random.Generator | None = None,
    aug: AugmentConfig | None = None,
) -> np.ndarray:
    """One model input ``(C, S, S) float32``: optional augmentation of the context crop, then the view."""
    ctx = store.slice01(case_index, slice_index)
    if rng is not None and aug is not None:
        ctx = augment(ctx, rng, aug)
    spacing = store.cases[case_index].pixel_spacing_mm
    view = view_from_context(ctx, vc.view, vc.input_size, spacing, vc.field_mm)
    return to_model_input(view, vc.mean, vc.std)


def train_batch(
    store: SliceStore, case_indices: np.ndarray, vc: ViewConfig, rng: np.random.Generator, aug: AugmentConfig
) -> np.ndarray:
    """A batch of augmented inputs, one random slice of each listed case."""
    return np.stack([make_input(store, int(i), store.train_slice(int(i), rng), vc, rng, aug) for i in case_indices])


def train_batch_with_masks(
    store: SliceStore, case_indices: np.ndarray, labels: np.ndarray, vc: ViewConfig, rng: np.random.Generator,
    aug: AugmentConfig, grid: int,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`train_batch` plus, per input, the readers' consensus mask in the same augmented view averaged to
    ``grid x grid`` cells: targets ``(N, 1 + grid**2) float32`` = (class label, mask cells row by row)."""
    xs, ys = [], []
    for i, y in zip(case_indices, labels, strict=True):
        i = int(i)
        k = store.train_slice(i, rng)
        ctx, mask = augment_pair(store.slice01(i, k), store.mask01(i, k), rng, aug)
        spacing = store.cases[i].pixel_spacing_mm
        view = view_from_context(ctx, vc.view, vc.input_size, spacing, vc.field_mm)
        mview = view_from_context(mask, vc.view, vc.input_size, spacing, vc.field_mm)
        cell = vc.input_size // grid
        cells = mview[: grid * cell, : grid * cell].reshape(grid, cell, grid, cell).mean(axis=(1, 3))
        xs.append(to_model_input(view, vc.mean, vc.std))
        ys.append(np.concatenate([[float(y)], cells.ravel()]).astype(np.float32))
    return np.stack(xs), np.stack(ys)


def view_config_from_spec(spec: ModelSpec | dict) -> ViewConfig:
    """The input pipeline a bundle was trained with, read from its spec (never retyped)."""
    spec = spec_dict(spec)
    pre = spec.get("preprocessing", {})
    return ViewConfig(str(spec["view"]), int(spec["input_size"]), tuple(spec["mean"]), tuple(spec["std"]),
                      pre.get("field_mm") if spec["view"] == "nodule" else None,
                      float(pre.get("central_fraction", 1.0)))


def attribute_targets(cases: Sequence[Case], train_idx: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """The readers' median characteristics and log diameter per case, standardised on the training cases (missing
    = the training mean, 0): ``(N, A) float32`` auxiliary targets (training only, never a model input)."""
    names = (*CHARACTERISTICS, "log_diameter_mm")
    raw = np.array([[c.characteristics.get(k, np.nan) for k in CHARACTERISTICS]
                    + [np.log(c.diameter_mm) if c.diameter_mm and c.diameter_mm > 0 else np.nan] for c in cases],
                   np.float64)
    train = raw[np.asarray(train_idx, int)]
    mean = np.nanmean(train, axis=0)
    std = np.nanstd(train, axis=0)
    z = (raw - mean) / np.where(std > 0, std, 1.0)
    return np.nan_to_num(z, nan=0.0).astype(np.float32), names


def reader_targets(cases: Sequence[Case], labels: np.ndarray, scheme: LabelScheme, weight: float) -> np.ndarray:
    """Soft class targets ``(N, C) float32``: ``(1 - weight)`` x the panel's class + ``weight`` x the share of the
    readers who rated the nodule into each class (``binary``: 1-3 / 4-5; ``score``: 1..5). A case without reader
    scores (or another scheme) keeps its one-hot label. Training only; the panel label stays the evaluation truth."""
    n_classes = scheme.n_classes
    out = np.eye(n_classes, dtype=np.float32)[np.asarray(labels, int)]
    for i, c in enumerate(cases):
        scores = [int(s) for s in c.reader_scores if 1 <= int(s) <= 5]
        if not scores or scheme.name not in ("binary", "score"):
            continue
        cls = [int(s >= 4) for s in scores] if scheme.name == "binary" else [s - 1 for s in scores]
        share = np.bincount(cls, minlength=n_classes)[:n_classes] / len(cls)
        out[i] = (1.0 - weight) * out[i] + weight * share
    return out
