"""Pure-numpy preprocessing: HU windowing, contrast, crops, resizing and the two model views.

Images are ``(H, W) float32 in [0, 1]`` unless a docstring says HU. No torch, no streamlit here.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
from PIL import Image

from lungviz.data.limits import MAX_SIDE_PX, SPACING_RANGE_MM
from lungviz.errors import LungvizError

# (width, level) in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (1500.0, -600.0),
    "mediastinum": (400.0, 40.0),
    "bone": (1800.0, 400.0),
}

#: Pixel spacing assumed when an image carries none (the LIDC slices set's median is about 0.7 mm).
DEFAULT_SPACING_MM = 0.7
#: Side of the slices set's context crop in native pixels (the "slice" view as stored).
SLICE_CROP_PX = 128


@dataclass(frozen=True)
class ViewSpec:
    """A model view defined in millimetres: a square field centred on the nodule."""

    name: str
    field_mm: float


#: The two views, in one place. ``slice`` is the ~9 cm context crop (the slices set stores it as
#: 128 native pixels, 64-125 mm); ``nodule`` is a zoomed centred crop.
VIEWS: dict[str, ViewSpec] = {
    "slice": ViewSpec("slice", 90.0),
    "nodule": ViewSpec("nodule", 32.0),
}


def _image2d(image: np.ndarray, what: str = "image") -> np.ndarray:
    """``image`` as a non-empty ``(H, W) float32`` array, or a :class:`LungvizError` saying what is wrong."""
    a = np.asarray(image, np.float32)
    if a.ndim != 2 or a.size == 0:
        raise LungvizError(f"the {what} has shape {tuple(a.shape)}; a non-empty 2D (height x width) image is expected.")
    return a


def _side(size: object, what: str) -> int:
    """A positive whole number of pixels (numpy integers accepted)."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or int(size) < 1:
        raise LungvizError(f"{what} must be a whole number of pixels, at least 1; got {size!r}.")
    return int(size)


def window(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    """HU ``(H, W)`` -> ``(H, W) float32 in [0, 1]``: linear over ``[level - width/2, level + width/2]``, clipped."""
    if not width > 0:  # also rejects NaN
        raise LungvizError(f"window width must be positive, got {width}.")
    lo = level - width / 2.0
    return np.clip((np.asarray(hu, np.float32) - lo) / width, 0.0, 1.0).astype(np.float32)


def window_preset(hu: np.ndarray, preset: str = "lung") -> np.ndarray:
    """Apply a named HU window (``lung`` W1500/L-600, ``mediastinum`` W400/L40, ``bone`` W1800/L400)."""
    if preset not in WINDOW_PRESETS:
        raise LungvizError(f"unknown window '{preset}'; choose one of {', '.join(WINDOW_PRESETS)}.")
    return window(hu, *WINDOW_PRESETS[preset])


def minmax(image: np.ndarray) -> np.ndarray:
    """Rescale to ``[0, 1]`` by the image's own min and max; a constant image becomes all zeros."""
    a = np.asarray(image, np.float32)
    if a.size == 0:
        raise LungvizError("the image is empty.")
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros_like(a)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def sigmoid_contrast(image: np.ndarray, gain: float = 10.0, cutoff: float | None = None) -> np.ndarray:
    """Sigmoidal contrast ``1 / (1 + exp(gain * (cutoff - x)))`` on ``[0, 1]`` images; cutoff defaults to the mean."""
    a = np.asarray(image, np.float32)
    c = float(a.mean()) if cutoff is None else float(cutoff)
    # 0.5 * (1 + tanh(z / 2)) is the logistic function without exp overflow at large gains.
    return (0.5 * (1.0 + np.tanh(0.5 * gain * (a - c)))).astype(np.float32)


def pad_to_square(image: np.ndarray, fill: float | None = None) -> np.ndarray:
    """Pad the shorter side symmetrically (extra pixel at the end) to a square; fill defaults to the minimum."""
    a = _image2d(image)
    h, w = a.shape
    if h == w:
        return a.copy()
    value = float(a.min()) if fill is None else float(fill)
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    out = np.full((side, side), value, np.float32)
    out[top : top + h, left : left + w] = a
    return out


def crop_around(image: np.ndarray, centre_rc: tuple[float, float], size: int, fill: float | None = None) -> np.ndarray:
    """Cut a ``size x size`` window whose centre is ``centre_rc`` (row, col); outside pixels get ``fill``.

    For an even size the centre lies between the two middle pixels: the window starts at
    ``round(centre - size / 2)``.
    """
    a = _image2d(image)
    size = _side(size, "the crop size")
    if not np.all(np.isfinite(centre_rc)):
        raise LungvizError(f"the crop centre {tuple(centre_rc)} is not a pixel position.")
    value = float(a.min()) if fill is None else float(fill)
    r0 = int(np.floor(centre_rc[0] - size / 2.0 + 0.5))
    c0 = int(np.floor(centre_rc[1] - size / 2.0 + 0.5))
    out = np.full((size, size), value, np.float32)
    h, w = a.shape
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + size, h), min(c0 + size, w)
    if re > rs and ce > cs:
        out[rs - r0 : re - r0, cs - c0 : ce - c0] = a[rs:re, cs:ce]
    return out


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central ``size x size`` window (padded with the minimum if the image is smaller)."""
    h, w = _image2d(image).shape
    return crop_around(image, (h / 2.0, w / 2.0), size)


def resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize (antialiased when shrinking) of ``(H, W) float32`` to ``size`` (side or (H, W))."""
    a = _image2d(image)
    if isinstance(size, numbers.Integral):
        h_out = w_out = _side(size, "the output size")
    else:
        try:
            h_out, w_out = (_side(v, "the output size") for v in size)
        except (TypeError, ValueError) as err:
            raise LungvizError(f"the output size must be a side or (height, width), got {size!r}.") from err
    if a.shape == (h_out, w_out):
        return a.copy()
    img = Image.fromarray(a, mode="F").resize((w_out, h_out), Image.Resampling.BILINEAR)
    return np.asarray(img, np.float32)


def valid_spacing(spacing_mm: float | None) -> float | None:
    """The pixel spacing when it lies in the plausible :data:`~lungviz.data.limits.SPACING_RANGE_MM`, else None
    (unknown: missing, NaN, zero, or so small or large that a crop in millimetres would be absurd)."""
    lo, hi = SPACING_RANGE_MM
    return float(spacing_mm) if spacing_mm is not None and lo <= spacing_mm <= hi else None


def spacing_or_default(spacing_mm: float | None) -> float:
    """A pixel spacing usable in arithmetic: the given one when it is valid, else the default."""
    sp = valid_spacing(spacing_mm)
    return DEFAULT_SPACING_MM if sp is None else sp


def mm_to_px(size_mm: float, spacing_mm: float | None) -> int:
    """Number of pixels covering ``size_mm`` at ``spacing_mm`` (default spacing when unknown)."""
    if not (np.isfinite(size_mm) and size_mm > 0):
        raise LungvizError(f"a field of view must be a positive number of millimetres, got {size_mm}.")
    spacing = spacing_or_default(spacing_mm)  # NaN/None/0/implausible -> default
    n = max(1, round(size_mm / spacing))
    if n > MAX_SIDE_PX:
        raise LungvizError(f"a field of {size_mm:g} mm at {spacing:g} mm per pixel would be {n} pixels wide, more "
                           f"than the largest image side ({MAX_SIDE_PX} pixels).")
    return n


def crop_mm(
    image: np.ndarray, centre_rc: tuple[float, float], size_mm: float, spacing_mm: float | None
) -> np.ndarray:
    """Cut a square of ``size_mm`` around ``centre_rc`` at the image's pixel spacing."""
    return crop_around(image, centre_rc, mm_to_px(size_mm, spacing_mm))


def view_from_context(
    context: np.ndarray, view: str, input_size: int, spacing_mm: float | None, field_mm: float | None = None
) -> np.ndarray:
    """A model view from a nodule-centred context crop (as the slices set stores it).

    ``slice``: the whole context crop, resized. ``nodule``: the central ``field_mm`` (default from
    :data:`VIEWS`) at the crop's spacing, resized. Returns ``(input_size, input_size) float32 in [0, 1]``.
    """
    if view not in VIEWS:
        raise LungvizError(f"unknown view '{view}'; choose one of {', '.join(VIEWS)}.")
    a = _image2d(context, "context crop")
    if view == "slice":
        return resize(pad_to_square(a), input_size)
    size_mm = VIEWS[view].field_mm if field_mm is None else field_mm
    h, w = a.shape
    return resize(crop_mm(a, (h / 2.0, w / 2.0), size_mm, spacing_mm), input_size)


def view_from_nodule_crop(crop: np.ndarray, input_size: int, field_mm: float | None = None) -> np.ndarray:
    """A nodule view from an uploaded nodule crop, which is taken to span the default nodule field
    (:data:`VIEWS`, 32 mm): a model with a narrower ``field_mm`` sees its central share, a wider one the crop on a
    margin of its darkest value; resized to ``input_size``."""
    a = pad_to_square(_image2d(crop, "nodule crop"))
    upload_mm = VIEWS["nodule"].field_mm
    h = a.shape[0] / 2.0
    a = crop_mm(a, (h, h), upload_mm if field_mm is None else field_mm, upload_mm / a.shape[0])
    return resize(a, input_size)


def view_from_whole_slice(
    image: np.ndarray,
    centre_rc: tuple[float, float],
    view: str,
    input_size: int,
    spacing_mm: float | None,
    field_mm: float | None = None,
) -> np.ndarray:
    """A model view cut from a whole (e.g. 512 x 512) slice at ``field_mm`` around the nodule centre."""
    if view not in VIEWS:
        raise LungvizError(f"unknown view '{view}'; choose one of {', '.join(VIEWS)}.")
    size_mm = VIEWS[view].field_mm if field_mm is None else field_mm
    return resize(crop_mm(image, centre_rc, size_mm, spacing_mm), input_size)


def to_model_input(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], channels: int = 3) -> np.ndarray:
    """``(H, W) float32 in [0, 1]`` -> ``(C, H, W) float32`` normalised by per-channel mean/std."""
    a = _image2d(image)
    channels = _side(channels, "the number of channels")
    m = np.asarray(mean, np.float32).reshape(-1)
    s = np.asarray(std, np.float32).reshape(-1)
    for label, v in (("mean", m), ("std", s)):
        if v.size != 1 and v.size < channels:
            raise LungvizError(
                f"the normalisation {label} has {v.size} values; {channels} channels need 1 or {channels}."
            )
    m, s = m[:channels].reshape(-1, 1, 1), s[:channels].reshape(-1, 1, 1)
    if not np.all(s > 0):
        raise LungvizError(f"the normalisation std must be positive, got {tuple(float(v) for v in s.ravel())}.")
    stacked = np.broadcast_to(a, (channels, *a.shape))
    return ((stacked - m) / s).astype(np.float32)
