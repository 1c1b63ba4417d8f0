"""CSV manifests of (whole-slice image, nodule-crop image, malignancy 1-5, patient id) pairs -> case records.

This is the format of the published full-slice / nodule-crop studies. Required columns:
``slice_path``, ``nodule_path``, ``malignancy``, ``patient_id``; optional ``nodule_id`` and
``pixel_spacing_mm``. Relative paths are resolved against the manifest's folder.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from lungviz.cases import Case, ImportReport
from lungviz.errors import LungvizError

MANIFEST_COLUMNS = ("slice_path", "nodule_path", "malignancy", "patient_id")


def import_manifest(path: Path, check_files: bool = True) -> tuple[list[Case], ImportReport]:
    """Read a pairs manifest; rows with missing files or bad scores are skipped with their reason."""
    path = Path(path)
    if not path.is_file():
        raise LungvizError("the manifest file was not found.", source=path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: a spreadsheet's BOM is no column
            reader = csv.DictReader(fh)
            missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise LungvizError(
                    f"the manifest lacks the column(s) {', '.join(missing)}; expected {', '.join(MANIFEST_COLUMNS)}.",
                    source=path,
                )
            rows = list(reader)
    except UnicodeDecodeError as err:
        raise LungvizError("the manifest is not a text CSV file.", source=path) from err
    except csv.Error as err:
        raise LungvizError(f"the manifest is not valid CSV ({err}).", source=path) from err
    cases: list[Case] = []
    skipped: list[tuple[str, str]] = []
    counts: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        where = f"line {line}"
        cell = {k: (row.get(k) or "").strip() for k in (*MANIFEST_COLUMNS, "nodule_id", "pixel_spacing_mm")}
        pid = cell["patient_id"]
        if not pid:
            skipped.append((where, "no patient id"))
            continue
        try:
            score_f = float(cell["malignancy"])
        except ValueError:
            score_f = float("nan")
        if not score_f.is_integer():  # NaN, inf and 3.5 are not panel scores
            skipped.append((where, f"malignancy '{cell['malignancy']}' is not a whole number 1-5"))
            continue
        score = int(score_f)
        if not 1 <= score <= 5:
            skipped.append((where, f"malignancy {score} is outside 1-5"))
            continue
        try:
            spacing = float(cell["pixel_spacing_mm"]) if cell["pixel_spacing_mm"] else None
        except ValueError:
            spacing = float("nan")
        if spacing is not None and not (math.isfinite(spacing) and spacing > 0):
            skipped.append((where, f"pixel_spacing_mm '{cell['pixel_spacing_mm']}' is not a positive number"))
            continue
        empty = [k for k in ("slice_path", "nodule_path") if not cell[k]]
        if empty:
            skipped.append((where, f"no {empty[0]}"))
            continue
        slice_p = (path.parent / cell["slice_path"]).resolve()
        nodule_p = (path.parent / cell["nodule_path"]).resolve()
        absent = [p for p in (slice_p, nodule_p) if check_files and not p.is_file()]
        if absent:
            skipped.append((where, f"file not found: {absent[0]}"))
            continue
        counts[pid] = counts.get(pid, 0) + 1
        nid = cell["nodule_id"] or f"pair-{counts[pid] - 1}"
        cases.append(Case(patient_id=pid, nodule_id=nid, source="manifest", image_paths=(slice_p,),
                          crop_paths=(nodule_p,), reader_scores=(score,), n_readers=1,
                          malignancy_median=float(score), malignancy=score, pixel_spacing_mm=spacing))
    return cases, ImportReport(len(cases), tuple(skipped))
