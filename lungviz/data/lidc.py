"""The LIDC-IDRI-slices layout (``labels.csv`` + per-nodule ``images/`` and masks) -> case records.

Masks may be the merged ``consensus/`` reader-count maps or the original per-reader ``mask-0..N``
folders. Rows marked ``unmatched`` carry no labels and are skipped and counted. The DICOM + reader-XML
path lives in :mod:`lungviz.data.dicom`.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from lungviz.data.cases import CHARACTERISTICS, Case, ImportReport, panel_median, round_half_up
from lungviz.errors import LungvizError

REQUIRED_COLUMNS = ("patient_id", "nodule", "n_readers", "malignancy_readers")
_SLICE_RE = re.compile(r"slice-(\d+)\.(png|jpg|jpeg|tif|tiff|npy)$", re.IGNORECASE)
_READER_DIR_RE = re.compile(r"mask-(\d+)$")


def _slice_files(folder: Path) -> list[Path]:
    """Files ``slice-N.*`` of a folder, ordered by N (numerically, so slice-10 follows slice-9)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _SLICE_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def _float(row: dict, key: str) -> float | None:
    value = (row.get(key) or "").strip()
    if value == "" or value.lower() == "nan":
        return None
    try:
        return float(value)
    except ValueError as err:
        raise LungvizError(f"column '{key}' holds '{value}', which is not a number.") from err


def read_labels(labels_csv: Path) -> list[dict[str, str]]:
    """Read ``labels.csv`` rows, checking the required columns are present."""
    if not labels_csv.is_file():
        raise LungvizError("the labels file was not found.", source=labels_csv)
    try:
        with labels_csv.open(newline="", encoding="utf-8-sig") as fh:  # -sig: a spreadsheet's BOM is no column
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise LungvizError(
                    f"the labels file lacks the column(s) {', '.join(missing)}; "
                    f"expected at least {', '.join(REQUIRED_COLUMNS)}.",
                    source=labels_csv,
                )
            return list(reader)
    except UnicodeDecodeError as err:
        raise LungvizError("the labels file is not a text CSV file.", source=labels_csv) from err
    except csv.Error as err:
        raise LungvizError(f"the labels file is not valid CSV ({err}).", source=labels_csv) from err


def _reader_characteristics(row: dict[str, str], n_scores: int, where: str) -> tuple[dict[str, float], ...]:
    """Each reader's characteristics from the ``<characteristic>_readers`` columns (same reader order as
    ``malignancy_readers``); () when the file has none of them."""
    per_reader: list[dict[str, float]] = [{} for _ in range(n_scores)]
    found = False
    for k in CHARACTERISTICS:
        text = (row.get(f"{k}_readers") or "").split()
        if not text:
            continue
        try:
            values = [float(v) for v in text]
        except ValueError:
            values = []
        if len(values) != n_scores or not all(np.isfinite(values)):
            raise LungvizError(f"{k}_readers is '{row.get(f'{k}_readers')}'; expected one rating per reader of "
                               "malignancy_readers, separated by spaces.", source=where)
        found = True
        for reader, v in zip(per_reader, values, strict=True):
            reader[k] = v
    return tuple(per_reader) if found else ()


def _case_from_row(root: Path, row: dict[str, str], line: int) -> Case:
    pid, nod = row["patient_id"].strip(), row["nodule"].strip()
    folder = root / pid / nod
    where = f"{root / 'labels.csv'} line {line}"
    images = _slice_files(folder / "images")
    if not images:
        raise LungvizError(f"no slice images in {folder / 'images'}.", source=where)
    n_readers_f = _float(row, "n_readers")
    if n_readers_f is not None and not (n_readers_f >= 0 and n_readers_f.is_integer()):
        raise LungvizError(f"n_readers is '{row['n_readers']}', not a number of readers.", source=where)
    n_readers = int(n_readers_f or 0)
    consensus = _slice_files(folder / "consensus")
    reader_dirs = sorted(
        (d for d in folder.iterdir() if d.is_dir() and _READER_DIR_RE.match(d.name)), key=lambda d: int(d.name[5:])
    )
    reader_masks = tuple(tuple(_slice_files(d)) for d in reader_dirs)
    if consensus and len(consensus) != len(images):
        raise LungvizError(f"{len(images)} images but {len(consensus)} consensus masks.", source=folder)
    for d, masks in zip(reader_dirs, reader_masks, strict=False):
        if len(masks) != len(images):
            raise LungvizError(f"{len(images)} images but {len(masks)} masks in {d.name}.", source=folder)
    score_text = (row.get("malignancy_readers") or "").split()
    if not all(s.isdigit() and 1 <= int(s) <= 5 for s in score_text):
        raise LungvizError(
            f"malignancy_readers is '{row.get('malignancy_readers')}'; expected reader scores 1-5 separated by spaces.",
            source=where,
        )
    scores = tuple(int(s) for s in score_text)
    median = _float(row, "malignancy_median")
    if median is None:
        median = panel_median(scores)
    score_col = _float(row, "malignancy")
    malignancy = int(score_col) if score_col is not None else (round_half_up(median) if median is not None else None)
    chars = {k: v for k in CHARACTERISTICS if (v := _float(row, f"{k}_median")) is not None}
    return Case(
        reader_characteristics=_reader_characteristics(row, len(scores), where),
        patient_id=pid,
        nodule_id=nod,
        source="lidc-slices",
        image_paths=tuple(images),
        mask_paths=tuple(consensus),
        mask_mode="consensus" if consensus else "per-reader",
        reader_mask_paths=() if consensus else reader_masks,
        n_readers=n_readers or len(reader_masks),
        reader_scores=scores,
        characteristics=chars,
        malignancy_median=median,
        malignancy=malignancy,
        diameter_mm=_float(row, "diameter_mm"),
        volume_mm3=_float(row, "volume_mm3"),
        pixel_spacing_mm=_float(row, "pixel_spacing_mm"),
        slice_thickness_mm=_float(row, "slice_thickness_mm"),
        label_check=(row.get("label_check") or "ok").strip(),
        extra={
            "centroid_ijk": tuple(_float(row, f"centroid_{a}") for a in "ijk"),
            "series_uid": (row.get("series_uid") or "").strip(),
        },
    )


def import_slices(root: Path, strict: bool = False) -> tuple[list[Case], ImportReport]:
    """Import every labelled nodule of a folder in the LIDC-IDRI-slices layout.

    Rows marked ``unmatched`` (no labels) are skipped and counted; nodules whose images are missing
    are skipped with the reason (or raise when ``strict``). Returns the cases and what was skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise LungvizError("the slices folder was not found.", source=root)
    rows = read_labels(root / "labels.csv")
    cases: list[Case] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        key = f"{row.get('patient_id', '?')}/{row.get('nodule', '?')}"
        if key in seen:  # a nodule listed twice would count twice in every figure
            skipped.append((key, "listed again in labels.csv (the first row is used)"))
            continue
        seen.add(key)
        if (row.get("label_check") or "").strip() == "unmatched" or not (row.get("malignancy_readers") or "").strip():
            skipped.append((key, "unmatched (no reader labels)"))
            continue
        try:
            cases.append(_case_from_row(root, row, line))
        except LungvizError as err:
            if strict:
                if err.source is None:  # e.g. a non-numeric column: say which line
                    raise LungvizError(err.message, source=f"{root / 'labels.csv'} line {line}") from err
                raise
            skipped.append((key, err.message))
    return cases, ImportReport(len(cases), tuple(skipped))


def load_case(root: Path, case_id: str) -> Case:
    """One labelled nodule (``"patient/nodule"``) of a slices-layout folder, without importing the others."""
    root = Path(root)
    patient, _, nodule = str(case_id).partition("/")
    for line, row in enumerate(read_labels(root / "labels.csv"), start=2):
        if row.get("patient_id", "").strip() == patient and row.get("nodule", "").strip() == nodule:
            unlabelled = not (row.get("malignancy_readers") or "").strip()
            if (row.get("label_check") or "").strip() == "unmatched" or unlabelled:
                raise LungvizError(f"case {case_id} has no reader labels.", source=root)
            return _case_from_row(root, row, line)
    raise LungvizError(f"case {case_id} is not in the library's labels file.", source=root)
