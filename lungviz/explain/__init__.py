"""Saliency for one model view: Grad-CAM / Grad-CAM++, a fast LIME, overlays and a "does it point at the nodule" score.

Images are ``(S, S) float32 in [0, 1]`` at the model's input size (the view the model sees); maps come back at the
same size. Probabilities and the explained call follow the bundle's calibration (:mod:`lungviz.calibration`).

The package re-exports its public names: ``from lungviz.explain import bundle_cam, lime_map, overlay``.
"""

from lungviz.explain.cam import *  # noqa: F403
from lungviz.explain.common import *  # noqa: F403
from lungviz.explain.lime import *  # noqa: F403
from lungviz.explain.overlay import *  # noqa: F403
