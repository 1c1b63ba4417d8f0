"""CSV manifests of (whole-slice image, nodule-crop image, malignancy 1-5, patient id) pairs -> case records.

This is the format of the published full-slice / nodule-crop studies. Required columns:
``slice_path``, ``nodule_path``, ``malignancy``, ``patient_id``; optional ``nodule_id`` and
``pixel_spacing_mm``. Relative paths are resolved against the manifest's folder.
"""

from __future__ import annotations

import csv
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
        with path.open(newline="", encoding="utf-8") as fh:
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
    cases: list[Case] = []
    skipped: list[tuple[str, str]] = []
    counts: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        where = f"line {line}"
        pid = (row["patient_id"] or "").strip()
        if not pid:
            skipped.append((where, "no patient id"))
            continue
        try:
            score = int(float(row["malignancy"]))
        except (TypeError, ValueError):
            skipped.append((where, f"malignancy '{row['malignancy']}' is not a number 1-5"))
            continue
        if not 1 <= score <= 5:
            skipped.append((where, f"malignancy {score} is outside 1-5"))
            continue
        slice_p = (path.parent / row["slice_path"].strip()).resolve()
        nodule_p = (path.parent / row["nodule_path"].strip()).resolve()
        absent = [p for p in (slice_p, nodule_p) if check_files and not p.is_file()]
        if absent:
            skipped.append((where, f"file not found: {absent[0]}"))
            continue
        counts[pid] = counts.get(pid, 0) + 1
        nid = (row.get("nodule_id") or "").strip() or f"pair-{counts[pid] - 1}"
        spacing = (row.get("pixel_spacing_mm") or "").strip()
        cases.append(Case(patient_id=pid, nodule_id=nid, source="manifest", image_paths=(slice_p,),
                          crop_paths=(nodule_p,), reader_scores=(score,), n_readers=1,
                          malignancy_median=float(score), malignancy=score,
                          pixel_spacing_mm=float(spacing) if spacing else None))
    return cases, ImportReport(len(cases), tuple(skipped))
