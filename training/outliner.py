"""Train the nodule outliner: a segmenter of the readers' outline on the nodule view, and its honest report.

Targets are the readers' consensus masks of the slices set (``union``: inside any reader's outline; ``half``: at
least half of them). Train fits, validation picks the epoch (mean Dice), test is reported once: Dice, the measured
diameter against the readers' own, and how well the measured size alone separates malignant from benign.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from lungviz import metrics, paths
from lungviz.models import Bundle, ModelSpec, create_model, resolve_device, round_to_storage, save_bundle
from lungviz.outline import OUTLINER, THRESHOLD, measure_views, view_mm_per_px
from lungviz.preprocess import to_model_input, view_from_context
from training.augment import AugmentConfig, augment_pair
from training.config import OutlinerConfig
from training.data import SliceStore, central_slices
from training.datasets import load_cases
from training.loop import LoopConfig, fit, seed_everything
from training.train import split_for

if TYPE_CHECKING:
    from lungviz.cases import Case
    from lungviz.splits import Split

log = logging.getLogger("training")


class OutlineLoss(nn.Module):
    """Binary cross-entropy + soft Dice of per-pixel logits ``(N, 1, S, S)`` against targets ``(N, S, S)``."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z = logits[:, 0].float()
        p = torch.sigmoid(z)
        inter = (p * target).sum(dim=(1, 2))
        dice = 1.0 - (2.0 * inter + 1.0) / (p.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + 1.0)
        return nn.functional.binary_cross_entropy_with_logits(z, target) + dice.mean()


def outline_target(consensus: np.ndarray, target: str) -> np.ndarray:
    """The readers' consensus (fraction of readers per pixel) -> a binary target mask ``float32``."""
    if target == "union":
        return (consensus > 0.0).astype(np.float32)
    if target == "half":
        return (consensus >= 0.5).astype(np.float32)
    raise ValueError(f"unknown outline target '{target}' (union | half)")


def _views(store: SliceStore, ci: int, k: int, cfg: OutlinerConfig, rng: np.random.Generator | None = None,
           aug: AugmentConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One slice's outliner view and its target in the same (optionally augmented) geometry."""
    img, mask = store.slice01(ci, k), store.mask01(ci, k)
    if rng is not None and aug is not None:
        img, mask = augment_pair(img, mask, rng, aug)
    spacing = store.cases[ci].pixel_spacing_mm
    view = view_from_context(img, "nodule", cfg.input_size, spacing, cfg.field_mm)
    mview = view_from_context(mask, "nodule", cfg.input_size, spacing, cfg.field_mm)
    return view, outline_target(mview, cfg.target)


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    p, t = np.asarray(pred, bool), np.asarray(target, bool)
    total = p.sum() + t.sum()
    return 1.0 if total == 0 else float(2.0 * (p & t).sum() / total)


def measure_nodules(bundle: Bundle, store: SliceStore, cfg: OutlinerConfig, central: float = 0.5,
                    max_slices: int = 0) -> dict[str, np.ndarray]:
    """Per nodule, over the central share of its slices (0 = the middle one): the mean measured diameter (mm), the
    mean Dice against the target, and the same-area diameter of the target itself."""
    out: dict[str, list[float]] = {"diameter_mm": [], "dice": [], "target_diameter_mm": []}
    for ci in range(len(store)):
        ks = central_slices(store.n_slices(ci), max_slices, central)
        views, targets = zip(*(_views(store, ci, k, cfg) for k in ks), strict=True)
        mm_px = view_mm_per_px(bundle, store.cases[ci].pixel_spacing_mm)
        _, masks, diam = measure_views(bundle, np.stack(views), mm_px)
        out["diameter_mm"].append(float(np.mean(diam)))
        out["dice"].append(float(np.mean([dice(m, t > 0.5) for m, t in zip(masks, targets, strict=True)])))
        area = np.array([t.sum() for t in targets]) * mm_px**2
        out["target_diameter_mm"].append(float(np.mean(2.0 * np.sqrt(area / np.pi))))
    return {k: np.asarray(v) for k, v in out.items()}


def outliner_report(bundle: Bundle, store: SliceStore, cfg: OutlinerConfig, n_boot: int,
                    central: float = 0.5) -> dict:
    """Dice (patient-bootstrap interval), the measured diameter against the readers' and the size-only AUROC."""
    m = measure_nodules(bundle, store, cfg, central)
    groups = [c.patient_id for c in store.cases]
    ci = metrics.bootstrap_ci(lambda i: {"dice": float(np.mean(m["dice"][i]))}, len(store), groups, n_boot)
    readers = np.array([c.diameter_mm if c.diameter_mm else np.nan for c in store.cases])
    known = np.isfinite(readers) & (readers > 0)
    malignant = np.array([c.malignant if c.malignant is not None else -1 for c in store.cases])
    labelled = malignant >= 0
    rep = {"n": len(store), "dice": float(np.mean(m["dice"])), "ci95": ci,
           "diameter_median_mm": float(np.median(m["diameter_mm"])),
           "ratio_to_readers_median": float(np.median(m["diameter_mm"][known] / readers[known])),
           "ratio_to_target_median": float(np.median(m["diameter_mm"] / np.maximum(m["target_diameter_mm"], 1e-6))),
           "abs_error_vs_target_mm_median": float(np.median(np.abs(m["diameter_mm"] - m["target_diameter_mm"]))),
           "by_size_vs_readers": metrics.ratio_by_band(m["diameter_mm"], readers)}
    if labelled.any():
        rep["size_auroc"] = metrics.score_auroc(malignant[labelled], m["diameter_mm"][labelled],
                                                [g for g, keep in zip(groups, labelled, strict=True) if keep], n_boot)
    return rep


def outlined_splits(data: str, what: str, progress: bool = True
                    ) -> tuple[Split, dict[str, list[Case]], dict[str, SliceStore]]:
    """The nodules with the readers' outlines, split by patient (the shipped split), and each split's slices and
    masks in memory."""
    cases, report = load_cases("lidc", data)
    split = split_for(cases, data=data)
    parts = {n: [c for c in split.select(cases, n) if c.has_masks] for n in ("train", "val", "test")}
    log.info("%s: %s; train %d, val %d, test %d nodules", what, report.summary(), *(len(parts[n]) for n in parts))
    return split, parts, {n: SliceStore(parts[n], progress=progress, masks=True) for n in parts}


def train_outliner(cfg: OutlinerConfig, progress: bool = True) -> dict:
    """Train, select on validation, report on test and save the ``outliner`` bundle (weights/ by default)."""
    t_start = time.perf_counter()
    split, parts, stores = outlined_splits(cfg.data, OUTLINER, progress)
    device = resolve_device()
    seed_everything(cfg.seed)
    model = create_model(cfg.arch, 1, pretrained=cfg.pretrained)
    spec = ModelSpec.from_model(model, classes=["nodule"], view="nodule", task="outline", input_size=cfg.input_size,
                                preprocessing={"view": "nodule", "field_mm": cfg.field_mm, "context_px": 128,
                                               "context_intensity": "minmax", "threshold": THRESHOLD,
                                               "target": cfg.target})
    loop = LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, layer_decay=cfg.layer_decay,
                      weight_decay=cfg.weight_decay, stages=(), stage_groups=(0,), balance="none",
                      epoch_samples=cfg.epoch_samples, patience=cfg.patience, seed=cfg.seed)
    train = stores["train"]

    def batch_fn(items: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for ci in items:
            view, target = _views(train, int(ci), train.train_slice(int(ci), rng), cfg, rng, loop.aug)
            xs.append(to_model_input(view, spec.mean, spec.std, model.in_chans))
            ys.append(target)
        return np.stack(xs), np.stack(ys)

    def as_bundle(m: nn.Module) -> Bundle:
        return Bundle(model=m, spec=spec.to_dict(), name=OUTLINER, folder=Path("."), device=device)  # type: ignore[arg-type]

    def validate(m: nn.Module) -> float:
        m.eval()
        score = float(np.mean(measure_nodules(as_bundle(m), stores["val"], cfg, max_slices=cfg.val_slices)["dice"]))
        m.train()
        return score

    run = fit(model, None, np.arange(len(train)), np.zeros(len(train), int), None, loop, device, validate, progress,
              batch_fn=batch_fn, loss_fn=OutlineLoss())
    round_to_storage(model)  # every figure below is that of the stored weights
    bundle = as_bundle(model)
    reports = {"val": outliner_report(bundle, stores["val"], cfg, 200),
               "test": outliner_report(bundle, stores["test"], cfg, cfg.n_boot),
               "test_single_slice": outliner_report(bundle, stores["test"], cfg, 200, central=0.0)}
    final = ModelSpec.from_dict({**spec.to_dict(), "metrics": reports,
                                 "training": {**dataclasses.asdict(cfg), **{k: v for k, v in run.items()
                                                                            if k != "history"},
                                              "history": run["history"],
                                              "total_seconds": time.perf_counter() - t_start,
                                              "n_train": len(parts["train"]), "n_val": len(parts["val"]),
                                              "n_test": len(parts["test"])},
                                 "split_fingerprint": split.fingerprint})
    out = Path(cfg.out) if cfg.out else paths.weights_dir()
    return save_bundle(model, final, out, OUTLINER)
