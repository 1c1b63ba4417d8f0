"""Reading images: PNG/JPG/TIFF/GIF/NPY/DICOM files and DICOM series (folder or zip) into arrays.

Every reader checks its input and raises :class:`LungvizError` naming the file and the problem. What a file
claims (image size, frames, bits, an NPY header, a zip's directory) is checked against :mod:`lungviz.data.limits`
before anything is decoded or allocated, and every DICOM value used is parsed by one checked helper.
"""

from __future__ import annotations

import io as _io
import stat
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from lungviz.data import limits
from lungviz.data.limits import MAX_SIDE_PX, MIN_SIDE_PX, describe_bytes
from lungviz.data.preprocess import valid_spacing
from lungviz.errors import LungvizError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom", "")
#: Values an NPY array may span to be taken as HU. The low end admits scanners' outside-the-scan padding.
HU_RANGE = (-3100.0, 5000.0)
#: Zip compression methods read: what zip tools write. ``zipfile`` inflates bzip2 and LZMA members without an
#: output bound (one 4 KB read can become hundreds of MB), so those are refused.
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}

Source = str | Path | bytes | BinaryIO


@dataclass
class LoadedImage:
    """An image as read from disk or an upload.

    ``pixels`` is ``(H, W) float32``: Hounsfield units when ``is_hu`` else intensities in [0, 1]. ``notes`` say
    what reading changed or could not use (a later frame left out, a pixel spacing taken as unknown).
    """

    pixels: np.ndarray
    is_hu: bool
    name: str
    pixel_spacing_mm: float | None = None
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class DicomSlice:
    """One CT slice in Hounsfield units with its geometry (NaN spacing when unknown or implausible)."""

    hu: np.ndarray  # (H, W) float32, HU
    pixel_spacing_mm: tuple[float, float]  # (row, column) spacing
    z_mm: float
    instance_number: int
    sop_uid: str
    series_uid: str
    name: str
    position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    slice_thickness_mm: float | None = None
    notes: list[str] = field(default_factory=list)
    #: the header fields a result that references the slice copies (:func:`reference_header`), detached from the file
    header: Any = field(default=None, repr=False, compare=False)


# --------------------------------------------------------------------------------------------------------------
# Bytes in, with their budgets
# --------------------------------------------------------------------------------------------------------------


def _name_of(src: Source, name: str | None) -> str:
    if name:
        return name
    if isinstance(src, (str, Path)):
        return str(src)
    return getattr(src, "name", "upload")


def _printable(name: str) -> str:
    """A file or member name for a one-line message: control characters (a line break) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)


def _reason(err: BaseException) -> str:
    """A library's exception as a short clause for a message: on one line, at most 160 characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _refuse_size(size: int, limit: int, what: str, name: str) -> None:
    if size > limit:
        raise LungvizError(f"{what} is {describe_bytes(size)}; lungviz reads at most {describe_bytes(limit)}.",
                           source=name)


def _read_bytes(src: Source, name: str, limit: int | None = None) -> bytes:
    """The whole file, refused when it is empty, not a regular file or over ``limit`` bytes (default
    :data:`limits.MAX_UPLOAD_BYTES`)."""
    limit = limits.MAX_UPLOAD_BYTES if limit is None else limit
    if isinstance(src, bytes):
        data = src
    elif isinstance(src, (str, Path)):
        path = Path(src)
        if not path.exists():
            raise LungvizError("file not found.", source=name)
        if path.is_dir():
            raise LungvizError("this is a folder, not an image file.", source=name)
        return _read_file(path, name, limit)
    else:
        if hasattr(src, "seek"):
            src.seek(0)  # an upload read once before must not look empty the second time
        data = src.read(limit + 1)  # one byte more than the limit tells an upload over it
        if hasattr(src, "seek"):
            src.seek(0)
        if len(data) > limit:
            raise LungvizError(f"the file is larger than {describe_bytes(limit)}, the most lungviz reads.", source=name)
    _refuse_size(len(data), limit, "the file", name)
    if not data:
        raise LungvizError("the file is empty (0 bytes).", source=name)
    return data


def _read_file(path: Path, name: str, limit: int, head: int | None = None) -> bytes:
    """A regular file's bytes (its first ``head`` bytes when given), its size checked before reading."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise LungvizError("this is not a regular file (a device or a pipe), so it cannot be an image.",
                               source=name)
        _refuse_size(info.st_size, limit, "the file", name)
        with path.open("rb") as fh:
            data = fh.read(limit + 1 if head is None else head)
    except OSError as err:
        raise LungvizError(f"the file cannot be read ({err.strerror or _reason(err)}).", source=name) from err
    _refuse_size(len(data), limit, "the file", name)
    if not data:
        raise LungvizError("the file is empty (0 bytes).", source=name)
    return data


class _Budget:
    """What one upload may still decode: :data:`limits.MAX_DECODED_BYTES` in all and, past
    :data:`limits.EXPANSION_FREE_BYTES`, at most :data:`limits.MAX_EXPANSION` times the bytes it was read from."""

    def __init__(self, source_bytes: int = 0, what: str = "the image") -> None:
        self.source_bytes = source_bytes
        self.decoded = 0
        self.what = what

    def charge(self, n: int, name: str) -> None:
        total, what = self.decoded + n, self.what
        if total > limits.MAX_DECODED_BYTES:
            raise LungvizError(f"{what} would take {describe_bytes(total)} of memory once decoded; one upload may "
                               f"take at most {describe_bytes(limits.MAX_DECODED_BYTES)}.", source=name)
        if total > limits.EXPANSION_FREE_BYTES and total > limits.MAX_EXPANSION * self.source_bytes:
            raise LungvizError(
                f"{what} would take {describe_bytes(total)} of memory once decoded, "
                f"{total / max(self.source_bytes, 1):,.0f} times the {describe_bytes(self.source_bytes)} it is stored "
                f"in; lungviz decodes at most {limits.MAX_EXPANSION} times a file's size (real CT images compress far "
                "less), so this file is refused as a decompression bomb.", source=name)
        self.decoded = total


@contextmanager
def _decoding() -> Iterator[None]:
    """Library warnings silenced while decoding (problems become :class:`LungvizError`, not stderr noise), Pillow's
    decompression-bomb check raising at the side limit, and numpy's floating-point warnings off."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = MAX_SIDE_PX * MAX_SIDE_PX
        with np.errstate(all="ignore"):
            yield


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


def _require_finite(arr: np.ndarray, name: str, what: str = "the array") -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        n_bad = int((~np.isfinite(arr)).sum())
        raise LungvizError(f"{what} contains {n_bad} missing or infinite values (NaN/Inf).", source=name)


# --------------------------------------------------------------------------------------------------------------
# Raster images (PIL)
# --------------------------------------------------------------------------------------------------------------


def _to_gray01(arr: np.ndarray, mode: str, name: str) -> np.ndarray:
    """Convert a PIL-decoded array of any common mode to ``(H, W) float32 in [0, 1]``."""
    a = np.asarray(arr)
    _require_finite(a, name, "the image")
    if a.ndim == 3:
        bands = [a[..., k].astype(np.float32) for k in range(min(a.shape[2], 3))]
        if a.shape[2] == 4:  # RGBA/LA: composite alpha onto black, then luminance
            alpha = a[..., 3].astype(np.float32) / 255.0
            bands = [b * alpha for b in bands]
        elif a.shape[2] == 2:
            bands = [bands[0] * (a[..., 1].astype(np.float32) / 255.0)]
        if len(bands) == 1:
            gray = bands[0]
        else:  # luminance, one band at a time so a large colour image needs no (H, W, 3) float copy
            gray = bands[0] * np.float32(0.299)
            gray += bands[1] * np.float32(0.587)
            gray += bands[2] * np.float32(0.114)
        return np.clip(gray / 255.0, 0.0, 1.0).astype(np.float32)
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if mode in ("I;16", "I;16B", "I;16L") or a.dtype == np.uint16:
        return (a.astype(np.float32) / 65535.0).astype(np.float32)
    if mode in ("I", "F") or a.dtype in (np.int32, np.float32):
        a = a.astype(np.float32)
        lo, hi = float(a.min()), float(a.max())
        return np.zeros_like(a) if hi <= lo else ((a - lo) / (hi - lo)).astype(np.float32)
    return (a.astype(np.float32) / 255.0).astype(np.float32)


def _pil_bytes_per_pixel(mode: str) -> int:
    """Bytes Pillow holds per pixel of ``mode``: 4 for any multi-band image, else the band's own size."""
    try:
        desc = ImageMode.getmode(mode)
    except KeyError:
        return 4
    return 4 if len(desc.bands) > 1 else int(desc.typestr[-1])


def _decode_pil(data: bytes, name: str) -> tuple[Image.Image, list[str]]:
    """The first frame, EXIF orientation applied, with notes on what was left out or turned; its declared size
    and decoded bytes checked before decoding."""
    notes: list[str] = []
    with _decoding():
        try:
            img = Image.open(_io.BytesIO(data))
            _check_size((img.height, img.width), name)
            _Budget(len(data)).charge(img.width * img.height * (_pil_bytes_per_pixel(img.mode) + 4), name)
            if getattr(img, "is_animated", False):
                notes.append(f"{name}: the file holds several frames (an animation or a multi-page image); only "
                             "the first was read.")
            img.load()
        except LungvizError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise LungvizError(f"the image is too large to be a CT slice (largest accepted side {MAX_SIDE_PX} "
                               "pixels).", source=name) from err
        except UnidentifiedImageError as err:
            raise LungvizError("this is not an image file that lungviz can read (PNG, JPG, TIFF, NPY or DICOM).",
                               source=name) from err
        except Exception as err:  # Pillow's decoders raise many types on damaged files
            raise LungvizError(f"the image file is damaged or truncated ({_reason(err)}).", source=name) from err
        try:
            if int(img.getexif().get(0x0112, 1)) in range(2, 9):
                img = ImageOps.exif_transpose(img)
                notes.append(f"{name}: the image was rotated or flipped as its EXIF orientation tag says.")
        except Exception:  # unreadable EXIF: the pixels as stored
            pass
    return img, notes


def _load_raster(data: bytes, label: str) -> tuple[np.ndarray, str, list[str]]:
    """``(H, W) float32 in [0, 1]``, the file's own mode and the reading notes of a raster image."""
    img, notes = _decode_pil(data, label)
    mode = img.mode
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "CMYK":
        img = img.convert("RGB")
    with np.errstate(all="ignore"):
        return _to_gray01(np.asarray(img), img.mode, label), mode, notes


def load_raw_gray(src: Source, name: str | None = None) -> np.ndarray:
    """Read a single-channel image without rescaling (e.g. reader-count masks): ``(H, W)`` integer array."""
    label = _name_of(src, name)
    img, _ = _decode_pil(_read_bytes(src, label), label)
    if img.mode not in ("L", "1", "I", "I;16", "P"):
        img = img.convert("L")
    return np.asarray(img)


def load_gray(src: Source, name: str | None = None) -> np.ndarray:
    """Read a raster image as ``(H, W) float32 in [0, 1]`` (grey; colour is converted to luminance)."""
    label = _name_of(src, name)
    return _load_raster(_read_bytes(src, label), label)[0]


# --------------------------------------------------------------------------------------------------------------
# NPY
# --------------------------------------------------------------------------------------------------------------


def _npy_header(data: bytes, label: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, data offset)`` from an NPY header, before any array is allocated."""
    fp = _io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise LungvizError(f"NPY format version {version[0]}.{version[1]} is not read (1.0 and 2.0 are).",
                               source=label)
    except LungvizError:
        raise
    except Exception as err:  # numpy's header parser raises ValueError and others on damaged headers
        raise LungvizError("this is not a valid NPY array file (damaged or another format).", source=label) from err
    return tuple(int(n) for n in shape), bool(fortran), dtype, fp.tell()


def load_npy(src: Source, name: str | None = None) -> LoadedImage:
    """Read a 2D ``.npy`` array: values below -100 are taken as HU, else as intensities scaled to [0, 1].

    The header's shape and dtype are checked, and the data's length against them, before anything is
    allocated; pickled objects are never loaded.
    """
    label = _name_of(src, name)
    data = _read_bytes(src, label)
    shape, fortran, dtype, offset = _npy_header(data, label)
    if dtype.hasobject:
        raise LungvizError("this NPY file cannot be read safely (it holds Python objects, which lungviz never "
                           "unpickles).", source=label)
    if dtype.kind not in "biuf" or dtype.subdtype is not None:
        raise LungvizError("the NPY file must hold a numeric image array.", source=label)
    kept = tuple(n for n in shape if n != 1)
    if len(kept) != 2:
        raise LungvizError(f"the NPY array has shape {shape}; a single 2D slice (height x width) is expected.",
                           source=label)
    _check_size(kept, label)
    count = kept[0] * kept[1]
    if len(data) - offset < count * dtype.itemsize:
        raise LungvizError(f"the NPY file is truncated: its header claims {kept[1]} x {kept[0]} values of "
                           f"{dtype.itemsize} bytes but it holds {describe_bytes(len(data) - offset)} of data.",
                           source=label)
    _Budget(len(data)).charge(count * 4, label)
    raw = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order="F" if fortran else "C")
    with np.errstate(all="ignore"):
        arr = np.squeeze(raw).astype(np.float32)
    _require_finite(arr, label)
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -100.0 and HU_RANGE[0] <= lo and hi <= HU_RANGE[1]:
        return LoadedImage(arr, True, label, meta={"format": "npy"})
    if lo >= 0.0 and hi <= 1.0:
        return LoadedImage(arr, False, label, meta={"format": "npy"})
    scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo)
    return LoadedImage(scaled.astype(np.float32), False, label, meta={"format": "npy", "rescaled_from": (lo, hi)})


# --------------------------------------------------------------------------------------------------------------
# DICOM values: one checked parser per kind
# --------------------------------------------------------------------------------------------------------------


def _shown(value: Any) -> str:
    text = "\\".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    text = " ".join(text.split())
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _dicom_values(ds, keyword: str, source: str) -> list | None:
    """The value(s) of a DICOM field as a list; None when it is absent or empty."""
    try:
        with warnings.catch_warnings():  # pydicom warns as it converts a malformed value: the error says it instead
            warnings.simplefilter("ignore")
            value = ds.get(keyword)
    except Exception as err:  # pydicom converts values lazily and raises many types on damaged ones
        raise LungvizError(f"the DICOM field {keyword} cannot be read ({_reason(err)}).", source=source) from err
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [value]
    values = list(value)
    return values or None


def _number(value: Any, keyword: str, source: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        try:
            number = float(value.decode("ascii") if isinstance(value, bytes) else str(value).strip())
        except (ValueError, UnicodeDecodeError) as err:
            raise LungvizError(f"the DICOM field {keyword} is {_shown(value)}, not a number.", source=source) from err
    if not np.isfinite(number):
        raise LungvizError(f"the DICOM field {keyword} is {_shown(value)}, not a finite number.", source=source)
    return number


def dicom_floats(ds, keyword: str, n: int, *, source: str,
                 default: tuple[float, ...] | None = None) -> tuple[float, ...] | None:
    """Exactly ``n`` finite numbers from a DICOM field (``default`` when absent or empty)."""
    values = _dicom_values(ds, keyword, source)
    if values is None:
        return default
    if len(values) != n:
        raise LungvizError(f"the DICOM field {keyword} holds {len(values)} value{'s' if len(values) != 1 else ''} "
                           f"({_shown(values)}); {n} number{'s are' if n != 1 else ' is'} expected.", source=source)
    return tuple(_number(v, keyword, source) for v in values)


def dicom_float(ds, keyword: str, *, source: str, default: float | None = None) -> float | None:
    """One finite number from a DICOM field (``default`` when absent or empty)."""
    values = dicom_floats(ds, keyword, 1, source=source)
    return default if values is None else values[0]


def dicom_int(ds, keyword: str, *, source: str, default: int | None = None) -> int | None:
    """One whole number from a DICOM field (``default`` when absent or empty)."""
    number = dicom_float(ds, keyword, source=source)
    if number is None:
        return default
    if not number.is_integer():
        raise LungvizError(f"the DICOM field {keyword} is {_shown(number)}, not a whole number.", source=source)
    return int(number)


def dicom_text(ds, keyword: str, *, source: str, default: str = "") -> str:
    """A DICOM field as one line of text (``default`` when absent or empty)."""
    values = _dicom_values(ds, keyword, source)
    if values is None:
        return default
    parts = [v.decode("ascii", "replace") if isinstance(v, bytes) else str(v) for v in values]
    return _printable(" ".join("\\".join(parts).split()))


# --------------------------------------------------------------------------------------------------------------
# DICOM files
# --------------------------------------------------------------------------------------------------------------


def is_dicom_bytes(data: bytes) -> bool:
    """True when the bytes carry the DICOM preamble marker."""
    return len(data) > 132 and data[128:132] == b"DICM"


class _Inflation:
    """Bytes inflated while one series is read (zip members, and the deflated DICOM data sets of a zip or a folder),
    refused as soon as they pass :data:`limits.MAX_ZIP_INFLATED_BYTES` in all."""

    def __init__(self, what: str, label: str) -> None:
        self.total, self.what, self.label = 0, what, label

    def charge(self, n: int) -> None:
        self.total += n
        if self.total > limits.MAX_ZIP_INFLATED_BYTES:
            limit = describe_bytes(limits.MAX_ZIP_INFLATED_BYTES)
            raise LungvizError(f"{self.what} to more than {limit} in all; lungviz reads at most that.",
                               source=self.label)


def _inflate_into(out: BinaryIO, payload: memoryview, name: str, inflation: _Inflation | None) -> None:
    """Inflate a raw deflate stream onto ``out``, piece by piece, refused as soon as ``out`` would pass
    :data:`limits.MAX_FILE_BYTES` (and charged to ``inflation``); input is fed in pieces too, so no step copies more
    than a piece."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    step = limits.ZIP_READ_CHUNK
    try:
        for start in range(0, len(payload), step):
            pending: bytes | memoryview = payload[start : start + step]
            while pending and not inflater.eof:
                piece = inflater.decompress(pending, step)
                if out.tell() + len(piece) > limits.MAX_FILE_BYTES:
                    raise LungvizError(f"the deflated DICOM inflates to more than "
                                       f"{describe_bytes(limits.MAX_FILE_BYTES)}, more than any slice lungviz reads.",
                                       source=name)
                if inflation is not None:
                    inflation.charge(len(piece))
                out.write(piece)
                pending = inflater.unconsumed_tail
            if inflater.eof:
                return
    except zlib.error as err:
        raise LungvizError(f"the DICOM file is damaged ({_reason(err)}).", source=name) from err


def _inflated_dicom(data: bytes, name: str, inflation: _Inflation | None = None) -> bytes:
    """The file with a Deflated-syntax data set inflated once, within the per-file limit (and the series' total), and
    labelled Explicit VR Little Endian: the header and then the pixels are parsed from these bytes without inflating
    again (pydicom would inflate the whole data set unbounded on every parse). Any other file is returned as it is."""
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    try:
        fp = _io.BytesIO(data)
        read_preamble(fp, False)
        meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                            stop_when=lambda tag, vr, length: tag >> 16 != 2)
        if dicom_text(meta, "TransferSyntaxUID", source=name) != DeflatedExplicitVRLittleEndian:
            return data
        start = fp.tell()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out = _io.BytesIO()  # grown in place, and getvalue() hands over its buffer: the file is held once
        out.write(data[:128] + b"DICM")
        write_file_meta_info(out, meta, enforce_standard=False)
    except LungvizError:
        raise
    except Exception:  # not DICOM, or a damaged file meta: parsing the file says which
        return data
    _inflate_into(out, memoryview(data)[start:], name, inflation)
    return out.getvalue()


#: DICOM values longer than this are left in the file while it is parsed, and read only when used (the pixels):
#: a large private or padding field costs nothing.
DEFER_BYTES = 1 << 20


class _DicomStream(_io.BytesIO):
    """A DICOM file being parsed, noting whether a field runs past the file's end: pydicom then reads what is there
    (or skips past the end) without complaint, so a truncated file would look like a complete one."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.end = len(data)
        self.truncated = False

    def read(self, size: int | None = -1, /) -> bytes:
        at = self.tell()
        out = super().read(size)
        # Only the 8 bytes of a next field's tag may meet the file's end, and only exactly there: any other read
        # that comes back short is a field cut off (or one skipped past the end).
        if size is not None and len(out) < size and (out or at > self.end or size != 8):
            self.truncated = True
        return out


def _dataset(data: bytes, name: str, stop_before_pixels: bool = False):
    """The parsed DICOM file; with ``stop_before_pixels`` its header only. A deflated file is inflated first, within
    the per-file limit (callers that parse a file twice pass it through :func:`_inflated_dicom` once beforehand).
    Large values are read only when used; a file that ends part-way through a field is refused as truncated."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    _refuse_size(len(data), limits.MAX_FILE_BYTES, "the DICOM file", name)
    data = _inflated_dicom(data, name)
    try:
        stream = _DicomStream(data)
        ds = pydicom.dcmread(stream, stop_before_pixels=stop_before_pixels, defer_size=DEFER_BYTES, force=False)
    except InvalidDicomError as err:
        raise LungvizError("this is not a DICOM file (no DICOM header found).", source=name) from err
    except Exception as err:  # pydicom raises many types on damaged files
        raise LungvizError(f"the DICOM file is damaged ({_reason(err)}).", source=name) from err
    if stream.truncated:
        raise LungvizError("the DICOM file is damaged: it ends part-way through its data (truncated, as by an "
                           "interrupted copy or download).", source=name)
    return ds


def _check_transfer_syntax(ds, name: str) -> None:
    """The pixel data's encoding must be one pydicom can decode here."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    text = dicom_text(meta, "TransferSyntaxUID", source=name) if meta is not None else ""
    if not text:
        return  # pydicom then reads the data set as implicit VR little endian, uncompressed
    uid = UID(text)
    known, compressed = uid.is_transfer_syntax, uid.is_transfer_syntax and uid.is_compressed
    if not known:
        raise LungvizError(f"the DICOM transfer syntax {_shown(text)} is not one lungviz knows; export the slice "
                           "uncompressed (Explicit VR Little Endian).", source=name)
    if compressed:
        try:
            available = get_decoder(uid).is_available
        except Exception:
            available = False
        if not available:
            raise LungvizError(f"the DICOM image is compressed as {uid.name}, which lungviz cannot decode here; "
                               "export the slice uncompressed (Explicit VR Little Endian).", source=name)


def _check_pixel_claims(header, name: str) -> tuple[int, int]:
    """``(rows, columns)`` after checking what the header claims: one 2D grey slice within the size limits, in a
    bit depth and transfer syntax lungviz decodes."""
    rows = dicom_int(header, "Rows", source=name)
    cols = dicom_int(header, "Columns", source=name)
    if rows is None or cols is None:
        raise LungvizError("this DICOM file has no image (pixel data) in it.", source=name)
    _check_size((rows, cols), name)
    frames = dicom_int(header, "NumberOfFrames", source=name, default=1)
    if frames != 1:
        raise LungvizError(f"the DICOM holds {frames} frames (NumberOfFrames); one 2D slice is expected.",
                           source=name)
    samples = dicom_int(header, "SamplesPerPixel", source=name, default=1)
    if samples != 1:
        raise LungvizError(f"the DICOM image has {samples} samples per pixel (SamplesPerPixel), a colour image; CT "
                           "slices have one.", source=name)
    bits = dicom_int(header, "BitsAllocated", source=name)
    if bits not in limits.DICOM_BITS_ALLOCATED:
        raise LungvizError(f"the DICOM field BitsAllocated is {'missing' if bits is None else bits}; lungviz reads "
                           f"{', '.join(map(str, limits.DICOM_BITS_ALLOCATED))} bits per pixel.", source=name)
    _check_transfer_syntax(header, name)
    return rows, cols


def _to_hu(raw: np.ndarray, ds, name: str) -> np.ndarray:
    """Stored values to ``float32`` HU through RescaleSlope/Intercept, refused when that leaves the physical range.

    A single stored value below the range is the scanner's outside-the-field padding: it becomes the range's low end.
    """
    slope = dicom_float(ds, "RescaleSlope", source=name, default=1.0)
    intercept = dicom_float(ds, "RescaleIntercept", source=name, default=0.0)
    assert slope is not None and intercept is not None
    if slope == 0.0:
        raise LungvizError("the DICOM field RescaleSlope is 0, which would make every pixel the same value.",
                           source=name)
    for keyword, value in (("RescaleSlope", slope), ("RescaleIntercept", intercept)):
        if abs(value) > limits.MAX_RESCALE:
            raise LungvizError(f"the DICOM field {keyword} is {value:g}, far outside any CT rescale.", source=name)
    lo, hi = sorted(float(v) * slope + intercept for v in (raw.min(), raw.max()))
    hu_lo, hu_hi = limits.PHYSICAL_HU_RANGE
    refuse = LungvizError(
        f"after RescaleSlope {slope:g} and RescaleIntercept {intercept:g} the pixels span {lo:,.0f} to {hi:,.0f} HU, "
        f"outside the physical {hu_lo:,.0f} to {hu_hi:,.0f} HU; the rescale fields are wrong or this is not a CT "
        "image in Hounsfield units.", source=name)
    if hi > hu_hi:
        raise refuse
    hu = raw.astype(np.float32)
    hu *= np.float32(slope)
    hu += np.float32(intercept)
    if lo < hu_lo:
        below = hu < hu_lo
        if np.unique(raw[below]).size > 1:
            raise refuse
        hu[below] = hu_lo
    return hu


def _geometry(ds, name: str) -> dict:
    """Spacing, position, thickness and identifiers of a slice, each field parsed by the checked helpers; a
    pixel spacing outside :data:`limits.SPACING_RANGE_MM` is unknown (NaN) with a note."""
    notes: list[str] = []
    spacing = dicom_floats(ds, "PixelSpacing", 2, source=name)
    spacing_rc = (float("nan"), float("nan"))
    if spacing is not None:
        if all(valid_spacing(v) is not None for v in spacing):
            spacing_rc = (spacing[0], spacing[1])
        else:
            lo, hi = limits.SPACING_RANGE_MM
            notes.append(f"{name}: the DICOM field PixelSpacing says {spacing[0]:g} x {spacing[1]:g} mm per pixel, "
                         f"outside the plausible {lo:g}-{hi:g} mm, so the pixel spacing is taken as unknown.")
    position = dicom_floats(ds, "ImagePositionPatient", 3, source=name)
    if position is None:
        position = (0.0, 0.0, dicom_float(ds, "SliceLocation", source=name, default=0.0))
    thickness = dicom_float(ds, "SliceThickness", source=name)
    return {
        "pixel_spacing_mm": spacing_rc,
        "z_mm": float(position[2]),
        "position": position,
        "instance_number": dicom_int(ds, "InstanceNumber", source=name, default=0),
        "sop_uid": dicom_text(ds, "SOPInstanceUID", source=name),
        "series_uid": dicom_text(ds, "SeriesInstanceUID", source=name),
        "slice_thickness_mm": thickness if thickness is not None and thickness > 0 else None,
        "notes": notes,
    }


#: The header fields a DICOM result (an SR, a SEG) copies from or checks in the slices it references: patient, study,
#: series, frame of reference, image plane and pixel description (no private fields, no pixels).
REFERENCE_KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "Modality", "ImageType",
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "InstanceNumber",
    "FrameOfReferenceUID", "PositionReferenceIndicator", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "Rows", "Columns", "SamplesPerPixel",
    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
)


def reference_header(header):
    """A new dataset with the :data:`REFERENCE_KEYWORDS` fields ``header`` has (at most 1 KB each), holding no
    reference to the file's bytes (a parsed header keeps its whole file alive)."""
    from pydicom.dataset import Dataset

    out = Dataset()
    for keyword in REFERENCE_KEYWORDS:
        try:
            elem = header.data_element(keyword)
            if elem is not None and elem.VR != "SQ" and len(str(elem.value)) <= 1024:
                out.add(elem)
        except Exception:  # a damaged field is left out; what needs it says so
            continue
    return out


def _read_slice(data: bytes, header, label: str, budget: _Budget, require_ct: bool = True) -> DicomSlice:
    """One slice from a file whose header is parsed: claims checked and charged, then decoded (call inside
    :func:`_decoding`)."""
    modality = dicom_text(header, "Modality", source=label).upper()
    if require_ct and modality and modality != "CT":
        raise LungvizError(f"this DICOM is a {_shown(modality)} image, not CT; lungviz reads CT slices in Hounsfield "
                           "units.", source=label)
    rows, cols = _check_pixel_claims(header, label)
    budget.charge(rows * cols * 4, label)
    ds = _dataset(data, label)
    if "PixelData" not in ds:
        raise LungvizError("this DICOM file has no image (pixel data) in it.", source=label)
    try:
        raw = ds.pixel_array
    except Exception as err:
        raise LungvizError(f"the DICOM image cannot be decoded ({_reason(err)}).", source=label) from err
    if raw.shape != (rows, cols):
        raise LungvizError(f"the DICOM image decodes to shape {raw.shape}; its header says {rows} x {cols}.",
                           source=label)
    hu = _to_hu(raw, ds, label)
    return DicomSlice(hu=hu, name=label, **_geometry(ds, label), header=reference_header(header))


def read_dicom(src: Source, name: str | None = None, require_ct: bool = True) -> DicomSlice:
    """Read one DICOM slice into Hounsfield units (RescaleSlope/Intercept applied)."""
    label = _name_of(src, name)
    data = _read_bytes(src, label, limits.MAX_FILE_BYTES)
    budget = _Budget(len(data))
    with _decoding():
        data = _inflated_dicom(data, label)
        return _read_slice(data, _dataset(data, label, stop_before_pixels=True), label, budget, require_ct)


#: CT Image Storage and Enhanced CT Image Storage: objects meant to be CT slices (a damaged one raises).
CT_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")


def _is_ct_image(header, name: str) -> bool:
    """A CT slice; dose reports, colour screenshots, other modalities and DICOMDIRs are not (header only)."""
    meta = getattr(header, "file_meta", None)
    sop = dicom_text(header, "SOPClassUID", source=name) or (
        dicom_text(meta, "MediaStorageSOPClassUID", source=name) if meta is not None else "")
    if sop in CT_SOP_CLASSES:
        return True
    return (
        dicom_text(header, "Modality", source=name).upper() in ("CT", "")
        and dicom_int(header, "Rows", source=name) is not None
        and dicom_int(header, "SamplesPerPixel", source=name, default=1) == 1
        and dicom_int(header, "NumberOfFrames", source=name, default=1) == 1
    )


# --------------------------------------------------------------------------------------------------------------
# DICOM series: a folder or a zip
# --------------------------------------------------------------------------------------------------------------


def _skip_in_series(name: str) -> bool:
    """Files in a series folder or zip that are never slices: hidden files, macOS ``__MACOSX/._*`` and DICOMDIR."""
    parts = name.replace("\\", "/").split("/")
    base = parts[-1]
    return base.startswith(".") or base.upper() == "DICOMDIR" or "__MACOSX" in parts


def _sorted_series(slices: list[DicomSlice], n_other: int, name: str) -> list[DicomSlice]:
    if not slices:
        other = ("" if not n_other else " (1 other DICOM object, not a CT image, was left out)" if n_other == 1
                 else f" ({n_other} other DICOM objects, not CT images, were left out)")
        raise LungvizError(f"no DICOM CT slices were found{other}.", source=name)
    uids = {s.series_uid for s in slices}
    if len(uids) > 1:
        largest = max(sorted(uids), key=lambda u: sum(s.series_uid == u for s in slices))
        slices = [s for s in slices if s.series_uid == largest]
    shapes = {s.hu.shape for s in slices}
    if len(shapes) > 1:
        raise LungvizError(f"the series mixes slices of different sizes ({sorted(shapes)}).", source=name)
    return sorted(slices, key=lambda s: (s.z_mm, s.instance_number))


def _too_many_files(name: str) -> LungvizError:
    return LungvizError(f"the series holds more than {limits.MAX_SERIES_FILES:,} files; lungviz looks at "
                        f"{limits.MAX_SERIES_FILES:,} at most.", source=name)


def _folder_files(folder: Path, label: str, budget: _Budget) -> Iterator[tuple[bytes, str]]:
    """``(bytes, path)`` of each file of a series folder that may be a slice, each size checked before reading."""
    entries = []
    for k, p in enumerate(folder.iterdir()):
        if k >= limits.MAX_SERIES_FILES:
            raise _too_many_files(label)
        entries.append(p)
    read = 0
    for p in sorted(entries):
        if not p.is_file() or p.suffix.lower() not in DICOM_SUFFIXES or _skip_in_series(p.name):
            continue
        # extension-less: a slice only with the DICOM marker, looked for before the file is read whole
        if p.suffix == "" and not is_dicom_bytes(_read_file(p, str(p), limits.MAX_FILE_BYTES, head=133)):
            continue
        data = _read_file(p, str(p), limits.MAX_FILE_BYTES)
        read += len(data)
        _refuse_size(read, limits.MAX_UPLOAD_BYTES, "the series folder", label)
        budget.source_bytes = read
        yield data, str(p)


def _zip_archive(data: bytes, label: str) -> zipfile.ZipFile:
    """The zip, its directory's claims (member count, directory size) checked before ``zipfile`` parses it."""
    fp = _io.BytesIO(data)
    try:
        # The end record ZipFile.__init__ reads first: the number of members and the size of the list of them.
        end = zipfile._EndRecData(fp)
    except OSError:
        end = None
    if not end:
        raise LungvizError("this is not a readable zip archive.", source=label)
    if end[zipfile._ECD_ENTRIES_TOTAL] > limits.MAX_SERIES_FILES:
        raise _too_many_files(label)
    _refuse_size(end[zipfile._ECD_SIZE], limits.MAX_ZIP_DIRECTORY_BYTES, "the zip's list of files", label)
    try:
        archive = zipfile.ZipFile(fp)
    except Exception as err:  # zipfile raises BadZipFile, ValueError, UnicodeDecodeError... on damaged directories
        raise LungvizError(f"this is not a readable zip archive ({_reason(err)}).", source=label) from err
    if len(archive.infolist()) > limits.MAX_SERIES_FILES:
        raise _too_many_files(label)
    return archive


def _zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, label: str, limit: int,
                head: int | None = None, inflation: _Inflation | None = None) -> bytes:
    """A member's bytes (its first ``head`` bytes when given), inflated in pieces (charged to ``inflation``) and
    refused as soon as they pass ``limit``; the size the zip declares is checked first."""
    where = f"'{_printable(info.filename)}' in the zip"
    if info.file_size > limit:
        raise LungvizError(f"{where} inflates to {describe_bytes(info.file_size)}, as the zip declares; lungviz reads "
                           f"at most {describe_bytes(limit)} per file.", source=label)
    if info.compress_type not in ZIP_METHODS:
        raise LungvizError(f"{where} is compressed with a method lungviz does not read (zip method "
                           f"{info.compress_type}); zip the series with the usual deflate compression.", source=label)
    out, size = _io.BytesIO(), 0  # grown in place, handed over whole by getvalue(): the member is held once
    try:
        with archive.open(info) as fh:
            while chunk := fh.read(limits.ZIP_READ_CHUNK if head is None else head - size):
                size += len(chunk)
                if size > limit:
                    raise LungvizError(f"{where} inflates to more than {describe_bytes(limit)}; lungviz reads at "
                                       f"most {describe_bytes(limit)} per file.", source=label)
                if inflation is not None:
                    inflation.charge(len(chunk))
                out.write(chunk)
                if head is not None and size >= head:
                    break
    except LungvizError:
        raise
    except Exception as err:  # damaged, encrypted or truncated members
        raise LungvizError(f"{where} cannot be extracted ({_reason(err)}).", source=label) from err
    return out.getvalue()


def _zip_files(data: bytes, label: str, inflation: _Inflation) -> Iterator[tuple[bytes, str]]:
    """``(bytes, name)`` of each member of a zip that may be a slice, read within the per-file and total limits."""
    archive = _zip_archive(data, label)
    with archive:
        for info in archive.infolist():
            mode = info.external_attr >> 16
            if info.is_dir() or stat.S_ISLNK(mode) or info.file_size == 0 or _skip_in_series(info.filename):
                continue
            # named as DICOM, or a slice only with the DICOM marker, looked for before the member is read whole
            if not info.filename.lower().endswith((".dcm", ".dicom")) and (
                    info.compress_type not in ZIP_METHODS
                    or not is_dicom_bytes(_zip_member(archive, info, label, limits.MAX_FILE_BYTES, head=133))):
                continue
            member = _zip_member(archive, info, label, limits.MAX_FILE_BYTES, inflation=inflation)
            yield member, f"{label}:{_printable(info.filename)}"


def _series_slice(data: bytes, name: str, budget: _Budget, inflation: _Inflation, n_slices: int,
                  label: str) -> DicomSlice | None:
    """One file of a series as a slice, or None when it is not a CT image; a deflated file is inflated once, counted
    in the series' total (call inside :func:`_decoding`)."""
    data = _inflated_dicom(data, name, inflation)
    header = _dataset(data, name, stop_before_pixels=True)
    if not _is_ct_image(header, name):
        return None
    if n_slices >= limits.MAX_SLICES:
        raise LungvizError(f"the series holds more than {limits.MAX_SLICES:,} CT slices; lungviz reads "
                           f"{limits.MAX_SLICES:,} at most.", source=label)
    return _read_slice(data, header, name, budget)


def read_series(src: Source, name: str | None = None) -> list[DicomSlice]:
    """Read a DICOM series from a folder or a ``.zip``; slices ordered by z position (inferior first).

    Objects that are not CT images (dose reports, DICOMDIR, macOS ``._`` files) are left out; a damaged or truncated
    file raises. When several series are present the one with most slices is kept. Files, members, slices,
    inflated and decoded bytes are counted against :mod:`lungviz.data.limits` as they are read.
    """
    label = _name_of(src, name)
    slices: list[DicomSlice] = []
    n_other = 0
    is_folder = isinstance(src, (str, Path)) and Path(src).is_dir()
    if is_folder:
        budget = _Budget(what="the series")
        inflation = _Inflation("the deflated DICOM files of the series folder inflate", label)
        files = _folder_files(Path(src), label, budget)
    else:
        data = _read_bytes(src, label)
        budget = _Budget(len(data), what="the series")
        inflation = _Inflation("the zip inflates", label)
        files = _zip_files(data, label, inflation)
    with _decoding():
        for data_k, member in files:
            found = _series_slice(data_k, member, budget, inflation, len(slices), label)
            if found is None:
                n_other += 1
            else:
                slices.append(found)
    if not slices and not n_other and not is_folder:
        raise LungvizError("the zip archive contains no DICOM files.", source=label)
    return _sorted_series(slices, n_other, label)


def load_image(src: Source, name: str | None = None) -> LoadedImage:
    """Read any supported single image (PNG/JPG/TIFF/GIF/BMP, NPY, DICOM) by content and file name."""
    label = _name_of(src, name)
    data = _read_bytes(src, label)
    lower = label.lower()
    if lower.endswith(".npy") or data[:6] == b"\x93NUMPY":
        return load_npy(data, name=label)
    if is_dicom_bytes(data) or lower.endswith((".dcm", ".dicom")):
        sl = read_dicom(data, name=label)
        return LoadedImage(
            sl.hu, True, label, pixel_spacing_mm=valid_spacing(float(np.mean(sl.pixel_spacing_mm))),
            meta={"format": "dicom", "z_mm": sl.z_mm, "series_uid": sl.series_uid}, notes=list(sl.notes),
        )
    if lower.endswith(".zip") or data[:2] == b"PK":
        raise LungvizError("this is a zip archive, not a single image; open it as a DICOM series (a folder or a zip of "
                           "its slices).",
                           source=label)
    pixels, mode, notes = _load_raster(data, label)
    return LoadedImage(pixels, False, label, meta={"format": "raster", "mode": mode}, notes=notes)
