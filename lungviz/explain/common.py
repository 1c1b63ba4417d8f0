"""What Grad-CAM and LIME share: the view as a model input, the class explained and the calibrated
probabilities."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lungviz import metrics
from lungviz.calibration import Calibration
from lungviz.data.preprocess import to_model_input
from lungviz.errors import LungvizError

#: Grad-CAM variants by the name the app and the CLI use.
#: (pytorch-grad-cam class names: the package, which imports torchvision, loads on the first map, not with the app.)
CAM_METHODS: dict[str, str] = {"gradcam": "GradCAM", "gradcampp": "GradCAMPlusPlus"}

#: LIME's kernel width on the cosine distance between a perturbation and the full image (lime's default).
LIME_KERNEL_WIDTH = 0.25
#: Perturbations per fast-LIME run (lime's default is 1000); see :func:`lime_map` for the trade-off.
LIME_SAMPLES = 256
#: Perturbations for a "stable" LIME run: as many as lime's default 1000 (rounded up to the design's power of two),
#: so that it is as repeatable as stock lime.
LIME_STABLE_SAMPLES = 1024
#: Most superpixels a LIME run explains (the design matrix grows with them).
MAX_SEGMENTS = 1023
#: Perturbed images per forward pass on CPU: small batches stay in the CPU's cache, which larger ones overflow.
LIME_CPU_BATCH = 32

# Grad-CAM hooks see every forward pass through the target layer: one CAM at a time per process, so two app
# sessions sharing a cached model cannot read each other's activations.
_CAM_LOCK = threading.Lock()




# ------------------------------------------------------------------------------------------------ helpers


def _device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (CPU for a parameterless module)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _view(image: np.ndarray) -> np.ndarray:
    """``image`` as ``(S, S) float32``, or a :class:`LungvizError` saying why it cannot be explained."""
    a = np.asarray(image, np.float32)
    if a.ndim != 2 or a.size == 0:
        raise LungvizError(
            f"the image to explain has shape {tuple(a.shape)}; one 2D view (height x width) is expected."
        )
    if not np.all(np.isfinite(a)):
        raise LungvizError("the image to explain contains missing (NaN) or infinite values.")
    return a


def _model_input(model: nn.Module, image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(S, S)`` view -> ``(C, S, S)`` normalised tensor on the model's device (the one preprocessing function)."""
    chans = int(getattr(model, "in_chans", 3))
    x = to_model_input(image, tuple(mean), tuple(std), channels=chans)
    return torch.from_numpy(x).to(_device(model))


def _num_classes(model: nn.Module) -> int | None:
    """``model.num_classes`` when the model says (LungvizNet does), else None."""
    n = getattr(model, "num_classes", None)
    return int(n) if n is not None else None


def _check_class(model: nn.Module, target_class: int) -> int:
    """``target_class`` as an int within the model's classes."""
    n = _num_classes(model)
    if isinstance(target_class, bool) or not isinstance(target_class, (int, np.integer)):
        raise LungvizError(f"the class to explain must be a class number, got {target_class!r}.")
    if target_class < 0 or (n is not None and target_class >= n):
        raise LungvizError(f"class {target_class} does not exist; this model has {n} classes (0-{(n or 1) - 1}).")
    return int(target_class)


def _prior(prior_adjust: Sequence[float] | None, n_classes: int) -> np.ndarray:
    """Per-class logit offsets (zeros when none), checked against the number of classes."""
    if prior_adjust is None:
        return np.zeros(n_classes, np.float32)
    prior = np.asarray(prior_adjust, np.float32).reshape(-1)
    if prior.size != n_classes:
        raise LungvizError(f"prior_adjust has {prior.size} values but the model has {n_classes} classes.")
    return prior


def calibrated_probabilities(logits: np.ndarray, calibration: Calibration | None = None) -> np.ndarray:
    """``(N, K)`` logits -> the model's calibrated probabilities (None = plain softmax)."""
    z = np.asarray(logits, np.float64)
    return metrics.softmax(z) if calibration is None else calibration.probabilities(z)


def _called(probs: np.ndarray, calibration: Calibration | None) -> int:
    """The model's call on one row of calibrated probabilities."""
    return int(metrics.decide(probs[None], None if calibration is None else calibration.decision_bias)[0])
