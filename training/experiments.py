"""Backbone screening and k-fold cross-validation, on short budgets, for the model card."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from lungviz import paths
from lungviz.splits import Split
from training.train import TrainConfig, fold_split, train_model

PUBLISHED_SCREEN = ("cnn4", "tf_efficientnet_lite0", "tf_efficientnet_lite2")


def screen_backbones(base: TrainConfig, archs: tuple[str, ...] = PUBLISHED_SCREEN, out: str = "") -> dict:
    """Train ``base`` once per backbone; compare on the validation split only (test stays untouched)."""
    rows = []
    for arch in archs:
        cfg = dataclasses.replace(base, name=f"screen-{arch}", arch=arch, pretrained=arch != "cnn4",
                                  runs=str(paths.runs_dir() / "screen" / arch), n_boot=200)
        t0 = time.perf_counter()
        spec = train_model(cfg, save=False)
        val = spec["metrics"]["val"]
        rows.append({"arch": arch, "pretrained": cfg.pretrained, "val_auroc": val["auroc"],
                     "val_auroc_ci95": val["ci95"].get("auroc"), "val_f1_malignant": val.get("f1_malignant"),
                     "best_epoch": spec["training"]["best_epoch"], "seconds": time.perf_counter() - t0,
                     "images_per_second": spec["training"]["images_per_second"]})
    result = {"setup": {k: v for k, v in dataclasses.asdict(base).items() if k not in ("name", "arch", "runs")},
              "selection": "validation split AUROC", "results": rows}
    path = Path(out) if out else paths.weights_dir() / "screen.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def cross_validate(base: TrainConfig, k: int = 5, out: str = "") -> dict:
    """Patient-level k-fold CV: each fold is the test set once (the next fold validates)."""
    folds = Split.load(paths.weights_dir() / "splits" / f"kfold{k}.json")
    rows = []
    for r in range(k):
        cfg = dataclasses.replace(base, name=f"cv-{r}", runs=str(paths.runs_dir() / "cv" / str(r)), n_boot=200)
        t0 = time.perf_counter()
        spec = train_model(cfg, split=fold_split(folds, r), save=False)
        test = spec["metrics"]["test"]
        rows.append({"fold": r, "n_test": test["n"], "auroc": test["auroc"], "f1_malignant": test.get("f1_malignant"),
                     "f1_weighted": test["f1_weighted"], "ece": test["ece"], "seconds": time.perf_counter() - t0})
    summary = {m: {"mean": float(np.mean([r[m] for r in rows])), "sd": float(np.std([r[m] for r in rows], ddof=1))}
               for m in ("auroc", "f1_malignant", "f1_weighted", "ece")}
    result = {"setup": {kk: v for kk, v in dataclasses.asdict(base).items() if kk not in ("name", "runs")},
              "k": k, "folds": rows, "summary": summary}
    path = Path(out) if out else paths.weights_dir() / "cv.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


#: Variations of one recipe tried against it on the validation split (``python -m training ablate``); each is a set of
#: :class:`TrainConfig` overrides. ``seed 1`` repeats the recipe itself, to show how much one seed moves the figures.
ABLATIONS: dict[str, dict] = {
    "recipe": {},
    "recipe, seed 1": {"seed": 1},
    "weight average (EMA 0.99)": {"ema": 0.99},
    "readers' votes as soft targets": {"soft_labels": 1.0},
    "regress the readers' characteristics (weight 0.5)": {"attr_weight": 0.5},
    "nodule view 24 mm": {"field_mm": 24.0},
    "nodule view 48 mm": {"field_mm": 48.0},
}


def ablate(base: TrainConfig, variants: dict[str, dict] | None = None, out: str = "") -> dict:
    """Train ``base`` and each variation of it; compare on the validation split only (test stays untouched)."""
    rows: list[dict] = []
    result = {"setup": {k: v for k, v in dataclasses.asdict(base).items() if k not in ("name", "runs")},
              "selection": "validation split, one training seed per row", "results": rows}
    path = Path(out) if out else paths.weights_dir() / "ablation.json"
    for label, overrides in (ABLATIONS if variants is None else variants).items():
        slug = "".join(ch if ch.isalnum() else "-" for ch in label.lower()).strip("-")
        cfg = dataclasses.replace(base, **overrides, name=f"ablate-{slug}",
                                  runs=str(paths.runs_dir() / "ablate" / slug), n_boot=200)
        t0 = time.perf_counter()
        spec = train_model(cfg, save=False)
        val = spec["metrics"]["val"]
        rows.append({"variant": label, "overrides": overrides, "val_auroc": val.get("auroc"),
                     "val_auroc_ci95": val["ci95"].get("auroc"), "val_f1_malignant": val.get("f1_malignant"),
                     "val_qwk": val.get("qwk"), "val_ece": val.get("ece"),
                     "best_epoch": spec["training"]["best_epoch"], "seconds": time.perf_counter() - t0})
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")  # after each row: an hour-long run
    return result
