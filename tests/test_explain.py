"""Saliency: Grad-CAM / Grad-CAM++ hooks and localisation, fast LIME vs lime, overlays and the in-mask score.

Models are tiny and hand-built or untrained, on CPU at 32-64 px. The "corner" network is a cnn4 whose single live
channel passes bright pixels through every block, and whose head says class 1 when that channel fires: its
saliency must point at a bright square, and class 0 must have none.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungviz import explain
from lungviz.calibration import Calibration
from lungviz.errors import LungvizError
from lungviz.models import ModelSpec, create_model, inference_model, load_bundle, save_bundle, update_spec

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
SIDE = 32
SQUARE = (slice(2, 10), slice(2, 10))  # the bright square, in the top-left corner
# LIME hides a superpixel with black here: lime's default (the segment's mean grey) leaves a uniform square as is.
HIDE = 0.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a small CPU shared with other jobs, two threads wait on each other (up to 50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def corner_model() -> torch.nn.Module:
    """cnn4 whose channel 0 carries pixels brighter than mid-grey through all four blocks; class 1 = "bright"."""
    model = create_model("cnn4", 2, drop_rate=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for i, block in enumerate(model.backbone.blocks):
            conv, bn = block[0], block[1]
            if i == 0:
                conv.weight[0, :, 1, 1] = 1.0 / conv.in_channels
            else:
                conv.weight[0, 0, 1, 1] = 1.0
            bn.weight.fill_(1.0)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
        model.classifier.weight[1, 0] = 20.0
        model.classifier.weight[0, 0] = -20.0
    return model.eval()


def square_image(side: int = SIDE, seed: int = 0) -> np.ndarray:
    """Dark noisy background (about 0.1-0.3) with a bright 8 x 8 square in the top-left corner."""
    rng = np.random.default_rng(seed)
    img = (0.1 + 0.2 * rng.random((side, side))).astype(np.float32)
    img[SQUARE] = 0.9
    return img


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return corner_model()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return square_image()


def _no_hooks(module: torch.nn.Module) -> bool:
    return all(
        not getattr(m, name)
        for m in module.modules()
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


# ----------------------------------------------------------------------------------------------- Grad-CAM

CAM_CASES = [
    ("cnn4", 32, "gradcam"),
    ("cnn4", 64, "gradcampp"),
    ("tf_efficientnet_lite0", 32, "gradcam"),
    ("tf_efficientnet_lite0", 64, "gradcam"),
    ("tf_efficientnet_lite0", 64, "gradcampp"),
]


@pytest.fixture(scope="module")
def networks() -> dict[str, torch.nn.Module]:
    """Untrained networks, built once (timm's construction dominates the test time otherwise)."""
    torch.manual_seed(0)
    return {arch: create_model(arch, 2) for arch in ("cnn4", "tf_efficientnet_lite0")}


@pytest.mark.parametrize(("arch", "side", "method"), CAM_CASES)
def test_cam_shape_range_and_hooks_released(networks, arch: str, side: int, method: str) -> None:
    net = networks[arch]
    net.train()  # left as found: cam() switches to eval for the pass and back afterwards
    img = np.random.default_rng(1).random((side, side), dtype=np.float32)
    heat = explain.cam(net, img, MEAN, STD, method=method)
    np.testing.assert_array_equal(explain.cam(net, img, MEAN, STD, method=method), heat)  # no stale hooks
    assert heat.shape == (side, side) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert heat.max() == pytest.approx(1.0, abs=1e-5) or heat.max() == 0.0
    assert _no_hooks(net), "pytorch-grad-cam hooks were left on the model"
    assert net.training
    assert all(p.grad is None for p in net.parameters())


def test_bundle_cam_uses_the_bundle_layer(tmp_path, networks) -> None:
    net = networks["tf_efficientnet_lite0"]
    save_bundle(net, ModelSpec.from_model(net, classes=["a", "b"], view="nodule", task="binary"), tmp_path, "m")
    img = np.random.default_rng(3).random((64, 64), dtype=np.float32)
    last = explain.bundle_cam(load_bundle(tmp_path, "m", "cpu"), img)
    update_spec(tmp_path, "m", cam_layer="backbone.blocks.2")
    bundle = load_bundle(tmp_path, "m", "cpu")
    chosen = explain.bundle_cam(bundle, img)
    expected = explain.cam(bundle.model, img, bundle.mean, bundle.std, layer="backbone.blocks.2")
    np.testing.assert_array_equal(chosen, expected)
    assert not np.allclose(chosen, last)  # an 8 x 8 map, not the last layer's 2 x 2


@pytest.mark.parametrize("method", sorted(explain.CAM_METHODS))
def test_cam_peaks_on_the_bright_corner(model, image, method: str) -> None:
    heat = explain.cam(model, image, MEAN, STD, method=method)
    r, c = np.unravel_index(np.argmax(heat), heat.shape)
    assert r < SIDE // 2 and c < SIDE // 2
    assert heat[: SIDE // 2, : SIDE // 2].sum() > 0.8 * heat.sum()
    assert heat[3 * SIDE // 4 :, 3 * SIDE // 4 :].max() < 0.01
    assert explain.cam_in_mask(heat, _square_mask())["peak_inside"]
    # the bright square moved to the bottom-right corner: the map follows it
    moved = np.flip(image).copy()
    r, c = np.unravel_index(np.argmax(explain.cam(model, moved, MEAN, STD, method=method)), heat.shape)
    assert r >= SIDE // 2 and c >= SIDE // 2


def test_cam_target_class_and_prior_adjust(model, image) -> None:
    predicted = explain.cam(model, image, MEAN, STD)
    np.testing.assert_array_equal(predicted, explain.cam(model, image, MEAN, STD, target_class=1))
    # class 0 ("dark") has no positive evidence anywhere: an empty map
    assert explain.cam(model, image, MEAN, STD, target_class=0).max() == 0.0
    # a prior shift that makes class 0 the prediction changes which class is explained
    assert explain.cam(model, image, MEAN, STD, prior_adjust=[1000.0, 0.0]).max() == 0.0
    with pytest.raises(LungvizError, match="does not exist"):
        explain.cam(model, image, MEAN, STD, target_class=2)
    with pytest.raises(LungvizError, match="unknown saliency method"):
        explain.cam(model, image, MEAN, STD, method="scorecam")
    with pytest.raises(LungvizError, match="2D"):
        explain.cam(model, np.zeros((2, SIDE, SIDE), np.float32), MEAN, STD)
    assert _no_hooks(model)


def test_cam_releases_hooks_when_the_model_fails() -> None:
    net = corner_model()

    def broken(*_args) -> None:
        raise RuntimeError("boom")

    handle = net.head.register_forward_hook(broken)
    with pytest.raises(RuntimeError, match="boom"):
        explain.cam(net, square_image(), MEAN, STD)
    handle.remove()
    assert _no_hooks(net)
    # and the model still explains correctly afterwards
    heat = explain.cam(net, square_image(), MEAN, STD)
    assert heat[SQUARE].mean() > heat[SIDE // 2 :, SIDE // 2 :].mean()


def test_cam_on_a_frozen_model_and_in_inference_mode(model, image) -> None:
    expected = explain.cam(model, image, MEAN, STD)
    frozen = corner_model().requires_grad_(False)
    np.testing.assert_allclose(explain.cam(frozen, image, MEAN, STD), expected, atol=1e-6)
    with torch.inference_mode():
        np.testing.assert_allclose(explain.cam(model, image, MEAN, STD), expected, atol=1e-6)


# --------------------------------------------------------------------------------------------------- LIME


def _square_mask() -> np.ndarray:
    mask = np.zeros((SIDE, SIDE), bool)
    mask[SQUARE] = True
    return mask


def _count_images(net: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    sizes: list[int] = []
    handle = net.register_forward_hook(lambda _m, inp, _out: sizes.append(int(inp[0].shape[0])))
    return sizes, handle


def test_segment_is_deterministic_and_contiguous(image) -> None:
    seg = explain.segment(image, n_segments=16)
    assert seg.shape == image.shape and seg.dtype == np.int32
    assert set(np.unique(seg)) == set(range(int(seg.max()) + 1))
    np.testing.assert_array_equal(seg, explain.segment(image, n_segments=16))


def test_lime_weights_heat_and_determinism(model, image) -> None:
    seg = explain.segment(image, n_segments=16)
    calls: list[float] = []
    res = explain.lime_map(
        model,
        image,
        MEAN,
        STD,
        num_samples=100,
        seed=3,
        segments=seg,
        batch_size=40,
        progress=calls.append,
        hide_value=HIDE,
    )
    assert res.weights.shape == (int(seg.max()) + 1,) and np.all(np.isfinite(res.weights))
    assert res.target_class == 1 and res.probability > 0.5 and res.num_samples == 100
    assert res.heat.shape == image.shape and res.heat.min() >= -1.0 and res.heat.max() <= 1.0
    assert np.abs(res.heat).max() == pytest.approx(1.0)
    assert calls == pytest.approx([0.4, 0.8, 1.0])
    again = explain.lime_map(
        model, image, MEAN, STD, num_samples=100, seed=3, segments=seg, batch_size=25, hide_value=HIDE
    )
    np.testing.assert_allclose(again.weights, res.weights, rtol=1e-5, atol=1e-7)
    other = explain.lime_map(model, image, MEAN, STD, num_samples=100, seed=4, segments=seg, hide_value=HIDE)
    assert not np.allclose(other.weights, res.weights)
    assert len(res.top_segments(5)) == 5 and res.top_segments(3) == res.top_segments(5)[:3]
    assert list(res.weights[res.top_segments(5)]) == sorted(res.weights[res.top_segments(5)], reverse=True)


def test_lime_top_segment_covers_the_bright_square(model, image) -> None:
    res = explain.lime_map(model, image, MEAN, STD, num_samples=100, hide_value=HIDE)
    top = res.segments == res.top_segments(1)[0]
    assert _square_mask()[top].mean() > 0.5, "the best superpixel should lie on the bright square"
    assert res.mask(1).sum() == top.sum()
    score = explain.cam_in_mask(np.clip(res.heat, 0, 1), _square_mask())
    assert score["peak_inside"] and score["mass_inside"] > 0.5


def test_fast_lime_agrees_with_stock_lime_with_fewer_model_calls(model, image) -> None:
    seg = explain.segment(image, n_segments=16)
    probe = explain.common._model_input(model, image, MEAN, STD)[None]
    sizes, handle = _count_images(inference_model(model, probe))  # the folded copy LIME runs
    fast = explain.lime_map(model, image, MEAN, STD, segments=seg, seed=0, hide_value=HIDE)
    handle.remove()
    fast_calls, fast_images = len(sizes), sum(sizes)
    sizes, handle = _count_images(model)
    stock = explain.stock_lime(model, image, MEAN, STD, seg, target_class=None, seed=0, hide_value=HIDE)
    handle.remove()
    assert stock.target_class == fast.target_class == 1
    assert stock.weights.shape == fast.weights.shape
    assert stock.top_segments(1) == fast.top_segments(1)
    assert np.corrcoef(fast.weights, stock.weights)[0, 1] > 0.9
    assert sum(sizes) >= 1000 and len(sizes) >= 100  # lime: 1000 perturbations in batches of 10
    assert fast_images == explain.LIME_SAMPLES and fast_calls == -(-explain.LIME_SAMPLES // explain.LIME_CPU_BATCH)


def test_lime_design_is_balanced_orthogonal_and_folded_over() -> None:
    masks = explain.lime._design(128, 20, np.random.default_rng(0))
    assert masks.shape == (128, 20) and masks.dtype == np.int8 and np.all(masks[0] == 1)
    np.testing.assert_array_equal(masks[65:], 1 - masks[1:64])  # the second half flips every segment
    signs = 2 * masks.astype(int) - 1  # row 0 (the image itself) replaced one row of the design
    gram = signs.T @ signs
    assert np.all(np.abs(gram - np.diag(np.diag(gram))) <= 2)  # columns orthogonal up to that one row
    assert np.all(np.abs(signs.sum(axis=0)) <= 2)  # each segment on in half of the masks
    # fold-over: every segment is orthogonal to every two-segment interaction (a plain Hadamard design aliases some)
    inter = np.stack([signs[:, i] * signs[:, j] for i in range(20) for j in range(i + 1, 20)], axis=1)
    assert np.abs(signs.T @ inter).max() <= 2
    assert len({tuple(r) for r in masks}) == 128
    assert not np.array_equal(masks, explain.lime._design(128, 20, np.random.default_rng(1)))
    sub = explain.lime._design(41, 50, np.random.default_rng(0))  # fewer samples than segments + 1, odd count
    assert sub.shape == (41, 50) and np.all(sub[0] == 1)
    np.testing.assert_array_equal(sub[22:], 1 - sub[1:20])


def test_lime_kernel_matches_lime() -> None:
    w = explain.lime_kernel(np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]))
    d = 1 - np.sqrt(0.5)
    np.testing.assert_allclose(w, [1.0, np.sqrt(np.exp(-(d**2) / 0.25**2)), np.sqrt(np.exp(-1 / 0.25**2))])


def test_lime_input_errors(model, image) -> None:
    with pytest.raises(LungvizError, match="8 to 4096 samples"):
        explain.lime_map(model, image, MEAN, STD, num_samples=2)
    with pytest.raises(LungvizError, match="segmentation has shape"):
        explain.lime_map(model, image, MEAN, STD, segments=np.zeros((4, 4), np.int32))
    with pytest.raises(LungvizError, match="3 prior values but the model has 2 classes"):
        explain.lime_map(model, image, MEAN, STD, num_samples=8, calibration=Calibration(prior=(0.0, 0.0, 0.0)))


TOP_K_CASES = [
    ([1, 2, 3, 4, 5], [5, 4, 3, 2, 1], 5, 1.0),
    ([1, 2, 3, 4, 5], [1, 2, 6, 7, 8], 5, 0.4),
    ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10], 5, 0.0),
    ([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], 5, 0.8),  # only the first k of each count
    ([1, 2, 3], [2, 9, 1], 2, 0.5),
    ([], [], 5, 1.0),
]


@pytest.mark.parametrize(("a", "b", "k", "expected"), TOP_K_CASES)
def test_top_k_overlap(a, b, k, expected) -> None:
    assert explain.top_k_overlap(a, b, k) == pytest.approx(expected)


def test_top_k_overlap_rejects_k_zero() -> None:
    with pytest.raises(LungvizError):
        explain.top_k_overlap([1], [1], k=0)


# ----------------------------------------------------------------------------------------------- overlays


def test_overlay_shapes_and_alpha(image) -> None:
    heat = np.zeros((SIDE, SIDE), np.float32)
    heat[SQUARE] = 1.0
    grey = np.repeat(np.rint(image.astype(np.float64) * 255).astype(np.uint8)[..., None], 3, axis=2)
    out = explain.overlay(image, heat, alpha=0.5)
    assert out.shape == (SIDE, SIDE, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(explain.overlay(image, heat, alpha=0.0), grey)
    full = explain.overlay(image, heat, alpha=1.0)
    np.testing.assert_array_equal(full[5, 5], [128, 0, 0])  # jet(1): dark red
    np.testing.assert_array_equal(full[20, 20], [0, 0, 128])  # jet(0): dark blue
    # a 16 px map on a 64 px view is resized to the view
    big = np.kron(image, np.ones((2, 2), np.float32))
    assert explain.overlay(big, heat[::2, ::2], alpha=0.3, cmap="inferno").shape == (64, 64, 3)
    with pytest.raises(LungvizError, match="opacity"):
        explain.overlay(image, heat, alpha=1.5)
    with pytest.raises(LungvizError, match="colour map"):
        explain.overlay(image, heat, cmap="no-such-map")


def test_lime_overlay_marks_positive_segments_only() -> None:
    segments = np.zeros((8, 8), np.int32)
    segments[:, 4:] = 1
    segments[6:, :] = 2
    res = explain.LimeResult(segments, np.array([0.5, -0.2, 0.0], np.float32), 0.0, 1.0, 1, 0.9, 100)
    img = np.full((8, 8), 0.5, np.float32)
    grey = np.full(3, 128, np.uint8)
    out = explain.lime_overlay(img, res, k=5, alpha=0.5, color=(0, 200, 0), boundary_color=(255, 255, 0))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[2, 2], [64, 164, 64])  # inside segment 0: tinted green
    np.testing.assert_array_equal(out[0, 3], [255, 255, 0])  # its outline (the image border is no outline)
    np.testing.assert_array_equal(out[5, 0], [255, 255, 0])
    np.testing.assert_array_equal(out[2, 6], grey)  # negative segment: untouched
    np.testing.assert_array_equal(out[7, 7], grey)  # zero weight: untouched
    assert res.shown_segments(5) == [0] and res.shown_segments(5, positive_only=False) == [0, 1]
    np.testing.assert_array_equal(res.mask(5, positive_only=False), segments < 2)
    both = explain.lime_overlay(img, res, positive_only=False, alpha=0.5, negative_color=(200, 0, 0))
    np.testing.assert_array_equal(both[2, 6], [164, 64, 64])
    # a larger view than the model input gets the segments at its size
    assert explain.lime_overlay(np.full((16, 16), 0.5, np.float32), res).shape == (16, 16, 3)


# ----------------------------------------------------------------------------------------------- locating

MASK = np.zeros((4, 4), bool)
MASK[:2, :2] = True
HEAT = np.array([[0, 1, 0, 0], [1, 4, 0, 0], [0, 0, 1, 0], [0, 0, 0, 3]], np.float32)  # total 10, 6 inside

CAM_IN_MASK_CASES = [
    (HEAT, MASK, True, 0.6),
    (HEAT[::-1, ::-1].copy(), MASK, False, 0.4),  # turned round: the peak (2, 2) is out, 3 + 1 of 10 inside
    (np.where(MASK, 0.0, 1.0).astype(np.float32), MASK, False, 0.0),
    (np.zeros((4, 4), np.float32), MASK, False, 0.0),  # no positive value: no peak
    (HEAT - 2.0, MASK, True, 2 / 3),  # negative values count as zero: 4 - 2 inside, 3 - 2 outside
    (HEAT, MASK.astype(np.float32) * 0.75, True, 0.6),  # 3 of 4 readers: inside at 50 % consensus
    (HEAT, MASK.astype(np.float32) * 0.25, False, 0.0),  # 1 of 4 readers: outside
]


@pytest.mark.parametrize(("heat", "mask", "peak", "mass"), CAM_IN_MASK_CASES)
def test_cam_in_mask(heat, mask, peak, mass) -> None:
    score = explain.cam_in_mask(heat, mask)
    assert score["peak_inside"] is peak
    assert score["mass_inside"] == pytest.approx(mass)


def test_cam_in_mask_flat_top_counts_at_its_middle() -> None:
    heat = np.zeros((8, 8), np.float32)
    heat[:5, :5] = 1.0  # a plateau, as a coarse map upsampled gives; np.argmax alone would say (0, 0)
    mask = np.zeros((8, 8), bool)
    mask[1:4, 1:4] = True
    assert explain.cam_in_mask(heat, mask)["peak_inside"]


def test_cam_in_mask_tolerance() -> None:
    heat = np.zeros((8, 8), np.float32)
    heat[6, 6] = 1.0
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True  # nearest mask pixel (3, 3): 3 * sqrt(2) = 4.24 px from the peak
    assert not explain.cam_in_mask(heat, mask)["peak_inside"]
    assert not explain.cam_in_mask(heat, mask, tolerance_px=4.0)["peak_inside"]
    assert explain.cam_in_mask(heat, mask, tolerance_px=4.5)["peak_inside"]
    assert not explain.cam_in_mask(heat, np.zeros((8, 8), bool), tolerance_px=100)["peak_inside"]


def test_cam_in_mask_fraction_and_resize() -> None:
    assert explain.cam_in_mask(HEAT, MASK)["mask_fraction"] == pytest.approx(0.25)
    big_mask = np.kron(MASK, np.ones((4, 4), bool))  # 16 x 16 mask, 4 x 4 map resized to it
    score = explain.cam_in_mask(HEAT, big_mask)
    assert score["peak_inside"] and 0.4 < score["mass_inside"] < 0.8
    with pytest.raises(LungvizError, match="2D"):
        explain.cam_in_mask(HEAT, np.zeros(4, bool))
