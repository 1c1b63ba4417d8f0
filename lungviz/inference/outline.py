"""The geometry of a nodule's outline (pure numpy): the region nearest the view's centre, its long and short axis as a
reader measures them on a slice, and the outline drawn on an image. The nodule model (:mod:`lungviz.inference.nodule`)
outlines; this module measures and draws.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: A pixel is inside the outline when its probability exceeds this.
THRESHOLD = 0.5
#: The outline must reach within this share of the view's side from its centre (else: nothing outlined).
CENTRE_REACH = 0.2
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


def outline_overlay(context01: np.ndarray, mask: np.ndarray,
                    colour: tuple[int, int, int] = (230, 60, 60)) -> np.ndarray:
    """``(H, W, 3) uint8``: the grey crop with the outline's boundary drawn in ``colour``."""
    grey = np.clip(np.asarray(context01, np.float32), 0.0, 1.0)
    rgb = np.repeat((grey * 255.0).round().astype(np.uint8)[..., None], 3, axis=2)
    m = np.asarray(mask, bool)
    edge = m & ~ndimage.binary_erosion(m, structure=np.ones((3, 3)), border_value=0)
    rgb[edge] = colour
    return rgb
