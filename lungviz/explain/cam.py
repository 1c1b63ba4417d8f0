"""Grad-CAM and Grad-CAM++ of one model view (pytorch-grad-cam), and how much of a map falls on the
nodule."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from torch import nn

from lungviz.errors import LungvizError
from lungviz.explain.common import (  # noqa: F401
    _CAM_LOCK,
    CAM_METHODS,
    _called,
    _check_class,
    _device,
    _model_input,
    _num_classes,
    _prior,
    _view,
    calibrated_probabilities,
)
from lungviz.explain.overlay import _fit_to
from lungviz.models import Bundle

# ----------------------------------------------------------------------------------------------- Grad-CAM


class _PredictedClass:
    """A pytorch-grad-cam target: the predicted class's logit (after ``prior_adjust``), remembered in ``.index``."""

    def __init__(self, prior: torch.Tensor | None) -> None:
        self.prior = prior
        self.index: int | None = None

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        scores = output.detach() if self.prior is None else output.detach() + self.prior
        self.index = int(torch.argmax(scores))
        return output[self.index]


class _Class:
    """A pytorch-grad-cam target: the logit of a fixed class."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output[self.index]


def cam(
    model: nn.Module,
    image: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    method: str = "gradcam",
    target_class: int | None = None,
    *,
    prior_adjust: Sequence[float] | None = None,
    layer: str | nn.Module | None = None,
) -> np.ndarray:
    """Grad-CAM (``"gradcam"``) or Grad-CAM++ (``"gradcampp"``) of one view: ``(S, S) float32 in [0, 1]``.

    One forward and one backward pass on ``layer`` (default ``model.feature_layer``; a module or its dotted name);
    hooks are released before returning and the model's gradients and train/eval mode are left as found.
    ``target_class`` None explains the predicted class (the argmax of ``logits + prior_adjust``). A map of zeros
    means no region supports the class. The map is as coarse as the layer: EfficientNet-Lite0's last layer is
    2 x 2 at 64 px (stride 32), too coarse to point at a centred nodule; ``layer="backbone.blocks.4"`` is 4 x 4.
    """
    if method not in CAM_METHODS:
        raise LungvizError(f"unknown saliency method '{method}'; choose one of {', '.join(CAM_METHODS)}.")
    if isinstance(layer, str):
        try:
            layer = model.get_submodule(layer)
        except AttributeError as err:
            raise LungvizError(f"the model has no layer '{layer}' to compute a saliency map on.") from err
    elif layer is None:
        layer = getattr(model, "feature_layer", None)
    if not isinstance(layer, nn.Module):
        raise LungvizError("this model has no feature layer for Grad-CAM; build it with lungviz.models.create_model.")
    view = _view(image)
    if target_class is None:
        n = _num_classes(model)
        prior = None if prior_adjust is None or n is None else torch.from_numpy(_prior(prior_adjust, n))
        target: _PredictedClass | _Class = _PredictedClass(prior.to(_device(model)) if prior is not None else None)
    else:
        target = _Class(_check_class(model, target_class))
    heat: np.ndarray | None = None
    was_training = model.training
    with _CAM_LOCK, torch.inference_mode(False), torch.enable_grad():
        x = _model_input(model, view, mean, std)[None]
        x.requires_grad_(True)  # so a frozen model (no trainable parameters) still gets gradients at the layer
        import pytorch_grad_cam  # here, not at import: it pulls in torchvision, which the first page need not wait for

        try:
            # BaseCAM.__exit__ releases the hooks (and swallows IndexError, hence the `heat is None` check).
            with getattr(pytorch_grad_cam, CAM_METHODS[method])(model=model, target_layers=[layer]) as explainer:
                heat = explainer(input_tensor=x, targets=[target])[0]
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
    if heat is None or heat.shape != view.shape:
        raise LungvizError(f"the {method} map could not be computed for this model and image.")
    return np.clip(np.nan_to_num(heat), 0.0, 1.0).astype(np.float32)


def bundle_cam(
    bundle: Bundle, image: np.ndarray, method: str = "gradcam", target_class: int | None = None
) -> np.ndarray:
    """:func:`cam` of a shipped model on its view, on the bundle's chosen layer (``cam_layer``) and with its prior."""
    return cam(bundle.model, image, bundle.mean, bundle.std, method, target_class,
               prior_adjust=bundle.spec.prior_adjust, layer=bundle.cam_layer)




# ----------------------------------------------------------------------------------------------- locating


def cam_in_mask(
    heat: np.ndarray, mask: np.ndarray, threshold: float = 0.5, tolerance_px: float = 0.0
) -> dict[str, float | bool]:
    """Does a saliency map point at the nodule? ``heat`` ``(h, w)``; ``mask`` ``(H, W)`` bool or reader fraction.

    A fractional mask (share of readers who drew each pixel) counts as inside where it is at least ``threshold``
    (0.5 = the usual 50 % consensus). The heat map is resized to the mask when their sizes differ; negative values
    (LIME) count as zero. Returns ``peak_inside`` (the maximum lies in the mask, or within ``tolerance_px`` of it
    as in the pointing game; a flat top counts at its middle), ``mass_inside`` (share of the map's total inside the
    mask) and ``mask_fraction`` (share of the image in the mask: the chance level of ``mass_inside``). A map
    without positive values has no peak (False, 0.0).
    """
    m = np.asarray(mask)
    if m.ndim != 2 or m.size == 0:
        raise LungvizError(f"the nodule mask has shape {tuple(m.shape)}; a 2D mask is expected.")
    inside = m if m.dtype == bool else np.asarray(m, np.float32) >= threshold
    h = np.clip(np.nan_to_num(_fit_to(heat, m.shape, "saliency map")), 0.0, None)
    total = float(h.sum())
    fraction = float(inside.mean())
    if total <= 0.0:
        return {"peak_inside": False, "mass_inside": 0.0, "mask_fraction": fraction}
    # The peak pixel; a flat top (a coarse map upsampled) counts at the top pixel nearest the top's centre.
    rows, cols = np.nonzero(h >= h.max() * (1.0 - 1e-6))
    nearest = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    peak = (rows[nearest], cols[nearest])
    if tolerance_px > 0 and inside.any():
        hit = bool(distance_transform_edt(~inside)[peak] <= tolerance_px)
    else:
        hit = bool(inside[peak])
    return {"peak_inside": hit, "mass_inside": float(h[inside].sum()) / total, "mask_fraction": fraction}


