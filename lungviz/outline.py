"""Outline the nodule at the centre of a crop and measure it with the outliner bundle (``outliner``).

The outliner (:class:`lungviz.models.LungvizSegNet`) maps its nodule view to the probability that each pixel lies
inside the outline any LIDC reader drew. The outline is the connected region above :data:`THRESHOLD` nearest the
view's centre; its size is the diameter of the circle with the same area (what the fused model uses), and its long
and short axis as a reader measures them on a slice. Nothing here reads the readers' measurements: these are
image-derived sizes, like the finder's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from lungviz.errors import LungvizError
from lungviz.models import Bundle, load_bundle
from lungviz.preprocess import mm_to_px, spacing_or_default, to_model_input, view_from_context
from lungviz.shape import axes_px, outline_features

#: The bundle name of the shipped outliner.
OUTLINER = "outliner"
#: A pixel is inside the outline when its probability exceeds this.
THRESHOLD = 0.5
#: The outline must reach within this share of the view's side from its centre (else: nothing outlined).
CENTRE_REACH = 0.2


@dataclass
class Outline:
    """The outlined nodule: its mask in the crop's pixels, the view's probabilities and its size."""

    mask: np.ndarray  # (H, W) bool, in the context crop's pixels
    probability: np.ndarray  # (S, S) float32, in the outliner's view
    area_mm2: float
    diameter_mm: float  # of the circle with the same area; 0 when nothing is outlined
    long_axis_mm: float = 0.0  # the widest extent of the outline (see axes_px)
    short_axis_mm: float = 0.0  # its widest cross-section at right angles to the long axis
    features: dict[str, float] = field(default_factory=dict)  # lungviz.shape.OUTLINE_FEATURES (NaN: not measured)


def load_outliner(folder: Path | None = None, device: str | None = None) -> Bundle:
    """The shipped outliner bundle (a clear error when it is not installed)."""
    from lungviz import paths

    folder = Path(folder) if folder else paths.weights_dir()
    if not (folder / f"{OUTLINER}.json").is_file():
        raise LungvizError(f"the nodule outliner is not installed (no {OUTLINER}.json in {folder}); "
                           "train it with `python -m training outliner`.")
    bundle = load_bundle(folder, OUTLINER, device)
    if bundle.spec.get("task") != "outline":
        raise LungvizError(f"'{OUTLINER}' in {folder} is not a nodule outliner.")
    return bundle


def central_region(mask: np.ndarray, reach: float = CENTRE_REACH) -> np.ndarray:
    """The connected region of ``mask`` (8-connectivity) nearest the centre, if it comes within ``reach`` x side
    of it; else an empty mask."""
    m = np.asarray(mask, bool)
    labels, n = ndimage.label(m, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros_like(m)
    rr, cc = np.indices(m.shape)
    dist = np.hypot(rr - (m.shape[0] - 1) / 2.0, cc - (m.shape[1] - 1) / 2.0)
    nearest = ndimage.minimum(dist, labels, index=np.arange(1, n + 1))
    best = int(np.argmin(nearest))
    if nearest[best] > reach * max(m.shape):
        return np.zeros_like(m)
    return labels == best + 1


@torch.inference_mode()
def view_probabilities(bundle: Bundle, views01: np.ndarray, batch: int = 256) -> np.ndarray:
    """``(N, S, S)`` outliner views in [0, 1] -> ``(N, S, S)`` probabilities of being inside the outline."""
    views = np.asarray(views01, np.float32).reshape(-1, bundle.input_size, bundle.input_size)
    out = []
    for i in range(0, len(views), batch):
        x = np.stack([to_model_input(v, bundle.mean, bundle.std, bundle.in_chans) for v in views[i : i + batch]])
        logits = bundle.model(torch.from_numpy(x).to(bundle.device))[:, 0]
        out.append(torch.sigmoid(logits.float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, bundle.input_size, bundle.input_size), np.float32)


def view_mm_per_px(bundle: Bundle, spacing_mm: float | None) -> float:
    """Millimetres per outliner view pixel for a crop at ``spacing_mm`` (the default spacing when unknown)."""
    field = float(bundle.spec["preprocessing"]["field_mm"])
    return mm_to_px(field, spacing_mm) * spacing_or_default(spacing_mm) / bundle.input_size


def measure_views(bundle: Bundle, views01: np.ndarray, mm_per_px: np.ndarray | float) -> tuple[np.ndarray, ...]:
    """Outline each view: ``(probabilities (N, S, S), outline masks (N, S, S) bool, diameters (N,) mm)``."""
    probs = view_probabilities(bundle, views01)
    masks = np.stack([central_region(p > THRESHOLD) for p in probs]) if len(probs) else probs.astype(bool)
    area = masks.sum(axis=(1, 2)) * np.broadcast_to(np.asarray(mm_per_px, np.float64), (len(probs),)) ** 2
    return probs, masks, 2.0 * np.sqrt(area / np.pi)


#: The sizes :func:`mask_sizes_mm` measures: same-area circle diameter, long and short axis, and their mean (the
#: Fleischner / Lung-RADS average diameter).
SIZE_MEASURES = ("circle", "long_axis", "short_axis", "mean_axes")


def mask_sizes_mm(masks: np.ndarray, mm_per_px: float) -> dict[str, np.ndarray]:
    """Per outline mask ``(N, S, S)``, each of :data:`SIZE_MEASURES` in mm."""
    m = np.asarray(masks, bool).reshape(-1, *np.shape(masks)[-2:])
    axes = np.array([axes_px(k) for k in m], np.float64).reshape(-1, 2) * float(mm_per_px)
    circle = 2.0 * np.sqrt(m.sum(axis=(1, 2)) * float(mm_per_px) ** 2 / np.pi)
    return {"circle": circle, "long_axis": axes[:, 0], "short_axis": axes[:, 1], "mean_axes": axes.mean(axis=1)}


def _crop_views(bundle: Bundle, contexts01: list[np.ndarray], spacing_mm: float | None) -> tuple[np.ndarray, float]:
    """The outliner's views of several crops at one pixel spacing, and millimetres per view pixel."""
    field = float(bundle.spec["preprocessing"]["field_mm"])
    views = np.stack([view_from_context(c, "nodule", bundle.input_size, spacing_mm, field) for c in contexts01])
    return views, view_mm_per_px(bundle, spacing_mm)


def crops_sizes_mm(bundle: Bundle, contexts01: list[np.ndarray], spacing_mm: float | None) -> dict[str, np.ndarray]:
    """Each of :data:`SIZE_MEASURES` (mm) of the outline at the centre of each of several crops at one pixel
    spacing (e.g. the slices of one nodule)."""
    views, mm_px = _crop_views(bundle, contexts01, spacing_mm)
    return mask_sizes_mm(measure_views(bundle, views, mm_px)[1], mm_px)


def crops_outline_features(bundle: Bundle, contexts01: list[np.ndarray], spacing_mm: float | None,
                           ) -> dict[str, np.ndarray]:
    """:data:`SIZE_MEASURES` (mm) and :data:`lungviz.shape.OUTLINE_FEATURES` of the outline at the centre of each
    of several crops at one pixel spacing (e.g. the slices of one nodule)."""
    views, mm_px = _crop_views(bundle, contexts01, spacing_mm)
    masks = measure_views(bundle, views, mm_px)[1]
    return {**mask_sizes_mm(masks, mm_px), **outline_features(masks, views)}


def crops_diameter_mm(bundle: Bundle, contexts01: list[np.ndarray], spacing_mm: float | None) -> np.ndarray:
    """The outlined diameter (mm) at the centre of each of several crops at one pixel spacing (e.g. the slices of
    one nodule): the same-area circle's, as the fused model uses it (no axes measured)."""
    views, mm_px = _crop_views(bundle, contexts01, spacing_mm)
    return measure_views(bundle, views, mm_px)[2]


def outline_nodule(bundle: Bundle, context01: np.ndarray, spacing_mm: float | None) -> Outline:
    """Outline the nodule at the centre of a nodule-centred crop (the slices set's context, values in [0, 1]); an
    unknown pixel spacing is taken as the default one."""
    img = np.asarray(context01, np.float32)
    if img.ndim != 2 or img.size == 0 or not np.isfinite(img).all():
        raise LungvizError("the nodule cannot be outlined: a 2D crop with valid values is needed.")
    spacing_mm = spacing_or_default(spacing_mm)  # unknown: the default spacing, which the app then says it assumed
    field = float(bundle.spec["preprocessing"]["field_mm"])
    view = view_from_context(img, "nodule", bundle.input_size, spacing_mm, field)
    mm_px = view_mm_per_px(bundle, spacing_mm)
    probs, masks, diam = measure_views(bundle, view[None], mm_px)
    # Back to the crop: the view resamples the central n x n pixels (n = the field at this spacing), which start
    # where lungviz.preprocess.crop_around puts them.
    h, w = img.shape
    n = mm_to_px(field, spacing_mm)
    s = bundle.input_size
    r0, c0 = int(np.floor(h / 2.0 - n / 2.0 + 0.5)), int(np.floor(w / 2.0 - n / 2.0 + 0.5))
    vr = np.floor((np.arange(h) - r0 + 0.5) * s / n).astype(int)
    vc = np.floor((np.arange(w) - c0 + 0.5) * s / n).astype(int)
    inside = (vr[:, None] >= 0) & (vr[:, None] < s) & (vc[None, :] >= 0) & (vc[None, :] < s)
    mask = np.zeros((h, w), bool)
    mask[inside] = masks[0][np.clip(vr, 0, s - 1)[:, None], np.clip(vc, 0, s - 1)[None, :]][inside]
    area = float(masks[0].sum()) * mm_px**2
    sizes = mask_sizes_mm(masks[:1], mm_px)
    shape = {k: float(v[0]) for k, v in outline_features(masks[:1], view[None]).items()}
    return Outline(mask, probs[0], area, float(diam[0]), float(sizes["long_axis"][0]), float(sizes["short_axis"][0]),
                   shape)


def outline_overlay(context01: np.ndarray, mask: np.ndarray,
                    colour: tuple[int, int, int] = (230, 60, 60)) -> np.ndarray:
    """``(H, W, 3) uint8``: the grey crop with the outline's boundary drawn in ``colour``."""
    grey = np.clip(np.asarray(context01, np.float32), 0.0, 1.0)
    rgb = np.repeat((grey * 255.0).round().astype(np.uint8)[..., None], 3, axis=2)
    m = np.asarray(mask, bool)
    edge = m & ~ndimage.binary_erosion(m, structure=np.ones((3, 3)), border_value=0)
    rgb[edge] = colour
    return rgb
