"""The outline: the segmentation network the nodule model builds on, the region at the centre, its axes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungviz.errors import LungvizError
from lungviz.inference.outline import axes_px, central_region, outline_overlay
from lungviz.models import ModelSpec, create_model, load_bundle, save_bundle


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
    loaded = load_bundle(tmp_path, "outliner", "cpu")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), loaded.model(x), atol=0.05)  # float16 storage
    with pytest.raises(LungvizError, match="EfficientNet-style"):
        create_model("cnn4+fpn", 1)


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


def test_outline_overlay_draws_the_boundary_only():
    ctx = np.full((20, 20), 0.5, np.float32)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    rgb = outline_overlay(ctx, mask)
    assert rgb.shape == (20, 20, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[5, 10]) == (230, 60, 60) and tuple(rgb[10, 10]) == (128, 128, 128)
    assert tuple(rgb[0, 0]) == (128, 128, 128)


