"""lungviz.data.preprocess on tiny arrays, compared with values computed by hand or with plain numpy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from lungviz.data import preprocess as pp
from lungviz.errors import LungvizError

# ------------------------------------------------------------------------------------------------ windowing

#: (preset, HU values, expected [0, 1] values). Lung W1500/L-600 spans [-1350, 150]; mediastinum W400/L40
#: spans [-160, 240]; bone W1800/L400 spans [-500, 1300]. Values outside are clipped.
WINDOW_CASES = [
    ("lung", [-1350.0, 150.0, -600.0, -975.0, -2000.0, 3000.0], [0.0, 1.0, 0.5, 0.25, 0.0, 1.0]),
    ("mediastinum", [-160.0, 240.0, 40.0, 140.0, -1000.0, 1000.0], [0.0, 1.0, 0.5, 0.75, 0.0, 1.0]),
    ("bone", [-500.0, 1300.0, 400.0, 850.0, -1000.0, 2000.0], [0.0, 1.0, 0.5, 0.75, 0.0, 1.0]),
]


@pytest.mark.parametrize("preset, hu, expected", WINDOW_CASES)
def test_window_preset_maps_hu_to_unit_range(preset, hu, expected):
    hu2d = np.array([hu], np.int16 if preset != "lung" else np.float64)
    out = pp.window_preset(hu2d, preset)
    assert out.dtype == np.float32
    assert out.shape == hu2d.shape
    np.testing.assert_allclose(out[0], expected, atol=1e-6)


def test_window_presets_are_the_documented_ones():
    assert pp.WINDOW_PRESETS == {"lung": (1500.0, -600.0), "mediastinum": (400.0, 40.0), "bone": (1800.0, 400.0)}


def test_window_custom_matches_numpy():
    hu = np.array([[-100.0, 0.0], [50.0, 300.0]])
    width, level = 200.0, 0.0
    expected = np.clip((hu - (level - width / 2)) / width, 0, 1)
    np.testing.assert_allclose(pp.window(hu, width, level), expected, atol=1e-6)


WINDOW_INVALID = [
    (lambda: pp.window(np.zeros((2, 2)), 0.0, 40.0), "width"),
    (lambda: pp.window(np.zeros((2, 2)), -400.0, 40.0), "width"),
    (lambda: pp.window(np.zeros((2, 2)), float("nan"), 40.0), "width"),
    (lambda: pp.window_preset(np.zeros((2, 2)), "brain"), "unknown window 'brain'"),
]


@pytest.mark.parametrize("call, words", WINDOW_INVALID)
def test_window_invalid_raises(call, words):
    with pytest.raises(LungvizError, match=words):
        call()


# ------------------------------------------------------------------------------------------------ intensity

MINMAX_CASES = [
    (np.array([[2.0, 4.0], [6.0, 10.0]]), np.array([[0.0, 0.25], [0.5, 1.0]])),
    (np.array([[-1000, 0], [500, 1000]], np.int16), np.array([[0.0, 0.5], [0.75, 1.0]])),
    (np.full((3, 3), 7.0), np.zeros((3, 3))),  # constant image -> zeros, no division by zero
]


@pytest.mark.parametrize("image, expected", MINMAX_CASES)
def test_minmax(image, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = pp.minmax(image)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_minmax_empty_raises():
    with pytest.raises(LungvizError, match="empty"):
        pp.minmax(np.zeros((0, 4)))


def _logistic(x, gain, cutoff):
    return 1.0 / (1.0 + np.exp(gain * (cutoff - np.asarray(x, np.float64))))


def test_sigmoid_contrast_default_cutoff_is_the_mean():
    image = np.array([[0.2, 0.5], [0.8, 0.5]], np.float32)  # mean 0.5
    out = pp.sigmoid_contrast(image)
    assert out[0, 1] == pytest.approx(0.5) and out[1, 1] == pytest.approx(0.5)
    np.testing.assert_allclose(out, _logistic(image, 10.0, 0.5), rtol=1e-5)
    assert out[0, 0] < 0.5 < out[1, 0]


SIGMOID_CASES = [  # (gain, cutoff)
    (10.0, 0.3),
    (5.0, 0.5),
    (20.0, 0.7),
    (1.0, None),
]


@pytest.mark.parametrize("gain, cutoff", SIGMOID_CASES)
def test_sigmoid_contrast_matches_logistic(gain, cutoff):
    image = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    c = float(image.mean()) if cutoff is None else cutoff
    out = pp.sigmoid_contrast(image, gain=gain, cutoff=cutoff)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, _logistic(image, gain, c), rtol=1e-5, atol=1e-7)


def test_sigmoid_contrast_higher_gain_is_steeper_and_large_gain_does_not_overflow():
    image = np.array([[0.4, 0.6]], np.float32)
    soft, hard = pp.sigmoid_contrast(image, gain=2, cutoff=0.5), pp.sigmoid_contrast(image, gain=20, cutoff=0.5)
    assert hard[0, 1] - hard[0, 0] > soft[0, 1] - soft[0, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exp overflow would warn
        steep = pp.sigmoid_contrast(np.array([[0.0, 1.0]], np.float32), gain=1000.0, cutoff=0.5)
    np.testing.assert_allclose(steep, [[0.0, 1.0]], atol=1e-6)


# ------------------------------------------------------------------------------------------------ geometry

PAD_CASES = [
    # 2 x 4 -> 4 x 4: one row of fill above, one below
    (np.array([[1, 2, 3, 4], [5, 6, 7, 8]]), None,
     np.array([[1, 1, 1, 1], [1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 1, 1]])),
    # 3 x 2 -> 3 x 3: the odd extra column goes at the end
    (np.array([[1, 2], [3, 4], [5, 6]]), 0.0, np.array([[1, 2, 0], [3, 4, 0], [5, 6, 0]])),
    # 1 x 4 with an explicit fill
    (np.array([[9, 8, 7, 6]]), -1.0,
     np.array([[-1, -1, -1, -1], [9, 8, 7, 6], [-1, -1, -1, -1], [-1, -1, -1, -1]])),
    # already square: unchanged
    (np.array([[1, 2], [3, 4]]), None, np.array([[1, 2], [3, 4]])),
]


@pytest.mark.parametrize("image, fill, expected", PAD_CASES)
def test_pad_to_square(image, fill, expected):
    out = pp.pad_to_square(image, fill=fill)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


def test_pad_to_square_returns_a_new_array():
    image = np.ones((3, 3), np.float32)
    out = pp.pad_to_square(image)
    out[0, 0] = 5.0
    assert image[0, 0] == 1.0


GRID = np.arange(36, dtype=np.float32).reshape(6, 6) + 100.0  # minimum 100 = the default fill
F = 100.0

CROP_CASES = [
    # (centre_rc, size, fill, expected)
    ((2, 3), 3, None, GRID[1:4, 2:5]),  # odd size: centred on the pixel
    ((2, 3), 1, None, GRID[2:3, 3:4]),
    ((3.0, 3.0), 2, None, GRID[2:4, 2:4]),  # even size: the window starts at round(centre - size / 2)
    ((2.5, 2.5), 2, None, GRID[2:4, 2:4]),
    ((3.0, 3.0), 4, None, GRID[1:5, 1:5]),
    ((3.0, 3.0), 6, None, GRID),
    ((0, 0), 3, -1.0, np.array([[-1, -1, -1], [-1, 100, 101], [-1, 106, 107]])),  # off the top-left edge
    ((5, 5), 3, None, np.array([[128, 129, F], [134, 135, F], [F, F, F]])),  # off the bottom-right edge, min fill
    ((50, 50), 2, 0.0, np.zeros((2, 2))),  # entirely outside
]


@pytest.mark.parametrize("centre, size, fill, expected", CROP_CASES)
def test_crop_around(centre, size, fill, expected):
    out = pp.crop_around(GRID, centre, size, fill=fill)
    assert out.shape == (size, size) and out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


CENTER_CROP_CASES = [
    (np.arange(36.0).reshape(6, 6), 2, np.arange(36.0).reshape(6, 6)[2:4, 2:4]),
    (np.arange(25.0).reshape(5, 5), 3, np.arange(25.0).reshape(5, 5)[1:4, 1:4]),
    (np.arange(25.0).reshape(5, 5), 1, np.array([[12.0]])),
    (np.arange(24.0).reshape(4, 6), 4, np.arange(24.0).reshape(4, 6)[:, 1:5]),
    # smaller than the crop: padded all round with the minimum (1)
    (np.array([[1.0, 2.0], [3.0, 4.0]]), 4,
     np.array([[1, 1, 1, 1], [1, 1, 2, 1], [1, 3, 4, 1], [1, 1, 1, 1]], np.float32)),
]


@pytest.mark.parametrize("image, size, expected", CENTER_CROP_CASES)
def test_center_crop(image, size, expected):
    np.testing.assert_array_equal(pp.center_crop(image, size), expected)


CROP_INVALID = [
    (lambda: pp.crop_around(GRID, (2, 2), 0), "crop size"),
    (lambda: pp.crop_around(GRID, (2, 2), -3), "crop size"),
    (lambda: pp.crop_around(GRID, (2, 2), 2.5), "crop size"),
    (lambda: pp.crop_around(GRID, (float("nan"), 2), 3), "centre"),
    (lambda: pp.crop_around(np.zeros((2, 3, 3)), (1, 1), 2), "2D"),
    (lambda: pp.center_crop(np.zeros(5), 2), "2D"),
    (lambda: pp.pad_to_square(np.zeros((2, 2, 3))), "2D"),
]


@pytest.mark.parametrize("call, words", CROP_INVALID)
def test_crop_invalid_raises(call, words):
    with pytest.raises(LungvizError, match=words):
        call()


# ------------------------------------------------------------------------------------------------ resizing

RESIZE_SHAPES = [
    ((8, 8), 4, (4, 4)),
    ((8, 8), np.int64(12), (12, 12)),  # a numpy integer (e.g. read from an array) is a side too
    ((10, 6), (5, 3), (5, 3)),
    ((4, 4), (3, 7), (3, 7)),
    ((5, 5), 5, (5, 5)),
]


@pytest.mark.parametrize("shape, size, expected", RESIZE_SHAPES)
def test_resize_shape_and_constant_image_stays_constant(shape, size, expected):
    out = pp.resize(np.full(shape, 0.3, np.float32), size)
    assert out.shape == expected and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.3, atol=1e-6)


def test_resize_upsampling_is_bilinear_with_half_pixel_centres():
    # f(y, x) = 2y + x sampled at 2 x 2; at 4 x 4 the output centres map to y, x in {0, .25, .75, 1} (edges clamped)
    image = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)
    t = np.array([0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(pp.resize(image, 4), 2 * t[:, None] + t[None, :], atol=1e-6)


def test_resize_shrinking_is_antialiased():
    checker = (np.indices((8, 8)).sum(axis=0) % 2).astype(np.float32)
    out = pp.resize(checker, 4)
    np.testing.assert_allclose(out[1:3, 1:3], 0.5, atol=1e-6)  # averaged, not sampled (0 or 1)
    assert out.min() > 0.0 and out.max() < 1.0


def test_resize_does_not_alias_its_input():
    image = np.zeros((4, 4), np.float32)
    out = pp.resize(image, 4)
    out[0, 0] = 1.0
    assert image[0, 0] == 0.0


RESIZE_INVALID = [
    (np.zeros((4, 4)), 0),
    (np.zeros((4, 4)), -2),
    (np.zeros((4, 4)), (4, 0)),
    (np.zeros((4, 4)), (4, 4, 4)),
    (np.zeros((4, 4)), 2.5),
    (np.zeros((3, 4, 4)), 4),
    (np.zeros((0, 4)), 4),
]


@pytest.mark.parametrize("image, size", RESIZE_INVALID)
def test_resize_invalid_raises(image, size):
    with pytest.raises(LungvizError):
        pp.resize(image, size)


# ------------------------------------------------------------------------------------------------ millimetres

MM_CASES = [
    (32.0, 0.5, 64),
    (32.0, 1.0, 32),
    (32.0, 0.7, 46),  # 45.7 rounds to 46
    (90.0, 0.703125, 128),
    (32.0, None, 46),  # unknown spacing: DEFAULT_SPACING_MM = 0.7
    (32.0, 0.0, 46),
    (32.0, -1.0, 46),
    (32.0, float("nan"), 46),
    (32.0, 0.002, 46),  # implausible: as unknown
    (32.0, 50.0, 46),
    (32.0, 0.05, 640),  # the plausible range's ends
    (32.0, 5.0, 6),
    (0.1, 1.0, 1),  # never fewer than one pixel
]


@pytest.mark.parametrize("size_mm, spacing, expected", MM_CASES)
def test_mm_to_px(size_mm, spacing, expected):
    assert pp.mm_to_px(size_mm, spacing) == expected


@pytest.mark.parametrize("size_mm", [0.0, -5.0, float("nan"), float("inf")])
def test_mm_to_px_invalid_field_raises(size_mm):
    with pytest.raises(LungvizError, match="millimetres"):
        pp.mm_to_px(size_mm, 0.7)


@pytest.mark.parametrize("spacing, expected", [
    (0.7, 0.7), (0.05, 0.05), (5.0, 5.0), (0.049, None), (5.01, None), (0.002, None), (0.0001, None), (0.0, None),
    (-0.7, None), (float("nan"), None), (float("inf"), None), (None, None),
])
def test_valid_spacing_is_a_plausible_one(spacing, expected):
    assert pp.valid_spacing(spacing) == expected


def test_a_crop_wider_than_the_largest_image_side_is_refused():
    with pytest.raises(LungvizError, match="would be 10000 pixels wide, more than the largest image side"):
        pp.mm_to_px(500.0, 0.05)


def test_crop_mm_cuts_the_pixels_covering_the_field():
    image = np.arange(100 * 100, dtype=np.float32).reshape(100, 100)
    out = pp.crop_mm(image, (50, 40), 10.0, 0.5)  # 10 mm at 0.5 mm = 20 px
    np.testing.assert_array_equal(out, image[40:60, 30:50])


def _square_image(side_px: int, square_px: int, centre: tuple[int, int] | None = None) -> np.ndarray:
    """Zeros with a centred (or ``centre``-d) square of ones ``square_px`` wide."""
    image = np.zeros((side_px, side_px), np.float32)
    r, c = centre or (side_px // 2, side_px // 2)
    image[r - square_px // 2 : r - square_px // 2 + square_px, c - square_px // 2 : c - square_px // 2 + square_px] = 1
    return image


#: (pixel spacing mm, input size). A 16 mm square inside the 32 mm nodule view fills (16 / 32)^2 = 1/4 of it.
NODULE_VIEW_CASES = [(0.5, 64), (0.5, 32), (1.0, 32), (0.7, 64), (0.9, 48)]


@pytest.mark.parametrize("spacing, input_size", NODULE_VIEW_CASES)
def test_nodule_view_covers_32_mm(spacing, input_size):
    square_px = round(16.0 / spacing)
    context = _square_image(128, square_px)
    view = pp.view_from_context(context, "nodule", input_size, spacing)
    assert view.shape == (input_size, input_size) and view.dtype == np.float32
    field_px = pp.mm_to_px(32.0, spacing)
    expected = square_px**2 / field_px**2  # exactly 1/4 up to pixel rounding
    assert view.mean() == pytest.approx(expected, abs=0.02)
    assert expected == pytest.approx(0.25, abs=0.02)
    assert view[input_size // 2, input_size // 2] == pytest.approx(1.0)  # centred on the nodule
    assert view[0, 0] == pytest.approx(0.0)


def test_nodule_view_field_override_and_default_spacing():
    context = _square_image(128, 32)
    # 64 mm at 0.5 mm = the whole 128 px crop: the 32 px square fills 1/16
    assert pp.view_from_context(context, "nodule", 64, 0.5, field_mm=64.0).mean() == pytest.approx(1 / 16, abs=0.005)
    # unknown spacing -> 0.7 mm -> 46 px field; a 23 px square (16 mm) fills 1/4
    context = _square_image(128, 23)
    assert pp.view_from_context(context, "nodule", 46, None).mean() == pytest.approx(23**2 / 46**2, abs=1e-6)


def test_slice_view_is_the_whole_context_crop():
    context = _square_image(128, 32)
    view = pp.view_from_context(context, "slice", 64, 0.7)
    assert view.shape == (64, 64)
    assert view.mean() == pytest.approx(1 / 16, abs=0.005)
    rect = np.full((96, 128), 0.4, np.float32)  # non-square: padded (with its minimum) then resized
    np.testing.assert_allclose(pp.view_from_context(rect, "slice", 32, 0.7), 0.4, atol=1e-6)


def test_view_from_whole_slice_cuts_around_the_nodule():
    spacing = 0.7
    whole = _square_image(512, 23, centre=(300, 200))  # a 16 mm nodule off-centre
    nodule = pp.view_from_whole_slice(whole, (300, 200), "nodule", 46, spacing)
    assert nodule.mean() == pytest.approx(0.25, abs=1e-6)  # 23 px in a 46 px (32 mm) field
    slice_view = pp.view_from_whole_slice(whole, (300, 200), "slice", 129, spacing)
    assert pp.mm_to_px(90.0, spacing) == 129
    assert slice_view.mean() == pytest.approx(23**2 / 129**2, abs=1e-6)
    # at the image corner three quarters of the field lie outside and get the image's minimum (0)
    bright = np.ones((512, 512), np.float32)
    bright[-1, -1] = 0.0
    corner = pp.view_from_whole_slice(bright, (0, 0), "nodule", 46, spacing)
    assert corner.mean() == pytest.approx(0.25, abs=1e-6)


VIEW_INVALID = [
    (lambda: pp.view_from_context(np.zeros((128, 128)), "lung", 64, 0.7), "unknown view 'lung'"),
    (lambda: pp.view_from_whole_slice(np.zeros((64, 64)), (3, 3), "whole", 32, 0.7), "unknown view"),
    (lambda: pp.view_from_context(np.zeros((2, 128, 128)), "slice", 64, 0.7), "2D"),
    (lambda: pp.view_from_context(np.zeros((128, 128)), "nodule", 0, 0.7), "output size"),
    (lambda: pp.view_from_context(np.zeros((128, 128)), "nodule", 64, 0.7, field_mm=0.0), "millimetres"),
]


@pytest.mark.parametrize("call, words", VIEW_INVALID)
def test_view_invalid_raises(call, words):
    with pytest.raises(LungvizError, match=words):
        call()


# ------------------------------------------------------------------------------------------------ model input

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_to_model_input_normalises_each_channel():
    image = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    out = pp.to_model_input(image, *IMAGENET)
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    for ch, (m, s) in enumerate(zip(*IMAGENET, strict=True)):
        np.testing.assert_allclose(out[ch], (image - m) / s, rtol=1e-6)
    assert out[0, 0, 0] == pytest.approx(-0.485 / 0.229)


MODEL_INPUT_CASES = [
    # (mean, std, channels, expected for pixel value 0.75)
    ((0.5,), (0.25,), 1, [1.0]),
    ((0.5,), (0.25,), 3, [1.0, 1.0, 1.0]),  # one value serves every channel
    ((0.5, 0.25, 0.0), (0.25, 0.5, 1.0), 3, [1.0, 1.0, 0.75]),
    ((0.5, 0.25, 0.0), (0.25, 0.5, 1.0), 1, [1.0]),  # a 1-channel model takes the first
]


@pytest.mark.parametrize("mean, std, channels, expected", MODEL_INPUT_CASES)
def test_to_model_input_channels(mean, std, channels, expected):
    out = pp.to_model_input(np.full((2, 3), 0.75, np.float32), mean, std, channels=channels)
    assert out.shape == (channels, 2, 3)
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-6)


MODEL_INPUT_INVALID = [
    (np.zeros((2, 2)), (0.5, 0.5), (0.2, 0.2), 3, "mean"),
    (np.zeros((2, 2)), (0.5,), (0.0,), 3, "std"),
    (np.zeros((2, 2)), (0.5,), (-1.0,), 1, "std"),
    (np.zeros((2, 2, 3)), (0.5,), (0.2,), 3, "2D"),
    (np.zeros((2, 2)), (0.5,), (0.2,), 0, "channels"),
]


@pytest.mark.parametrize("image, mean, std, channels, words", MODEL_INPUT_INVALID)
def test_to_model_input_invalid_raises(image, mean, std, channels, words):
    with pytest.raises(LungvizError, match=words):
        pp.to_model_input(image, mean, std, channels=channels)


@pytest.mark.parametrize("field_mm, share",
                         [(None, 0.25), (32.0, 0.25), (24.0, (16 / 24) ** 2), (48.0, (16 / 48) ** 2)])
def test_an_uploaded_nodule_crop_is_cut_to_each_model_field(field_mm, share):
    """The upload is taken to span the default 32 mm: a 16 mm square in its middle fills (16 / field)^2 of a view."""
    crop = np.zeros((96, 96), np.float32)
    crop[24:72, 24:72] = 1.0  # 48 of 96 px = 16 of 32 mm
    view = pp.view_from_nodule_crop(crop, 48, field_mm)
    assert view.shape == (48, 48)
    assert view.mean() == pytest.approx(share, abs=0.02)
    assert view[24, 24] == pytest.approx(1.0) and view[0, 0] == pytest.approx(0.0)  # centred, margin = darkest value


@pytest.mark.parametrize("field_mm", [0.0, -24.0, float("nan")])
def test_a_nodule_field_that_is_no_size_is_refused(field_mm):
    with pytest.raises(LungvizError, match="positive number of millimetres"):
        pp.view_from_nodule_crop(np.zeros((40, 40), np.float32), 48, field_mm)
