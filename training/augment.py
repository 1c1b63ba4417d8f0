"""Dynamic augmentation of ``(H, W) float32 in [0, 1]`` views: rotations, flips, small shifts, mild intensity.

Pure numpy/PIL; every random transform draws from the generator it is given, so runs reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms (0 disables one)."""

    rotate_deg: float = 180.0  # nodules have no canonical orientation in the axial plane
    flip: bool = True
    shift_frac: float = 0.06  # of the side
    scale: float = 0.08  # +- relative zoom
    brightness: float = 0.05  # additive
    contrast: float = 0.10  # multiplicative around the mean
    gamma: float = 0.10  # exponent range 1 +- gamma
    noise: float = 0.01  # gaussian sigma


def affine(
    image: np.ndarray, angle_deg: float, shift_rc: tuple[float, float], scale: float, fill: float | None = None
) -> np.ndarray:
    """Rotate about the centre, scale and shift (pixels), bilinear; edges filled with ``fill`` (None = the median of
    the border)."""
    h, w = image.shape
    a = np.deg2rad(angle_deg)
    cos, sin = np.cos(a) / scale, np.sin(a) / scale
    cx, cy = w / 2.0, h / 2.0  # PIL samples pixel centres at +0.5
    # inverse map: output (x, y) -> input
    dx, dy = shift_rc[1], shift_rc[0]
    c0 = cx - cos * (cx + dx) - sin * (cy + dy)
    c1 = cy + sin * (cx + dx) - cos * (cy + dy)
    coeffs = (cos, sin, c0, -sin, cos, c1)
    if fill is None:
        fill = float(np.median(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])))
    img = Image.fromarray(np.asarray(image, np.float32), mode="F")
    out = img.transform((w, h), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=fill)
    return np.asarray(out, np.float32)


def augment(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """One random augmentation of a view; output has the input's shape, values clipped to [0, 1]."""
    return augment_pair(image, None, rng, cfg)[0]


def augment_pair(
    image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`augment` of ``image``, with the same flip, rotation, shift and zoom applied to ``mask`` (if given;
    filled with 0 outside, no intensity changes). The random draws are those of :func:`augment`."""
    x = np.asarray(image, np.float32)
    m = None if mask is None else np.asarray(mask, np.float32)
    h, w = x.shape
    if cfg.flip and rng.random() < 0.5:
        x = x[:, ::-1]
        m = None if m is None else m[:, ::-1]
    angle = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg) if cfg.rotate_deg else 0.0
    shift = tuple(rng.uniform(-cfg.shift_frac, cfg.shift_frac) * s for s in (h, w)) if cfg.shift_frac else (0.0, 0.0)
    scale = float(np.exp(rng.uniform(-cfg.scale, cfg.scale))) if cfg.scale else 1.0
    if angle or shift != (0.0, 0.0) or scale != 1.0:
        x = affine(np.ascontiguousarray(x), angle, shift, scale)  # type: ignore[arg-type]
        m = None if m is None else affine(np.ascontiguousarray(m), angle, shift, scale, fill=0.0)  # type: ignore[arg-type]
    if cfg.gamma:
        x = np.clip(x, 0.0, 1.0) ** float(np.exp(rng.uniform(-cfg.gamma, cfg.gamma)))
    if cfg.contrast:
        mean = float(x.mean())
        x = (x - mean) * float(1.0 + rng.uniform(-cfg.contrast, cfg.contrast)) + mean
    if cfg.brightness:
        x = x + float(rng.uniform(-cfg.brightness, cfg.brightness))
    if cfg.noise:
        x = x + rng.normal(0.0, cfg.noise, x.shape).astype(np.float32)
    return np.clip(x, 0.0, 1.0).astype(np.float32), None if m is None else np.clip(m, 0.0, 1.0).astype(np.float32)
