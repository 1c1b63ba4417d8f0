"""The shape and grey levels of a nodule's outline (pure numpy): its long and short axis as a reader measures them,
and the features the fused model may weigh beside the outline's size (:data:`OUTLINE_FEATURES`).

Grey levels are read on the outliner's view of the crop, min-max scaled from HU as the slices set stores it (0-1),
not in Hounsfield units: they move with whatever else the crop holds.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

#: Directions (degrees, half a turn) over which :func:`axes_px` looks for the longest axis.
AXIS_ANGLES = np.deg2rad(np.arange(180.0))


def axes_px(mask: np.ndarray) -> tuple[float, float]:
    """``(long axis, short axis)`` of a 2D mask in pixels, as a reader measures on a slice: the long axis is the
    widest extent over all directions (the maximum caliper, edge to edge: each pixel counted whole, so one pixel
    longer than the distance between the extreme pixels' centres); the short axis the widest spread at right angles
    to it within any one-pixel band along the long axis (the longest perpendicular chord for a convex outline; a
    band may span a concave outline's gap). ``(0, 0)`` for an empty mask."""
    m = np.asarray(mask, bool)
    if not m.any():
        return 0.0, 0.0
    pts = np.argwhere(m).astype(np.float64)
    edge = pts[(m & ~ndimage.binary_erosion(m, structure=np.ones((3, 3)), border_value=0))[m]]
    proj = edge @ np.stack([np.cos(AXIS_ANGLES), np.sin(AXIS_ANGLES)])  # (P, A): extents live on the edge
    extent = proj.max(axis=0) - proj.min(axis=0) + 1.0
    best = int(np.argmax(extent))
    theta = AXIS_ANGLES[best]
    along = np.floor(pts @ np.array([np.cos(theta), np.sin(theta)]))
    across = pts @ np.array([-np.sin(theta), np.cos(theta)])
    _, band = np.unique(along, return_inverse=True)
    width = ndimage.maximum(across, band, np.arange(band.max() + 1)) - ndimage.minimum(
        across, band, np.arange(band.max() + 1))
    return float(extent[best]), float(np.max(width) + 1.0)


#: The outline's shape: roundness (short / long axis; 1 = as wide as long), solidity (area / convex hull area;
#: below 1 where the outline is concave or lobulated) and compactness (4 pi area / perimeter^2, the perimeter by
#: Crofton's formula; about 0.9-1 for a digital disc, lower for an elongated, irregular or spiculated edge).
SHAPE_FEATURES = ("roundness", "solidity", "compactness")
#: The outline's grey levels: the view's mean and spread inside it, and its mean inside minus that of a ring just
#: outside (how solid and how distinct from its surroundings the nodule is).
GREY_FEATURES = ("mean_inside", "std_inside", "contrast")
OUTLINE_FEATURES = SHAPE_FEATURES + GREY_FEATURES
#: The outline features in a clinician's words, as the app, the report and the model card show them.
OUTLINE_FEATURE_LABELS = {"roundness": "roundness (short / long axis)", "solidity": "solidity (area / convex hull)",
                          "compactness": "compactness (about 1 for a disc)", "mean_inside": "mean grey level inside",
                          "std_inside": "grey-level spread inside", "contrast": "contrast with its surroundings"}
#: Width (view pixels) of the ring outside the outline that the contrast compares with.
RING_PX = 3
#: Below this many view pixels (about 4 mm across at 0.5 mm per pixel) an outline is too small to tell a shape on a
#: pixel grid: its shape features are not measured.
MIN_SHAPE_PX = 50


def feature_groups_text(names: Iterable[str]) -> str:
    """Which groups of outline features ``names`` holds, in words: "shape", "grey levels", "shape and grey levels"
    (empty when none)."""
    names = set(names)
    return " and ".join(g for g, members in (("shape", SHAPE_FEATURES), ("grey levels", GREY_FEATURES))
                        if names & set(members))


def outline_features(masks: np.ndarray, views01: np.ndarray) -> dict[str, np.ndarray]:
    """Each of :data:`OUTLINE_FEATURES` per outline mask ``(N, S, S)`` on its view ``(N, S, S)`` in [0, 1]; NaN
    where it cannot be measured (nothing outlined; the shape of an outline under :data:`MIN_SHAPE_PX`; the contrast
    when no ring fits in the view)."""
    from skimage.measure import perimeter_crofton
    from skimage.morphology import convex_hull_image

    m = np.asarray(masks, bool)
    v = np.asarray(views01, np.float64)
    if m.ndim != 3 or v.shape != m.shape:
        raise ValueError(f"one (S, S) view per outline mask is needed, got masks {m.shape} and views {v.shape}.")
    out = {f: np.full(len(m), np.nan) for f in OUTLINE_FEATURES}
    for i, (mask, view) in enumerate(zip(m, v, strict=True)):
        area = float(mask.sum())
        if area == 0:
            continue
        inside = view[mask]
        out["mean_inside"][i] = float(inside.mean())
        out["std_inside"][i] = float(inside.std())
        ring = ndimage.binary_dilation(mask, iterations=RING_PX) & ~mask
        if ring.any():
            out["contrast"][i] = float(inside.mean() - view[ring].mean())
        if area >= MIN_SHAPE_PX:
            long_px, short_px = axes_px(mask)
            out["roundness"][i] = short_px / long_px
            out["solidity"][i] = area / float(convex_hull_image(mask, offset_coordinates=False).sum())
            out["compactness"][i] = 4.0 * np.pi * area / float(perimeter_crofton(mask, 4)) ** 2
    return out
