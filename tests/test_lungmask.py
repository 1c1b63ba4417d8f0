"""The lung mask (HU and windowed images) and the Hessian blob/vessel measures: tiny synthetic slices, slices
with no lung (head CT, localiser, phantom), and the real DICOM series with every reader-confirmed nodule."""

from __future__ import annotations

import numpy as np
import pytest

from lungviz.inference.blobness import hessian_2d, hessian_3d
from lungviz.inference.lungmask import lung_mask, series_lung_mask

SP = 0.7


def chest(juxta: bool = False, pad_value: float | None = None) -> np.ndarray:
    """A 512 x 512 slice in HU: air, a body ellipse, two lungs; with ``juxta`` a 16 mm nodule on the right
    lung's outer wall (its centre 4 mm inside the lung's edge, the rest in the chest wall), with ``pad_value`` the
    corners padded as scanners do."""
    r, c = np.mgrid[0:512, 0:512].astype(float)
    hu = np.full((512, 512), -1000.0)
    hu[((r - 256) / 200) ** 2 + ((c - 256) / 240) ** 2 <= 1] = 40.0
    for cc in (160, 352):
        hu[((r - 250) / 140) ** 2 + ((c - cc) / 75) ** 2 <= 1] = -850.0
    if juxta:
        hu[np.hypot(r - 250, c - 91) <= 8.0 / SP] = 30.0  # lung's outer edge is at column 85
    if pad_value is not None:
        hu[np.hypot(r - 256, c - 256) > 255] = pad_value
    return (hu + np.random.default_rng(0).normal(0, 15, hu.shape)).astype(np.float32)


def test_mask_holds_both_lungs_not_outside_air_or_body():
    lung = lung_mask(chest(), True, SP)
    assert lung.shape == (512, 512) and lung.dtype == bool
    assert lung[250, 160] and lung[250, 352]  # both lungs
    assert not lung[5, 5] and not lung[256, 256] and not lung[450, 256] and not lung[256, 20]  # air, mediastinum, body
    assert 0.15 < lung.mean() < 0.30


def test_juxtapleural_nodule_stays_inside_only_thanks_to_the_closing():
    hu = chest(juxta=True)
    assert lung_mask(hu, True, SP)[250, 91]
    assert not lung_mask(hu, True, SP, closing_mm=0.0)[250, 91]  # without the rolling ball it would be cut out


def test_scanner_padding_is_outside_air():
    lung = lung_mask(chest(pad_value=-2048.0), True, SP)
    assert lung[250, 160] and not lung[2, 2] and not lung[256, 256]


def test_windowed_image_gives_the_same_mask():
    hu = chest(juxta=True)
    png = np.clip((hu + 1350.0) / 1500.0, 0, 1)  # lung window W1500 L-600
    a, b = lung_mask(hu, True, SP), lung_mask(png, False, SP)
    assert (a & b).sum() / (a | b).sum() > 0.97


def _head_ct() -> np.ndarray:
    r, c = np.mgrid[0:512, 0:512].astype(float)
    hu = np.full((512, 512), -1000.0)
    e = ((r - 256) / 180) ** 2 + ((c - 256) / 150) ** 2
    hu[e <= 1] = 1200.0  # skull
    hu[e <= 0.85] = 35.0  # brain
    for cc in (220, 292):  # two small air cells (sinuses)
        hu[np.hypot(r - 140, c - cc) <= 12] = -1000.0
    return hu.astype(np.float32)


def _localiser() -> np.ndarray:
    """A projection radiograph stored like a CT: smooth values, nothing near air inside the body."""
    c = np.mgrid[0:512, 0:512][1].astype(float)
    img = np.full((512, 512), -1000.0)
    body = np.abs(c - 256) < 200
    img[body] = 200.0 - 250.0 * np.exp(-(((c[body] - 256) % 200 - 100) / 60) ** 2)
    return img.astype(np.float32)


def _phantom(air_rods: bool) -> np.ndarray:
    r, c = np.mgrid[0:512, 0:512].astype(float)
    hu = np.full((512, 512), -1000.0)
    hu[np.hypot(r - 256, c - 256) <= 200] = 0.0  # water cylinder
    if air_rods:
        for rr, cc in ((200, 200), (300, 320)):
            hu[np.hypot(r - rr, c - cc) <= 15] = -1000.0
    return hu.astype(np.float32)


@pytest.mark.parametrize("make", [_head_ct, _localiser, lambda: _phantom(False), lambda: _phantom(True),
                                  lambda: np.full((512, 512), -1000.0, np.float32),
                                  lambda: np.zeros((512, 512), np.float32)])
def test_slices_without_lung_give_an_empty_mask(make):
    img = make()
    assert not lung_mask(img, True, SP).any()
    assert not lung_mask(np.clip((img + 1350.0) / 1500.0, 0, 1), False, SP).any()


def test_series_mask_is_per_slice():
    vol = np.stack([chest(), _head_ct()])
    m = series_lung_mask(vol, True, SP)
    assert m.shape == vol.shape and m[0].any() and not m[1].any()


def test_hessian_tells_a_ball_from_a_vessel_across_slices():
    k, r, c = np.mgrid[0:16, 0:64, 0:64].astype(float)
    gap = 2.5
    z, y, x = (k - 8) * gap, (r - 32) * SP, (c - 32) * SP
    ball = (np.sqrt(z**2 + y**2 + x**2) <= 4).astype(np.float32)
    vessel = (np.sqrt(y**2 + x**2) <= 2.5).astype(np.float32)  # runs across the slices: a dot on each one
    at = np.array([[8.0, 32.0, 32.0]])
    d_ball, l_ball = hessian_3d(ball, at, SP, gap)
    d_vessel, l_vessel = hessian_3d(vessel, at, SP, gap)
    assert d_ball[0] > 5 * d_vessel[0] and l_vessel[0] > 5 * l_ball[0]
    # on one slice the two look alike: that is what the third dimension adds
    d2_ball, _ = hessian_2d(ball[8], at[:, 1:], SP)
    d2_vessel, _ = hessian_2d(vessel[8], at[:, 1:], SP)
    assert d2_vessel[0] > 0.5 * d2_ball[0] > 0
    assert hessian_3d(ball, np.zeros((0, 3)), SP, gap)[0].shape == (0,)


def test_real_series_masks_hold_both_lungs_and_every_confirmed_nodule(lidc_dicom_dir):
    from lungviz.data.dicom import find_nodules, read_patient

    checked = 0
    for patient in ("LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003", "LIDC-IDRI-0006"):
        series, marks, _ = read_patient(lidc_dicom_dir / patient)
        nodules, _ = find_nodules(series, marks)
        sp = float(np.mean(series[0].pixel_spacing_mm))
        for nd in (n for n in nodules if n.n_readers >= 2):
            for j, k in enumerate(nd.slice_indices):
                hu = np.maximum(series[k].hu, -1024.0)
                lung = lung_mask(hu, True, sp)
                r, c = np.round(np.argwhere(nd.counts[j] > 0).mean(axis=0)).astype(int)
                assert lung[r, c], (patient, k)  # the readers' centre on this slice, juxta-pleural ones included
                checked += 1
            hu = np.maximum(series[nd.slice_indices[len(nd.slice_indices) // 2]].hu, -1024.0)
            lung = lung_mask(hu, True, sp)
            half = lung.shape[1] // 2
            assert lung[:, :half].sum() * sp**2 > 3000 and lung[:, half:].sum() * sp**2 > 3000  # both lungs
            assert not lung[:10].any() and not lung[-10:].any()  # never the air around the patient
            assert np.median(hu[lung]) < -700  # mostly aerated lung, not body
            body_wall = (hu > -200) & ~lung
            assert body_wall.sum() > lung.sum() * 0.5
    assert checked >= 30
