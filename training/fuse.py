"""Train the two-view fused model: late fusion of the shipped slice and nodule models, fitted on validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lungviz import metrics, paths
from lungviz.fusion import SIZE_FEATURE, SIZE_SOURCES, fit_fusion
from lungviz.labels import get_scheme
from training.data import SliceStore
from training.datasets import load_cases
from training.evaluate import (
    calibrated_logits,
    fusion_features,
    read_any_spec,
    report_from_logits,
    select_split,
    selection_score,
)


def train_fusion(task: str = "binary", weights: str = "", n_boot: int = 1000, progress: bool = True,
                 size: bool = True, size_source: str = "outliner") -> dict:
    """Fit ``fused-<task>`` from ``slice-<task>`` and ``nodule-<task>`` (and, with ``size``, the nodule's diameter
    measured on the image by ``size_source``: the outliner or the finder) on the validation split; test once."""
    folder = Path(weights) if weights else paths.weights_dir()
    components = [f"slice-{task}", f"nodule-{task}"]
    specs = [read_any_spec(folder, c) for c in components]
    fingerprint = specs[0]["split_fingerprint"]
    if any(s["split_fingerprint"] != fingerprint for s in specs):
        raise ValueError("the two view models were trained on different splits")
    scheme = get_scheme(task)
    names = [SIZE_FEATURE] if size else []
    cases, _ = load_cases("lidc")
    parts, stores = {}, {}
    for split in ("val", "test"):
        pairs = scheme.labelled(select_split(cases, split, fingerprint))
        kept = [c for c, _ in pairs]
        store = stores[split] = SliceStore(kept, progress=progress)
        outs = [calibrated_logits(folder, c, store, np.arange(len(kept))) for c in components]
        feats = fusion_features(names, folder, store, np.arange(len(kept)), source=size_source) if names else None
        parts[split] = (kept, np.array([y for _, y in pairs]), [o[0] for o in outs], [o[1] for o in outs], feats)
    kept, y, cal, _, feats = parts["val"]
    fusion = fit_fusion(["slice", "nodule"], cal, y, features=feats, feature_names=names, size_source=size_source)
    # What the features add, on validation (the split the choice is made on): the same fusion without them.
    views_only = fit_fusion(["slice", "nodule"], cal, y).logits(cal)
    val_views_only = float(selection_score(y, views_only, scheme))
    reports = {}
    for split in ("val", "test"):
        kept, y, cal, raw, feats = parts[split]
        reports[split] = report_from_logits(y, fusion.logits(cal, feats), np.mean(raw, axis=0), scheme,
                                            [c.patient_id for c in kept], [c.reader_scores for c in kept],
                                            n_boot if split == "test" else 200)
    # What the app sees: the middle slice only (views and size measured on it).
    kept, y, _, _, _ = parts["test"]
    every = np.arange(len(kept))
    single = [calibrated_logits(folder, c, stores["test"], every, central=0.0) for c in components]
    feats = fusion_features(names, folder, stores["test"], every, 0.0, source=size_source) if names else None
    reports["test_single_slice"] = report_from_logits(y, fusion.logits([o[0] for o in single], feats),
                                                      np.mean([o[1] for o in single], axis=0), scheme,
                                                      [c.patient_id for c in kept], None, 200)
    # The image-measured size alone (no malignancy CNN), for binary: what the views add beyond it.
    size_only = {}
    if names and scheme.positive_class is not None:
        columns = {"val": parts["val"][4], "test": parts["test"][4], "test_single_slice": feats}
        for name, f in columns.items():
            split_kept, split_y = parts[name.split("_")[0]][:2]
            size_only[name] = metrics.score_auroc(split_y == scheme.positive_class, f[:, 0],
                                                  [c.patient_id for c in split_kept], n_boot if name == "test" else 200)
    # The measurement against the readers' diameter (a label, never an input), on one middle slice as the app sees.
    size_vs_readers = metrics.ratio_by_band(np.exp(feats[:, 0]), np.array(
        [c.diameter_mm if c.diameter_mm else np.nan for c in parts["test"][0]])) if names else []
    spec = {"kind": "fusion", "view": "fused", "task": task, "classes": list(scheme.classes),
            "components": components, "fusion": fusion.to_dict(), "split_fingerprint": fingerprint,
            "dataset": "lidc", "metrics": reports, "size_only_auroc": size_only,
            "size_vs_readers_test": size_vs_readers,
            "training": {"method": "late fusion: per-view weight x calibrated logits + class bias"
                                   + (" + per-class weights x the log of the nodule diameter measured on the image "
                                      f"by {SIZE_SOURCES[size_source]} (central half of the slices)" if names else "")
                                   + ", maximum likelihood on the validation split", "n_val": len(parts["val"][0]),
                         "n_test": len(parts["test"][0]), "features": names,
                         "val_score_views_only": val_views_only,
                         "val_score": float(selection_score(parts["val"][1], fusion.logits(parts["val"][2],
                                                                                           parts["val"][4]), scheme))}}
    path = folder / f"fused-{task}.json"
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return spec
