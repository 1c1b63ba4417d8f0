"""Does the map point at the nodule, and follow it when the nodule moves? Grad-CAM against the readers' outline.

A centred view alone cannot tell: the readers' outline covers the centre pixel of the nodule view for nearly every
nodule, so a map that always peaks at the centre would look perfect. Each nodule's middle slice is therefore cut
twice, as the app cuts it (centred) and shifted: the nodule's centre moved a fixed share of the view's side in a
seeded random direction. A centred Gaussian (the centre prior) is scored beside each map as the baseline a real map
must beat. ``mass_inside`` is the map's share inside the outline (consensus >= 50%) dilated by 3 mm, and
``mask_area`` that dilated outline's share of the view (the chance level of ``mass_inside``).
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_dilation
from tqdm import tqdm

from lungviz import paths
from lungviz.data.cases import Case
from lungviz.data.preprocess import crop_around, mm_to_px, pad_to_square, resize
from lungviz.errors import LungvizError
from lungviz.explain import cam, cam_in_mask
from lungviz.inference.nodule import read_slices
from lungviz.models import Bundle, NoduleNet, load_bundle, stage_shapes, update_spec
from training.data import ViewConfig, central_slices, view_config_from_spec
from training.datasets import load_cases
from training.evaluate import select_split

LIDC_MODELS = ("nodule", "slice-binary", "slice-score")
#: Coarsest useful map: layers with an output stride above 32 or below 8 are not tried.
MIN_STRIDE, MAX_STRIDE = 8, 32
#: The nodule's centre moves this share of the view's side in the shifted view.
SHIFT = 0.25
#: The outline is widened by this margin for ``mass_inside`` (a map on the nodule's edge still points at it).
MARGIN_MM = 3.0
#: The centre prior: a centred Gaussian whose sigma is this share of the view's side.
PRIOR_SIGMA = 0.125


@dataclass(frozen=True)
class LocView:
    """One nodule view with its outline: ``image`` ``(S, S) float32 in [0, 1]``, ``outline`` ``(S, S) bool``
    (consensus >= 50%), ``near`` the outline dilated by :data:`MARGIN_MM`; ``kept`` the share of the centred view's
    outline still inside this view (1.0 when the nodule stayed inside)."""

    case_id: str
    image: np.ndarray
    outline: np.ndarray
    near: np.ndarray
    kept: float


def shift_direction(case_id: str, seed: int = 0) -> tuple[float, float]:
    """A unit (row, col) direction fixed by the nodule's name and ``seed``: the same on every run and machine."""
    rng = np.random.default_rng([zlib.crc32(case_id.encode()), seed])
    angle = float(rng.uniform(0.0, 2.0 * np.pi))
    return float(np.sin(angle)), float(np.cos(angle))


def cut_view(context: np.ndarray, vc: ViewConfig, spacing_mm: float | None, offset: tuple[float, float],
             fill: float | None = None) -> np.ndarray:
    """The model view of a nodule-centred context crop ``(H, W)`` whose window centre is moved by ``offset`` (a share
    of the view's side, (row, col)), so the nodule sits at ``-offset`` from the view's centre; ``(0, 0)`` gives
    the view the app cuts. Returns ``(input_size, input_size) float32``."""
    a = pad_to_square(np.asarray(context, np.float32), fill)
    h = a.shape[0]
    side = h if vc.view == "slice" else mm_to_px(float(vc.field_mm or 32.0), spacing_mm)
    centre = (h / 2.0 + offset[0] * side, h / 2.0 + offset[1] * side)
    return resize(crop_around(a, centre, side, fill), vc.input_size)


def localisation_views(case: Case, vc: ViewConfig, shift: float = SHIFT,
                       seed: int = 0) -> tuple[LocView, LocView] | None:
    """The centred and the shifted view of a nodule's middle slice, or None when no pixel of it reaches 50%
    consensus in the centred view."""
    k = central_slices(case.n_slices, 0, 0.0)[0]
    ctx, mask = case.load_slice(k), case.load_masks()[k]
    field = vc.input_size if vc.view == "slice" else float(vc.field_mm or 32.0)
    mm_per_px = (max(mask.shape) * float(case.pixel_spacing_mm or 0.7) if vc.view == "slice" else field) / vc.input_size
    radius = max(1, int(round(MARGIN_MM / mm_per_px)))
    direction = shift_direction(case.case_id, seed)
    out = []
    for offset in ((0.0, 0.0), (-direction[0] * shift, -direction[1] * shift)):
        image = cut_view(ctx, vc, case.pixel_spacing_mm, offset)
        outline = cut_view(mask, vc, case.pixel_spacing_mm, offset, fill=0.0) >= 0.5
        out.append((image, outline))
    if not out[0][1].any():
        return None
    full = float(out[0][1].sum())
    return tuple(LocView(case.case_id, image, outline, binary_dilation(outline, iterations=radius),
                         float(outline.sum()) / full) for image, outline in out)  # type: ignore[return-value]


def centre_prior(side: int) -> np.ndarray:
    """The baseline map: a centred Gaussian, ``(side, side) float32``."""
    r = np.arange(side, dtype=np.float32) - (side - 1) / 2.0
    s = PRIOR_SIGMA * side
    return np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2.0 * s * s)).astype(np.float32)


def score_map(heat: np.ndarray, view: LocView) -> tuple[float, float, float]:
    """(peak inside the outline, mass inside the dilated outline, the dilated outline's share of the view)."""
    peak = bool(cam_in_mask(heat, view.outline)["peak_inside"])
    near = cam_in_mask(heat, view.near)
    return float(peak), float(near["mass_inside"]), float(near["mask_fraction"])


def _block(rows: list[tuple[float, float, float]], prior: list[tuple[float, float, float]], kept: list[float]) -> dict:
    a = np.asarray(rows, np.float64).reshape(-1, 3)
    p = np.asarray(prior, np.float64).reshape(-1, 3)

    def mean(x: np.ndarray) -> float:
        return float(x.mean()) if len(x) else float("nan")

    return {"n": len(a), "peak_inside": mean(a[:, 0]), "mass_inside": mean(a[:, 1]), "mask_area": mean(a[:, 2]),
            "nodule_cut_by_view": int(sum(k < 0.99 for k in kept)),
            "centre_prior": {"peak_inside": mean(p[:, 0]), "mass_inside": mean(p[:, 1])}}


def measure(bundle: Bundle, cases: list[Case], layer: str | None = None, method: str = "gradcam",
            shift: float = SHIFT, seed: int = 0, progress: bool = True, what: str = "") -> dict:
    """Localisation of ``bundle``'s map on ``layer`` (default: its spec's) over the middle slice of each case:
    a ``centred`` and a ``shifted`` block, each with the centre prior's figures on the same views."""
    vc = view_config_from_spec(bundle.spec)
    layer = layer or bundle.cam_layer
    prior = centre_prior(vc.input_size)
    rows: dict[str, list] = {"centred": [], "shifted": []}
    priors: dict[str, list] = {"centred": [], "shifted": []}
    kept: dict[str, list] = {"centred": [], "shifted": []}
    follows = isinstance(bundle.model, NoduleNet)
    for case in tqdm(cases, desc=what or bundle.name, disable=not progress, unit="nodule"):
        case_vc = vc
        if follows:  # the nodule model's field follows the nodule: the one it chooses on the centred slice
            k = central_slices(case.n_slices, 0, 0.0)[0]
            field = read_slices(bundle, [case.load_slice(k)], case.pixel_spacing_mm)[0].field_mm
            case_vc = dataclasses.replace(vc, field_mm=field)
        views = localisation_views(case, case_vc, shift, seed)
        if views is None:
            continue
        for key, view in zip(("centred", "shifted"), views, strict=True):
            heat = cam(bundle.model, view.image, bundle.mean, bundle.std, method,
                       prior_adjust=bundle.spec.prior_adjust, layer=layer)
            rows[key].append(score_map(heat, view))
            priors[key].append(score_map(prior, view))
            kept[key].append(view.kept)
    return {"layer": layer or bundle.model.feature_layer_name,
            **{key: _block(rows[key], priors[key], kept[key]) for key in rows}}


def cam_layer_candidates(bundle: Bundle) -> list[str]:
    """Layers a Grad-CAM can be taken on: each stage of the backbone with output stride 8-32, then the last one."""
    size = bundle.input_size
    keep = [n for n, shape in stage_shapes(bundle.model, size).items()
            if MIN_STRIDE <= size // max(1, shape[-1]) <= MAX_STRIDE]
    last = bundle.model.feature_layer_name
    return keep if last in keep else [*keep, last]


METHOD_NOTE = (
    "Grad-CAM of the predicted class on the middle slice of each nodule with a pixel drawn by at least half of the "
    "readers, on each model's map layer. centred: the view as the app cuts it; shifted: the nodule's centre moved "
    "{shift:.0%} of the view's side in a fixed random direction per nodule (seed {seed}). peak_inside: the map's "
    "maximum lies inside the outline; mass_inside: its share inside the outline dilated by {margin:g} mm; mask_area: "
    "that dilated outline's share of the view (the chance level of mass_inside); centre_prior: a centred Gaussian "
    "scored on the same views.")


def cam_localisation(models: tuple[str, ...] = LIDC_MODELS, data: str = "", split: str = "", method: str = "gradcam",
                     choose: bool = False, shift: float = SHIFT, seed: int = 0, out: str = "",
                     progress: bool = True, weights: str = "") -> dict:
    """Measure each model's map localisation on a lidc-slices folder (``data``; its ``split`` of the model's own
    split when given). With ``choose``, each model's map layer is first chosen on the validation split (most mass
    inside the dilated outline on the shifted views) and written into its spec. Writes ``out`` when given."""
    folder = Path(weights) if weights else paths.weights_dir()
    cases, _ = load_cases("lidc", data)
    cases = [c for c in cases if c.has_masks]
    results, selection = {}, {}
    for name in models:
        if not (folder / f"{name}.json").is_file():
            raise LungvizError(f"no model '{name}' in {folder}.")
        bundle = load_bundle(folder, name)
        if choose:
            val = select_split(cases, "val", bundle.spec, folder)
            tried = [measure(bundle, val, layer, method, shift, seed, progress, f"val {name} {layer}")
                     for layer in cam_layer_candidates(bundle)]
            best = max(tried, key=lambda r: (r["shifted"]["mass_inside"], r["shifted"]["peak_inside"]))
            selection[name] = {"chosen": best["layer"], "val": tried}
            update_spec(folder, name, cam_layer=best["layer"])
            bundle = load_bundle(folder, name)
        chosen = select_split(cases, split, bundle.spec, folder) if split else cases
        results[name] = measure(bundle, chosen, None, method, shift, seed, progress, f"{split or 'all'} {name}")
    report = {"data": data or "default", "split": split or "all", "shift": shift, "seed": seed,
              "margin_mm": MARGIN_MM, "method": METHOD_NOTE.format(shift=shift, seed=seed, margin=MARGIN_MM),
              "models": results, **({"selection": selection} if selection else {})}
    if out:
        Path(out).write_text(json.dumps(report, indent=1) + "\n")
    return report


def localisation_text(report: dict) -> str:
    """A readable table of :func:`cam_localisation`'s report."""
    lines = [f"Map localisation on {report['data']} (split: {report['split']}); shifted by {report['shift']:.0%} of "
             f"the view, outline widened by {report['margin_mm']:g} mm for the mass"]
    for name, r in report["models"].items():
        for key in ("centred", "shifted"):
            b = r[key]
            lines.append(f"  {name:14s} {key:8s} n={b['n']:4d}  peak inside {b['peak_inside']:.0%} (centre prior "
                         f"{b['centre_prior']['peak_inside']:.0%})  mass inside {b['mass_inside']:.0%} (prior "
                         f"{b['centre_prior']['mass_inside']:.0%}, chance {b['mask_area']:.0%})")
    return "\n".join(lines)
