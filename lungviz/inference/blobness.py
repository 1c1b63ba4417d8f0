"""Hessian shape measures at given points of a slice or a series: is the bright structure there a blob or a tube?

Classic CAD (Li, Sone and Doi, Med. Phys. 2003): at a bright blob all Hessian eigenvalues are strongly negative;
in a vessel two are and the third (along the vessel) is near zero. With eigenvalues ordered by magnitude
``|l1| >= |l2| >= |l3|``, the dot measure is ``|l3|^2 / |l1|`` (all negative) and the line measure
``|l2| (|l2| - |l3|) / |l1|`` (``l1, l2`` negative), each scale-normalised (``sigma^2``) and maximised over scales.
On one slice only two eigenvalues exist: a vessel seen end-on is a blob there, which is why the third dimension helps.

The Hessian is evaluated only at the points asked for: the image is sampled on a small isotropic grid around each
point (bilinear / trilinear) and the grid is multiplied with Gaussian second-derivative kernels, which costs a
small matrix product instead of filtering the whole volume. Intensities should be in "contrast units":
0 = lung parenchyma, 1 = soft tissue (see :func:`contrast_units`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

#: Scales (mm) of the Gaussian derivatives: nodules of about 4-20 mm.
SIGMAS_MM = (1.5, 2.5, 4.0)
#: Grid step (mm) and half-width (mm) of the sampled neighbourhood.
GRID_STEP_MM = 1.0
GRID_HALF_MM = 9.0
#: HU of lung parenchyma and soft tissue that define contrast units on slices in HU.
PARENCHYMA_HU = -850.0
TISSUE_HU = 40.0


def contrast_units(image: np.ndarray, is_hu: bool, lung: np.ndarray | None = None) -> np.ndarray:
    """Intensities rescaled so that lung parenchyma is about 0 and soft tissue about 1 (same shape, float32).

    HU use fixed values; a windowed image uses the medians of its lung and of its dense tissue outside the lung.
    """
    img = np.asarray(image, np.float32)
    if is_hu:
        return (img - PARENCHYMA_HU) / (TISSUE_HU - PARENCHYMA_HU)
    from lungviz.inference.lungmask import otsu

    thr = otsu(img)
    inside = img[lung & (img < thr)] if lung is not None and (lung & (img < thr)).any() else img[img < thr]
    outside = img[(~lung if lung is not None else True) & (img >= thr)]
    lo = float(np.median(inside)) if inside.size else float(img.min())
    hi = float(np.median(outside)) if outside.size else float(img.max())
    return (img - lo) / max(hi - lo, 1e-6)


@lru_cache(maxsize=8)
def _kernels(ndim: int, step_mm: float, half_mm: float, sigmas: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Grid offsets ``(G, ndim)`` in mm and kernels ``(G, S * P)``: the scale-normalised second derivatives
    (pairs ``P`` = 3 in 2D, 6 in 3D) of a unit Gaussian, one block per scale."""
    g = np.arange(-half_mm, half_mm + 1e-6, step_mm)
    grid = np.stack(np.meshgrid(*[g] * ndim, indexing="ij"), axis=-1).reshape(-1, ndim)
    pairs = [(i, j) for i in range(ndim) for j in range(i, ndim)]
    cols = []
    for s in sigmas:
        w = np.exp(-(grid**2).sum(axis=1) / (2 * s * s))
        w /= w.sum()
        for i, j in pairs:
            d = grid[:, i] * grid[:, j] / s**4 - (1.0 / s**2 if i == j else 0.0)
            cols.append(s * s * d * w)
    return grid, np.stack(cols, axis=1).astype(np.float32)


def _eigen_measures(h: np.ndarray, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """``h (N, S, P)`` Hessian entries -> dot and line measures ``(N,)`` each, maximised over the scales."""
    pairs = [(i, j) for i in range(ndim) for j in range(i, ndim)]
    m = np.zeros((*h.shape[:2], ndim, ndim), np.float64)
    for p, (i, j) in enumerate(pairs):
        m[..., i, j] = m[..., j, i] = h[..., p]
    ev = np.linalg.eigvalsh(m)  # ascending
    order = np.argsort(-np.abs(ev), axis=-1)
    ev = np.take_along_axis(ev, order, axis=-1)  # |l1| >= |l2| (>= |l3|)
    a1 = np.maximum(np.abs(ev[..., 0]), 1e-9)
    if ndim == 2:
        neg = (ev[..., 0] < 0) & (ev[..., 1] < 0)
        dot = np.where(neg, ev[..., 1] ** 2 / a1, 0.0)
        line = np.where(ev[..., 0] < 0, np.abs(ev[..., 0]) - np.abs(ev[..., 1]), 0.0)
    else:
        neg3 = (ev[..., 0] < 0) & (ev[..., 1] < 0) & (ev[..., 2] < 0)
        neg2 = (ev[..., 0] < 0) & (ev[..., 1] < 0)
        dot = np.where(neg3, ev[..., 2] ** 2 / a1, 0.0)
        line = np.where(neg2, np.abs(ev[..., 1]) * (np.abs(ev[..., 1]) - np.abs(ev[..., 2])) / a1, 0.0)
    return dot.max(axis=1), line.max(axis=1)


def hessian_2d(image_u: np.ndarray, points_rc: np.ndarray, spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Dot and line measures ``(N,)`` at ``points_rc (N, 2)`` of an ``(H, W)`` slice in contrast units."""
    pts = np.asarray(points_rc, np.float64).reshape(-1, 2)
    if len(pts) == 0:
        return np.zeros(0), np.zeros(0)
    grid, k = _kernels(2, GRID_STEP_MM, GRID_HALF_MM, SIGMAS_MM)
    rows = pts[:, :1] + grid[None, :, 0] / spacing_mm
    cols = pts[:, 1:] + grid[None, :, 1] / spacing_mm
    v = ndimage.map_coordinates(np.asarray(image_u, np.float32), [rows.ravel(), cols.ravel()], order=1,
                                mode="nearest").reshape(len(pts), -1)
    h = (v @ k).reshape(len(pts), len(SIGMAS_MM), 3)
    return _eigen_measures(h, 2)


def hessian_3d(volume_u: np.ndarray, points_krc: np.ndarray, spacing_mm: float, slice_gap_mm: float,
               ) -> tuple[np.ndarray, np.ndarray]:
    """Dot and line measures ``(N,)`` at ``points_krc (N, 3)`` (slice, row, col) of a ``(K, H, W)`` series in
    contrast units; ``slice_gap_mm`` is the distance between slice centres. Beyond the first and last slice the
    edge slice is repeated."""
    pts = np.asarray(points_krc, np.float64).reshape(-1, 3)
    if len(pts) == 0:
        return np.zeros(0), np.zeros(0)
    grid, k = _kernels(3, GRID_STEP_MM * 1.5, GRID_HALF_MM, SIGMAS_MM)
    vol = np.asarray(volume_u, np.float32)
    # only the slab of slices the grids reach is interpolated
    reach = int(np.ceil(GRID_HALF_MM / slice_gap_mm)) + 1
    k0 = max(0, int(np.floor(pts[:, 0].min())) - reach)
    k1 = min(len(vol), int(np.ceil(pts[:, 0].max())) + reach + 1)
    slab = vol[k0:k1]
    ks = pts[:, :1] - k0 + grid[None, :, 0] / slice_gap_mm
    rows = pts[:, 1:2] + grid[None, :, 1] / spacing_mm
    cols = pts[:, 2:3] + grid[None, :, 2] / spacing_mm
    v = ndimage.map_coordinates(slab, [ks.ravel(), rows.ravel(), cols.ravel()], order=1,
                                mode="nearest").reshape(len(pts), -1)
    h = (v @ k).reshape(len(pts), len(SIGMAS_MM), 6)
    return _eigen_measures(h, 3)
