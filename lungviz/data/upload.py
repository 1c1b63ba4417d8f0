"""From what a user uploads (a slice, a nodule crop, a DICOM slice or series) to the model's inputs.

The models were trained on the LIDC slices set: a 128-native-pixel crop centred on the nodule, min-max
scaled from HU. Every path here produces that same context crop, so predictions see what training saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lungviz.data.io import DicomSlice, LoadedImage
from lungviz.data.preprocess import SLICE_CROP_PX, VIEWS, crop_around, minmax, valid_spacing, window_preset
from lungviz.errors import LungvizError

#: An image up to this side is taken as a nodule-centred context crop; a larger one as a whole slice.
MAX_CONTEXT_SIDE = 192


@dataclass
class CaseInput:
    """The model inputs of one case and what the user should be told about how they were made."""

    context: np.ndarray | None  # (H, W) float32 in [0, 1], nodule-centred, as the slices set
    nodule_crop: np.ndarray | None = None  # (h, w) float32 in [0, 1] when the user gave one
    spacing_mm: float | None = None
    whole_slice: np.ndarray | None = None  # (H, W) HU or [0, 1], for display only
    whole_is_hu: bool = False
    centre_rc: tuple[float, float] | None = None
    names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def conversion_note(image: LoadedImage) -> str | None:
    """What reading a raster image changed (colour, transparency, 16 bits), for the user; None when nothing did."""
    mode = str(image.meta.get("mode", ""))
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return (f"{image.name}: the image has a transparency channel; transparent areas were taken as black and the "
                "image converted to grey.")
    if mode == "P":  # a palette may be grey already: say what happened, not that it was in colour
        return f"{image.name}: the palette (indexed) image was converted to grey (luminance)."
    if mode in ("RGB", "CMYK", "YCbCr", "LAB", "HSV"):
        return f"{image.name}: the colour image was converted to grey (luminance)."
    if mode.startswith("I;16"):
        return (f"{image.name}: the 16-bit image was scaled to grey over its full 0-65535 range. If it holds "
                "Hounsfield units, upload the DICOM or an NPY array instead to get HU windowing.")
    if mode in ("I", "F"):
        return f"{image.name}: the 32-bit image was min-max scaled to grey."
    return None


def is_whole_slice(image: np.ndarray) -> bool:
    """Whether an image is too large to be a nodule-centred crop (so a nodule centre must be chosen)."""
    return max(np.asarray(image).shape) > MAX_CONTEXT_SIDE


def low_resolution_note(shape: tuple[int, ...]) -> str | None:
    """A note when a context crop has under two thirds of the slices set's pixels per side (it is enlarged to the
    networks' input, so they see less detail than in training); None otherwise."""
    h, w = shape[:2]
    if min(h, w) * 3 >= SLICE_CROP_PX * 2:
        return None
    return (f"The slice image is only {w} x {h} pixels, against the {SLICE_CROP_PX} px crops the models learned "
            f"from: it was enlarged about {SLICE_CROP_PX / min(h, w):.1f}x, so the models see less detail than in "
            "training and the estimate is less reliable.")


def context_from_whole(image: np.ndarray, centre_rc: tuple[float, float], size_px: int = SLICE_CROP_PX) -> np.ndarray:
    """Cut the ``size_px`` context around ``centre_rc`` from a whole slice and min-max scale it (as training)."""
    h, w = image.shape
    if not (0 <= centre_rc[0] < h and 0 <= centre_rc[1] < w):
        raise LungvizError(f"the nodule centre (row {centre_rc[0]:.0f}, column {centre_rc[1]:.0f}) lies outside the "
                           f"{w} x {h} image.")
    fill = float(image.min())
    return minmax(crop_around(np.asarray(image, np.float32), centre_rc, size_px, fill=fill))


def from_loaded(slice_img: LoadedImage | None, nodule_img: LoadedImage | None = None,
                centre_rc: tuple[float, float] | None = None) -> CaseInput:
    """Model inputs from a loaded slice image (a crop or a whole slice, HU or not) and an optional nodule crop."""
    if slice_img is None and nodule_img is None:
        raise LungvizError("upload a slice image, a nodule crop or a DICOM file.")
    out = CaseInput(context=None)
    for img in (slice_img, nodule_img):
        if img is not None:
            out.notes.extend(img.notes)
            if note := conversion_note(img):
                out.notes.append(note)
    if slice_img is not None:
        px = slice_img.pixels
        out.names.append(slice_img.name)
        out.spacing_mm = slice_img.pixel_spacing_mm
        if is_whole_slice(px):
            centre = centre_rc or (px.shape[0] / 2.0, px.shape[1] / 2.0)
            if centre_rc is None:
                out.notes.append("No nodule centre was given: the image centre was used. Choose the centre for a "
                                 "meaningful prediction.")
            out.whole_slice, out.whole_is_hu, out.centre_rc = px, slice_img.is_hu, centre
            out.context = context_from_whole(px, centre)
        else:
            out.context = minmax(px)
            if small := low_resolution_note(px.shape):
                out.notes.append(small)
            if not slice_img.is_hu:
                out.notes.append("The slice image was taken as a crop centred on the nodule (about 9 cm wide), "
                                 "as in the LIDC slices set.")
            if centre_rc is not None:
                out.notes.append("The nodule centre given was not used: the slice image is a crop, which is taken "
                                 "to be centred on the nodule. A centre applies to a whole slice.")
    if nodule_img is not None:
        out.names.append(nodule_img.name)
        crop = nodule_img.pixels
        if is_whole_slice(crop):
            raise LungvizError("the nodule crop is larger than a crop should be; upload it as the slice image "
                               "instead and choose the nodule centre.", source=nodule_img.name)
        out.nodule_crop = minmax(crop)
        out.notes.append("The uploaded nodule crop is used for the nodule view; it is taken to span about "
                         f"{VIEWS['nodule'].field_mm:g} mm.")
    return out


def from_series(series: list[DicomSlice], index: int, centre_rc: tuple[float, float] | None = None,
                nodule_img: LoadedImage | None = None) -> CaseInput:
    """Model inputs from one slice of a DICOM series (HU), cut around the chosen nodule centre, and an optional
    nodule crop."""
    if not series:
        raise LungvizError("the DICOM series holds no slices.")
    if not 0 <= index < len(series):
        raise LungvizError(f"slice {index} does not exist; the series has {len(series)} slices (0-{len(series) - 1}).")
    sl = series[index]
    loaded = LoadedImage(sl.hu, True, sl.name, pixel_spacing_mm=valid_spacing(float(np.mean(sl.pixel_spacing_mm))),
                         meta={"z_mm": sl.z_mm}, notes=list(sl.notes))
    return from_loaded(loaded, nodule_img, centre_rc)


def display_image(image: np.ndarray, is_hu: bool, window: str = "lung") -> np.ndarray:
    """``(H, W) float32 in [0, 1]`` for showing a slice: HU through a window preset, else stretched to its own
    range (a 16-bit export of HU + 1024 fills only 6% of [0, 1] and would show black; the models min-max scale
    their crops anyway)."""
    return window_preset(image, window) if is_hu else minmax(image)


#: The picker's magnifications around the nodule centre.
PICK_ZOOMS = {"whole slice": 1.0, "2x": 2.0, "4x": 4.0}


def zoom_ranges(shape: tuple[int, int], centre_rc: tuple[float, float], zoom: float,
                ) -> tuple[list[float], list[float]]:
    """Plotly axis ranges showing ``1/zoom`` of an image around ``centre_rc``, kept inside the image: ``x`` left to
    right, ``y`` bottom to top (an image's rows run downwards)."""
    h, w = shape
    out = []
    for size, c in ((w, centre_rc[1]), (h, centre_rc[0])):
        half = size / (2.0 * max(zoom, 1.0))
        lo = float(np.clip(c - half, -0.5, size - 0.5 - 2 * half))
        out.append([lo, lo + 2 * half])
    (x0, x1), (y0, y1) = out
    return [x0, x1], [y1, y0]
