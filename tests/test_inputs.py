"""Uploads become the model's context crop exactly as the slices set stores it."""

from __future__ import annotations

import numpy as np
import pytest

from lungviz.data.io import DicomSlice, LoadedImage
from lungviz.data.upload import display_image, from_loaded, from_series
from lungviz.errors import LungvizError


def _hu_slice() -> np.ndarray:
    hu = np.full((512, 512), -1000.0, np.float32)
    hu[300:310, 200:210] = 50.0  # a nodule centred at (305, 205)
    return hu


def test_whole_hu_slice_is_cut_around_the_centre_and_minmax_scaled():
    ci = from_loaded(LoadedImage(_hu_slice(), True, "a.dcm", 0.7), centre_rc=(305.0, 205.0))
    assert ci.context.shape == (128, 128)
    assert ci.context[64, 64] == 1.0 and ci.context[0, 0] == 0.0  # nodule in the middle, air at 0
    assert ci.whole_slice is not None and ci.whole_is_hu and ci.spacing_mm == 0.7 and not ci.notes


def test_whole_slice_without_centre_uses_image_centre_and_says_so():
    ci = from_loaded(LoadedImage(_hu_slice(), True, "a.dcm", 0.7))
    assert ci.centre_rc == (256.0, 256.0) and "centre" in ci.notes[0]
    with pytest.raises(LungvizError, match="outside"):
        from_loaded(LoadedImage(_hu_slice(), True, "a.dcm"), centre_rc=(600.0, 10.0))


def test_crop_upload_is_taken_as_context_and_nodule_crop_is_kept():
    crop = np.linspace(0.2, 0.6, 128 * 128, dtype=np.float32).reshape(128, 128)
    ci = from_loaded(LoadedImage(crop, False, "s.png"), LoadedImage(crop[40:88, 40:88], False, "n.png"))
    assert ci.context.min() == 0.0 and ci.context.max() == 1.0  # min-max as the slices set
    assert ci.nodule_crop.shape == (48, 48) and ci.names == ["s.png", "n.png"]
    with pytest.raises(LungvizError):
        from_loaded(None, None)
    with pytest.raises(LungvizError, match="larger than a crop"):
        from_loaded(None, LoadedImage(np.zeros((512, 512), np.float32), False, "n.png"))


def test_a_small_crop_is_enlarged_with_a_note_and_a_full_one_is_not():
    small = from_loaded(LoadedImage(np.random.default_rng(0).random((40, 60), np.float32), False, "s.png"))
    assert small.notes[0].startswith("The slice image is only 60 x 40 pixels") and "3.2x" in small.notes[0]
    for side in (86, 128, 150):  # two thirds of 128 px and more: as the slices set
        ci = from_loaded(LoadedImage(np.random.default_rng(0).random((side, side), np.float32), False, "s.png"))
        assert not any("enlarged" in n for n in ci.notes), side
    assert "enlarged" in from_loaded(LoadedImage(np.zeros((85, 128), np.float32), False, "s.png")).notes[0]


def test_series_slice_and_display_window():
    sl = DicomSlice(_hu_slice(), (0.7, 0.7), 10.0, 1, "1.2", "9", "x.dcm")
    ci = from_series([sl], 0, (305.0, 205.0))
    assert ci.context[64, 64] == 1.0
    with pytest.raises(LungvizError, match="does not exist"):
        from_series([sl], 3)
    no_spacing = DicomSlice(_hu_slice(), (float("nan"), float("nan")), 10.0, 1, "1.2", "9", "x.dcm")
    assert ci.spacing_mm == pytest.approx(0.7) and from_series([no_spacing], 0, (305.0, 205.0)).spacing_mm is None
    shown = display_image(_hu_slice(), True, "lung")
    assert shown[0, 0] == pytest.approx((-1000 + 1350) / 1500)
    # a 16-bit export of HU + 1024 reads as [0, 0.06]: shown stretched to its range, not almost black
    export = (_hu_slice() + 1024.0) / 65535.0
    shown = display_image(export, False)
    assert shown.min() == 0.0 and shown.max() == pytest.approx(1.0)
    assert np.allclose(shown, (export - export.min()) / (export.max() - export.min()), atol=1e-6)
    assert not display_image(np.full((8, 8), 0.3, np.float32), False).any()  # a flat image: black, not NaN


def test_reading_notes_reach_the_case_notes():
    note = "s.gif: the file holds several frames (an animation or a multi-page image); only the first was read."
    crop = LoadedImage(np.zeros((128, 128), np.float32), False, "s.gif", meta={"mode": "P"}, notes=[note])
    ci = from_loaded(crop)
    assert ci.notes[:2] == [note, "s.gif: the palette (indexed) image was converted to grey (luminance)."]
    sl = DicomSlice(_hu_slice(), (float("nan"),) * 2, 10.0, 1, "1.2", "9", "x.dcm", notes=["x.dcm: spacing unknown"])
    assert from_series([sl], 0, (305.0, 205.0)).notes[0] == "x.dcm: spacing unknown"


@pytest.mark.parametrize(("mode", "expected"), [
    ("RGBA", "transparency channel"), ("LA", "transparency channel"), ("RGB", "colour image"),
    ("P", "palette (indexed) image"), ("I;16", "16-bit"), ("F", "32-bit"), ("L", None), ("", None),
])
def test_conversion_note_tells_what_reading_changed(mode, expected):
    from lungviz.data.upload import conversion_note

    note = conversion_note(LoadedImage(np.zeros((32, 32), np.float32), False, "x.png", meta={"mode": mode}))
    assert note is None if expected is None else expected in note


def test_rgba_upload_is_read_with_a_note(image_bytes):
    from lungviz.data.io import load_image

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 3] = 255
    case = from_loaded(load_image(image_bytes(rgba), "rgba.png"))
    assert any("transparency" in n for n in case.notes) and case.context.shape == (32, 32)


def test_zoom_ranges_magnify_around_the_centre_and_stay_inside_the_image():
    from lungviz.data.upload import PICK_ZOOMS, zoom_ranges

    assert zoom_ranges((512, 512), (100.0, 300.0), PICK_ZOOMS["whole slice"]) == ([-0.5, 511.5], [511.5, -0.5])
    x, y = zoom_ranges((512, 512), (256.0, 300.0), 4.0)  # a quarter of each side, centred on the point
    assert x == [236.0, 364.0] and y == [320.0, 192.0]
    x, y = zoom_ranges((400, 512), (5.0, 510.0), 2.0)  # near a corner: shifted to stay on the image
    assert x == [255.5, 511.5] and y == [199.5, -0.5]
