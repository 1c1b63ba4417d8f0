"""lungviz.data.io: every supported format read to the documented array, and every bad input refused by name."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungviz.data import io as lio
from lungviz.errors import LungvizError

RAMP = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)  # every 8-bit value, 32 x 32
LUMA = np.array([0.299, 0.587, 0.114])

# ------------------------------------------------------------------------------------------------ raster images


def _rgb():
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    rgb[:8] = (10, 20, 30)
    return rgb


def _rgba():
    rgba = np.concatenate([_rgb(), np.full((16, 16, 1), 255, np.uint8)], axis=2)
    rgba[:, :4, 3] = 0  # transparent: composited onto black
    rgba[:, 4:8, 3] = 51  # 20 % opaque
    return rgba


def _rgba_expected():
    gray = _rgb().astype(np.float64) @ LUMA / 255.0
    alpha = _rgba()[..., 3] / 255.0
    return gray * alpha


def _palette_png() -> bytes:
    img = Image.fromarray(np.tile(np.arange(4, dtype=np.uint8), (16, 4)), mode="L").convert("P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 - 4) * 3)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


_PALETTE_GRAY = np.array([0.0, 0.299, 0.587, 0.114])  # black, red, green, blue as luminance

#: (case id, (array, format, mode, save kwargs), expected (H, W) in [0, 1], tolerance)
RASTER_CASES = [
    ("png-8bit", (RAMP, "PNG", None, {}), RAMP / 255.0, 1e-6),
    ("tiff-8bit", (RAMP, "TIFF", None, {}), RAMP / 255.0, 1e-6),
    ("bmp-8bit", (RAMP, "BMP", None, {}), RAMP / 255.0, 1e-6),
    ("jpg-8bit", (np.repeat(np.linspace(0, 255, 32), 32).reshape(32, 32).astype(np.uint8), "JPEG", None,
                  {"quality": 100}), np.repeat(np.linspace(0, 255, 32), 32).reshape(32, 32).astype(np.uint8) / 255.0,
     3 / 255),
    ("png-16bit", (np.array([[0, 65535, 32768, 1000]] * 16, np.uint16).repeat(4, axis=1), "PNG", None, {}),
     np.array([[0, 65535, 32768, 1000]] * 16).repeat(4, axis=1) / 65535.0, 1e-6),
    ("png-rgb", (_rgb(), "PNG", None, {}), _rgb() @ LUMA / 255.0, 1e-6),
    ("png-rgba", (_rgba(), "PNG", None, {}), _rgba_expected(), 1e-6),
    ("png-gray-alpha", (RAMP, "PNG", "LA", {}), RAMP / 255.0, 1e-6),
    ("png-1bit", (RAMP, "PNG", "1", {"optimize": False}), None, 0.0),
]


@pytest.mark.parametrize("case, spec, expected, tol", RASTER_CASES, ids=[c[0] for c in RASTER_CASES])
def test_load_gray_valid(case, spec, expected, tol, image_bytes, tmp_path):
    array, fmt, mode, kwargs = spec
    path = tmp_path / f"{case}.{fmt.lower()}"
    path.write_bytes(image_bytes(array, fmt, mode, **kwargs))
    out = lio.load_gray(path)
    loaded = lio.load_image(path)
    assert not loaded.is_hu and loaded.pixel_spacing_mm is None
    assert loaded.meta == {"format": "raster", "mode": Image.open(path).mode}  # the mode tells what was converted
    np.testing.assert_array_equal(loaded.pixels, out)
    assert out.dtype == np.float32 and out.shape == array.shape[:2]
    assert out.min() >= 0.0 and out.max() <= 1.0
    if expected is None:  # 1-bit: only black and white survive
        assert set(np.unique(out)) <= {0.0, 1.0} and out.max() == 1.0
    else:
        np.testing.assert_allclose(out, expected, atol=tol)


def test_load_gray_palette_png_becomes_luminance():
    out = lio.load_gray(_palette_png(), name="palette.png")
    np.testing.assert_allclose(out[0, :4], _PALETTE_GRAY, atol=1e-6)


def test_load_gray_16bit_png_keeps_16_bit_precision(image_bytes):
    values = np.array([[1, 2, 3, 65534]] * 16, np.uint16).repeat(4, axis=1)
    out = lio.load_gray(image_bytes(values), name="fine.png")
    assert len(np.unique(out)) == 4  # 8-bit conversion would merge 1, 2 and 3
    assert out[0, 0] == pytest.approx(1 / 65535)


def test_load_gray_from_bytes_path_and_file_like(image_bytes, tmp_path):
    data = image_bytes(RAMP)
    path = tmp_path / "ramp.png"
    path.write_bytes(data)
    upload = io.BytesIO(data)
    upload.name = "ramp.png"
    results = [lio.load_gray(data), lio.load_gray(path), lio.load_gray(str(path)), lio.load_gray(upload)]
    upload.read()  # something else consumed the upload: the next read must still see the whole file
    results.append(lio.load_gray(upload))
    for out in results:
        np.testing.assert_allclose(out, RAMP / 255.0, atol=1e-6)


def test_load_raw_gray_keeps_counts(image_bytes):
    counts = np.zeros((16, 16), np.uint8)
    counts[3, 4], counts[5, 6] = 4, 1
    raw = lio.load_raw_gray(image_bytes(counts), name="consensus.png")
    np.testing.assert_array_equal(raw, counts)


# ------------------------------------------------------------------------------------------------ bad files


def _truncated_png(image_bytes) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)  # incompressible
    data = image_bytes(noise)
    return data[: len(data) // 2]


def _huge_png(image_bytes) -> bytes:
    return image_bytes(np.zeros((20, 20000), np.uint8), "PNG", "1")  # 20000 x 20 px, a few hundred bytes


#: (case id, file name, bytes builder, words the message must contain)
BAD_FILES = [
    ("missing", "absent.png", None, "not found"),
    ("empty", "empty.png", lambda b: b"", "empty"),
    ("truncated-png", "cut.png", _truncated_png, "damaged or truncated"),
    ("text-as-png", "notes.png", lambda b: b"patient notes, not an image\n" * 4, "not an image file"),
    ("too-large", "wide.png", _huge_png, "20000 x 20 pixels"),
    ("too-small", "tiny.png", lambda b: b(np.zeros((8, 8), np.uint8)), "at least 16"),
    ("zip-as-image", "series.zip", lambda b: _zip({"a.txt": b"x"}), "DICOM series"),
]


@pytest.mark.parametrize("case, filename, build, words", BAD_FILES, ids=[c[0] for c in BAD_FILES])
@pytest.mark.parametrize("reader", [lio.load_image, lio.load_gray], ids=["load_image", "load_gray"])
def test_bad_image_files_raise_naming_the_file(reader, case, filename, build, words, image_bytes, tmp_path):
    if reader is lio.load_gray and case == "zip-as-image":
        words = "not an image file"
    path = tmp_path / filename
    if build is not None:
        path.write_bytes(build(image_bytes))
    with pytest.raises(LungvizError, match=words) as info:
        reader(path)
    assert str(path) in str(info.value)
    assert info.value.source == str(path)


def test_folder_is_not_an_image(tmp_path):
    with pytest.raises(LungvizError, match="folder"):
        lio.load_image(tmp_path)


def test_upload_name_is_used_in_messages():
    with pytest.raises(LungvizError, match=r"^scan\.png: the file is empty"):
        lio.load_image(b"", name="scan.png")


# ------------------------------------------------------------------------------------------------ NPY


def _npy(array, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


HU_SLICE = np.array([[-1000.0, -500.0], [0.0, 400.0]]).repeat(8, axis=0).repeat(8, axis=1)

#: (case id, array, is_hu, expected pixels)
NPY_VALID = [
    ("hu-float", HU_SLICE, True, HU_SLICE),
    ("hu-int16", HU_SLICE.astype(np.int16), True, HU_SLICE),
    ("hu-padding-3024", np.where(HU_SLICE == 400, -3024, HU_SLICE), True, np.where(HU_SLICE == 400, -3024, HU_SLICE)),
    ("unit-range", np.linspace(0, 1, 256).reshape(16, 16), False, np.linspace(0, 1, 256).reshape(16, 16)),
    ("uint8-rescaled", RAMP[:16, :16] + 10, False, RAMP[:16, :16] / 239.0),  # by its own range 10..249
    ("squeezable", np.linspace(0, 1, 256).reshape(1, 16, 16, 1), False, np.linspace(0, 1, 256).reshape(16, 16)),
    ("bool", np.eye(16, dtype=bool), False, np.eye(16)),
]


@pytest.mark.parametrize("case, array, is_hu, expected", NPY_VALID, ids=[c[0] for c in NPY_VALID])
def test_load_npy_valid(case, array, is_hu, expected):
    loaded = lio.load_npy(_npy(array), name=f"{case}.npy")
    assert loaded.is_hu is is_hu
    assert loaded.pixels.dtype == np.float32 and loaded.pixels.ndim == 2
    np.testing.assert_allclose(loaded.pixels, expected, atol=1e-6)
    assert loaded.meta["format"] == "npy"


def _with_nan():
    a = np.zeros((16, 16), np.float32)
    a[2, 3] = a[4, 5] = np.nan
    return a


#: (case id, bytes, words)
NPY_INVALID = [
    ("nan", _npy(_with_nan()), "2 missing or infinite"),
    ("inf", _npy(np.full((16, 16), np.inf)), "missing or infinite"),
    ("3d", _npy(np.zeros((2, 16, 16))), r"shape \(2, 16, 16\)"),
    ("1d", _npy(np.zeros(256)), "2D"),
    ("pickled-object", _npy(np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True), "cannot be read safely"),
    ("complex", _npy(np.zeros((16, 16), np.complex64)), "numeric image"),
    ("strings", _npy(np.array([["a"] * 16] * 16)), "numeric image"),
    ("too-large", _npy(np.zeros((16, 20000), np.uint8)), "largest accepted side"),
    ("not-npy", b"\x93NUMPY garbage", "NPY"),
]


@pytest.mark.parametrize("case, data, words", NPY_INVALID, ids=[c[0] for c in NPY_INVALID])
def test_load_npy_invalid_raises_naming_the_file(case, data, words, tmp_path):
    path = tmp_path / f"{case}.npy"
    path.write_bytes(data)
    for reader in (lio.load_npy, lio.load_image):
        with pytest.raises(LungvizError, match=words) as info:
            reader(path)
        assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------------------ DICOM (synthetic)

RAW = np.array([[0, 24], [1024, 2048]], np.int16).repeat(8, axis=0).repeat(8, axis=1)

#: (slope, intercept, expected HU for RAW)
RESCALE_CASES = [
    (1.0, -1024.0, np.array([[-1024, -1000], [0, 1024]])),
    (2.0, -1000.0, np.array([[-1000, -952], [1048, 3096]])),
    (0.5, 0.0, np.array([[0, 12], [512, 1024]])),
]


@pytest.mark.parametrize("slope, intercept, expected", RESCALE_CASES)
def test_read_dicom_applies_rescale(slope, intercept, expected, dicom_bytes):
    data = dicom_bytes(RAW, slope=slope, intercept=intercept, z_mm=-12.5, instance=7, spacing=(0.6, 0.8))
    sl = lio.read_dicom(data, name="slice.dcm")
    assert sl.hu.dtype == np.float32 and sl.hu.shape == (16, 16)
    np.testing.assert_allclose(sl.hu, expected.repeat(8, axis=0).repeat(8, axis=1))
    assert sl.pixel_spacing_mm == (0.6, 0.8)
    assert sl.z_mm == -12.5 and sl.instance_number == 7 and sl.slice_thickness_mm == 2.5
    assert sl.series_uid == "1.2.826.0.1.3680043.8.498.1" and sl.sop_uid


def test_load_image_reads_dicom_as_hu(dicom_bytes):
    loaded = lio.load_image(dicom_bytes(RAW, spacing=(0.6, 0.8), z_mm=3.0), name="upload")
    assert loaded.is_hu and loaded.meta["format"] == "dicom" and loaded.meta["z_mm"] == 3.0
    assert loaded.pixel_spacing_mm == pytest.approx(0.7)
    assert loaded.pixels[0, 0] == -1024.0


def test_load_image_dicom_without_spacing_has_none(dicom_bytes):
    loaded = lio.load_image(dicom_bytes(RAW, spacing=None), name="nospacing.dcm")
    assert loaded.pixel_spacing_mm is None  # not NaN: "unknown" downstream means the default spacing


#: (case id, builder(dicom_bytes, image_bytes), words)
BAD_DICOM = [
    ("no-pixel-data", lambda d, i: d(with_pixels=False), "no image \\(pixel data\\)"),
    ("mr", lambda d, i: d(RAW, modality="MR"), "'MR' image, not CT"),
    ("png-named-dcm", lambda d, i: i(RAMP), "not a DICOM file"),
    ("truncated", lambda d, i: d(RAW)[:400], "DICOM"),
    ("empty", lambda d, i: b"", "empty"),
]


@pytest.mark.parametrize("case, build, words", BAD_DICOM, ids=[c[0] for c in BAD_DICOM])
def test_bad_dicom_raises_naming_the_file(case, build, words, dicom_bytes, image_bytes, tmp_path):
    path = tmp_path / f"{case}.dcm"
    path.write_bytes(build(dicom_bytes, image_bytes))
    for reader in (lio.read_dicom, lio.load_image):
        with pytest.raises(LungvizError, match=words) as info:
            reader(path)
        assert str(path) in str(info.value)


def test_read_dicom_non_ct_allowed_when_asked(dicom_bytes):
    assert lio.read_dicom(dicom_bytes(RAW, modality="MR"), require_ct=False).hu.shape == (16, 16)


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_read_series_zip_orders_by_z_and_skips_non_slices(dicom_bytes):
    members = {
        f"series/{name}.dcm": dicom_bytes(np.full((16, 16), 1024 + int(z), np.int16), z_mm=z, instance=i)
        for i, (name, z) in enumerate([("b", 5.0), ("c", -2.5), ("a", 0.0)], start=1)
    }
    members["__MACOSX/series/._a.dcm"] = b"\x00\x05\x16\x07" + b"\x00" * 200  # macOS resource fork
    members["DICOMDIR"] = dicom_bytes(with_pixels=False, modality=None)
    members["series/dose.dcm"] = dicom_bytes(RAW, modality="SR", z_mm=99.0)  # not a CT image
    members["readme.txt"] = b"exported series"
    slices = lio.read_series(_zip(members), name="upload.zip")
    assert [s.z_mm for s in slices] == [-2.5, 0.0, 5.0]
    assert [float(s.hu[0, 0]) for s in slices] == [-2.0, 0.0, 5.0]  # raw 1024 + z, intercept -1024
    assert [s.name for s in slices] == ["upload.zip:series/c.dcm", "upload.zip:series/a.dcm", "upload.zip:series/b.dcm"]


def test_read_series_keeps_the_largest_series(dicom_bytes):
    members = {f"{i}.dcm": dicom_bytes(z_mm=float(i), series_uid="1.2.3.4") for i in range(3)}
    members["scout.dcm"] = dicom_bytes(z_mm=-50.0, series_uid="1.2.3.9")
    slices = lio.read_series(_zip(members), name="mixed.zip")
    assert {s.series_uid for s in slices} == {"1.2.3.4"} and len(slices) == 3


def test_read_series_folder_ignores_hidden_and_non_dicom_files(dicom_bytes, tmp_path):
    for i, z in enumerate([10.0, -10.0, 0.0]):
        (tmp_path / f"IM{i:04d}").write_bytes(dicom_bytes(z_mm=z))  # extension-less slices, as scanners write
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 300)
    (tmp_path / "README").write_bytes(b"study exported from PACS" * 10)
    (tmp_path / "notes.xml").write_text("<readers/>")
    slices = lio.read_series(tmp_path)
    assert [s.z_mm for s in slices] == [-10.0, 0.0, 10.0]


#: (case id, builder(dicom_bytes), words)
BAD_SERIES = [
    ("not-a-zip", lambda d: b"this is not a zip archive at all" * 5, "not a readable zip"),
    ("zip-without-dicom", lambda d: _zip({"a.txt": b"hello", "b.png": b"\x89PNG"}), "contains no DICOM"),
    ("zip-of-mr", lambda d: _zip({"a.dcm": d(RAW, modality="MR")}), "no DICOM CT slices.*1 other"),
    ("damaged-slice", lambda d: _zip({"a.dcm": d(RAW), "b.dcm": d(RAW)[:300]}), "b.dcm"),
    ("mixed-sizes", lambda d: _zip({"a.dcm": d(RAW), "b.dcm": d(np.zeros((32, 32)), z_mm=1.0)}), "different sizes"),
    ("empty", lambda d: b"", "empty"),
]


@pytest.mark.parametrize("case, build, words", BAD_SERIES, ids=[c[0] for c in BAD_SERIES])
def test_bad_series_raise_naming_the_file(case, build, words, dicom_bytes, tmp_path):
    path = tmp_path / f"{case}.zip"
    path.write_bytes(build(dicom_bytes))
    with pytest.raises(LungvizError, match=words) as info:
        lio.read_series(path)
    assert str(path) in str(info.value)


def test_a_truncated_file_is_called_damaged_wherever_it_is_cut(dicom_bytes):
    """Cut anywhere, a slice is refused as damaged (naming the member), never counted as a non-CT object: pydicom
    reads a cut-off field as a shorter value, which once made a slice cut inside its SOP class look like another
    kind of object."""
    full = dicom_bytes(RAW)
    for cut in range(140, len(full), 3):
        with pytest.raises(LungvizError, match=r"^cut\.zip:a\.dcm: ") as info:
            lio.read_series(_zip({"a.dcm": full[:cut]}), name="cut.zip")
        assert "other DICOM" not in str(info.value), cut
    with pytest.raises(LungvizError, match=r"^cut\.zip:b\.dcm: the DICOM file is damaged: it ends part-way through its "
                                           r"data \(truncated"):
        lio.read_series(_zip({"a.dcm": full, "b.dcm": full[:400]}), name="cut.zip")  # cut inside the SOP class


def test_a_file_cut_inside_a_large_field_left_unread_is_truncated():
    """Values over lio.DEFER_BYTES are skipped while parsing, so a cut inside one is seen by the position passing
    the file's end."""
    import pydicom

    from tests.hostile_files import dicom_with

    ds = pydicom.dcmread(io.BytesIO(dicom_with()))
    ds.private_block(0x0009, "lungviz test", create=True).add_new(0x10, "OB", bytes(2 * lio.DEFER_BYTES))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    full = buf.getvalue()
    assert lio.read_dicom(full, name="whole.dcm").hu.shape == (16, 16)
    for cut in (len(full) - lio.DEFER_BYTES, len(full) - 300):  # inside the field; inside the pixels after it
        with pytest.raises(LungvizError, match=r"^cut\.dcm: the DICOM file is damaged: it ends part-way"):
            lio.read_dicom(full[:cut], name="cut.dcm")


def _count_inflations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Calls to the readers' inflater, each entry the bytes it gave; pydicom's own (whole, unbounded) inflation
    fails the test."""
    calls: list[int] = []
    real = lio._inflate_into

    def counted(out, payload, name, inflation):
        start = out.tell()
        real(out, payload, name, inflation)
        calls.append(out.tell() - start)

    def whole(*args, **kwargs):
        raise AssertionError("pydicom inflated a deflated DICOM itself")

    monkeypatch.setattr(lio, "_inflate_into", counted)
    monkeypatch.setattr(lio.zlib, "decompress", whole)
    return calls


def test_a_deflated_slice_is_inflated_once(monkeypatch):
    from tests.hostile_files import padded_deflated_dicom, padded_deflated_zip

    pad = 2 * lio.DEFER_BYTES
    calls = _count_inflations(monkeypatch)
    sl = lio.read_dicom(padded_deflated_dicom(pad), name="padded.dcm")
    assert (sl.hu == 1000 - 1024).all() and len(calls) == 1 and calls[0] > pad
    calls.clear()
    assert len(lio.read_series(padded_deflated_zip(pad, n=3), name="three.zip")) == 3
    assert len(calls) == 3  # once per member, for its header and its pixels


def test_deflated_slices_count_toward_the_series_inflation_limit(monkeypatch, tmp_path):
    """A zip of small stored members whose deflated data sets inflate to 2 MiB each: what they inflate to counts,
    in a zip and in a folder."""
    from tests.hostile_files import padded_deflated_dicom, padded_deflated_zip

    pad = 2 << 20
    monkeypatch.setattr(lio.limits, "MAX_ZIP_INFLATED_BYTES", 5 << 20)
    zipped = padded_deflated_zip(pad, n=3)
    assert len(zipped) < 20_000
    with pytest.raises(LungvizError, match=r"^padded\.zip: the zip inflates to more than 5 MB in all; lungviz reads "
                                           "at most that"):
        lio.read_series(zipped, name="padded.zip")
    member = padded_deflated_dicom(pad)
    for k in range(3):
        (tmp_path / f"s{k}.dcm").write_bytes(member)
    with pytest.raises(LungvizError, match="the deflated DICOM files of the series folder inflate to more than 5 MB"):
        lio.read_series(tmp_path)
    monkeypatch.setattr(lio.limits, "MAX_ZIP_INFLATED_BYTES", 7 << 20)
    assert len(lio.read_series(zipped, name="padded.zip")) == 3 and len(lio.read_series(tmp_path)) == 3


def test_read_series_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(LungvizError, match="not found"):
        lio.read_series(tmp_path / "absent.zip")
    with pytest.raises(LungvizError, match="no DICOM CT slices"):
        lio.read_series(tmp_path)


# ------------------------------------------------------------------------------------------------ raster edge cases


def _frames(fmt: str, **kwargs) -> bytes:
    """Two frames (grey 50, then grey 200) saved as one animated or multi-page file."""
    first, second = (Image.fromarray(np.full((16, 16), v, np.uint8)) for v in (50, 200))
    buf = io.BytesIO()
    first.save(buf, format=fmt, save_all=True, append_images=[second], **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, kwargs", [("GIF", {}), ("PNG", {}), ("TIFF", {})], ids=["gif", "apng", "tiff"])
def test_an_animation_or_multi_page_file_is_read_as_its_first_frame_with_a_note(fmt, kwargs):
    image = lio.load_image(_frames(fmt, **kwargs), name=f"scan.{fmt.lower()}")
    np.testing.assert_allclose(image.pixels, 50 / 255, atol=1 / 255)
    assert image.notes == [f"scan.{fmt.lower()}: the file holds several frames (an animation or a multi-page image); "
                           "only the first was read."]


def test_a_single_frame_file_has_no_note(image_bytes):
    assert lio.load_image(image_bytes(RAMP), name="one.png").notes == []


def test_exif_orientation_is_applied_with_a_note():
    wide = np.tile(np.arange(32, dtype=np.uint8) * 8, (16, 1))  # 16 rows x 32 columns, brighter to the right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG", exif=exif)
    image = lio.load_image(buf.getvalue(), name="phone.png")
    np.testing.assert_allclose(image.pixels, np.rot90(wide, k=-1) / 255.0, atol=1e-6)
    assert image.notes == ["phone.png: the image was rotated or flipped as its EXIF orientation tag says."]


@pytest.mark.parametrize("bad, count", [(np.nan, 2), (np.inf, 2), (-np.inf, 2)])
def test_a_float_tiff_with_nan_or_inf_is_refused(bad, count):
    values = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    values[3, 4] = values[5, 6] = bad
    buf = io.BytesIO()
    Image.fromarray(values, mode="F").save(buf, format="TIFF")
    with pytest.raises(LungvizError, match=f"^float.tif: the image contains {count} missing or infinite"):
        lio.load_image(buf.getvalue(), name="float.tif")


def test_a_png_within_the_side_limit_that_inflates_thousands_of_times_is_refused():
    buf = io.BytesIO()
    Image.new("1", (8192, 8192)).save(buf, format="PNG")  # a few KB, 320 MB once decoded to grey
    with pytest.raises(LungvizError, match="decompression bomb"):
        lio.load_image(buf.getvalue(), name="black.png")


# ------------------------------------------------------------------------------------------------ checked DICOM values


def _parsed(**texts: str):
    import pydicom

    from tests.hostile_files import dicom_with_text

    return pydicom.dcmread(io.BytesIO(dicom_with_text(texts)))


#: (field, raw text, parser, expected value)
DICOM_VALUES_VALID = [
    ("RescaleSlope", "2.5", lambda ds, k: lio.dicom_float(ds, k, source="x.dcm"), 2.5),
    ("RescaleIntercept", " -1024 ", lambda ds, k: lio.dicom_float(ds, k, source="x.dcm"), -1024.0),
    ("PixelSpacing", "0.6\\0.8", lambda ds, k: lio.dicom_floats(ds, k, 2, source="x.dcm"), (0.6, 0.8)),
    ("InstanceNumber", "7", lambda ds, k: lio.dicom_int(ds, k, source="x.dcm"), 7),
    ("SliceThickness", "", lambda ds, k: lio.dicom_float(ds, k, source="x.dcm", default=1.25), 1.25),
    ("Modality", "ct", lambda ds, k: lio.dicom_text(ds, k, source="x.dcm"), "ct"),
]

#: (field, raw text, parser, words)
DICOM_VALUES_INVALID = [
    ("RescaleSlope", "1e400", lambda ds, k: lio.dicom_float(ds, k, source="x.dcm"), "'1e400', not a finite number"),
    ("RescaleSlope", "nan", lambda ds, k: lio.dicom_float(ds, k, source="x.dcm"), "'nan', not a finite number"),
    ("RescaleSlope", "1\\2", lambda ds, k: lio.dicom_float(ds, k, source="x.dcm"), "holds 2 values .*1 number is"),
    ("InstanceNumber", "7.5", lambda ds, k: lio.dicom_int(ds, k, source="x.dcm"), "'7.5', not a whole number"),
    ("PixelSpacing", "1\\2\\3", lambda ds, k: lio.dicom_floats(ds, k, 2, source="x.dcm"), "holds 3 values"),
    ("SliceLocation", "12mm", lambda ds, k: lio.dicom_float(ds, k, source="x.dcm"), "'12mm', not a number"),
]


@pytest.mark.parametrize("keyword, text, parse, expected", DICOM_VALUES_VALID,
                         ids=[f"{c[0]}={c[1]!r}" for c in DICOM_VALUES_VALID])
def test_checked_dicom_values(keyword, text, parse, expected):
    assert parse(_parsed(**{keyword: text}), keyword) == expected


@pytest.mark.parametrize("keyword, text, parse, words", DICOM_VALUES_INVALID,
                         ids=[f"{c[0]}={c[1]!r}" for c in DICOM_VALUES_INVALID])
def test_malformed_dicom_values_name_the_file_and_the_field(keyword, text, parse, words):
    with pytest.raises(LungvizError, match=f"^x.dcm: the DICOM field {keyword} .*{words}"):
        parse(_parsed(**{keyword: text}), keyword)


def test_a_missing_field_gives_the_default(dicom_bytes):
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes()))
    assert lio.dicom_int(ds, "NumberOfFrames", source="x.dcm", default=1) == 1
    assert lio.dicom_floats(ds, "PixelAspectRatio", 2, source="x.dcm") is None


# ------------------------------------------------------------------------------------------------ DICOM claims


def _dicom_claims_cases():
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    from tests.hostile_files import dicom_with, dicom_with_text, with_transfer_syntax

    jpeg_ls = ("cannot be decoded" if get_decoder(JPEGLSLossless).is_available
               else "compressed as JPEG-LS Lossless Image Compression, which lungviz cannot decode here")
    raw = np.full((16, 16), 1000, np.int16)
    return [
        ("two-frames", lambda: dicom_with_text({"NumberOfFrames": "2"}), "holds 2 frames \\(NumberOfFrames\\)"),
        ("colour", lambda: dicom_with(SamplesPerPixel=3), "3 samples per pixel \\(SamplesPerPixel\\)"),
        ("12-bits", lambda: dicom_with(BitsAllocated=12), "BitsAllocated is 12"),
        ("unknown-syntax", lambda: with_transfer_syntax(dicom_with(), "1.2.3.4"), "transfer syntax '1.2.3.4'"),
        ("jpeg-ls", lambda: with_transfer_syntax(dicom_with(), JPEGLSLossless), jpeg_ls),
        ("slope-0", lambda: dicom_with(RescaleSlope=0), "RescaleSlope is 0"),
        ("slope-huge", lambda: dicom_with(RescaleSlope=1e7), "RescaleSlope is 1e\\+07, far outside"),
        ("hu-too-high", lambda: dicom_with(raw, RescaleSlope=100), "span 98,976 to 98,976 HU, outside the physical"),
        ("hu-too-low", lambda: dicom_with(np.array([[-32768, -20000], [0, 0]], np.int16).repeat(8, 0).repeat(8, 1)),
         "span -33,792 to -1,024 HU"),
    ]


@pytest.mark.parametrize("case, build, words", _dicom_claims_cases(), ids=[c[0] for c in _dicom_claims_cases()])
def test_dicom_claims_outside_what_lungviz_reads_are_refused(case, build, words):
    with pytest.raises(LungvizError, match=f"^{case}.dcm: .*{words}"):
        lio.read_dicom(build(), name=f"{case}.dcm")


def test_one_padding_value_below_the_physical_range_becomes_its_low_end():
    from tests.hostile_files import dicom_with

    raw = np.full((16, 16), 1000, np.int16)
    raw[:4] = -32768  # outside the scanned field, as some scanners store it
    sl = lio.read_dicom(dicom_with(raw), name="padded.dcm")
    assert (sl.hu[:4] == -3100.0).all() and (sl.hu[4:] == 1000 - 1024).all()


def test_deflated_and_rle_dicoms_within_the_limits_read_as_uncompressed(dicom_bytes):
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

    data = dicom_bytes(RAW, spacing=(0.6, 0.8))
    plain = lio.read_dicom(data)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = io.BytesIO()
    ds.save_as(deflated, enforce_file_format=True)
    rle = pydicom.dcmread(io.BytesIO(data))
    rle.compress(RLELossless)
    encoded = io.BytesIO()
    rle.save_as(encoded, enforce_file_format=True)
    for other in (deflated.getvalue(), encoded.getvalue()):
        sl = lio.read_dicom(other)
        np.testing.assert_array_equal(sl.hu, plain.hu)
        assert sl.pixel_spacing_mm == (0.6, 0.8)


# ------------------------------------------------------------------------------------------------ zip and folder limits


def test_zip_path_traversal_names_are_only_labels(dicom_bytes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    slices = lio.read_series(_zip({"../../evil.dcm": dicom_bytes(), "/abs/x.dcm": dicom_bytes(z_mm=1.0)}),
                             name="up.zip")
    assert [s.name for s in slices] == ["up.zip:../../evil.dcm", "up.zip:/abs/x.dcm"]
    assert not list(tmp_path.parent.parent.glob("evil.dcm")) and not list(tmp_path.iterdir())  # nothing written


def test_zip_symlink_members_are_never_read(dicom_bytes):
    link = zipfile.ZipInfo("link.dcm")
    link.external_attr = 0o120777 << 16  # a symbolic link to /etc/passwd
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(LungvizError, match="contains no DICOM files"):
        lio.read_series(buf.getvalue(), name="links.zip")
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr("slice.dcm", dicom_bytes())
    assert [s.name for s in lio.read_series(buf.getvalue(), name="links.zip")] == ["links.zip:slice.dcm"]


def test_zip_members_compressed_with_bzip2_are_refused_or_skipped(dicom_bytes):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("slice.dcm", dicom_bytes())
        zf.writestr("README.txt", b"exported", compress_type=zipfile.ZIP_BZIP2)  # not a slice: skipped
    assert len(lio.read_series(buf.getvalue(), name="ok.zip")) == 1
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr("more.dcm", dicom_bytes(z_mm=1.0), compress_type=zipfile.ZIP_BZIP2)
    with pytest.raises(LungvizError, match=r"'more\.dcm' in the zip is compressed with a method lungviz does not read"):
        lio.read_series(buf.getvalue(), name="bz.zip")


@pytest.mark.parametrize("limit, value, words", [
    ("MAX_SLICES", 2, "more than 2 CT slices"),
    ("MAX_SERIES_FILES", 2, "more than 2 files"),
    ("MAX_ZIP_INFLATED_BYTES", 2000, "inflates to more than 2 KB in all"),
    ("MAX_ZIP_DIRECTORY_BYTES", 100, "the zip's list of files is .*; lungviz reads at most 100 bytes"),
    ("MAX_UPLOAD_BYTES", 1000, "the file is (.* KB; lungviz reads at most|larger than) 1000 bytes"),
])
def test_series_limits_are_checked_as_the_zip_is_read(limit, value, words, dicom_bytes, monkeypatch):
    monkeypatch.setattr(lio.limits, limit, value)
    data = _zip({f"s{k}.dcm": dicom_bytes(z_mm=float(k)) for k in range(3)})
    with pytest.raises(LungvizError, match=words):
        lio.read_series(data, name="three.zip")
    with pytest.raises(LungvizError, match=words):
        lio.read_series(io.BytesIO(data), name="three.zip")


def test_series_folder_limits(dicom_bytes, tmp_path, monkeypatch):
    for k in range(3):
        (tmp_path / f"s{k}.dcm").write_bytes(dicom_bytes(z_mm=float(k)))
    assert len(lio.read_series(tmp_path)) == 3
    monkeypatch.setattr(lio.limits, "MAX_SERIES_FILES", 2)
    with pytest.raises(LungvizError, match="more than 2 files"):
        lio.read_series(tmp_path)
    monkeypatch.setattr(lio.limits, "MAX_SERIES_FILES", 10)
    monkeypatch.setattr(lio.limits, "MAX_FILE_BYTES", 500)
    with pytest.raises(LungvizError, match=r"s0\.dcm: the file is 1 KB; lungviz reads at most 500 bytes"):
        lio.read_series(tmp_path)


def test_a_path_that_is_not_a_regular_file_is_refused_without_reading(tmp_path):
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    with pytest.raises(LungvizError, match="not a regular file"):
        lio.load_image(fifo)


def test_npy_header_claims_are_checked_against_its_data():
    data = _npy(np.zeros((16, 16), np.float32))
    with pytest.raises(LungvizError, match="truncated: its header claims 16 x 16 values of 4 bytes"):
        lio.load_npy(data[:-10], name="cut.npy")
    fortran = np.asfortranarray(np.arange(16 * 20, dtype=np.float32).reshape(16, 20) / 320)
    np.testing.assert_array_equal(lio.load_npy(_npy(fortran)).pixels, fortran)


# ------------------------------------------------------------------------------------------------ DICOM (real)


@pytest.fixture(scope="module")
def real_series_dir(lidc_dicom_dir: Path) -> Path:
    folder = lidc_dicom_dir / "LIDC-IDRI-0001"
    if not any(folder.glob("*.dcm")):
        pytest.skip(f"no DICOM files in {folder}")
    return folder


def test_read_real_dicom_is_in_hounsfield_units(real_series_dir):
    import pydicom

    path = sorted(real_series_dir.glob("*.dcm"))[0]
    sl = lio.read_dicom(path)
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(sl.hu, expected)
    assert float(ds.RescaleIntercept) != 0.0  # the rescale really is applied, not a no-op
    assert sl.hu.shape == (512, 512)
    assert lio.HU_RANGE[0] <= sl.hu.min() and sl.hu.max() <= lio.HU_RANGE[1]
    body_and_air = sl.hu[sl.hu > -1500]  # without the outside-the-scan padding
    counts, edges = np.histogram(body_and_air, bins=np.arange(-1500, 1501, 50))
    assert -1100 <= edges[counts.argmax()] <= -900  # the commonest value is air, about -1000 HU
    assert -1100 <= sl.hu[10, 256] <= -900  # air above the patient
    assert 0.5 < sl.pixel_spacing_mm[0] < 1.0 and sl.pixel_spacing_mm[0] == sl.pixel_spacing_mm[1]


def test_real_hu_slice_saved_as_npy_is_recognised_as_hu(real_series_dir):
    sl = lio.read_dicom(sorted(real_series_dir.glob("*.dcm"))[0])
    assert sl.hu.min() < -2000  # LIDC pads outside the scan field with -2048 HU
    loaded = lio.load_npy(_npy(sl.hu), name="real.npy")
    assert loaded.is_hu
    np.testing.assert_array_equal(loaded.pixels, sl.hu)


def test_read_real_series_folder_is_ordered_by_z(real_series_dir):
    slices = lio.read_series(real_series_dir)
    n_files = len(list(real_series_dir.glob("*.dcm")))
    assert len(slices) == n_files  # the reader XML next to them is not a slice
    z = np.array([s.z_mm for s in slices])
    assert np.all(np.diff(z) > 0)
    assert len({s.series_uid for s in slices}) == 1
    thickness = slices[0].slice_thickness_mm
    assert thickness is not None and np.all(np.diff(z) >= thickness - 1e-3)


def test_read_series_zip_of_three_real_files(real_series_dir):
    paths = sorted(real_series_dir.glob("*.dcm"))[:3]
    data = _zip({f"dicom/{p.name}": p.read_bytes() for p in reversed(paths)})
    slices = lio.read_series(data, name="three.zip")
    singles = sorted((lio.read_dicom(p) for p in paths), key=lambda s: s.z_mm)
    assert [s.z_mm for s in slices] == [s.z_mm for s in singles]
    assert [s.sop_uid for s in slices] == [s.sop_uid for s in singles]
    for a, b in zip(slices, singles, strict=True):
        np.testing.assert_array_equal(a.hu, b.hu)
