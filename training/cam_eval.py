"""Does the map point at the nodule? Grad-CAM peak and mass inside the readers' consensus mask, test split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lungviz import paths
from lungviz.explain import cam, cam_in_mask
from lungviz.models import load_bundle
from lungviz.preprocess import view_from_context
from training.data import central_slices, view_config_from_spec
from training.datasets import load_cases
from training.evaluate import select_split

LIDC_MODELS = ("nodule-binary", "nodule-score", "slice-binary", "slice-score")


def cam_localisation(models: tuple[str, ...] = LIDC_MODELS, split: str = "test", method: str = "gradcam",
                     out: str = "", progress: bool = True) -> dict:
    """For each model: on the middle slice of every nodule of ``split``, whether the CAM peak lies inside the
    readers' 50 % consensus mask, and the share of CAM mass inside it (chance = the mask's share of the view)."""
    folder = paths.weights_dir()
    cases, _ = load_cases("lidc")
    results = {}
    for name in models:
        if not (folder / f"{name}.json").is_file():
            continue
        bundle = load_bundle(folder, name)
        vc = view_config_from_spec(bundle.spec)
        sel = [c for c in select_split(cases, split, bundle.spec.get("split_fingerprint")) if c.has_masks]
        peaks, masses, areas = [], [], []
        for c in tqdm(sel, desc=f"cam {name}", disable=not progress, unit="nodule"):
            k = central_slices(c.n_slices, 0, 0.0)[0]
            ctx, mask = c.load_slice(k), c.load_masks()[k]
            view = view_from_context(ctx, vc.view, vc.input_size, c.pixel_spacing_mm, vc.field_mm)
            mview = view_from_context(mask, vc.view, vc.input_size, c.pixel_spacing_mm, vc.field_mm)
            if mview.max() < 0.5:
                continue  # no 50 % consensus pixel on this slice
            heat = cam(bundle.model, view, bundle.mean, bundle.std, method,
                       prior_adjust=bundle.spec.get("prior_adjust"))
            r = cam_in_mask(heat, mview >= 0.5)
            peaks.append(r["peak_inside"])
            masses.append(r["mass_inside"])
            areas.append(r["mask_fraction"])
        results[name] = {"n": len(peaks), "peak_inside": float(np.mean(peaks)), "mass_inside": float(np.mean(masses)),
                         "mask_area": float(np.mean(areas))}
    report = {"split": split, "method": f"{method} on the middle slice of each nodule; mask = pixels drawn by at "
                                        "least half of the readers, in the model's view; chance level of the mass "
                                        "share = the mask's share of the view.", "models": results}
    path = Path(out) if out else folder / "cam_localisation.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    return report
