"""Importer for LIDC DICOM series with the original LIDC reader XML (``lidc-dicom/LIDC-IDRI-xxxx/``).

Each patient folder holds the CT slices (``*.dcm``) and one reader XML (namespace ``http://www.nih.gov``):
one ``readingSession`` per radiologist, each with its ``unblindedReadNodule`` marks (ratings and outlines
per slice). This module parses the XML, rasterises each reader's outlines onto the series, groups the
readers' marks of the same physical nodule (as pylidc does) and produces :class:`lungviz.data.cases.Case`
records with ``source="lidc-dicom"``.

How the LIDC-IDRI-slices set relates to the DICOM (checked pixel for pixel on LIDC-IDRI-0001..0003, see
tests/test_lidc_dicom.py):

- ``images/slice-n.png`` is the n-th slice any reader of the nodule outlined, in ascending z (inferior first);
- it covers native pixels ``[ci - 64, ci + 64) x [cj - 64, cj + 64)`` of that slice, where ``(ci, cj)`` is
  ``int()`` of the pylidc centroid (mean of the outline points) of the reader mark with the most outlines
  (ties: most points) -- :attr:`LidcNodule.crop_centre_rc`. That is within 2 px of labels.csv
  ``centroid_i/j``, which is the mean of all the readers' centroids (:attr:`LidcNodule.centre_rc`);
- its grey values are the crop's own HU min-max scaled to 0..255, not a fixed W1500/L-600 window
  (``intensity="minmax"`` reproduces them within one grey level; the lung-windowed crop correlates at
  r = 0.96-0.995);
- ``consensus/slice-n.png`` counts the readers whose filled outline covers the pixel, outline pixels
  excluded and holes removed with their line (pylidc's masks) -- identical to :func:`rasterise_mark`;
- labels.csv ``diameter_mm`` / ``volume_mm3`` are the readers' means of pylidc's diameter (longest chord
  between outline points on one slice) and volume (outline areas by the shoelace formula x slice gap);
- ``centroid_k`` indexes the full scan in ascending z; the shipped series is a sub-range, so it differs
  from :attr:`LidcNodule.centre_z_index` by a constant per patient.
"""

from __future__ import annotations

import itertools
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungviz.data.cases import CHARACTERISTICS, Case, ImportReport, panel_median, round_half_up
from lungviz.data.io import DicomSlice, read_series
from lungviz.data.preprocess import (
    SLICE_CROP_PX,
    VIEWS,
    WINDOW_PRESETS,
    crop_around,
    crop_mm,
    minmax,
    view_from_whole_slice,
    window_preset,
)
from lungviz.errors import LungvizError

NS = "{http://www.nih.gov}"
SOURCE = "lidc-dicom"
#: Ratings read from each ``characteristics`` element (the eight of :data:`CHARACTERISTICS` + malignancy).
RATINGS = (*CHARACTERISTICS, "malignancy")
#: Marks closer than this (mm) are the same nodule even when both are tiny.
MIN_LINK_MM = 5.0
#: HU used outside the scanned field when a crop runs off the slice.
AIR_HU = -1024.0


@dataclass(frozen=True)
class Roi:
    """One reader's outline on one slice: ``points_rc`` are (row, col) pixel positions of the edge map."""

    z_mm: float
    sop_uid: str
    inclusion: bool
    points_rc: np.ndarray = field(repr=False, compare=False)  # (N, 2) int


@dataclass(frozen=True)
class ReaderNodule:
    """One reader's mark of one nodule: ratings (empty for a < 3 mm mark) and outlines per slice."""

    reader_index: int  # position of the reading session in the XML (0-based); the reader's identity here
    reader_id: str  # servicingRadiologistID as written (may be anonymised)
    nodule_id: str
    characteristics: dict[str, int]
    rois: tuple[Roi, ...]

    @property
    def is_small(self) -> bool:
        """True for a < 3 mm mark: no ratings, only a point (not a rated nodule)."""
        return not self.characteristics or all(len(r.points_rc) <= 1 for r in self.rois)

    @property
    def malignancy(self) -> int | None:
        return self.characteristics.get("malignancy")


def _text(elem: ET.Element | None, tag: str) -> str | None:
    child = elem.find(NS + tag) if elem is not None else None
    return child.text.strip() if child is not None and child.text is not None else None


def _parse_roi(roi: ET.Element, path: Path) -> Roi:
    z_text = _text(roi, "imageZposition")
    try:
        z_mm = float(z_text) if z_text is not None else math.nan
        pts = [
            (int(float(_text(e, "yCoord") or "")), int(float(_text(e, "xCoord") or "")))
            for e in roi.iter(NS + "edgeMap")
        ]
    except ValueError as err:
        raise LungvizError(f"a reader outline has an unreadable coordinate ({err}).", source=path) from err
    inclusion = (_text(roi, "inclusion") or "TRUE").upper() != "FALSE"
    points = np.asarray(pts, dtype=np.int64).reshape(-1, 2)
    return Roi(z_mm=z_mm, sop_uid=_text(roi, "imageSOP_UID") or "", inclusion=inclusion, points_rc=points)


def _parse_characteristics(elem: ET.Element | None) -> dict[str, int]:
    out: dict[str, int] = {}
    if elem is None:
        return out
    for name in RATINGS:
        value = _text(elem, name)
        try:
            score = int(float(value)) if value else 0
        except ValueError:
            score = 0
        if score > 0:
            out[name] = score
    return out


def _load_xml(path: Path) -> ET.Element:
    if not path.is_file():
        raise LungvizError("the LIDC reader XML file was not found.", source=path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise LungvizError(f"the LIDC reader XML is damaged or not XML ({err}).", source=path) from err
    if not root.tag.startswith(NS):
        raise LungvizError(
            "this XML is not an LIDC reader file (expected the namespace http://www.nih.gov).", source=path
        )
    return root


def reader_xml_series_uid(path: str | Path) -> str | None:
    """The SeriesInstanceUID the reader XML says its reads belong to (None when it does not say)."""
    header = _load_xml(Path(path)).find(NS + "ResponseHeader")
    return _text(header, "SeriesInstanceUid") or _text(header, "SeriesInstanceUID")


def parse_reader_xml(path: str | Path) -> list[ReaderNodule]:
    """Parse an LIDC reader XML into every reader's nodule marks (``nonNodule`` entries are ignored).

    Each ``readingSession`` is one reader. Marks under 3 mm are kept (``is_small``) but carry no ratings.
    """
    path = Path(path)
    root = _load_xml(path)
    sessions = root.findall(NS + "readingSession")
    if not sessions:
        raise LungvizError("the LIDC reader XML contains no reading sessions (no radiologist reads).", source=path)
    marks: list[ReaderNodule] = []
    for index, session in enumerate(sessions):
        reader_id = _text(session, "servicingRadiologistID") or f"reader-{index + 1}"
        for nod in session.findall(NS + "unblindedReadNodule"):
            rois = tuple(_parse_roi(r, path) for r in nod.findall(NS + "roi"))
            marks.append(
                ReaderNodule(
                    reader_index=index,
                    reader_id=reader_id,
                    nodule_id=_text(nod, "noduleID") or f"nodule-{len(marks) + 1}",
                    characteristics=_parse_characteristics(nod.find(NS + "characteristics")),
                    rois=rois,
                )
            )
    return marks


# --------------------------------------------------------------------------------------------------------------
# Outlines on the series
# --------------------------------------------------------------------------------------------------------------


def _outline_pixels(points_rc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels on the closed polyline through ``points_rc`` (rows, cols)."""
    from skimage.draw import line

    if len(points_rc) == 1:
        return points_rc[:, 0].copy(), points_rc[:, 1].copy()
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    closed = np.vstack([points_rc, points_rc[:1]])
    for (r0, c0), (r1, c1) in itertools.pairwise(closed):
        rr, cc = line(int(r0), int(c0), int(r1), int(c1))
        rows.append(rr)
        cols.append(cc)
    return np.concatenate(rows), np.concatenate(cols)


def fill_outline(points_rc: np.ndarray, shape: tuple[int, int], include_outline: bool = False) -> np.ndarray:
    """Boolean mask of the area enclosed by one outline.

    With ``include_outline=False`` (default) the outline pixels themselves are left out, as pylidc does and
    as the LIDC-IDRI-slices consensus masks are drawn (LIDC readers draw the line just outside the nodule);
    an outline too small to enclose any pixel then falls back to its own pixels.
    """
    from skimage.draw import polygon

    mask = np.zeros(shape, dtype=bool)
    points_rc = np.asarray(points_rc, dtype=np.int64).reshape(-1, 2)
    if len(points_rc) == 0:
        return mask
    if len(points_rc) >= 3:
        rr, cc = polygon(points_rc[:, 0], points_rc[:, 1], shape=shape)
        mask[rr, cc] = True
    orr, occ = _outline_pixels(points_rc)
    inside = (orr >= 0) & (orr < shape[0]) & (occ >= 0) & (occ < shape[1])
    orr, occ = orr[inside], occ[inside]
    if include_outline:
        mask[orr, occ] = True
    else:
        mask[orr, occ] = False
        if not mask.any():
            mask[orr, occ] = True
    return mask


def slice_index_for(roi: Roi, series: Sequence[DicomSlice], by_uid: dict[str, int] | None = None) -> int | None:
    """Index of the series slice an outline was drawn on: by SOP instance UID, else by z (within half a slice)."""
    if by_uid is None:
        by_uid = {s.sop_uid: i for i, s in enumerate(series)}
    if roi.sop_uid in by_uid:
        return by_uid[roi.sop_uid]
    if not series or not math.isfinite(roi.z_mm):
        return None
    zs = np.array([s.z_mm for s in series])
    i = int(np.argmin(np.abs(zs - roi.z_mm)))
    tol = 0.5 * _slice_gap_mm(series)
    return i if abs(zs[i] - roi.z_mm) <= tol else None


def _slice_gap_mm(series: Sequence[DicomSlice]) -> float:
    """Distance between neighbouring slices (median z gap; slice thickness for a single slice)."""
    gaps = np.diff([s.z_mm for s in series])
    gaps = gaps[gaps > 0]
    if len(gaps):
        return float(np.median(gaps))
    thickness = series[0].slice_thickness_mm if series else None
    return float(thickness) if thickness else 1.0


def rasterise_mark(
    mark: ReaderNodule,
    series: Sequence[DicomSlice],
    include_outline: bool = False,
    by_uid: dict[str, int] | None = None,
) -> tuple[dict[int, np.ndarray], int]:
    """One reader's mark as boolean masks per series slice index, and how many outlines found no slice.

    Inclusion outlines are filled (see :func:`fill_outline`); exclusion outlines (holes) are then removed.
    By default the outline pixels are never part of the nodule (a hole's own line is removed with it), which
    reproduces the LIDC-IDRI-slices consensus masks pixel for pixel; ``include_outline=True`` counts every
    line as nodule instead.
    """
    if not series:
        return {}, len(mark.rois)
    if by_uid is None:
        by_uid = {s.sop_uid: i for i, s in enumerate(series)}
    shape = series[0].hu.shape
    masks: dict[int, np.ndarray] = {}
    holes: dict[int, np.ndarray] = {}
    missing = 0
    for roi in mark.rois:
        k = slice_index_for(roi, series, by_uid)
        if k is None:
            missing += 1
            continue
        target = masks if roi.inclusion else holes
        # The outline line belongs to the nodule either for both kinds of outline or for neither.
        filled = fill_outline(roi.points_rc, shape, include_outline if roi.inclusion else not include_outline)
        target[k] = target[k] | filled if k in target else filled
    for k, hole in holes.items():
        if k in masks:
            masks[k] &= ~hole
    return {k: m for k, m in sorted(masks.items()) if m.any()}, missing


def _shoelace_px(points_rc: np.ndarray) -> float:
    r, c = points_rc[:, 0].astype(float), points_rc[:, 1].astype(float)
    return 0.5 * abs(float(np.dot(c, np.roll(r, 1)) - np.dot(r, np.roll(c, 1))))


@dataclass
class MarkGeometry:
    """One reader's mark placed on the series, with pylidc's measures of it."""

    mark: ReaderNodule
    masks: dict[int, np.ndarray] = field(repr=False)  # series slice index -> (H, W) bool
    centroid_rck: tuple[float, float, float]  # mean of the outline points: (row, col, slice index), as pylidc
    centroid_mm: tuple[float, float, float]  # (x, y, z) in mm: col * spacing, row * spacing, z position
    diameter_mm: float  # longest in-plane chord between outline points on any slice (pylidc ``diameter``)
    volume_mm3: float  # outline areas (shoelace, holes subtracted) x slice gap (pylidc ``volume``)
    n_unmatched: int  # outlines that found no slice in the series


def measure_mark(
    mark: ReaderNodule,
    series: Sequence[DicomSlice],
    include_outline: bool = False,
    by_uid: dict[str, int] | None = None,
) -> MarkGeometry | None:
    """Rasterise and measure one reader's mark; None when none of its outlines lies on the series."""
    from scipy.spatial.distance import pdist

    if by_uid is None:
        by_uid = {s.sop_uid: i for i, s in enumerate(series)}
    masks, missing = rasterise_mark(mark, series, include_outline, by_uid)
    placed = [(roi, k) for roi in mark.rois if (k := slice_index_for(roi, series, by_uid)) is not None]
    placed = [(roi, k) for roi, k in placed if len(roi.points_rc)]
    if not masks or not placed:
        return None
    sr, sc = series[0].pixel_spacing_mm
    pts = np.concatenate([roi.points_rc for roi, _ in placed]).astype(float)
    ks = np.concatenate([np.full(len(roi.points_rc), k, float) for roi, k in placed])
    zs = np.concatenate([np.full(len(roi.points_rc), series[k].z_mm, float) for roi, k in placed])
    row, col = pts.mean(axis=0)
    diameter = 0.0
    area = 0.0
    for roi, _ in placed:
        if roi.inclusion and len(roi.points_rc) >= 2:
            diameter = max(diameter, float(pdist(roi.points_rc * np.array([sr, sc])).max()))
        if len(roi.points_rc) >= 3:
            area += (1.0 if roi.inclusion else -1.0) * _shoelace_px(roi.points_rc) * sr * sc
    return MarkGeometry(
        mark=mark,
        masks=masks,
        centroid_rck=(float(row), float(col), float(ks.mean())),
        centroid_mm=(float(col * sc), float(row * sr), float(zs.mean())),
        diameter_mm=diameter,
        volume_mm3=max(area, 0.0) * _slice_gap_mm(series),
        n_unmatched=missing,
    )


# --------------------------------------------------------------------------------------------------------------
# Grouping the readers' marks into nodules
# --------------------------------------------------------------------------------------------------------------


def _link_mm(a: MarkGeometry, b: MarkGeometry, min_link_mm: float) -> float:
    return max(min_link_mm, 0.5 * max(a.diameter_mm, b.diameter_mm))


def group_marks(geoms: Sequence[MarkGeometry], min_link_mm: float = MIN_LINK_MM) -> list[list[int]]:
    """Indices of ``geoms`` grouped into physical nodules, at most one mark per reader in a group.

    Two marks may join when their centroids are within half the larger diameter (at least ``min_link_mm``).
    Pairs are merged closest first, and only when every pair across the two groups is within reach
    (complete linkage), so a reader's two neighbouring marks never end up in one nodule.
    """
    n = len(geoms)
    centres = np.array([g.centroid_mm for g in geoms], float).reshape(n, 3)
    pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            d = float(np.linalg.norm(centres[i] - centres[j]))
            same_reader = geoms[i].mark.reader_index == geoms[j].mark.reader_index
            if not same_reader and d <= _link_mm(geoms[i], geoms[j], min_link_mm):
                pairs.append((d, i, j))
    label = list(range(n))
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    for _, i, j in sorted(pairs):
        a, b = label[i], label[j]
        if a == b:
            continue
        readers_a = {geoms[m].mark.reader_index for m in members[a]}
        if any(geoms[m].mark.reader_index in readers_a for m in members[b]):
            continue
        if not all(
            np.linalg.norm(centres[p] - centres[q]) <= _link_mm(geoms[p], geoms[q], min_link_mm)
            for p in members[a]
            for q in members[b]
        ):
            continue
        for m in members[b]:
            label[m] = a
        members[a].extend(members.pop(b))
    return [sorted(group, key=lambda m: (geoms[m].mark.reader_index, m)) for group in members.values()]


@dataclass
class LidcNodule:
    """One physical nodule: the readers' marks of it and the panel's measures."""

    marks: tuple[MarkGeometry, ...]  # one per reader, in reading-session order
    slice_indices: tuple[int, ...]  # series slices any reader outlined, ascending z
    counts: np.ndarray = field(repr=False)  # (S, H, W) uint8: readers who included each pixel
    centre_rc: tuple[float, float]  # mean of the readers' centroids (= labels.csv centroid_i/j)
    centre_z_index: float  # same, as a (fractional) index into the series
    centre_z_mm: float
    crop_centre_rc: tuple[int, int]  # centre of the slices set's 128 px crop (see the module docstring)
    extent: dict[str, int]  # inclusive bounds of the union of the marks: row/col/z index min and max
    extent_mm: tuple[float, float, float]  # (rows, cols, z) extent of the union in mm
    diameter_mm: float  # mean of the readers' diameters (as labels.csv)
    volume_mm3: float  # mean of the readers' volumes (as labels.csv)

    @property
    def n_readers(self) -> int:
        return len(self.marks)

    @property
    def reader_scores(self) -> tuple[int, ...]:
        """Malignancy scores of the readers who gave one, in reading-session order."""
        return tuple(m.mark.malignancy for m in self.marks if m.mark.malignancy is not None)

    @property
    def reader_characteristics(self) -> tuple[dict[str, float], ...]:
        return tuple({k: float(v) for k, v in m.mark.characteristics.items()} for m in self.marks)

    @property
    def characteristics(self) -> dict[str, float]:
        """Panel median of each of the eight characteristics (those nobody rated are left out)."""
        out: dict[str, float] = {}
        for name in CHARACTERISTICS:
            med = panel_median([m.mark.characteristics[name] for m in self.marks if name in m.mark.characteristics])
            if med is not None:
                out[name] = med
        return out


def _build_nodule(geoms: Sequence[MarkGeometry], series: Sequence[DicomSlice]) -> LidcNodule:
    ks = sorted(set().union(*(g.masks for g in geoms)))
    shape = series[0].hu.shape
    counts = np.zeros((len(ks), *shape), np.uint8)
    for g in geoms:
        for n, k in enumerate(ks):
            if k in g.masks:
                counts[n] += g.masks[k]
    cents = np.array([g.centroid_rck for g in geoms])
    row, col, kz = cents.mean(axis=0)
    z_mm = float(np.mean([g.centroid_mm[2] for g in geoms]))
    # The slices set centres its crop on the centroid of the mark with the most outlines (ties: most points).
    ref = max(geoms, key=lambda g: (len(g.mark.rois), sum(len(r.points_rc) for r in g.mark.rois)))
    union = np.argwhere(counts > 0)
    (n0, r0, c0), (n1, r1, c1) = union.min(axis=0), union.max(axis=0)
    sr, sc = series[0].pixel_spacing_mm
    z_span = abs(series[ks[n1]].z_mm - series[ks[n0]].z_mm) + _slice_gap_mm(series)
    return LidcNodule(
        marks=tuple(geoms),
        slice_indices=tuple(ks),
        counts=counts,
        centre_rc=(float(row), float(col)),
        centre_z_index=float(kz),
        centre_z_mm=z_mm,
        crop_centre_rc=(int(ref.centroid_rck[0]), int(ref.centroid_rck[1])),
        extent={
            "row_min": int(r0), "row_max": int(r1), "col_min": int(c0), "col_max": int(c1),
            "z_index_min": int(ks[n0]), "z_index_max": int(ks[n1]),
        },
        extent_mm=(float((r1 - r0 + 1) * sr), float((c1 - c0 + 1) * sc), float(z_span)),
        diameter_mm=float(np.mean([g.diameter_mm for g in geoms])),
        volume_mm3=float(np.mean([g.volume_mm3 for g in geoms])),
    )


def find_nodules(
    series: Sequence[DicomSlice], marks: Sequence[ReaderNodule], include_outline: bool = False
) -> tuple[list[LidcNodule], list[ReaderNodule]]:
    """Group the readers' rated marks (>= 3 mm) into nodules, ordered by z then row and column.

    Also returns the rated marks that could not be placed on the series (no outline on its slices).
    Small (< 3 mm) marks and non-nodules are not nodules with ratings and are left out.
    """
    by_uid = {s.sop_uid: i for i, s in enumerate(series)}
    geoms: list[MarkGeometry] = []
    unplaced: list[ReaderNodule] = []
    for mark in marks:
        if mark.is_small:
            continue
        geom = measure_mark(mark, series, include_outline, by_uid)
        if geom is None:
            unplaced.append(mark)
        else:
            geoms.append(geom)
    nodules = [_build_nodule([geoms[i] for i in group], series) for group in group_marks(geoms)]
    nodules.sort(key=lambda nd: (nd.centre_z_mm, nd.centre_rc))
    return nodules, unplaced


# --------------------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------------------


def crop_hu(hu: np.ndarray, crop_centre_rc: tuple[int, int], size: int = SLICE_CROP_PX) -> np.ndarray:
    """``size`` x ``size`` HU crop starting at ``crop_centre - size // 2`` (the slices set's geometry); air outside."""
    return crop_around(hu, (float(crop_centre_rc[0]), float(crop_centre_rc[1])), size, fill=AIR_HU)


def to_unit(hu: np.ndarray, intensity: str = "lung") -> np.ndarray:
    """HU -> ``[0, 1]``: a window preset (``lung``, ``mediastinum``, ``bone``) or ``minmax`` (the slices set's PNGs)."""
    if intensity == "minmax":
        return minmax(hu)
    if intensity not in WINDOW_PRESETS:
        raise LungvizError(f"unknown intensity '{intensity}'; choose one of {', '.join(WINDOW_PRESETS)} or minmax.")
    return window_preset(hu, intensity)


def _find_xml(folder: Path, series_uid: str) -> Path:
    xmls = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".xml")
    if not xmls:
        raise LungvizError("no LIDC reader XML (*.xml) was found next to the DICOM slices.", source=folder)
    if len(xmls) == 1:
        uid = reader_xml_series_uid(xmls[0])
        if uid and series_uid and uid != series_uid:
            raise LungvizError(
                f"the reader XML belongs to series {uid}, but the DICOM slices are series {series_uid}.",
                source=xmls[0],
            )
        return xmls[0]
    for path in xmls:
        if reader_xml_series_uid(path) == series_uid:
            return path
    raise LungvizError(f"none of the {len(xmls)} reader XML files belongs to series {series_uid}.", source=folder)


def read_patient(folder: str | Path) -> tuple[list[DicomSlice], list[ReaderNodule], Path]:
    """The series (ascending z) and the reader marks of one LIDC patient folder, with the XML's path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LungvizError("this LIDC patient folder was not found.", source=folder)
    series = read_series(folder)
    if not np.isfinite(series[0].pixel_spacing_mm).all():
        raise LungvizError("the series has no plausible pixel spacing (DICOM field PixelSpacing), so the readers' "
                           "outlines cannot be measured in millimetres.", source=folder)
    xml = _find_xml(folder, series[0].series_uid)
    return series, parse_reader_xml(xml), xml


def nodule_case(
    nodule: LidcNodule,
    series: Sequence[DicomSlice],
    patient_id: str,
    nodule_id: str,
    crop_px: int = SLICE_CROP_PX,
    intensity: str = "lung",
    xml_path: Path | None = None,
) -> Case:
    """A :class:`Case` for one nodule: crops of the outlined slices, reader-consensus masks and ratings."""
    centre = nodule.crop_centre_rc
    slices = np.stack([to_unit(crop_hu(series[k].hu, centre, crop_px), intensity) for k in nodule.slice_indices])
    masks = np.stack(
        [crop_around(c.astype(np.float32), (float(centre[0]), float(centre[1])), crop_px, fill=0.0)
         for c in nodule.counts]
    ) / float(nodule.n_readers)
    scores = nodule.reader_scores
    median = panel_median(scores)
    centre_k = int(np.clip(round(nodule.centre_z_index), 0, len(series) - 1))
    sr, sc = series[0].pixel_spacing_mm
    thickness = series[0].slice_thickness_mm or _slice_gap_mm(series)
    n_unmatched = sum(g.n_unmatched for g in nodule.marks)
    return Case(
        patient_id=patient_id,
        nodule_id=nodule_id,
        source=SOURCE,
        slices=slices.astype(np.float32),
        masks=np.clip(masks, 0.0, 1.0).astype(np.float32),
        n_readers=nodule.n_readers,
        reader_scores=scores,
        reader_characteristics=nodule.reader_characteristics,
        characteristics=nodule.characteristics,
        malignancy_median=median,
        malignancy=None if median is None else round_half_up(median),
        diameter_mm=round(nodule.diameter_mm, 2),
        volume_mm3=round(nodule.volume_mm3, 1),
        pixel_spacing_mm=float((sr + sc) / 2.0),
        slice_thickness_mm=float(thickness),
        label_check="ok" if n_unmatched == 0 else "zextent_mismatch",
        extra={
            "centre_rc": nodule.centre_rc,
            "centre_z_index": nodule.centre_z_index,
            "centre_z_mm": nodule.centre_z_mm,
            "whole_slice_index": centre_k,
            "whole_slice_hu": series[centre_k].hu,
            "crop_centre_rc": centre,
            "crop_px": crop_px,
            "intensity": intensity,
            "series_uid": series[0].series_uid,
            "slice_indices": nodule.slice_indices,
            "slice_z_mm": tuple(series[k].z_mm for k in nodule.slice_indices),
            "sop_uids": tuple(series[k].sop_uid for k in nodule.slice_indices),
            "extent": nodule.extent,
            "extent_mm": nodule.extent_mm,
            "reader_ids": tuple(g.mark.reader_id for g in nodule.marks),
            "reader_nodule_ids": tuple(g.mark.nodule_id for g in nodule.marks),
            "reader_diameters_mm": tuple(round(g.diameter_mm, 2) for g in nodule.marks),
            "n_outlines_unmatched": n_unmatched,
            "xml_path": str(xml_path) if xml_path else None,
        },
    )


def import_dicom_case(
    folder: str | Path, crop_px: int = SLICE_CROP_PX, intensity: str = "lung", include_outline: bool = False
) -> tuple[list[Case], ImportReport]:
    """Import one LIDC patient folder (DICOM slices + reader XML): one :class:`Case` per rated nodule.

    Nodules are named ``nodule-0``, ``nodule-1``, ... in ascending z. Rated marks with no outline on the
    shipped slices are reported as skipped.
    """
    folder = Path(folder)
    series, marks, xml = read_patient(folder)
    nodules, unplaced = find_nodules(series, marks, include_outline)
    cases = [
        nodule_case(nd, series, folder.name, f"nodule-{i}", crop_px, intensity, xml) for i, nd in enumerate(nodules)
    ]
    skipped = tuple(
        (f"{folder.name}/{m.nodule_id} (reader {m.reader_index + 1})", "mark outside the DICOM slices")
        for m in unplaced
    )
    return cases, ImportReport(n_cases=len(cases), skipped=skipped)


def import_dicom_cases(
    root: str | Path | None = None,
    crop_px: int = SLICE_CROP_PX,
    intensity: str = "lung",
    include_outline: bool = False,
) -> tuple[list[Case], ImportReport]:
    """Import every patient folder under ``root`` (default :func:`lungviz.paths.lidc_dicom_dir`).

    A folder that cannot be read is skipped with its reason instead of stopping the import.
    """
    from lungviz.paths import lidc_dicom_dir

    root = Path(root) if root is not None else lidc_dicom_dir()
    if not root.is_dir():
        raise LungvizError("the LIDC DICOM folder was not found.", source=root)
    cases: list[Case] = []
    skipped: list[tuple[str, str]] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            found, report = import_dicom_case(folder, crop_px, intensity, include_outline)
        except LungvizError as err:
            skipped.append((folder.name, err.message))
            continue
        cases.extend(found)
        skipped.extend(report.skipped)
    return cases, ImportReport(n_cases=len(cases), skipped=tuple(skipped))


# --------------------------------------------------------------------------------------------------------------
# Whole slice and physical-size crops
# --------------------------------------------------------------------------------------------------------------


def whole_slice_and_crop(
    case: Case,
    size_mm: float = VIEWS["nodule"].field_mm,
    intensity: str = "lung",
    input_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The whole slice through the nodule centre and a ``size_mm`` square cut around the centre, both in [0, 1].

    The crop keeps the native pixels (``round(size_mm / spacing)`` wide) unless ``input_size`` asks for a
    resized model view (:func:`lungviz.data.preprocess.view_from_whole_slice`).
    """
    hu = case.extra.get("whole_slice_hu")
    centre = case.extra.get("centre_rc")
    if hu is None or centre is None:
        raise LungvizError(f"case {case.case_id} has no whole CT slice (only DICOM imports carry one).")
    whole = to_unit(hu, intensity)
    if input_size is None:
        crop = crop_mm(whole, centre, size_mm, case.pixel_spacing_mm)
    else:
        crop = view_from_whole_slice(whole, centre, "nodule", input_size, case.pixel_spacing_mm, field_mm=size_mm)
    return whole, crop
