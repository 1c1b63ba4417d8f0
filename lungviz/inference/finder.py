"""Find the nodule on a whole slice: lung mask, candidate points, presence scores, localiser refinement.

Two shipped bundles do the work (trained by ``python -m training finder``):

- ``finder-presence`` classifies a square patch (``field_mm`` wide, ``input_size`` px) as nodule-centred or not;
- ``finder-locate`` regresses, from a patch, the nodule's centre offset and diameter in patch pixels.

Both read patches the way they were trained: cut from a slice whose intensities are min-max scaled over the
``context_px`` native pixels around the point (the slices set's crops), so a DICOM slice in HU, a windowed
PNG or an NPY all look the same to the models. Geometry and intensity come from the bundle spec.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage import morphology

from lungviz import paths
from lungviz.data.dicom import AIR_HU
from lungviz.data.preprocess import DEFAULT_SPACING_MM, valid_spacing
from lungviz.errors import LungvizError
from lungviz.inference.blobness import contrast_units, hessian_2d, hessian_3d
from lungviz.inference.lungmask import NO_LUNG_MESSAGE, lung_mask, otsu
from lungviz.models import Bundle, ModelSpec, load_bundle

PRESENCE = "finder-presence"
LOCATE = "finder-locate"
#: Lung threshold for slices in HU; other images use Otsu's threshold.
LUNG_HU = -400.0
RANK = "finder-rank"  # the candidate ranker's coefficients (JSON), fitted by ``python -m training finder``
#: Candidate points: local maxima of the smoothed slice at least this far apart (mm) ...
PEAK_DISTANCE_MM = 4.0
#: ... and a regular grid at this pitch (mm) over dense lung tissue, so flat large nodules are not missed.
GRID_MM = 6.0
MAX_CANDIDATES = 500
REFINE_TOP = 40  # candidates refined by the localiser and scored again
MAX_SHIFT_MM = 12.0  # the localiser may move a candidate at most this far per step
REFINE_STEPS = 1  # localiser moves per candidate: more moves cost time without placing candidates better
#: Blob centring after the localiser: the candidate moves to the centroid of the dense blob it sits on, the pixels
#: of the smoothed slice above this share of the local peak (in contrast units, parenchyma = 0), so a large or
#: ground-glass nodule is marked at its centre rather than at a dense spot inside it ...
BLOB_FRACTION = 0.3
BLOB_OPEN_MM = 1.5  # ... after an opening of this radius cuts vessels off the blob ...
BLOB_MAX_RADIUS_MM = 20.0  # ... and only when the blob is a nodule's size (larger: lung wall or consolidation)


@dataclass
class Candidate:
    """One proposed nodule: position in pixels of the input slice (``x`` column, ``y`` row), size and score."""

    x: float
    y: float
    diameter_mm: float
    score: float
    x_mm: float | None = None
    y_mm: float | None = None
    log_odds: float | None = None  # the ranker's log-odds: ``score`` saturates near 1 and would tie

    def to_dict(self) -> dict:
        """JSON-ready, rounded."""
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}


#: Features measured per candidate (see :func:`feature_matrix`); the 3D ones need a series.
SLICE_FEATURES = ("net", "density", "dot2d", "line2d", "diameter")
SERIES_FEATURES = (*SLICE_FEATURES, "dot3d", "line3d")
#: Features the shipped rankers combine. On one slice the presence network alone (its threshold fitted); on a series
#: the network with the 3D Hessian blob and vessel measures. Adding density, the 2D Hessian measures and the
#: diameter ranked the nodule first less often, leave-one-series-out: on one slice in each of four trainings, on a
#: series on the nodules' central slices summed over them (docs/training.md).
SLICE_RANK_FEATURES = ("net",)
SERIES_RANK_FEATURES = ("net", "dot3d", "line3d")


def feature_matrix(table: dict[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    """``(N, F)`` features of a candidate table: network log-odds clipped, Hessian measures on a log scale."""
    cols = []
    for name in names:
        v = np.asarray(table[name], np.float64)
        if name == "net":
            v = np.clip(v, -20.0, 20.0)
        elif name in ("dot2d", "line2d", "dot3d", "line3d"):
            v = np.log1p(100.0 * np.maximum(v, 0.0))
        cols.append(v)
    n = len(np.asarray(table["net"]))
    return np.stack(cols, axis=1) if cols else np.zeros((n, 0))


@dataclass
class Ranker:
    """A logistic model over candidate features: log-odds = ``coef . (f - mean) / std + intercept``.

    ``threshold`` is the operating point on its probability: candidates at or above it are the findings (fitted
    for about one false candidate per slice on the series it was fitted on)."""

    features: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray
    intercept: float
    threshold: float = 0.5

    def log_odds(self, table: dict[str, np.ndarray]) -> np.ndarray:
        x = (feature_matrix(table, self.features) - self.mean) / self.std
        return x @ self.coef + self.intercept

    def to_dict(self) -> dict:
        return {"features": list(self.features), "mean": self.mean.tolist(), "std": self.std.tolist(),
                "coef": self.coef.tolist(), "intercept": float(self.intercept), "threshold": float(self.threshold)}

    @classmethod
    def from_dict(cls, d: dict) -> Ranker:
        return cls(tuple(d["features"]), np.asarray(d["mean"], float), np.asarray(d["std"], float),
                   np.asarray(d["coef"], float), float(d["intercept"]), float(d.get("threshold", 0.5)))


@dataclass
class Finder:
    """The two finder bundles, loaded once, and the candidate rankers (``slice``, ``series``) when fitted."""

    presence: Bundle
    locate: Bundle
    rankers: dict[str, Ranker] = field(default_factory=dict)

    @property
    def field_mm(self) -> float:
        return float(self.presence.preprocessing["field_mm"])

    @property
    def context_px(self) -> int:
        return int(self.presence.preprocessing.get("context_px", 128))


def load_rankers(folder: Path) -> dict[str, Ranker]:
    """The fitted candidate rankers in ``folder`` (none when the file is absent)."""
    path = folder / f"{RANK}.json"
    if not path.is_file():
        return {}
    return {k: Ranker.from_dict(v) for k, v in json.loads(path.read_text())["rankers"].items()}


def load_finder(folder: Path | None = None, device: str | None = "cpu") -> Finder:
    """Load ``finder-presence``, ``finder-locate`` and the rankers from ``folder`` (default: the shipped weights)."""
    folder = folder or paths.weights_dir()
    if not (folder / f"{PRESENCE}.json").is_file() or not (folder / f"{LOCATE}.json").is_file():
        raise LungvizError(f"the nodule finder models are not installed in {folder}; train them with "
                           "'python -m training finder'.")
    return Finder(load_bundle(folder, PRESENCE, device), load_bundle(folder, LOCATE, device), load_rankers(folder))


# ----------------------------------------------------------------------------------------------- geometry


def sample_patches(
    image: np.ndarray,
    centres_rc: np.ndarray,
    step_px: float | np.ndarray,
    size: int,
    angles_rad: np.ndarray | None = None,
    flips: np.ndarray | None = None,
) -> np.ndarray:
    """Square ``size`` px patches centred on each ``(row, col)``, ``step_px`` input pixels apart (bilinear).

    Optional per-patch rotation and left-right flip (augmentation). Outside the image the edge value is
    repeated. Returns ``(N, size, size) float32``.
    """
    c = np.asarray(centres_rc, np.float64).reshape(-1, 2)
    n = len(c)
    g = (np.arange(size) - (size - 1) / 2.0)
    u, v = np.meshgrid(g, g, indexing="ij")  # row, column offsets in output pixels
    u, v = np.broadcast_to(u, (n, size, size)).copy(), np.broadcast_to(v, (n, size, size)).copy()
    if flips is not None:
        v = np.where(np.asarray(flips, bool).reshape(-1, 1, 1), -v, v)
    if angles_rad is not None:
        a = np.asarray(angles_rad, np.float64).reshape(-1, 1, 1)
        u, v = np.cos(a) * u - np.sin(a) * v, np.sin(a) * u + np.cos(a) * v
    step = np.broadcast_to(np.asarray(step_px, np.float64), (n,)).reshape(-1, 1, 1)
    rows = c[:, 0].reshape(-1, 1, 1) + u * step
    cols = c[:, 1].reshape(-1, 1, 1) + v * step
    out = ndimage.map_coordinates(np.asarray(image, np.float32), [rows.ravel(), cols.ravel()], order=1,
                                  mode="nearest")
    return out.reshape(n, size, size).astype(np.float32)


def context_range(image: np.ndarray, context_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the minimum and maximum over the ``context_px`` square around it (the crops' min-max)."""
    lo = ndimage.minimum_filter(image, size=context_px, mode="nearest")
    hi = ndimage.maximum_filter(image, size=context_px, mode="nearest")
    return lo, hi


def candidate_points(image: np.ndarray, lung: np.ndarray, spacing_mm: float, is_hu: bool) -> np.ndarray:
    """Points worth scoring, ``(N, 2)`` row/col: dense local maxima and a grid over dense tissue in the lung."""
    img = np.asarray(image, np.float32)
    if not lung.any():
        return np.zeros((0, 2), np.int64)
    smooth = ndimage.gaussian_filter(img, sigma=1.5 / spacing_mm)
    thr = LUNG_HU if is_hu else otsu(img)
    parenchyma = float(np.median(smooth[lung & (img < thr)])) if (lung & (img < thr)).any() else float(smooth.min())
    tissue = float(np.median(smooth[~lung & (img >= thr)])) if (~lung & (img >= thr)).any() else float(smooth.max())
    dense = lung & (smooth > parenchyma + 0.2 * (tissue - parenchyma))
    size = max(3, int(round(PEAK_DISTANCE_MM / spacing_mm)) | 1)
    peaks = dense & (smooth == ndimage.maximum_filter(smooth, size=size))
    step = max(1, int(round(GRID_MM / spacing_mm)))
    grid = np.zeros_like(dense)
    grid[step // 2 :: step, step // 2 :: step] = True
    pts = np.argwhere(peaks | (grid & dense))
    if len(pts) > MAX_CANDIDATES:  # keep the densest
        order = np.argsort(-smooth[pts[:, 0], pts[:, 1]], kind="stable")
        pts = pts[order[:MAX_CANDIDATES]]
    return pts


# ----------------------------------------------------------------------------------------------- models


def channel_fields(spec: ModelSpec) -> list[float]:
    """The field (mm) of each input channel: several scales of the same point, or one field repeated."""
    pre = spec.preprocessing
    return [float(f) for f in pre.get("channel_fields_mm") or [pre["field_mm"]]]


def _inputs(patches01: np.ndarray, bundle: Bundle) -> torch.Tensor:
    """``(N, S, S)`` (one field, repeated over the channels) or ``(N, C, S, S)`` patches -> normalised tensor."""
    mean = torch.tensor(bundle.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std, dtype=torch.float32).view(1, -1, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(patches01, np.float32))
    x = x.unsqueeze(1).expand(-1, bundle.in_chans, -1, -1) if x.ndim == 3 else x
    x = (x - mean[:, : bundle.in_chans]) / std[:, : bundle.in_chans]
    # channels-last: faster convolutions and pooling on CPU for the finder's many small patches, same numbers
    return x.contiguous(memory_format=torch.channels_last).to(next(bundle.model.parameters()).device)


@torch.inference_mode()
def presence_log_odds(bundle: Bundle, patches01: np.ndarray, batch: int = 512) -> np.ndarray:
    """Calibrated log-odds (temperature-scaled logit margin) that each patch is centred on a nodule.

    Candidates are ranked on these: probabilities saturate at 1.0 and would tie."""
    if len(patches01) == 0:
        return np.zeros(0, np.float32)
    out = []
    for i in range(0, len(patches01), batch):
        logits = bundle.model(_inputs(patches01[i : i + batch], bundle)).float().cpu()
        out.append(((logits[:, 1] - logits[:, 0]) / bundle.temperature).numpy())
    return np.concatenate(out)


def presence_scores(bundle: Bundle, patches01: np.ndarray, batch: int = 512) -> np.ndarray:
    """Calibrated probability that each patch is centred on a nodule."""
    return 1.0 / (1.0 + np.exp(-presence_log_odds(bundle, patches01, batch)))


@torch.inference_mode()
def locate_patches(bundle: Bundle, patches01: np.ndarray) -> np.ndarray:
    """``(N, 3)``: the nodule centre's row and column offset from the patch centre and its diameter, in patch px."""
    if len(patches01) == 0:
        return np.zeros((0, 3), np.float32)
    return bundle.model(_inputs(patches01, bundle)).float().cpu().numpy()


def normalised_patches(
    image: np.ndarray, lo: np.ndarray, hi: np.ndarray, centres_rc: np.ndarray, bundle: Bundle, spacing_mm: float
) -> np.ndarray:
    """A bundle's patches at each centre, min-max scaled by the centre's context range as in training:
    ``(N, S, S)`` for one field, ``(N, C, S, S)`` for one field per channel."""
    c = np.asarray(centres_rc, np.float64).reshape(-1, 2)
    size = bundle.input_size
    fields = channel_fields(bundle.spec)
    patches = np.stack([sample_patches(image, c, f / size / spacing_mm, size) for f in fields], axis=1)
    ri = np.clip(np.round(c[:, 0]).astype(int), 0, image.shape[0] - 1)
    ci = np.clip(np.round(c[:, 1]).astype(int), 0, image.shape[1] - 1)
    a, b = lo[ri, ci].reshape(-1, 1, 1, 1), hi[ri, ci].reshape(-1, 1, 1, 1)
    out = np.clip((patches - a) / np.maximum(b - a, 1e-6), 0.0, 1.0).astype(np.float32)
    return out[:, 0] if len(fields) == 1 else out


def _centre_patch(bundle: Bundle, context: np.ndarray, spacing_mm: float) -> np.ndarray:
    """A finder bundle's patch at the centre of a crop (the slices set's ``context``: ``(H, W)`` grey, min-max
    scaled over the crop as the finder was trained)."""
    img = np.asarray(context, np.float32)
    if img.ndim != 2 or img.size == 0:
        raise LungvizError(f"a 2D crop is needed to measure the nodule, got shape {img.shape}.")
    if valid_spacing(spacing_mm) is None or not np.isfinite(img).all():
        raise LungvizError("the nodule cannot be measured: the pixel spacing or the image values are not valid.")
    lo, hi = np.full_like(img, img.min()), np.full_like(img, img.max())
    centre = np.array([[(img.shape[0] - 1) / 2.0, (img.shape[1] - 1) / 2.0]])
    return normalised_patches(img, lo, hi, centre, bundle, float(spacing_mm))


def presence_patch(finder: Finder, context: np.ndarray, spacing_mm: float) -> np.ndarray:
    """The presence classifier's patch at the centre of a crop, as :func:`presence_scores` reads it."""
    return _centre_patch(finder.presence, context, spacing_mm)


def centre_presence(finder: Finder, context: np.ndarray, spacing_mm: float) -> float:
    """The presence classifier's calibrated probability that a nodule sits at the centre of a crop."""
    return float(presence_scores(finder.presence, presence_patch(finder, context, spacing_mm))[0])


def refine(finder: Finder, img: np.ndarray, lo: np.ndarray, hi: np.ndarray, lung: np.ndarray,
           start: np.ndarray, sp: float, steps: int = REFINE_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """Move each point to the localiser's nodule centre (``steps`` times, each move at most
    :data:`MAX_SHIFT_MM`, never out of the lung); returns the points and the diameters (mm) at the last one."""
    loc_mm = channel_fields(finder.locate.spec)[0] / finder.locate.input_size  # mm per patch px
    here = np.asarray(start, np.float64).copy()
    diam = np.zeros(len(here))
    for _ in range(max(1, steps)):
        loc = locate_patches(finder.locate, normalised_patches(img, lo, hi, here, finder.locate, sp))
        shift = loc[:, :2] * loc_mm / sp  # patch px -> input px
        norm = np.hypot(shift[:, 0], shift[:, 1]) * sp
        shift *= np.minimum(1.0, MAX_SHIFT_MM / np.maximum(norm, 1e-6))[:, None]
        moved = here + shift
        inside = lung[np.clip(np.round(moved[:, 0]).astype(int), 0, img.shape[0] - 1),
                      np.clip(np.round(moved[:, 1]).astype(int), 0, img.shape[1] - 1)]
        here = np.where(inside[:, None], moved, here)
        diam = np.maximum(loc[:, 2], 0.0) * loc_mm
    return here, diam


def centre_on_blobs(image_u: np.ndarray, lung: np.ndarray, points_rc: np.ndarray, diameters_mm: np.ndarray,
                    spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Move each point to the centroid of the blob it lies on (see :data:`BLOB_FRACTION`) and widen its diameter
    to the blob's equivalent diameter. A point stays where it is when no blob is found within 3 mm, when the blob
    is larger than a nodule (:data:`BLOB_MAX_RADIUS_MM`) or when its centroid is farther than the blob's radius
    (at least 5 mm) away. ``image_u`` in contrast units (:func:`lungviz.inference.blobness.contrast_units`)."""
    pts = np.asarray(points_rc, np.float64).reshape(-1, 2).copy()
    diam = np.asarray(diameters_mm, np.float64).copy()
    if len(pts) == 0:
        return pts, diam
    smooth = ndimage.gaussian_filter(np.asarray(image_u, np.float32), sigma=max(0.5, 1.0 / spacing_mm))
    half = int(np.ceil((BLOB_MAX_RADIUS_MM + 5.0) / spacing_mm))
    near_px = int(np.ceil(3.0 / spacing_mm))
    disk = morphology.disk(max(1, int(round(BLOB_OPEN_MM / spacing_mm))))
    h, w = smooth.shape
    for i, (r, c) in enumerate(pts):
        ri, ci = int(np.clip(round(r), 0, h - 1)), int(np.clip(round(c), 0, w - 1))
        r0, c0 = max(0, ri - half), max(0, ci - half)
        win = smooth[r0 : ri + half + 1, c0 : ci + half + 1]
        pr, pc = ri - r0, ci - c0
        around = (slice(max(0, pr - near_px), pr + near_px + 1), slice(max(0, pc - near_px), pc + near_px + 1))
        peak = float(win[around].max())
        if peak <= 0.1:  # nothing denser than parenchyma here
            continue
        blobs = ndimage.binary_opening((win > BLOB_FRACTION * peak) & lung[r0 : r0 + win.shape[0],
                                                                           c0 : c0 + win.shape[1]], structure=disk)
        labels, _ = ndimage.label(blobs)
        ids = labels[around][labels[around] > 0]
        if ids.size == 0:
            continue
        rows, cols = np.nonzero(labels == np.bincount(ids).argmax())
        area_mm2 = len(rows) * spacing_mm**2
        at_edge = rows.min() == 0 or cols.min() == 0 or rows.max() == win.shape[0] - 1 or cols.max() == win.shape[1] - 1
        if at_edge or area_mm2 > np.pi * BLOB_MAX_RADIUS_MM**2:
            continue
        radius_mm = float(np.sqrt(area_mm2 / np.pi))
        centre = np.array([rows.mean() + r0, cols.mean() + c0])
        if np.hypot(*(centre - pts[i])) * spacing_mm > max(5.0, radius_mm):
            continue
        pts[i], diam[i] = centre, max(diam[i], 2.0 * radius_mm)
    return pts, diam


@dataclass
class SeriesContext:
    """The third dimension of a slice being scanned: its series in contrast units and where the slice lies in it."""

    volume_u: np.ndarray  # (K, H, W) float32, see lungviz.inference.blobness.contrast_units
    index: int  # the slice's position in the volume
    slice_gap_mm: float  # distance between slice centres


def _density(image_u: np.ndarray, points_rc: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Mean contrast-unit intensity within about 2 mm of each point (Gaussian-weighted)."""
    smooth = ndimage.gaussian_filter(image_u, sigma=max(0.5, 1.5 / spacing_mm))
    return ndimage.map_coordinates(smooth, [points_rc[:, 0], points_rc[:, 1]], order=1, mode="nearest")


def candidate_table(
    finder: Finder,
    img: np.ndarray,
    is_hu: bool,
    sp: float,
    lung: np.ndarray,
    context: SeriesContext | None = None,
    net_points: int | None = None,
    rotations: int = 4,
    refine_top: int = REFINE_TOP,
) -> tuple[dict[str, np.ndarray], int]:
    """The features of the refined candidate points of one slice (empty arrays when there are none).

    ``rc (N, 2)`` row/col, ``diameter`` (mm, the localiser's or the blob's if wider), ``net`` (presence log-odds),
    ``density`` (contrast units), ``dot2d``/``line2d`` and, with a series, ``dot3d``/``line3d``
    (:mod:`lungviz.inference.blobness`).
    ``net_points`` caps the points the presence network scores (the densest 2D blobs first; for speed on a
    series); the best ``refine_top`` are moved by the localiser and rescored, averaged over ``rotations``
    right-angle turns of the patch; their features are measured there, and each is then placed at the centre of
    the blob it lies on (:func:`centre_on_blobs`), which also sets its diameter. Also returns the
    number of points the network scored.
    """
    names = SERIES_FEATURES if context is not None else SLICE_FEATURES
    empty = {"rc": np.zeros((0, 2)), **{n: np.zeros(0) for n in names}}
    pts = candidate_points(img, lung, sp, is_hu)
    if len(pts) == 0:
        return empty, 0
    u = context.volume_u[context.index] if context is not None else contrast_units(img, is_hu, lung)
    if net_points is not None and len(pts) > net_points:  # cheapest first: 2D blobness times density
        dot, _ = hessian_2d(u, pts.astype(np.float64), sp)
        pre = np.log1p(100.0 * dot) + 2.0 * _density(u, pts.astype(np.float64), sp)
        pts = pts[np.argsort(-pre, kind="stable")[:net_points]]
    lo, hi = context_range(img, finder.context_px)
    p = presence_log_odds(finder.presence, normalised_patches(img, lo, hi, pts, finder.presence, sp))
    top = np.argsort(-p, kind="stable")[:refine_top]
    refined, diam = refine(finder, img, lo, hi, lung, pts[top].astype(np.float64), sp)
    patches = normalised_patches(img, lo, hi, refined, finder.presence, sp)
    # score at the refined point, averaged over right-angle turns of the patch
    p2 = np.mean([presence_log_odds(finder.presence, np.rot90(patches, t, axes=(-2, -1)))
                  for t in range(max(1, rotations))], axis=0)
    table = {"rc": refined, "diameter": diam, "net": np.maximum(p[top], p2),
             "density": _density(u, refined, sp)}
    table["dot2d"], table["line2d"] = hessian_2d(u, refined, sp)
    if context is not None:
        krc = np.column_stack([np.full(len(refined), float(context.index)), refined])
        table["dot3d"], table["line3d"] = hessian_3d(context.volume_u, krc, sp, context.slice_gap_mm)
    # scored where the localiser put them (as the ranker was fitted), shown at the centre of their blob
    table["rc"], table["diameter"] = centre_on_blobs(u, lung, refined, diam, sp)
    return table, len(pts)


def rank_scores(finder: Finder, table: dict[str, np.ndarray], series: bool) -> tuple[np.ndarray, str]:
    """Log-odds to rank a candidate table by: the series or slice ranker when fitted, else the network's alone."""
    name = "series" if series and "series" in finder.rankers else "slice"
    ranker = finder.rankers.get(name)
    if ranker is None or len(table["net"]) == 0:
        return np.asarray(table["net"], np.float64), "network"
    return ranker.log_odds(table), name


def select(table: dict[str, np.ndarray], score: np.ndarray, sp: float, known: bool, top_k: int,
           min_score: float = 0.0) -> list[Candidate]:
    """Best-first candidates from scored points: each nodule once (points within its radius, or 5 mm, merged
    into their score-weighted centre and size)."""
    refined, diam = np.asarray(table["rc"], np.float64), np.asarray(table["diameter"], np.float64)
    order = np.argsort(-score, kind="stable")
    kept: list[Candidate] = []
    taken = np.zeros(len(order), bool)
    for i in order:
        prob = float(1.0 / (1.0 + np.exp(-np.clip(score[i], -50, 50))))
        if taken[i] or prob < min_score or len(kept) >= top_k:
            continue
        r, c = refined[i]
        radius = max(5.0, 0.5 * float(diam[i])) / sp
        near = ~taken & (np.hypot(refined[:, 0] - r, refined[:, 1] - c) < radius)
        taken |= near
        if any(np.hypot(r - k.y, c - k.x) * sp < max(5.0, 0.5 * k.diameter_mm) for k in kept):
            continue
        wts = np.exp(score[near] - score[near].max())
        wts /= wts.sum()
        r, c = wts @ refined[near]
        d = float(wts @ diam[near])
        kept.append(Candidate(x=float(c), y=float(r), diameter_mm=d, score=prob,
                              x_mm=float(c * sp) if known else None, y_mm=float(r * sp) if known else None,
                              log_odds=float(score[i])))
    return kept


def _checked(image: np.ndarray, is_hu: bool) -> np.ndarray:
    img = np.asarray(image, np.float32)
    if img.ndim != 2 or min(img.shape) < 32:
        raise LungvizError(f"a slice to search must be a 2-D image of at least 32 px, got shape {img.shape}.")
    if not np.isfinite(img).all():
        raise LungvizError("the slice contains missing (NaN or infinite) values.")
    # scanners pad outside the reconstructed circle (often -2048 HU): that is air, not denser than air
    return np.maximum(img, AIR_HU) if is_hu else img


def scan(
    finder: Finder,
    image: np.ndarray,
    is_hu: bool,
    spacing_mm: float | None = None,
    top_k: int = 10,
    min_score: float = 0.0,
    context: SeriesContext | None = None,
    lung: np.ndarray | None = None,
    net_points: int | None = None,
    rotations: int = 4,
    refine_top: int = REFINE_TOP,
) -> tuple[list[Candidate], dict]:
    """Ranked nodule candidates inside the lungs of one whole axial slice, best first, and what the scan did.

    ``image`` is ``(H, W)``: HU when ``is_hu`` else intensities in [0, 1]. Without a known pixel spacing the
    slice is taken at :data:`DEFAULT_SPACING_MM` (noted in the info and no millimetre positions are given).
    With ``context`` (the slice's series) the 3D shape measures join the ranking. ``lung`` may pass a mask
    already computed. A slice with no lung gives no candidates and ``info["message"]`` says so.
    """
    img = _checked(image, is_hu)
    known = spacing_mm is not None and spacing_mm > 0
    sp = float(spacing_mm) if known else DEFAULT_SPACING_MM
    lung = lung_mask(img, is_hu, sp) if lung is None else lung
    info = {"spacing_mm": sp, "spacing_known": known, "lung_fraction": float(lung.mean()),
            "lung_found": bool(lung.any()), "points_scored": 0, "field_mm": finder.field_mm}
    if not lung.any():
        return [], {**info, "message": NO_LUNG_MESSAGE}
    table, info["points_scored"] = candidate_table(finder, img, is_hu, sp, lung, context, net_points, rotations,
                                                   refine_top)
    if len(table["net"]) == 0:
        return [], info
    score, ranker = rank_scores(finder, table, context is not None)
    info["ranker"] = ranker
    if ranker in finder.rankers:
        info["threshold"] = finder.rankers[ranker].threshold
    return select(table, score, sp, known, top_k, min_score), info


@dataclass
class SeriesFinding:
    """One candidate followed over consecutive slices of a series: shown at its best slice (``slice_index``),
    spanning ``first_slice`` to ``last_slice``; ``track`` holds its (slice, row, column) on each."""

    slice_index: int
    candidate: Candidate
    first_slice: int
    last_slice: int
    track: list[tuple[int, float, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.candidate.to_dict(), "slice_index": self.slice_index, "first_slice": self.first_slice,
                "last_slice": self.last_slice, "track": [[k, round(r, 1), round(c, 1)] for k, r, c in self.track]}


#: Findings a series lists for the reader (the app's list, and the figure of how many nodules it holds).
LISTED_FINDINGS = 8


def _rank_key(c: Candidate) -> float:
    if c.log_odds is not None:
        return c.log_odds
    p = float(np.clip(c.score, 1e-12, 1.0 - 1e-12))
    return float(np.log(p / (1.0 - p)))


def series_findings(per_slice: list[list[Candidate]], spacing_mm: float | None = None,
                    top_k: int | None = None) -> list[SeriesFinding]:
    """The candidates of a series joined across slices, best first: a candidate continues a finding of the slice
    below when it lies within 5 mm (or half the larger diameter) of it, the closest pairs joined first, so a nodule
    seen on several slices is one finding. Each finding is ranked and shown by its best slice's candidate."""
    sp = spacing_mm if spacing_mm and spacing_mm > 0 else DEFAULT_SPACING_MM
    groups: list[list[tuple[int, Candidate]]] = []
    below: list[list[tuple[int, Candidate]]] = []  # the findings that reach the previous slice
    for k, cands in enumerate(per_slice):
        pairs = []
        for i, c in enumerate(cands):
            for j, g in enumerate(below):
                prev = g[-1][1]
                d = float(np.hypot(c.y - prev.y, c.x - prev.x)) * sp
                if d <= max(5.0, 0.5 * max(c.diameter_mm, prev.diameter_mm)):
                    pairs.append((d, i, j))
        joined: dict[int, int] = {}  # candidate -> finding below, nearest pairs first, each used once
        for _, i, j in sorted(pairs):
            if i not in joined and j not in joined.values():
                joined[i] = j
        here = []
        for i, c in enumerate(cands):
            if i in joined:
                below[joined[i]].append((k, c))
                here.append(below[joined[i]])
            else:
                groups.append([(k, c)])
                here.append(groups[-1])
        below = here
    found = []
    for g in groups:
        k, c = max(g, key=lambda t: (_rank_key(t[1]), -t[0]))
        found.append(SeriesFinding(k, c, g[0][0], g[-1][0], [(kk, cc.y, cc.x) for kk, cc in g]))
    found.sort(key=lambda f: (-_rank_key(f.candidate), f.slice_index))
    return found[:top_k] if top_k is not None else found


@dataclass
class SeriesScan:
    """Candidates on every slice of a series: ``per_slice[k]`` best first."""

    per_slice: list[list[Candidate]]
    lung_found: list[bool]
    seconds: float
    spacing_mm: float | None = None

    def findings(self, top_k: int | None = None) -> list[SeriesFinding]:
        """The series' findings, each candidate followed over consecutive slices, best first."""
        return series_findings(self.per_slice, self.spacing_mm, top_k)

    @property
    def best(self) -> tuple[int, Candidate] | None:
        """(slice, candidate) of the series' best finding."""
        found = self.findings(1)
        return (found[0].slice_index, found[0].candidate) if found else None


#: Series scanning settings (speed, 100 slices in under 30 s): points the network scores per slice (the densest 2D
#: blobs first), points the localiser refines, and right-angle turns averaged: of the settings compared over four
#: trainings, the one that ranked the nodule first most often (docs/training.md).
SERIES_NET_POINTS = 64
SERIES_REFINE_TOP = 24
SERIES_ROTATIONS = 2
SERIES_TOP_K = 5  # candidates kept per slice of a series


def scan_series(
    finder: Finder,
    volume: np.ndarray,
    is_hu: bool,
    spacing_mm: float | None,
    slice_gap_mm: float,
    top_k: int = SERIES_TOP_K,
    progress=None,
) -> SeriesScan:
    """Scan every slice of a ``(K, H, W)`` series (ascending z) with its neighbours as the third dimension.

    ``progress(done, total)`` is called after each slice (a progress bar). Slices without lung get no candidates.
    """
    import time

    vol = np.asarray(volume, np.float32)
    if vol.ndim != 3 or len(vol) == 0:
        raise LungvizError(f"a series to search must be a stack of 2-D slices, got shape {vol.shape}.")
    if not np.isfinite(vol).all():
        raise LungvizError("the series contains missing (NaN or infinite) values.")
    if is_hu:
        vol = np.maximum(vol, AIR_HU)
    known = spacing_mm is not None and spacing_mm > 0
    sp = float(spacing_mm) if known else DEFAULT_SPACING_MM
    gap = float(slice_gap_mm) if slice_gap_mm and np.isfinite(slice_gap_mm) and slice_gap_mm > 0 else 2.5
    t0 = time.perf_counter()
    vol_u = np.stack([contrast_units(s, is_hu) for s in vol]) if not is_hu else contrast_units(vol, True)
    per, found = [], []
    for k in range(len(vol)):
        lung = lung_mask(vol[k], is_hu, sp)
        cands, _ = scan(finder, vol[k], is_hu, spacing_mm, top_k=top_k,
                        context=SeriesContext(vol_u, k, gap) if len(vol) > 1 else None, lung=lung,
                        net_points=SERIES_NET_POINTS, rotations=SERIES_ROTATIONS, refine_top=SERIES_REFINE_TOP)
        per.append(cands)
        found.append(bool(lung.any()))
        if progress is not None:
            progress(k + 1, len(vol))
    return SeriesScan(per, found, time.perf_counter() - t0, sp)


@dataclass
class SearchSlice:
    """A whole slice to search: pixels (HU or [0, 1]), spacing, and where it came from."""

    pixels: np.ndarray
    is_hu: bool
    spacing_mm: float | None
    name: str
    slice_index: int | None = None
    n_slices: int | None = None


def series_slice(series: list, slice_index: int | None, name: str) -> SearchSlice:
    """Slice ``slice_index`` (0 = most inferior; default the middle one) of a DICOM series."""
    n = len(series)
    k = n // 2 if slice_index is None else int(slice_index)
    if not 0 <= k < n:
        raise LungvizError(f"slice {k} does not exist; the series has slices 0 to {n - 1}.", source=name)
    sl = series[k]
    return SearchSlice(sl.hu, True, valid_spacing(float(np.mean(sl.pixel_spacing_mm))), name, k, n)


def series_volume(series: list) -> tuple[np.ndarray, float | None, float]:
    """A DICOM series (ascending z) as ``(K, H, W)`` HU, its pixel spacing and the gap between slices (mm)."""
    shapes = {s.hu.shape for s in series}
    if len(shapes) != 1:
        raise LungvizError("the slices of this series differ in size, so they cannot be searched together.")
    zs = np.array([s.z_mm for s in series], float)
    gap = float(np.median(np.abs(np.diff(zs)))) if len(zs) > 1 and np.isfinite(zs).all() else float("nan")
    sp = valid_spacing(float(np.mean(series[0].pixel_spacing_mm)))
    return np.stack([s.hu for s in series]).astype(np.float32), sp, gap


def series_context(series: list, slice_index: int) -> tuple[SeriesContext, float | None]:
    """The third dimension of one slice of a DICOM series, for :func:`scan`, and the series' pixel spacing."""
    vol, sp, gap = series_volume(series)
    vol = np.maximum(vol, AIR_HU)
    ok_gap = gap if np.isfinite(gap) and gap > 0 else 2.5
    return SeriesContext(contrast_units(vol, True), int(slice_index), ok_gap), sp


def read_search_slice(src: str | Path, slice_index: int | None = None) -> SearchSlice:
    """Read a whole slice to search: an image file (PNG/JPG/TIFF/NPY/DICOM) or a DICOM series (folder or zip)."""
    from lungviz.data.io import load_image, read_series

    path = Path(src)
    name = path.name or str(src)
    if not path.exists():
        raise LungvizError("the file does not exist.", source=str(src))
    if path.is_dir() or path.suffix.lower() == ".zip":
        return series_slice(read_series(path), slice_index, name)
    if slice_index not in (None, 0):
        raise LungvizError("a slice number applies to a DICOM series (a folder or a zip), not to a single image.",
                           source=name)
    img = load_image(path)
    return SearchSlice(img.pixels, img.is_hu, img.pixel_spacing_mm, img.name)
