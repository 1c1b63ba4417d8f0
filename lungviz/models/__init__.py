"""The one model factory, pretrained EfficientNet-Lite weights, and model bundles (safetensors + JSON spec).

Every classifier is a :class:`LungvizNet`: a backbone that returns pooled features ``(N, D)`` and a head of
dropout + linear. ``<backbone>+fpn`` names a :class:`LungvizSegNet` (the backbone's early stages and a light
feature-pyramid decoder: per-pixel logits) that outlines the nodule. The model carries its own data config (input
size, mean, std, interpolation) so the bundle spec, and everything downstream, derives preprocessing from it.

The package re-exports its public names: ``from lungviz.models import create_model, load_bundle``.
"""

from lungviz.models.bundle import *  # noqa: F403
from lungviz.models.networks import *  # noqa: F403
from lungviz.models.pretrained import *  # noqa: F403
