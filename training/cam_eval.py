"""Does the map point at the nodule? Grad-CAM peak and mass inside the readers' consensus mask.

Each model's Grad-CAM layer is chosen on the validation split (the layer whose map puts the most mass inside the
readers' outline) and written into its spec as ``cam_layer``; the test split is only used to report the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lungviz import paths
from lungviz.explain import cam, cam_in_mask
from lungviz.models import Bundle, load_bundle, stage_shapes, update_spec
from lungviz.preprocess import view_from_context
from training.data import central_slices, view_config_from_spec
from training.datasets import load_cases
from training.evaluate import select_split

LIDC_MODELS = ("nodule-binary", "nodule-score", "slice-binary", "slice-score")
#: Coarsest useful map: layers with an output stride above 32 or below 8 are not tried.
MIN_STRIDE, MAX_STRIDE = 8, 32


def cam_layer_candidates(bundle: Bundle) -> list[str]:
    """Layers a Grad-CAM can be taken on: each stage of the backbone with output stride 8-32, then the last one."""
    size = bundle.input_size
    keep = [n for n, shape in stage_shapes(bundle.model, size).items()
            if MIN_STRIDE <= size // max(1, shape[-1]) <= MAX_STRIDE]
    last = bundle.model.feature_layer_name
    return keep if last in keep else [*keep, last]


def _views(bundle: Bundle, cases: list) -> list[tuple[np.ndarray, np.ndarray]]:
    """(view, consensus mask in the view) for the middle slice of each case with a 50 % consensus pixel on it."""
    vc = view_config_from_spec(bundle.spec)
    out = []
    for c in cases:
        k = central_slices(c.n_slices, 0, 0.0)[0]
        ctx, mask = c.load_slice(k), c.load_masks()[k]
        view = view_from_context(ctx, vc.view, vc.input_size, c.pixel_spacing_mm, vc.field_mm)
        mview = view_from_context(mask, vc.view, vc.input_size, c.pixel_spacing_mm, vc.field_mm)
        if mview.max() >= 0.5:
            out.append((view, mview >= 0.5))
    return out


def _localisation(bundle: Bundle, views: list[tuple[np.ndarray, np.ndarray]], layer: str | None, method: str,
                  progress: bool, what: str) -> dict:
    """Mean peak-inside rate, CAM mass inside the mask and mask share over ``views`` for one layer."""
    rows = []
    for view, mask in tqdm(views, desc=what, disable=not progress, unit="nodule"):
        heat = cam(bundle.model, view, bundle.mean, bundle.std, method,
                   prior_adjust=bundle.spec.get("prior_adjust"), layer=layer)
        r = cam_in_mask(heat, mask)
        rows.append((r["peak_inside"], r["mass_inside"], r["mask_fraction"]))
    a = np.asarray(rows, np.float64).reshape(-1, 3)
    return {"layer": layer or bundle.model.feature_layer_name, "n": len(rows),
            "peak_inside": float(a[:, 0].mean()) if len(a) else float("nan"),
            "mass_inside": float(a[:, 1].mean()) if len(a) else float("nan"),
            "mask_area": float(a[:, 2].mean()) if len(a) else float("nan")}


def cam_localisation(models: tuple[str, ...] = LIDC_MODELS, method: str = "gradcam", choose: bool = True,
                     out: str = "", progress: bool = True) -> dict:
    """Choose each model's CAM layer on validation (``choose``), then report test localisation for it and for the
    model's last feature layer (the usual Grad-CAM target) side by side; writes ``cam_localisation.json``."""
    folder = paths.weights_dir()
    cases, _ = load_cases("lidc")
    results, selection = {}, {}
    for name in models:
        if not (folder / f"{name}.json").is_file():
            continue
        bundle = load_bundle(folder, name)
        if choose:
            val = _views(bundle, [c for c in select_split(cases, "val", bundle.spec, folder) if c.has_masks])
            tried = [_localisation(bundle, val, layer, method, progress, f"val {name} {layer}")
                     for layer in cam_layer_candidates(bundle)]
            best = max(tried, key=lambda r: (r["mass_inside"], r["peak_inside"]))
            selection[name] = {"chosen": best["layer"], "val": tried}
            update_spec(folder, name, cam_layer=best["layer"])
            bundle = load_bundle(folder, name)
        test = _views(bundle, [c for c in select_split(cases, "test", bundle.spec, folder) if c.has_masks])
        chosen = _localisation(bundle, test, bundle.cam_layer, method, progress, f"test {name}")
        last = (chosen if chosen["layer"] == bundle.model.feature_layer_name else
                _localisation(bundle, test, None, method, progress, f"test {name} last layer"))
        results[name] = {**chosen, "last_layer": last}
    report = {"split": "test",
              "method": f"{method} on the middle slice of each nodule, on each model's chosen layer; mask = pixels "
                        "drawn by at least half of the readers, in the model's view; chance level of the mass share "
                        "= the mask's share of the view. The layer of each model was chosen on the validation "
                        "split (most CAM mass inside the mask); the last feature layer is shown for comparison.",
              "models": results, "selection": selection}
    path = Path(out) if out else folder / "cam_localisation.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    return report
