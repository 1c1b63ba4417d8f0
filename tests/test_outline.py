"""The nodule outliner: the segmentation network, the outline at the crop's centre and its measured size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lungviz.errors import LungvizError
from lungviz.models import Bundle, ModelSpec, create_model, load_bundle, save_bundle
from lungviz.outline import (
    SIZE_MEASURES,
    axes_px,
    central_region,
    crops_diameter_mm,
    crops_outline_features,
    crops_sizes_mm,
    load_outliner,
    outline_nodule,
    outline_overlay,
)
from lungviz.shape import MIN_SHAPE_PX, OUTLINE_FEATURES, feature_groups_text, outline_features


class _Disc(nn.Module):
    """A stand-in outliner whose logits are +10 inside a centred disc of ``radius`` view pixels, -10 outside."""

    def __init__(self, size: int, radius: float) -> None:
        super().__init__()
        yy, xx = np.mgrid[:size, :size] - (size - 1) / 2.0
        self.register_buffer("map", torch.from_numpy(np.where(np.hypot(yy, xx) <= radius, 10.0, -10.0)).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.map.expand(x.shape[0], 1, -1, -1)


def _disc_bundle(size: int = 32, radius: float = 6.0, field_mm: float = 16.0) -> Bundle:
    spec = {"input_size": size, "mean": [0.5] * 3, "std": [0.5] * 3, "in_chans": 3, "task": "outline",
            "preprocessing": {"field_mm": field_mm}}
    return Bundle(model=_Disc(size, radius), spec=spec, name="outliner", folder=Path("."), device=torch.device("cpu"))


def test_the_segmentation_network_maps_every_pixel_and_round_trips_as_a_bundle(tmp_path):
    torch.manual_seed(0)
    net = create_model("tf_efficientnet_lite0+fpn", 1)
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 64, 64)
    assert net(torch.zeros(1, 3, 96, 96)).shape == (1, 1, 96, 96)
    groups = net.backbone_groups()
    assert sum(len(g) for g in groups) == len(list(net.parameters()))  # each parameter in exactly one group
    assert len({id(p) for g in groups for p in g}) == len(list(net.parameters()))
    assert not any("conv_head" in k or k.startswith("blocks.5") for k in net.state_dict())  # no dead stages shipped
    spec = ModelSpec.from_model(net, classes=["nodule"], view="nodule", task="outline", input_size=64,
                                preprocessing={"field_mm": 48.0})
    save_bundle(net, spec, tmp_path, "outliner")
    loaded = load_outliner(tmp_path, "cpu")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), loaded.model(x), atol=0.05)  # float16 storage
    with pytest.raises(LungvizError, match="EfficientNet-style"):
        create_model("cnn4+fpn", 1)
    with pytest.raises(LungvizError, match="not installed"):
        load_outliner(tmp_path / "nowhere")


def test_the_region_nearest_the_centre_is_the_outline():
    m = np.zeros((40, 40), bool)
    m[17:24, 17:24] = True  # at the centre
    m[2:8, 30:38] = True  # a vessel elsewhere, larger
    picked = central_region(m)
    assert picked.sum() == 49 and picked[20, 20] and not picked[5, 33]
    far = np.zeros((40, 40), bool)
    far[0:5, 0:5] = True
    assert not central_region(far).any()  # nothing near the centre: nothing outlined
    assert not central_region(np.zeros((8, 8), bool)).any()


def test_long_and_short_axis_as_a_reader_measures_them():
    rr, cc = np.indices((80, 80))
    # An ellipse with semi-axes 20 and 8 pixels, turned 30 degrees: long axis 41, short 17 (pixels counted whole).
    t = np.deg2rad(30.0)
    u, v = (rr - 40) * np.cos(t) + (cc - 40) * np.sin(t), -(rr - 40) * np.sin(t) + (cc - 40) * np.cos(t)
    long_ax, short_ax = axes_px((u / 20.0) ** 2 + (v / 8.0) ** 2 <= 1.0)
    assert long_ax == pytest.approx(41.0, abs=1.0) and short_ax == pytest.approx(17.0, abs=1.0)
    # A 4 x 40 bar: the short axis is its width, not its extent across a slightly tilted long axis.
    bar = np.zeros((64, 64), bool)
    bar[10:14, 5:45] = True
    long_ax, short_ax = axes_px(bar)
    assert 40.0 <= long_ax < 40.5 and short_ax == pytest.approx(4.0, abs=0.1)
    # A disc measures the same both ways; one pixel is one pixel; nothing is nothing.
    disc = np.hypot(rr - 40, cc - 40) <= 10
    assert axes_px(disc) == pytest.approx((21.0, 21.0), abs=0.5)
    assert axes_px(np.ones((1, 1), bool)) == (1.0, 1.0) and axes_px(np.zeros((5, 5), bool)) == (0.0, 0.0)


def test_outline_size_and_its_place_on_the_crop():
    bundle = _disc_bundle(size=32, radius=6.0, field_mm=16.0)  # 16 mm at 0.5 mm/px: the central 32 px, 1:1
    ctx = np.random.default_rng(0).random((128, 128)).astype(np.float32)
    out = outline_nodule(bundle, ctx, 0.5)
    view_px = int((np.hypot(*(np.mgrid[:32, :32] - 15.5)) <= 6.0).sum())
    assert out.area_mm2 == pytest.approx(view_px * 0.25)
    assert out.diameter_mm == pytest.approx(2 * np.sqrt(view_px * 0.25 / np.pi))
    assert out.diameter_mm == pytest.approx(6.0, abs=0.3)  # a 12 px (6 mm) disc
    assert out.mask.shape == (128, 128) and out.mask.sum() == view_px  # one crop pixel per view pixel here
    rows, cols = np.nonzero(out.mask)
    assert rows.mean() == pytest.approx(63.5, abs=0.5) and cols.mean() == pytest.approx(63.5, abs=0.5)
    fine = outline_nodule(bundle, ctx, 0.25)  # a finer crop: the view covers 64 crop px, still 0.5 mm per view px
    assert fine.diameter_mm == pytest.approx(out.diameter_mm)  # millimetres do not depend on the crop's pixels
    assert fine.mask.sum() == pytest.approx(4 * view_px, rel=0.05)
    assert outline_nodule(bundle, ctx, None).diameter_mm > 0  # unknown spacing: the default one
    assert crops_diameter_mm(bundle, [ctx, ctx], 0.5) == pytest.approx([out.diameter_mm] * 2)
    # A disc's long and short axis are its width (13 view px of 0.5 mm), whatever the crop's pixels.
    assert out.long_axis_mm == pytest.approx(6.5, abs=0.3) and out.short_axis_mm == pytest.approx(6.5, abs=0.3)
    assert fine.long_axis_mm == pytest.approx(out.long_axis_mm)
    sizes = crops_sizes_mm(bundle, [ctx], 0.5)
    assert set(sizes) == set(SIZE_MEASURES) and sizes["circle"] == pytest.approx([out.diameter_mm])
    assert sizes["long_axis"] == pytest.approx([out.long_axis_mm])
    assert sizes["mean_axes"] == pytest.approx([(out.long_axis_mm + out.short_axis_mm) / 2])
    with pytest.raises(LungvizError):
        outline_nodule(bundle, np.zeros((4, 4, 3), np.float32), 0.5)


def test_outline_overlay_draws_the_boundary_only():
    ctx = np.full((20, 20), 0.5, np.float32)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    rgb = outline_overlay(ctx, mask)
    assert rgb.shape == (20, 20, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[5, 10]) == (230, 60, 60) and tuple(rgb[10, 10]) == (128, 128, 128)
    assert tuple(rgb[0, 0]) == (128, 128, 128)


def test_the_outliner_bundle_is_checked(tmp_path):
    net = create_model("tf_efficientnet_lite0", 2)
    save_bundle(net, ModelSpec.from_model(net, classes=["a", "b"], view="nodule", task="binary", input_size=32),
                tmp_path, "outliner")
    with pytest.raises(LungvizError, match="not a nodule outliner"):
        load_outliner(tmp_path)
    assert load_bundle(tmp_path, "outliner").spec["task"] == "binary"


def test_outline_shape_and_grey_level_features():
    rr, cc = np.mgrid[:80, :80]
    disc = np.hypot(rr - 40, cc - 40) <= 12
    ellipse = ((rr - 40) / 16.0) ** 2 + ((cc - 40) / 6.0) ** 2 <= 1  # 33 x 13 px
    notched = disc & ~((np.abs(rr - 40) <= 3) & (cc >= 40))  # a disc with a slot cut to its centre
    tiny = np.hypot(rr - 40, cc - 40) <= 1.5  # 9 px: too few to tell a shape
    full = np.ones_like(disc)  # fills the view: no ring left to compare with
    view = np.where(disc, 0.8, 0.2)  # bright, uniform nodule on a darker background
    masks = np.stack([disc, ellipse, notched, np.zeros_like(disc), tiny, full])
    f = outline_features(masks, np.stack([view] * len(masks)))
    assert set(f) == set(OUTLINE_FEATURES) and all(v.shape == (len(masks),) for v in f.values())
    assert f["roundness"][0] == pytest.approx(1.0, abs=0.05)
    assert f["roundness"][1] == pytest.approx(13 / 33, abs=0.05)
    assert f["solidity"][0] > 0.98 and f["solidity"][2] < f["solidity"][0] - 0.1  # the slot is concave
    assert f["compactness"][0] == pytest.approx(1.0, abs=0.1)  # a disc
    assert f["compactness"][1] < f["compactness"][0] - 0.1 and f["compactness"][2] < f["compactness"][0] - 0.2
    assert f["mean_inside"][0] == pytest.approx(0.8) and f["std_inside"][0] == pytest.approx(0.0, abs=1e-9)
    assert f["contrast"][0] == pytest.approx(0.6)  # inside minus the ring just outside
    assert f["std_inside"][1] > 0.2  # the ellipse reaches beyond the bright disc
    assert all(np.isnan(v[3]) for v in f.values())  # nothing outlined: nothing measured
    assert tiny.sum() < MIN_SHAPE_PX and all(np.isnan(f[k][4]) for k in ("roundness", "solidity", "compactness"))
    assert f["mean_inside"][4] == pytest.approx(0.8) and f["contrast"][4] == pytest.approx(0.0)  # inside the disc
    assert np.isnan(f["contrast"][5]) and np.isfinite(f["mean_inside"][5])  # no ring: no contrast
    with pytest.raises(ValueError, match="one"):
        outline_features(np.stack([disc, disc]), view[None])
    # Small outlines, where a pixel grid distorts shape most: a small disc still reads as solid and compact, a small
    # 2:1 ellipse clearly less compact, and below MIN_SHAPE_PX no shape is read at all.
    small_disc = np.hypot(rr - 40, cc - 40) <= 5  # 81 px
    small_ellipse = ((rr - 40) / 8.0) ** 2 + ((cc - 40) / 4.0) ** 2 <= 1  # 97 px
    too_small = np.hypot(rr - 40, cc - 40) <= 3.5  # 37 px
    g = outline_features(np.stack([small_disc, small_ellipse, too_small]), np.stack([view] * 3))
    assert g["solidity"][0] == pytest.approx(1.0) and g["solidity"][1] == pytest.approx(1.0)  # both convex
    assert g["compactness"][0] > 0.85 and g["compactness"][1] < g["compactness"][0] - 0.08
    assert too_small.sum() < MIN_SHAPE_PX <= small_disc.sum() and np.isnan(g["compactness"][2])
    assert feature_groups_text(["compactness", "contrast"]) == "shape and grey levels"
    assert feature_groups_text(["mean_inside"]) == "grey levels" and feature_groups_text(["log_diameter_mm"]) == ""


def test_the_outline_carries_its_features_as_the_crops_measure_them():
    bundle = _disc_bundle(size=32, radius=6.0, field_mm=16.0)
    ctx = np.full((128, 128), 0.3, np.float32)
    ctx[np.hypot(*(np.mgrid[:128, :128] - 63.5)) <= 6.0] = 0.9  # a bright 6 mm disc where the outline is drawn
    out = outline_nodule(bundle, ctx, 0.5)
    assert set(out.features) == set(OUTLINE_FEATURES)
    assert out.features["contrast"] == pytest.approx(0.6, abs=0.05) and out.features["roundness"] > 0.9
    got = crops_outline_features(bundle, [ctx, ctx], 0.5)
    assert set(got) == set(SIZE_MEASURES) | set(OUTLINE_FEATURES)
    assert got["circle"] == pytest.approx([out.diameter_mm] * 2)
    assert got["contrast"] == pytest.approx([out.features["contrast"]] * 2)
