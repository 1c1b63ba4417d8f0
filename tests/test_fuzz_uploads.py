"""Fuzzing the upload readers: mutated real PNG, DICOM, NPY and zip files either read or raise LungvizError.

A fixed seed makes a few hundred mutations (bit flips, truncation, header fields set to hostile values or swapped)
of one real slice image and one real DICOM slice. The library part runs every case; the slow part runs a sample
through ``python -m lungviz predict`` and checks exit 0 or 2, one line on stderr, time and memory.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lungviz.data import io as lio
from lungviz.data import limits
from lungviz.errors import LungvizError
from tests.hostile_files import run_lungviz, with_transfer_syntax
from tests.test_predict import weights  # noqa: F401  (module-scoped tiny bundles fixture)

SEED = 30
N_PER_KIND = 80
PNG_SAMPLE = ("lidc-slices", "LIDC-IDRI-0001/nodule-0/images/slice-0.png")
DICOM_SAMPLE = ("lidc-dicom", "LIDC-IDRI-0001")


# ------------------------------------------------------------------------------------------------ real samples


@pytest.fixture(scope="module")
def samples(data_dir: Path) -> dict[str, bytes]:
    """The real PNG slice and DICOM slice, and an NPY and a zip made from the DICOM."""
    png = data_dir / PNG_SAMPLE[0] / PNG_SAMPLE[1]
    dicoms = sorted((data_dir / DICOM_SAMPLE[0] / DICOM_SAMPLE[1]).glob("*.dcm"))
    if not png.is_file() or len(dicoms) < 2:
        pytest.skip("the real PNG or DICOM sample is missing")
    hu = lio.read_dicom(dicoms[0]).hu
    buf = io.BytesIO()
    np.save(buf, hu[192:320, 192:320].astype(np.int16))  # a 128 px HU crop, as an upload of a crop would be
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in dicoms[:2]:
            zf.writestr(f"series/{p.name}", p.read_bytes())
        zf.writestr("series/README.txt", b"exported from PACS")
    return {"png": png.read_bytes(), "dcm": dicoms[0].read_bytes(), "npy": buf.getvalue(), "zip": zbuf.getvalue()}


# ------------------------------------------------------------------------------------------------ mutations

HUGE_INTS = [0, 1, 15, 16, 8192, 8193, 65535, 2**31 - 1, 2**32 - 1]


def flip_bits(data: bytes, rng: np.random.Generator) -> bytes:
    """A few bits flipped, mostly in the first 2 KB where the headers are."""
    out = bytearray(data)
    span = len(out) if rng.random() < 0.3 else min(len(out), 2048)
    for pos in rng.integers(0, span, int(rng.integers(1, 9))):
        out[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)) for kind, body in chunks
    )


@functools.cache
def _bomb_idat() -> bytes:
    """The compressed rows of an 8192 x 8192 black 8-bit image (about 65 KB)."""
    return zlib.compress(bytes(8193 * 8192), 1)


def png_fields(data: bytes, rng: np.random.Generator) -> bytes:
    """IHDR size or mode set to hostile values, a bomb IDAT, an EXIF or APNG chunk: all with valid CRCs."""
    chunks = _png_chunks(data)
    kind, ihdr = chunks[0]
    w, h, depth, colour, *rest = struct.unpack(">IIBBBBB", ihdr)
    choice = int(rng.integers(0, 5))
    if choice == 0:
        w, h = (int(rng.choice(HUGE_INTS)) for _ in range(2))
    elif choice == 1:
        depth, colour = int(rng.choice([1, 2, 4, 8, 16, 3, 255])), int(rng.choice([0, 2, 3, 4, 6, 1, 7]))
    elif choice == 2:  # a bomb: 8192 x 8192 zeros in about 65 KB
        w = h = 8192
        depth, colour = 8, 0
        chunks = [c for c in chunks if c[0] != b"IDAT"]
        chunks.insert(1, (b"IDAT", _bomb_idat()))
    elif choice == 3:  # EXIF orientation 1-9 (6 = turned 90 degrees)
        exif = b"MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01" + struct.pack(
            ">H", int(rng.integers(1, 10))) + b"\x00\x00\x00\x00\x00\x00"
        chunks.insert(1, (b"eXIf", exif))
    else:  # APNG: an animation control chunk claiming many frames
        chunks.insert(1, (b"acTL", struct.pack(">II", int(rng.choice([2, 1000, 2**31 - 1])), 0)))
    return _png([(kind, struct.pack(">IIBBBBB", w, h, depth, colour, *rest)), *chunks[1:]])


DICOM_FIELDS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
                "NumberOfFrames", "RescaleSlope", "RescaleIntercept", "PixelSpacing", "ImagePositionPatient",
                "InstanceNumber", "SliceThickness", "SliceLocation", "PhotometricInterpretation", "Modality",
                "SOPClassUID"]
TEXT_VALUES = ["0", "-1", "1", "65535", "99999999999", "abc", "nan", "inf", "-inf", "1e400", "", "1\\2",
               "1\\2\\3\\4", "0.0001", "0.002", "3.5", "MONOCHROME1", "RGB", "CT", "MR"]
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.5",
                     "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.3.4", ""]


def _raw_value(vr: str, rng: np.random.Generator) -> bytes:
    if vr in ("US", "SS"):
        return struct.pack("<H", int(rng.choice(HUGE_INTS)) & 0xFFFF) if rng.random() < 0.8 else bytes(
            rng.integers(0, 256, int(rng.integers(0, 6)), dtype=np.uint8))
    raw = str(rng.choice(TEXT_VALUES)).encode()
    return raw + b" " * (len(raw) % 2)


def _as_text(value) -> bytes:
    """A DICOM value as the text a string field would store (binary values pass as they are)."""
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        raw = "\\".join(map(str, value)).encode()
    else:
        raw = str(value).encode()
    return raw + b" " * (len(raw) % 2)


def dicom_fields(data: bytes, rng: np.random.Generator) -> bytes:
    """One or two header fields set to hostile raw values or swapped, or the transfer syntax changed alone."""
    import pydicom
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(io.BytesIO(data))
    if rng.random() < 0.2:  # the transfer syntax changed, the data set left as it is
        return with_transfer_syntax(data, str(rng.choice(TRANSFER_SYNTAXES)))
    fields = [str(f) for f in rng.choice(DICOM_FIELDS, size=2, replace=False)]
    if rng.random() < 0.3:  # the two fields' stored values swapped
        values = [ds.get(f) for f in fields]
        new = {f: _as_text(v) for f, v in zip(fields, reversed(values), strict=True) if v is not None}
    else:
        new = {f: _raw_value(dictionary_VR(tag_for_keyword(f)), rng) for f in fields[: int(rng.integers(1, 3))]}
    for keyword, raw in new.items():
        tag = Tag(tag_for_keyword(keyword))
        ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds)
    return buf.getvalue()


NPY_DESCR = ["<f8", "<f4", "|u1", "<i2", ">f8", "|b1", "|O", "<c8", "<U3", "|V8", "<f16", "<M8[s]"]
NPY_SHAPES = [(128, 128), (128,), (1, 128, 128), (2, 128, 128), (0, 128), (128, 0), (), (60000, 60000),
              (8192, 8192), (2**40, 2), (16, 16), (128, 129)]


def npy_fields(data: bytes, rng: np.random.Generator) -> bytes:
    """The header rewritten with another shape, dtype or order (the data left as it is), or its length field changed."""
    _, _, _, offset = lio._npy_header(data, "x.npy")
    if rng.random() < 0.2:
        out = bytearray(data)
        out[8:10] = struct.pack("<H", int(rng.choice([0, 1, 10, 118, 65535])))
        return bytes(out)
    header = {"descr": str(rng.choice(NPY_DESCR)), "fortran_order": bool(rng.random() < 0.3),
              "shape": NPY_SHAPES[int(rng.integers(0, len(NPY_SHAPES)))]}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data[offset:]


def zip_fields(data: bytes, rng: np.random.Generator) -> bytes:
    """A directory or end-record field set to a hostile value: method, sizes, name length, symlink mode, counts."""
    out = bytearray(data)
    entries, at = [], out.find(b"PK\x01\x02")
    while at >= 0:
        entries.append(at)
        at = out.find(b"PK\x01\x02", at + 4)
    end = out.rfind(b"PK\x05\x06")
    choice = int(rng.integers(0, 4))
    if choice == 3:
        at = end + int(rng.choice([8, 10, 12, 16]))
        width = 2 if at - end < 12 else 4
        out[at : at + width] = int(rng.choice(HUGE_INTS)).to_bytes(8, "little")[:width]
        return bytes(out)
    entry = entries[int(rng.integers(0, len(entries)))]
    if choice == 0:  # compression method: stored, deflated, bzip2, LZMA, unknown
        out[entry + 10 : entry + 12] = struct.pack("<H", int(rng.choice([0, 8, 12, 14, 99])))
    elif choice == 1:  # compressed or uncompressed size
        at = entry + int(rng.choice([20, 24]))
        out[at : at + 4] = struct.pack("<I", int(rng.choice(HUGE_INTS)))
    else:  # a symlink's mode, or a name length running past the entry
        if rng.random() < 0.5:
            out[entry + 38 : entry + 42] = struct.pack("<I", 0o120777 << 16)
        else:
            out[entry + 28 : entry + 30] = struct.pack("<H", int(rng.choice([0, 1, 500, 65535])))
    return bytes(out)


def zip_names(data: bytes, rng: np.random.Generator) -> bytes:
    """The members rewritten under hostile names (traversal, absolute, markup, duplicates) or as symlinks."""
    src = zipfile.ZipFile(io.BytesIO(data))
    names = ["../../etc/passwd.dcm", "/abs/slice.dcm", "![x](https://host/p.png).dcm", "<b>x</b>.dcm", "a\nb.dcm",
             "same.dcm", "same.dcm", "dir/", "__MACOSX/._a.dcm", "DICOMDIR"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info in src.infolist():
            new = zipfile.ZipInfo(str(rng.choice(names)))
            if rng.random() < 0.2:
                new.external_attr = 0o120777 << 16
            zf.writestr(new, src.read(info))
    return buf.getvalue()


MUTATORS: dict[str, list[Callable[[bytes, np.random.Generator], bytes]]] = {
    "png": [flip_bits, truncate, png_fields, png_fields],
    "dcm": [flip_bits, truncate, dicom_fields, dicom_fields],
    "npy": [flip_bits, truncate, npy_fields, npy_fields],
    "zip": [flip_bits, truncate, zip_fields, zip_names],
}


@pytest.fixture(scope="module")
def mutants(samples: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """``(file name, bytes)`` of every mutated file, the same on every run."""
    rng = np.random.default_rng(SEED)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values written on purpose
        for kind, mutators in MUTATORS.items():
            for k in range(N_PER_KIND):
                mutate = mutators[k % len(mutators)]
                out.append((f"fuzz-{kind}-{k:03d}-{mutate.__name__}.{kind}", mutate(samples[kind], rng)))
    return out


# ------------------------------------------------------------------------------------------------ library


def _check_loaded(image: lio.LoadedImage) -> None:
    px = image.pixels
    assert px.ndim == 2 and px.dtype == np.float32 and np.isfinite(px).all()
    assert min(px.shape) >= limits.MIN_SIDE_PX and max(px.shape) <= limits.MAX_SIDE_PX
    if image.is_hu:
        assert limits.PHYSICAL_HU_RANGE[0] <= px.min() and px.max() <= limits.PHYSICAL_HU_RANGE[1]
    else:
        assert px.min() >= 0.0 and px.max() <= 1.0
    assert image.pixel_spacing_mm is None or limits.SPACING_RANGE_MM[0] <= image.pixel_spacing_mm <= \
        limits.SPACING_RANGE_MM[1]


def read_upload(name: str, data: bytes) -> str:
    """'read' or 'refused' for one upload, asserting what a read image or a refusal must look like."""
    try:
        if name.endswith(".zip"):
            series = lio.read_series(data, name=name)
            assert series and len(series) <= limits.MAX_SLICES
            for sl in series:
                _check_loaded(lio.LoadedImage(sl.hu, True, sl.name))
        else:
            _check_loaded(lio.load_image(data, name=name))
    except LungvizError as err:
        text = str(err)
        assert text.startswith(name) and "\n" not in text and len(text) < 600, text
        return "refused"
    return "read"


def test_fuzzed_uploads_read_or_raise_lungviz_error(mutants):
    outcomes: dict[str, dict[str, int]] = {}
    for name, data in mutants:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outcome = read_upload(name, data)
        assert not caught, (name, [str(w.message) for w in caught])  # nothing reaches stderr besides the error
        assert time.perf_counter() - t0 < 10, name
        kind = name.split("-")[1]
        outcomes.setdefault(kind, {"read": 0, "refused": 0})[outcome] += 1
    assert len(mutants) == 4 * N_PER_KIND
    for kind, counts in outcomes.items():  # the mutations reach past the first check, and do refuse things
        assert counts["read"] >= 3 and counts["refused"] >= 10, (kind, counts)


def test_unmutated_samples_read(samples):
    for kind, data in samples.items():
        assert read_upload(f"sample.{kind}", data) == "read"


# ------------------------------------------------------------------------------------------------ command line


@pytest.mark.slow
def test_fuzzed_uploads_through_the_cli(mutants, weights, tmp_path):  # noqa: F811
    sample = mutants[::27]  # 27 is prime to the four mutators per kind: every kind and mutator, read and refused
    codes = set()
    for name, data in sample:
        path = tmp_path / name
        path.write_bytes(data)
        run = run_lungviz(["predict", "--slice", str(path), "--weights", str(weights), "--json"])
        code, out, err = run.code, run.out, run.err
        assert code in (0, 2), (name, code, err)
        assert "Traceback" not in err and run.seconds < 60, name
        assert run.peak_mb < 2 * limits.MAX_DECODED_BYTES / limits.MIB, (name, run.peak_mb)
        if code == 2:
            assert len(err.splitlines()) == 1 and err.startswith("error: ") and out == "", (name, err)
        else:
            assert json.loads(out)["inputs"], name
        codes.add(code)
    assert codes == {0, 2}
