"""Reading images: PNG/JPG/TIFF/NPY/DICOM files and DICOM series (folder or zip) into arrays.

Every reader checks its input and raises :class:`LungvizError` naming the file and the problem.
"""

from __future__ import annotations

import io as _io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from lungviz.errors import LungvizError
from lungviz.preprocess import valid_spacing

MAX_SIDE_PX = 8192
MIN_SIDE_PX = 16
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom", "")
#: Values an HU array may span. The low end admits scanners' outside-the-scan padding (-2048, -3024).
HU_RANGE = (-3100.0, 5000.0)

Source = str | Path | bytes | BinaryIO


@dataclass
class LoadedImage:
    """An image as read from disk or an upload.

    ``pixels`` is ``(H, W) float32``: Hounsfield units when ``is_hu`` else intensities in [0, 1].
    """

    pixels: np.ndarray
    is_hu: bool
    name: str
    pixel_spacing_mm: float | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class DicomSlice:
    """One CT slice in Hounsfield units with its geometry."""

    hu: np.ndarray  # (H, W) float32, HU
    pixel_spacing_mm: tuple[float, float]  # (row, column) spacing
    z_mm: float
    instance_number: int
    sop_uid: str
    series_uid: str
    name: str
    position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    slice_thickness_mm: float | None = None


def _name_of(src: Source, name: str | None) -> str:
    if name:
        return name
    if isinstance(src, (str, Path)):
        return str(src)
    return getattr(src, "name", "upload")


def _read_bytes(src: Source, name: str) -> bytes:
    if isinstance(src, bytes):
        data = src
    elif isinstance(src, (str, Path)):
        path = Path(src)
        if not path.exists():
            raise LungvizError("file not found.", source=name)
        if path.is_dir():
            raise LungvizError("this is a folder, not an image file.", source=name)
        data = path.read_bytes()
    else:
        if hasattr(src, "seek"):
            src.seek(0)  # an upload read once before must not look empty the second time
        data = src.read()
        if hasattr(src, "seek"):
            src.seek(0)
    if not data:
        raise LungvizError("the file is empty (0 bytes).", source=name)
    return data


def _check_size(shape: tuple[int, ...], name: str) -> None:
    h, w = shape[:2]
    if max(h, w) > MAX_SIDE_PX:
        raise LungvizError(
            f"the image is {w} x {h} pixels; the largest accepted side is {MAX_SIDE_PX} pixels. "
            "Please upload a single CT slice or a crop.",
            source=name,
        )
    if min(h, w) < MIN_SIDE_PX:
        raise LungvizError(f"the image is only {w} x {h} pixels; at least {MIN_SIDE_PX} are needed.", source=name)


def _to_gray01(arr: np.ndarray, mode: str, name: str) -> np.ndarray:
    """Convert a PIL-decoded array of any common mode to ``(H, W) float32 in [0, 1]``."""
    a = np.asarray(arr)
    if a.ndim == 3:
        if a.shape[2] == 4:  # RGBA/LA: composite alpha onto black, then luminance
            alpha = a[..., 3:4].astype(np.float32) / 255.0
            a = a[..., :3].astype(np.float32) * alpha
        elif a.shape[2] == 2:
            a = a[..., :1].astype(np.float32) * (a[..., 1:2].astype(np.float32) / 255.0)
        a = a.astype(np.float32)
        a = a[..., 0] if a.shape[2] == 1 else a[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(a / 255.0, 0.0, 1.0).astype(np.float32)
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if mode in ("I;16", "I;16B", "I;16L") or a.dtype == np.uint16:
        return (a.astype(np.float32) / 65535.0).astype(np.float32)
    if mode in ("I", "F") or a.dtype in (np.int32, np.float32):
        a = a.astype(np.float32)
        lo, hi = float(a.min()), float(a.max())
        return np.zeros_like(a) if hi <= lo else ((a - lo) / (hi - lo)).astype(np.float32)
    return (a.astype(np.float32) / 255.0).astype(np.float32)


def _decode_pil(data: bytes, name: str) -> Image.Image:
    try:
        Image.MAX_IMAGE_PIXELS = MAX_SIDE_PX * MAX_SIDE_PX
        img = Image.open(_io.BytesIO(data))
        _check_size((img.height, img.width), name)
        img.load()
    except LungvizError:
        raise
    except Image.DecompressionBombError as err:
        raise LungvizError(
            f"the image is too large to be a CT slice (largest accepted side {MAX_SIDE_PX} pixels).", source=name
        ) from err
    except UnidentifiedImageError as err:
        raise LungvizError("this is not an image file that lungviz can read (PNG, JPG, TIFF, NPY or DICOM).",
                           source=name) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise LungvizError(f"the image file is damaged or truncated ({err}).", source=name) from err
    return img


def load_raw_gray(src: Source, name: str | None = None) -> np.ndarray:
    """Read a single-channel image without rescaling (e.g. reader-count masks): ``(H, W)`` integer array."""
    label = _name_of(src, name)
    img = _decode_pil(_read_bytes(src, label), label)
    if img.mode not in ("L", "1", "I", "I;16", "P"):
        img = img.convert("L")
    return np.asarray(img)


def load_gray(src: Source, name: str | None = None) -> np.ndarray:
    """Read a raster image as ``(H, W) float32 in [0, 1]`` (grey; colour is converted to luminance)."""
    label = _name_of(src, name)
    img = _decode_pil(_read_bytes(src, label), label)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "CMYK":
        img = img.convert("RGB")
    return _to_gray01(np.asarray(img), img.mode, label)


def load_npy(src: Source, name: str | None = None) -> LoadedImage:
    """Read a 2D ``.npy`` array: values below -100 are taken as HU, else as intensities scaled to [0, 1]."""
    label = _name_of(src, name)
    data = _read_bytes(src, label)
    try:
        arr = np.load(_io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise LungvizError(f"this NPY file cannot be read safely ({err}).", source=label) from err
    except (OSError, EOFError) as err:
        raise LungvizError("this is not a valid NPY array file (damaged or another format).", source=label) from err
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
        raise LungvizError("the NPY file must hold a numeric image array.", source=label)
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise LungvizError(
            f"the NPY array has shape {tuple(arr.shape)}; a single 2D slice (height x width) is expected.",
            source=label,
        )
    _check_size(arr.shape, label)
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        n_bad = int((~np.isfinite(arr)).sum())
        raise LungvizError(f"the array contains {n_bad} missing or infinite values (NaN/Inf).", source=label)
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -100.0 and HU_RANGE[0] <= lo and hi <= HU_RANGE[1]:
        return LoadedImage(arr, True, label, meta={"format": "npy"})
    if lo >= 0.0 and hi <= 1.0:
        return LoadedImage(arr, False, label, meta={"format": "npy"})
    scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo)
    return LoadedImage(scaled.astype(np.float32), False, label, meta={"format": "npy", "rescaled_from": (lo, hi)})


def _dataset(data: bytes, name: str, stop_before_pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(_io.BytesIO(data), stop_before_pixels=stop_before_pixels, force=False)
    except InvalidDicomError as err:
        raise LungvizError("this is not a DICOM file (no DICOM header found).", source=name) from err
    except Exception as err:  # pydicom raises many types on damaged files
        raise LungvizError(f"the DICOM file is damaged ({err}).", source=name) from err


def is_dicom_bytes(data: bytes) -> bool:
    """True when the bytes carry the DICOM preamble marker."""
    return len(data) > 132 and data[128:132] == b"DICM"


def read_dicom(src: Source, name: str | None = None, require_ct: bool = True) -> DicomSlice:
    """Read one DICOM slice into Hounsfield units (RescaleSlope/Intercept applied)."""
    label = _name_of(src, name)
    return _slice_from_dataset(_dataset(_read_bytes(src, label), label), label, require_ct)


def _slice_from_dataset(ds, label: str, require_ct: bool = True) -> DicomSlice:
    modality = str(getattr(ds, "Modality", "")).upper()
    if require_ct and modality and modality != "CT":
        raise LungvizError(
            f"this DICOM is a '{modality}' image, not CT; lungviz reads CT slices in Hounsfield units.", source=label
        )
    if "PixelData" not in ds:
        raise LungvizError("this DICOM file has no image (pixel data) in it.", source=label)
    try:
        raw = ds.pixel_array
    except Exception as err:
        raise LungvizError(f"the DICOM image cannot be decoded ({err}).", source=label) from err
    if raw.ndim != 2:
        raise LungvizError(f"the DICOM holds an array of shape {raw.shape}; one 2D slice is expected.", source=label)
    _check_size(raw.shape, label)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    hu = raw.astype(np.float32) * slope + intercept
    spacing = getattr(ds, "PixelSpacing", None)
    spacing_rc = (float(spacing[0]), float(spacing[1])) if spacing is not None else (float("nan"),) * 2
    pos = getattr(ds, "ImagePositionPatient", None)
    position = tuple(float(v) for v in pos) if pos is not None else (0.0, 0.0, float(getattr(ds, "SliceLocation", 0)))
    thickness = getattr(ds, "SliceThickness", None)
    return DicomSlice(
        hu=hu,
        pixel_spacing_mm=spacing_rc,  # type: ignore[arg-type]
        z_mm=float(position[2]),
        instance_number=int(getattr(ds, "InstanceNumber", 0) or 0),
        sop_uid=str(getattr(ds, "SOPInstanceUID", "")),
        series_uid=str(getattr(ds, "SeriesInstanceUID", "")),
        name=label,
        position=position,  # type: ignore[arg-type]
        slice_thickness_mm=float(thickness) if thickness not in (None, "") else None,
    )


#: CT Image Storage and Enhanced CT Image Storage: objects meant to be CT slices (a damaged one raises).
CT_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")


def _is_ct_image(ds) -> bool:
    """A CT slice; dose reports, colour screenshots, other modalities and DICOMDIRs are not."""
    meta = getattr(ds, "file_meta", None)
    sop = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""))
    if sop in CT_SOP_CLASSES:
        return True
    return (
        str(getattr(ds, "Modality", "")).upper() in ("CT", "")
        and "PixelData" in ds
        and int(getattr(ds, "SamplesPerPixel", 1) or 1) == 1
        and int(getattr(ds, "NumberOfFrames", 1) or 1) == 1
    )


def _skip_in_series(name: str) -> bool:
    """Files in a series folder or zip that are never slices: hidden files, macOS ``__MACOSX/._*`` and DICOMDIR."""
    parts = name.replace("\\", "/").split("/")
    base = parts[-1]
    return base.startswith(".") or base.upper() == "DICOMDIR" or "__MACOSX" in parts


def _sorted_series(slices: list[DicomSlice], n_other: int, name: str) -> list[DicomSlice]:
    if not slices:
        other = f" ({n_other} other DICOM objects, not CT images, were left out)" if n_other else ""
        raise LungvizError(f"no DICOM CT slices were found{other}.", source=name)
    uids = {s.series_uid for s in slices}
    if len(uids) > 1:
        largest = max(sorted(uids), key=lambda u: sum(s.series_uid == u for s in slices))
        slices = [s for s in slices if s.series_uid == largest]
    shapes = {s.hu.shape for s in slices}
    if len(shapes) > 1:
        raise LungvizError(f"the series mixes slices of different sizes ({sorted(shapes)}).", source=name)
    return sorted(slices, key=lambda s: (s.z_mm, s.instance_number))


def read_series(src: Source, name: str | None = None) -> list[DicomSlice]:
    """Read a DICOM series from a folder or a ``.zip``; slices ordered by z position (inferior first).

    Objects that are not CT images (dose reports, DICOMDIR, macOS ``._`` files) are left out; a damaged
    slice raises. When several series are present the one with most slices is kept.
    """
    label = _name_of(src, name)
    slices: list[DicomSlice] = []
    n_other = 0

    def add(data: bytes, member: str) -> None:
        nonlocal n_other
        ds = _dataset(data, member)
        if _is_ct_image(ds):
            slices.append(_slice_from_dataset(ds, member))
        else:
            n_other += 1

    if isinstance(src, (str, Path)) and Path(src).is_dir():
        for p in sorted(Path(src).iterdir()):
            if not p.is_file() or p.suffix.lower() not in DICOM_SUFFIXES or _skip_in_series(p.name):
                continue
            data = p.read_bytes()
            if p.suffix == "" and not is_dicom_bytes(data):  # extension-less: a slice only with the DICOM marker
                continue
            add(data, str(p))
        return _sorted_series(slices, n_other, label)
    data = _read_bytes(src, label)
    try:
        zf = zipfile.ZipFile(_io.BytesIO(data))
    except zipfile.BadZipFile as err:
        raise LungvizError("this is not a readable zip archive.", source=label) from err
    with zf:
        for info in zf.infolist():
            if info.is_dir() or info.file_size == 0 or _skip_in_series(info.filename):
                continue
            try:
                member = zf.read(info)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError) as err:
                raise LungvizError(f"'{info.filename}' in the zip cannot be extracted ({err}).", source=label) from err
            if is_dicom_bytes(member) or info.filename.lower().endswith((".dcm", ".dicom")):
                add(member, f"{label}:{info.filename}")
    if not slices and not n_other:
        raise LungvizError("the zip archive contains no DICOM files.", source=label)
    return _sorted_series(slices, n_other, label)


def load_image(src: Source, name: str | None = None) -> LoadedImage:
    """Read any supported single image (PNG/JPG/TIFF/BMP, NPY, DICOM) by content and file name."""
    label = _name_of(src, name)
    data = _read_bytes(src, label)
    lower = label.lower()
    if lower.endswith(".npy") or data[:6] == b"\x93NUMPY":
        return load_npy(data, name=label)
    if is_dicom_bytes(data) or lower.endswith((".dcm", ".dicom")):
        sl = read_dicom(data, name=label)
        return LoadedImage(
            sl.hu, True, label, pixel_spacing_mm=valid_spacing(float(np.mean(sl.pixel_spacing_mm))),
            meta={"format": "dicom", "z_mm": sl.z_mm, "series_uid": sl.series_uid},
        )
    if lower.endswith(".zip") or data[:2] == b"PK":
        raise LungvizError("this is a zip archive, not a single image; open it as a DICOM series (a folder or a zip of "
                           "its slices).",
                           source=label)
    pixels = load_gray(data, name=label)
    return LoadedImage(pixels, False, label, meta={"format": "raster", "mode": Image.open(_io.BytesIO(data)).mode})
