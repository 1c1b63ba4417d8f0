"""The finder on whole slices and series of the DICOM set: fit the candidate rankers and measure them.

Every slice of every series in ``lidc-dicom/`` is scanned once (candidate features cached per mode); the rankers
(logistic models over the candidate features, :class:`lungviz.inference.finder.Ranker`) are then fitted and judged
leave-one-series-out: each series is ranked by a model and an operating threshold fitted on the other series
only, so no nodule is reported with a model tuned on it. The shipped rankers are fitted on all series.

Truth: the nodules at least two readers outlined; the centre is the median of the readers' outline centroids
(row, column and slice). A candidate is a hit when within 5 mm of that centre on the nodule's central slice. A
candidate is false when it is farther than 5 mm (or the outline's radius) from every nodule any reader outlined
on the slice: a candidate on a one-reader nodule or elsewhere on a large nodule is neither hit nor false.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lungviz import paths
from lungviz.inference.blobness import contrast_units
from lungviz.inference.finder import (
    LISTED_FINDINGS,
    RANK,
    REFINE_TOP,
    SERIES_FEATURES,
    SERIES_NET_POINTS,
    SERIES_RANK_FEATURES,
    SERIES_REFINE_TOP,
    SERIES_ROTATIONS,
    SERIES_TOP_K,
    SLICE_FEATURES,
    SLICE_RANK_FEATURES,
    Candidate,
    Finder,
    Ranker,
    SeriesContext,
    candidate_table,
    feature_matrix,
    select,
    series_findings,
)
from lungviz.inference.lungmask import lung_mask

log = logging.getLogger("training")

HIT_MM = 5.0
FROC_RATES = (0.5, 1.0, 2.0, 4.0)
#: Operating point: the threshold is the lowest whose false candidates per slice on the fitting series stay at
#: or below this.
TARGET_FP_PER_SLICE = 1.0
TOP_K = 10
#: Ranker variants compared (the ablation): name -> (scan mode, features); ``None`` = the presence network's score
#: alone with its untuned 0.5 threshold. ``slice`` and ``series`` are shipped; the others show what each measure adds.
VARIANTS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "network": ("slice", None),
    "slice": ("slice", SLICE_RANK_FEATURES),
    "slice_2d_shape": ("slice", SLICE_FEATURES),
    "hessian3d_only": ("series", ("density", "dot3d", "line3d", "diameter")),
    "series_network": ("series", ("net",)),
    "series_all_features": ("series", SERIES_FEATURES),
    "series_all_points": ("slice", SERIES_RANK_FEATURES),
    "series": ("series", SERIES_RANK_FEATURES),
}
#: Scan modes: (points the network scores, right-angle turns averaged, points refined) as scan and scan_series use.
MODES = {"slice": (None, 4, REFINE_TOP), "series": (SERIES_NET_POINTS, SERIES_ROTATIONS, SERIES_REFINE_TOP)}


@dataclass
class Region:
    """A reader-outlined nodule on one slice: centre (row, col) and radius in px; ``truth`` when confirmed."""

    centre: np.ndarray
    radius_px: float
    truth: int | None  # index into the confirmed nodules, None for a one-reader nodule


@dataclass
class SeriesData:
    patient_id: str
    spacing_mm: float
    n_slices: int
    regions: list[list[Region]]  # per slice
    nodules: list[dict]  # confirmed: patient, central slice, centre (row, col), diameter
    tables: dict[str, list[dict]]  # mode -> per slice candidate table
    seconds: dict[str, list[float]]  # mode -> per slice scan seconds


def load_series_data(finder: Finder, root: Path | None = None, progress: bool = True) -> list[SeriesData]:
    """Scan every slice of each DICOM series in both modes and collect the readers' nodules."""
    from lungviz.data.dicom import find_nodules, read_patient

    root = root or paths.lidc_dicom_dir()
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        series, marks, _ = read_patient(folder)
        nodules, _ = find_nodules(series, marks)
        sp = float(np.mean(series[0].pixel_spacing_mm))
        zs = np.array([s.z_mm for s in series])
        gap = float(np.median(np.diff(zs))) if len(zs) > 1 else 2.5
        vol = np.stack([np.maximum(s.hu, -1024.0) for s in series]).astype(np.float32)
        vol_u = contrast_units(vol, True)
        regions: list[list[Region]] = [[] for _ in series]
        confirmed = []
        for nd in nodules:
            truth = None
            if nd.n_readers >= 2:
                truth = len(confirmed)
                med = np.median(np.array([g.centroid_rck for g in nd.marks]), axis=0)
                confirmed.append({"patient_id": folder.name, "slice_index": int(round(med[2])),
                                  "centre_rc": [float(med[0]), float(med[1])], "n_readers": nd.n_readers,
                                  "diameter_mm": round(float(nd.diameter_mm), 1)})
            for j, k in enumerate(nd.slice_indices):
                px = np.argwhere(nd.counts[j] > 0)
                regions[k].append(Region(px.mean(axis=0), float(np.sqrt(len(px) / np.pi)), truth))
        tables: dict[str, list[dict]] = {m: [] for m in MODES}
        secs: dict[str, list[float]] = {m: [] for m in MODES}
        for k in tqdm(range(len(series)), desc=folder.name, unit="slice", disable=not progress, leave=False):
            t_lung = time.perf_counter()
            lung = lung_mask(vol[k], True, sp)
            t_lung = time.perf_counter() - t_lung
            for mode, (net_points, rotations, refine_top) in MODES.items():
                t0 = time.perf_counter()
                table, _ = (candidate_table(finder, vol[k], True, sp, lung, SeriesContext(vol_u, k, gap),
                                            net_points, rotations, refine_top) if lung.any() else
                            ({"rc": np.zeros((0, 2)), **{n: np.zeros(0) for n in SERIES_FEATURES}}, 0))
                secs[mode].append(time.perf_counter() - t0 + t_lung)
                tables[mode].append(table)
        out.append(SeriesData(folder.name, sp, len(series), regions, confirmed, tables, secs))
    return out


def point_labels(table: dict, regions: list[Region], sp: float) -> np.ndarray:
    """Per candidate point: 1 within 5 mm of a confirmed nodule's centre on this slice, 0 when false, -1 ignored."""
    rc = np.asarray(table["rc"]).reshape(-1, 2)
    lab = np.zeros(len(rc), int)
    for reg in regions:
        d = np.hypot(*(rc - reg.centre).T) * sp
        near = d <= max(HIT_MM, reg.radius_px * sp)
        lab[near & (lab == 0)] = -1
        if reg.truth is not None:
            lab[d <= HIT_MM] = 1
    return lab


def _is_false(c: Candidate, regions: list[Region], sp: float) -> bool:
    return all(np.hypot(c.y - r.centre[0], c.x - r.centre[1]) * sp > max(HIT_MM, r.radius_px * sp) for r in regions)


def _on_confirmed(c: Candidate, regions: list[Region], sp: float, truth: int | None = None) -> bool:
    """The candidate lies on a confirmed nodule of its slice (on confirmed nodule ``truth`` when given)."""
    return any((r.truth is not None if truth is None else r.truth == truth)
               and np.hypot(c.y - r.centre[0], c.x - r.centre[1]) * sp <= max(HIT_MM, r.radius_px * sp)
               for r in regions)


def fit_ranker(data: list[SeriesData], mode: str, features: tuple[str, ...]) -> Ranker:
    """A balanced, L2-regularised logistic model on the candidate points of ``data``; threshold for
    :data:`TARGET_FP_PER_SLICE` on the same series."""
    from sklearn.linear_model import LogisticRegression

    xs, ys = [], []
    for sd in data:
        for table, regions in zip(sd.tables[mode], sd.regions, strict=True):
            if len(table["net"]) == 0:
                continue
            lab = point_labels(table, regions, sd.spacing_mm)
            xs.append(feature_matrix(table, features)[lab >= 0])
            ys.append(lab[lab >= 0])
    x, y = np.concatenate(xs), np.concatenate(ys)
    mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    lr = LogisticRegression(C=0.3, class_weight="balanced", max_iter=2000).fit((x - mean) / std, y)
    ranker = Ranker(features, mean, std, lr.coef_[0].astype(float), float(lr.intercept_[0]))
    ranker.threshold = operating_threshold(data, mode, ranker)
    return ranker


def _scored(sd: SeriesData, mode: str, k: int, ranker: Ranker | None) -> list[Candidate]:
    table = sd.tables[mode][k]
    if len(table["net"]) == 0:
        return []
    score = ranker.log_odds(table) if ranker is not None else np.asarray(table["net"], float)
    return select(table, score, sd.spacing_mm, True, TOP_K)


def operating_threshold(data: list[SeriesData], mode: str, ranker: Ranker) -> float:
    """The lowest probability threshold whose false candidates per slice (all slices of ``data``) are at most
    :data:`TARGET_FP_PER_SLICE`."""
    false_scores, n = [], 0
    for sd in data:
        for k in range(sd.n_slices):
            n += 1
            false_scores += [c.score for c in _scored(sd, mode, k, ranker) if _is_false(c, sd.regions[k],
                                                                                        sd.spacing_mm)]
    s = np.sort(np.asarray(false_scores))[::-1]
    allowed = int(np.floor(TARGET_FP_PER_SLICE * n))
    return float(np.nextafter(s[allowed], 1.0)) if allowed < len(s) else 0.0


def froc(hit_scores: list[float | None], false_scores: list[float], n_slices: int) -> dict[str, float]:
    """Sensitivity at each :data:`FROC_RATES` false candidates per slice: the best sensitivity over thresholds
    with at most that many false candidates per slice. ``hit_scores``: per nodule, its best hit's score."""
    hits = np.array([h if h is not None else -np.inf for h in hit_scores])
    fs = np.sort(np.asarray(false_scores, float))[::-1]
    out = {}
    for rate in FROC_RATES:
        allowed = int(np.floor(rate * n_slices))
        thr = fs[allowed] if allowed < len(fs) else -np.inf  # scores strictly above thr are allowed
        out[f"{rate:g}"] = float(np.mean(hits > thr)) if len(hits) else 0.0
    return out


def evaluate_variant(data: list[SeriesData], mode: str, features: tuple[str, ...] | None) -> dict:
    """Leave-one-series-out figures of one ranker variant (``features`` None = the network's score alone)."""
    rows, central_false, all_false, all_false_thr, hit_scores = [], [], [], [], []
    # each (confirmed nodule, slice it is outlined on): is the slice's best candidate on it? (A slice showing two
    # confirmed nodules counts twice, and only one of them can be best.)
    outlined_hits: list[bool] = []
    per_series: dict[str, dict] = {}
    n_all = 0
    for i, sd in enumerate(data):
        rest = [d for j, d in enumerate(data) if j != i]
        ranker = fit_ranker(rest, mode, features) if features else None
        thr = ranker.threshold if ranker is not None else 0.5
        first_row, first_outlined, first_false = len(rows), len(outlined_hits), len(all_false_thr)
        for k in range(sd.n_slices):
            n_all += 1
            cands = _scored(sd, mode, k, ranker)
            fal = [c.score for c in cands if _is_false(c, sd.regions[k], sd.spacing_mm)]
            all_false += fal
            all_false_thr.append(sum(s >= thr for s in fal))
            outlined_hits += [bool(cands) and _on_confirmed(cands[0], [reg], sd.spacing_mm)
                              for reg in sd.regions[k] if reg.truth is not None]
        for nd in sd.nodules:
            k = nd["slice_index"]
            cands = _scored(sd, mode, k, ranker)
            dist = [float(np.hypot(c.y - nd["centre_rc"][0], c.x - nd["centre_rc"][1]) * sd.spacing_mm)
                    for c in cands]
            fal = [c.score for c in cands if _is_false(c, sd.regions[k], sd.spacing_mm)]
            central_false += fal
            hit = next((j for j, d in enumerate(dist) if d <= HIT_MM), None)
            on_nodule = bool(cands) and _on_confirmed(cands[0], sd.regions[k], sd.spacing_mm)
            hit_scores.append(cands[hit].score if hit is not None else None)
            rows.append({"patient_id": sd.patient_id, "slice_index": k, "diameter_mm": nd["diameter_mm"],
                         "n_readers": nd["n_readers"], "best_distance_mm": round(dist[0], 1) if dist else None,
                         "rank_within_5mm": hit + 1 if hit is not None else None,
                         "best_on_a_confirmed_nodule": on_nodule,
                         "hit_above_threshold": bool(hit is not None and cands[hit].score >= thr),
                         "false_candidates_above_threshold": int(sum(s >= thr for s in fal)),
                         "threshold": round(thr, 4)})
        mine, seen = rows[first_row:], outlined_hits[first_outlined:]
        per_series[sd.patient_id] = {
            "n_nodules": len(mine), "n_best_within_5mm": sum(r["rank_within_5mm"] == 1 for r in mine),
            "n_outlined_slices": len(seen), "n_outlined_best_on_nodule": int(sum(seen)),
            "n_slices": sd.n_slices, "false_above_threshold": int(sum(all_false_thr[first_false:]))}
    n = len(rows)
    return {
        "n_nodules": n,
        "best_within_5mm": float(np.mean([r["rank_within_5mm"] == 1 for r in rows])) if n else None,
        "top3_within_5mm": float(np.mean([(r["rank_within_5mm"] or 99) <= 3 for r in rows])) if n else None,
        # looser: the best candidate lies on a confirmed nodule of the slice (this one off-centre, or another)
        "best_on_a_confirmed_nodule": float(np.mean([r["best_on_a_confirmed_nodule"] for r in rows])) if n else None,
        "sensitivity_at_threshold": float(np.mean([r["hit_above_threshold"] for r in rows])) if n else None,
        "false_per_slice_nodule_slices": float(np.mean([r["false_candidates_above_threshold"] for r in rows]))
        if n else None,
        "false_per_slice_all_slices": float(np.mean(all_false_thr)) if all_false_thr else None,
        # a larger, less noisy sample than the central slices: each outlined slice of each confirmed nodule
        "outlined_slices_best_on_nodule": float(np.mean(outlined_hits)) if outlined_hits else None,
        "n_outlined_slices": len(outlined_hits),
        "froc_nodule_slices": froc(hit_scores, central_false, n),
        "froc_all_slices": froc(hit_scores, all_false, n_all),
        "n_slices_all": n_all,
        "per_series": per_series,  # counts, so that folds or series can be pooled
        "nodules": rows,
    }


def series_opening(data: list[SeriesData], mode: str, features: tuple[str, ...]) -> dict:
    """Leave-one-series-out, each series (here a slab of slices around its nodules) as the app opens it: the
    candidates of every slice (as many as a series scan keeps) followed over consecutive slices
    (:func:`lungviz.inference.finder.series_findings`), best first.
    Per series: whether the first finding lies on a confirmed nodule; per confirmed nodule: how many false findings
    rank above the first finding on it (findings on other nodules, confirmed or not, are not counted)."""
    series, nodules = [], []
    for i, sd in enumerate(data):
        ranker = fit_ranker([d for j, d in enumerate(data) if j != i], mode, features)
        per = []
        for k in range(sd.n_slices):
            table = sd.tables[mode][k]
            per.append(select(table, ranker.log_odds(table), sd.spacing_mm, True, SERIES_TOP_K)
                       if len(table["net"]) else [])
        found = series_findings(per, sd.spacing_mm)
        false = [_is_false(f.candidate, sd.regions[f.slice_index], sd.spacing_mm) for f in found]
        confirmed = [_on_confirmed(f.candidate, sd.regions[f.slice_index], sd.spacing_mm) for f in found]
        series.append({"patient_id": sd.patient_id, "n_findings": len(found),
                       "opens_on_a_confirmed_nodule": bool(found) and confirmed[0],
                       "false_findings_before_a_confirmed_nodule": next(
                           (int(sum(false[:j])) for j, hit in enumerate(confirmed) if hit), None)})
        for t, nd in enumerate(sd.nodules):
            j = next((j for j, f in enumerate(found)
                      if _on_confirmed(f.candidate, sd.regions[f.slice_index], sd.spacing_mm, t)), None)
            nodules.append({"patient_id": sd.patient_id, "slice_index": nd["slice_index"],
                            "diameter_mm": nd["diameter_mm"], "position": j + 1 if j is not None else None,
                            "false_findings_before": int(sum(false[:j])) if j is not None else None})
    ahead = [n["false_findings_before"] for n in nodules]
    return {"series": series, "nodules": nodules,
            "opens_on_a_confirmed_nodule": int(sum(s["opens_on_a_confirmed_nodule"] for s in series)),
            "n_series": len(series), "n_nodules": len(nodules),
            "nodules_with_no_false_finding_before": int(sum(a == 0 for a in ahead)),
            "nodules_with_at_most_2_false_findings_before": int(sum(a is not None and a <= 2 for a in ahead)),
            "listed_findings": LISTED_FINDINGS,
            "nodules_listed": int(sum(n["position"] is not None and n["position"] <= LISTED_FINDINGS
                                      for n in nodules))}


def wholeslice_report(finder: Finder, out: Path, progress: bool = True) -> dict:
    """Scan the DICOM series, judge every ranker variant leave-one-series-out, ship rankers fitted on all series.

    Writes ``finder-rank.json`` into ``out``; returns the ``wholeslice`` block of ``finder.json``."""
    import json

    t0 = time.perf_counter()
    data = load_series_data(finder, progress=progress)
    variants = {name: evaluate_variant(data, mode, feats) for name, (mode, feats) in VARIANTS.items()}
    rankers = {"slice": fit_ranker(data, "slice", SLICE_RANK_FEATURES),
               "series": fit_ranker(data, "series", SERIES_RANK_FEATURES)}
    (out / f"{RANK}.json").write_text(json.dumps({
        "rankers": {k: r.to_dict() for k, r in rankers.items()},
        "fitted_on": [sd.patient_id for sd in data],
        "target_false_per_slice": TARGET_FP_PER_SLICE,
        "note": "logistic models over candidate features; fitted by python -m training finder --only wholeslice",
    }, indent=1))
    secs = {m: [s for sd in data for s in sd.seconds[m]] for m in MODES}
    return {
        "series": [{"patient_id": sd.patient_id, "n_slices": sd.n_slices, "confirmed_nodules": len(sd.nodules)}
                   for sd in data],
        "protocol": "leave-one-series-out: each series ranked by a model and threshold fitted on the others",
        "hit_mm": HIT_MM, "target_false_per_slice": TARGET_FP_PER_SLICE, "top_k": TOP_K,
        "variants": variants,
        "series_opening": series_opening(data, *VARIANTS["series"]),
        "shipped": {"slice": "slice", "series": "series"},
        "seconds_per_slice": {m: float(np.median(v)) for m, v in secs.items()},
        "seconds_per_slice_max": {m: float(np.max(v)) for m, v in secs.items()},
        "total_seconds": time.perf_counter() - t0,
    }
