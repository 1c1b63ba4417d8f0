"""The lungs of an axial CT slice: a boolean mask from HU (DICOM) or from a windowed image (PNG), pure numpy/scipy.

Steps: threshold (air-like tissue below -400 HU, or Otsu's threshold on a windowed image); drop the air around
the patient (low regions touching the image border); keep the large air regions inside the body (the lungs; the
trachea and bowel gas are much smaller than the lungs on most slices); fill each lung's holes (vessels, nodules)
and close it with a rolling ball so that nodules on the pleura, which notch the lung's outline, stay inside.
Each lung is closed on its own, so the two are never bridged across the mediastinum.

Every mask is ``(H, W) bool`` on the slice's pixel grid; a series' masks are ``(K, H, W) bool``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Air-like tissue (lung parenchyma, air) lies below this on a slice in HU.
LUNG_HU = -400.0
#: Padding value of scanners outside the reconstructed circle is clipped to air.
AIR_HU = -1024.0
#: Radius (mm) of the rolling ball that closes each lung: a pleural notch up to about twice as wide is filled.
CLOSING_MM = 15.0
#: An air region counts as lung when at least this large (mm^2) ...
MIN_REGION_MM2 = 150.0
#: ... and at least this share of the largest such region (drops the trachea, small bowel gas).
MIN_SHARE_OF_LARGEST = 0.08
#: Below this total lung area (mm^2, about 4.5 x 4.5 cm) a slice is taken to show no lung: a head CT's sinuses,
#: a phantom's air inserts.
MIN_LUNG_MM2 = 2000.0
#: An image narrower than this (mm) is a crop: the lung may reach its border, so border regions are kept.
CROP_MM = 200.0


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold of an image's intensities."""
    from skimage.filters import threshold_otsu

    v = np.asarray(values, np.float32)
    return float(threshold_otsu(v)) if float(v.max()) > float(v.min()) else float(v.max())


def air_threshold(image: np.ndarray, is_hu: bool) -> float:
    """The air/tissue threshold: :data:`LUNG_HU` on HU, Otsu's threshold on a windowed image."""
    return LUNG_HU if is_hu else otsu(image)


def _close_disc(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Binary closing with a disc of ``radius_px`` (two distance transforms on the mask's padded bounding box)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    pad = int(np.ceil(radius_px)) + 1
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = np.pad(mask[r0:r1, c0:c1], pad)
    dilated = ndimage.distance_transform_edt(~box) <= radius_px
    closed = (ndimage.distance_transform_edt(dilated) > radius_px)[pad:-pad, pad:-pad]
    out = np.zeros_like(mask)
    out[r0:r1, c0:c1] = closed
    return out


def outside_air(low: np.ndarray) -> np.ndarray:
    """``(H, W) bool``: the low-density regions that touch the image border (air around the patient)."""
    lab, n = ndimage.label(low)
    if n == 0:
        return np.zeros(low.shape, bool)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    touch = np.zeros(n + 1, bool)
    touch[border] = True
    touch[0] = False
    return touch[lab]


def lung_mask(image: np.ndarray, is_hu: bool, spacing_mm: float, closing_mm: float = CLOSING_MM) -> np.ndarray:
    """The lungs of one axial slice, ``(H, W) bool``; all False when the slice shows no lung.

    ``image`` is ``(H, W)``: HU when ``is_hu``, else a windowed image (any range, brighter = denser).
    ``spacing_mm`` is the pixel spacing. Holes (vessels, nodules) are filled and each lung is closed with a
    ``closing_mm`` ball so nodules on the pleura stay inside; the mask never leaves the body.
    """
    img = np.asarray(image, np.float32)
    if is_hu:
        img = np.maximum(img, AIR_HU)
    sp = float(spacing_mm)
    low = img < air_threshold(img, is_hu)
    crop = min(img.shape) * sp < CROP_MM
    outside = np.zeros_like(low) if crop else outside_air(low)
    lab, n = ndimage.label(low & ~outside)
    if n == 0:
        return np.zeros(img.shape, bool)
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:] * sp**2
    keep = (areas >= MIN_REGION_MM2) & (areas >= MIN_SHARE_OF_LARGEST * areas.max())
    if areas[keep].sum() < (0.0 if crop else MIN_LUNG_MM2):
        return np.zeros(img.shape, bool)
    mask = np.zeros(img.shape, bool)
    objects = ndimage.find_objects(lab)
    radius = closing_mm / sp
    pad = int(np.ceil(radius)) + 2
    for i in np.flatnonzero(keep):
        # work on the region's bounding box grown by the ball: the closing cannot reach farther
        rs, cs = objects[i]
        r0, r1 = max(rs.start - pad, 0), min(rs.stop + pad, img.shape[0])
        c0, c1 = max(cs.start - pad, 0), min(cs.stop + pad, img.shape[1])
        part = ndimage.binary_fill_holes(lab[r0:r1, c0:c1] == i + 1)
        mask[r0:r1, c0:c1] |= ndimage.binary_fill_holes(_close_disc(part, radius))
    return mask & ~outside


def series_lung_mask(volume: np.ndarray, is_hu: bool, spacing_mm: float) -> np.ndarray:
    """``(K, H, W) bool``: :func:`lung_mask` of each slice of a ``(K, H, W)`` series."""
    vol = np.asarray(volume)
    return np.stack([lung_mask(s, is_hu, spacing_mm) for s in vol]) if len(vol) else np.zeros(vol.shape, bool)


def lung_found(mask: np.ndarray) -> bool:
    """Whether a mask from :func:`lung_mask` holds any lung."""
    return bool(np.asarray(mask).any())


def mask_overlay(gray01: np.ndarray, mask: np.ndarray, alpha: float = 0.18,
                 colour: tuple[float, float, float] = (0.2, 0.85, 0.35)) -> np.ndarray:
    """A faint tint of ``mask`` over a grey ``(H, W)`` image in [0, 1]: ``(H, W, 3) float32`` in [0, 1]."""
    g = np.clip(np.asarray(gray01, np.float32), 0.0, 1.0)
    rgb = np.repeat(g[..., None], 3, axis=-1)
    m = np.asarray(mask, bool)[..., None]
    return np.where(m, (1.0 - alpha) * rgb + alpha * np.asarray(colour, np.float32), rgb).astype(np.float32)


NO_LUNG_MESSAGE = ("No lung was found on this slice (it may be a head CT, a localiser or a phantom, or a slice above "
                   "or below the lungs), so the finder proposes nothing here. Click the nodule to place it by hand.")
