"""Maps and LIME regions drawn on the view: ``(S, S, 3) uint8``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from skimage.segmentation import find_boundaries

from lungviz.data.preprocess import resize
from lungviz.errors import LungvizError
from lungviz.explain.common import _view

if TYPE_CHECKING:
    from lungviz.explain.lime import LimeResult



# ----------------------------------------------------------------------------------------------- overlays


def _grey_rgb(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` in [0, 1] -> ``(H, W, 3) float64`` grey in [0, 255]."""
    a = np.clip(_view(image), 0.0, 1.0).astype(np.float64) * 255.0
    return np.repeat(a[..., None], 3, axis=2)


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _fit_to(values: np.ndarray, shape: tuple[int, int], what: str) -> np.ndarray:
    """A 2D map at ``shape`` (bilinear resize when it differs: a 64 px map shown on a larger view)."""
    a = np.asarray(values, np.float32)
    if a.ndim != 2 or a.size == 0:
        raise LungvizError(f"the {what} has shape {tuple(a.shape)}; a 2D map is expected.")
    return a if a.shape == shape else resize(a, shape)


def _nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label image (segments stay whole numbers)."""
    h, w = labels.shape
    rows = (np.arange(shape[0]) * h // shape[0]).clip(0, h - 1)
    cols = (np.arange(shape[1]) * w // shape[1]).clip(0, w - 1)
    return labels[rows[:, None], cols[None, :]]


def colormap(values: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """``(H, W)`` in [0, 1] -> ``(H, W, 3) float64`` RGB in [0, 255] through a matplotlib colormap."""
    import matplotlib

    try:
        lut = matplotlib.colormaps[cmap]
    except KeyError as err:
        raise LungvizError(f"unknown colour map '{cmap}'; try 'jet', 'inferno' or 'viridis'.") from err
    return lut(np.clip(np.asarray(values, np.float64), 0.0, 1.0))[..., :3] * 255.0


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.4, cmap: str = "jet") -> np.ndarray:
    """Blend a heat map ``(h, w)`` in [0, 1] over a grey view ``(H, W)`` in [0, 1] -> ``(H, W, 3) uint8``.

    ``alpha`` is the heat map's opacity (0 = the grey image, 1 = the colour map alone); a heat map of another size
    is resized to the image. Values outside [0, 1] are clipped (pass ``np.clip(lime.heat, 0, 1)`` for LIME).
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise LungvizError(f"the overlay opacity must be between 0 and 1, got {alpha}.")
    grey = _grey_rgb(image)
    colour = colormap(_fit_to(heat, grey.shape[:2], "heat map"), cmap)
    return _to_uint8((1.0 - alpha) * grey + alpha * colour)


def lime_overlay(
    image: np.ndarray,
    result: LimeResult,
    k: int = 5,
    alpha: float = 0.4,
    positive_only: bool = True,
    color: tuple[int, int, int] = (0, 200, 0),
    negative_color: tuple[int, int, int] = (220, 0, 0),
    boundary_color: tuple[int, int, int] = (255, 255, 0),
) -> np.ndarray:
    """The top-``k`` LIME superpixels on a grey view ``(H, W)`` -> ``(H, W, 3) uint8``.

    Segments for the class are tinted ``color``; with ``positive_only=False`` those against it ``negative_color``.
    Each shown segment's outline is drawn in ``boundary_color``. A view larger than the model input is fine.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise LungvizError(f"the overlay opacity must be between 0 and 1, got {alpha}.")
    grey = _grey_rgb(image)
    seg = _nearest(result.segments, grey.shape[:2])
    out = grey.copy()
    shown = np.zeros(seg.shape, bool)
    for i in result.shown_segments(k, positive_only):
        inside = seg == i
        tint = np.asarray(color if result.weights[i] > 0 else negative_color, np.float64)
        out[inside] = (1.0 - alpha) * grey[inside] + alpha * tint
        shown |= inside
    edges = find_boundaries(np.where(shown, seg + 1, 0), mode="inner", background=0) & shown
    out[edges] = np.asarray(boundary_color, np.float64)
    return _to_uint8(out)
