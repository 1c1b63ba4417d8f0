"""The browsable case library: the similar-case index's records, their images in the data folder, filters and
what the app shows about each case (split, readers, characteristics, the readers' outline).

A record is one row of the index metadata (:func:`lungviz.retrieval.load_index`): ``case_id``, ``split``,
``malignancy`` (panel score), ``malignant``, ``reader_scores``, ``diameter_mm``, ``images`` (paths relative to the
``lidc-slices`` folder), ``middle_index`` ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from skimage.segmentation import find_boundaries

from lungviz import paths
from lungviz.atlas import Atlas
from lungviz.data.io import load_gray
from lungviz.data.preprocess import resize
from lungviz.errors import LungvizError
from lungviz.present.report import reader_spread

#: What each split means for a library case, in the words the app uses.
SPLIT_NOTES = {
    "train": "Train case: seen by the model during training, so its prediction here is optimistic.",
    "val": "Validation case: used for early stopping, calibration and fitting the estimate's factor weights, so "
           "its estimates are not an independent test (the networks' weights were not fitted on it).",
    "test": "Test case: held out, never seen in training (the model card's figures come from these).",
}


def patient_split(patient_id: str, split_file: Path | None = None) -> str | None:
    """The split a patient is in (default split file: the shipped holdout), or None when it is not listed or the
    split file is missing."""
    from lungviz.data.splits import Split

    with contextlib.suppress(LungvizError):
        return Split.load(split_file or paths.weights_dir() / "splits" / "holdout.json").assignment.get(patient_id)
    return None


def series_split(series_uid: str, data_root: Path | None = None, split_file: Path | None = None
                 ) -> tuple[str, str] | None:
    """``(patient_id, split)`` of an uploaded DICOM series that is one of the library's LIDC scans (matched on the
    SeriesInstanceUID in ``lidc-slices/labels.csv``), or None when it is not, or the labels or split are missing."""
    from lungviz.data.lidc import read_labels

    if not series_uid:
        return None
    try:
        rows = read_labels((Path(data_root) if data_root else paths.data_dir()) / "lidc-slices" / "labels.csv")
    except LungvizError:
        return None
    patient = next((r["patient_id"] for r in rows if (r.get("series_uid") or "").strip() == series_uid), None)
    split = patient_split(patient, split_file) if patient else None
    return (patient, split) if patient and split else None


def series_split_note(patient_id: str, split: str) -> str:
    """What an upload of one of the library's own scans means for its estimate."""
    return {
        "train": f"This series is {patient_id}, a patient the models were trained on: the estimate, the maps and the "
                 "similar cases are optimistic and are not a test of the models.",
        "val": f"This series is {patient_id}, a validation patient (used to stop training and to calibrate): the "
               "estimate is not a fully independent test.",
        "test": f"This series is {patient_id}, a held-out test patient: the models never saw it.",
    }.get(split, f"This series is {patient_id} of the case library ({split} split).")


#: LIDC reader rating scales for the characteristics (panel medians are shown against them).
CHARACTERISTIC_SCALES = {
    "subtlety": "1 extremely subtle … 5 obvious",
    "internalStructure": "1 soft tissue, 2 fluid, 3 fat, 4 air",
    "calcification": "1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central, 6 absent",
    "sphericity": "1 linear … 3 ovoid … 5 round",
    "margin": "1 poorly defined … 5 sharp",
    "lobulation": "1 none … 5 marked",
    "spiculation": "1 none … 5 marked",
    "texture": "1 non-solid (ground glass) … 3 part solid … 5 solid",
}


def record_image_path(record: Mapping, slice_index: int | None = None, root: Path | None = None) -> Path:
    """Path of one slice image of a record (default: its middle slice) in the ``lidc-slices`` folder."""
    images = list(record.get("images") or [])
    if not images:
        raise LungvizError(f"the library record {record.get('case_id', '?')} lists no images.")
    i = int(record.get("middle_index", len(images) // 2)) if slice_index is None else int(slice_index)
    if not 0 <= i < len(images):
        raise LungvizError(f"slice {i} does not exist; case {record.get('case_id', '?')} has {len(images)} slices.")
    return (Path(root) if root else paths.lidc_slices_dir()) / images[i]


def thumbnail(record: Mapping, root: Path | None = None) -> np.ndarray | None:
    """The record's middle slice ``(H, W) float32 in [0, 1]``, or None when the data folder lacks it."""
    try:
        return load_gray(record_image_path(record, root=root))
    except LungvizError:
        return None


#: Where a case's picture came from: its middle slice in the data folder, or the thumbnail atlas shipped with the
#: index (the nodule view, small), in the words the app shows under it.
PICTURE_SOURCES = {"data": "middle slice", "atlas": "nodule view (thumbnail atlas)"}
#: What of the case library needs the data folder, in one line for the page.
NEEDS_DATA_FOLDER = ("Full-size slices, every slice of a nodule, the readers' outlines, the models' maps and readings "
                     "of a case need the data folder (LUNGVIZ_DATA); the case list, the ratings and a small thumbnail "
                     "of each nodule come with the index.")


def case_picture(record: Mapping, root: Path | None = None, atlas: Atlas | None = None
                 ) -> tuple[np.ndarray | None, str | None]:
    """``(picture (H, W) float32 in [0, 1], source)``: the middle slice from the data folder when it is there, else
    the atlas's thumbnail (source ``"data"`` / ``"atlas"``); ``(None, None)`` when neither has it."""
    image = thumbnail(record, root)
    if image is not None:
        return image, "data"
    small = atlas.thumbnail(str(record.get("case_id"))) if atlas is not None else None
    return (small, "atlas") if small is not None else (None, None)


def slice_file_table(slices_root: Path | None = None) -> dict[str, str]:
    """SHA-1 of every slice image file in the ``lidc-slices`` folder -> its path relative to that folder (about 1 s
    for the 13,207 files; build once per server)."""
    import hashlib

    root = Path(slices_root) if slices_root else paths.lidc_slices_dir()
    return {hashlib.sha1(p.read_bytes()).hexdigest(): p.relative_to(root).as_posix()
            for p in sorted(root.glob("*/*/images/*")) if p.is_file()}


def library_slice_of(data: bytes, table: Mapping[str, str], split_file: Path | None = None
                     ) -> tuple[str, str, str | None] | None:
    """``(case_id, file name, split)`` when an uploaded file is, byte for byte, one of the library's slice images
    (split None when the split file does not list the patient); None otherwise."""
    import hashlib

    rel = table.get(hashlib.sha1(data).hexdigest())
    if rel is None:
        return None
    parts = rel.split("/")
    return f"{parts[0]}/{parts[1]}", parts[-1], patient_split(parts[0], split_file)


def slice_spacings(slices_root: Path | None = None) -> dict[str, float]:
    """Case id -> the pixel spacing (mm) its ``labels.csv`` row gives, for the rows with a valid one (unlabelled
    nodules too); empty when the file cannot be read."""
    from lungviz.data.lidc import read_labels
    from lungviz.data.preprocess import valid_spacing

    root = Path(slices_root) if slices_root else paths.lidc_slices_dir()
    try:
        rows = read_labels(root / "labels.csv")
    except LungvizError:
        return {}
    out = {}
    for r in rows:
        with contextlib.suppress(ValueError, TypeError):
            if (mm := valid_spacing(float(r.get("pixel_spacing_mm") or "nan"))) is not None:
                out[f"{r.get('patient_id')}/{r.get('nodule')}"] = mm
    return out


def diameter_range(records: Iterable[Mapping]) -> tuple[float, float]:
    """Smallest and largest diameter (mm) among the records that have one; ``(0, 0)`` when none does."""
    d = [float(r["diameter_mm"]) for r in records if r.get("diameter_mm") is not None]
    return (min(d), max(d)) if d else (0.0, 0.0)


def filter_records(
    records: Iterable[Mapping],
    *,
    scores: Sequence[int] | None = None,
    malignant: bool | None = None,
    splits: Sequence[str] | None = None,
    diameter_mm: tuple[float, float] | None = None,
    model_correct: bool | None = None,
    correct_by_case: Mapping[str, bool] | None = None,
) -> list[dict]:
    """The records matching every given filter (None = no filter).

    ``model_correct`` keeps cases whose reference test prediction (``correct_by_case``) was right (True) or wrong
    (False); cases without one (train and validation cases) are then left out.
    """
    out = []
    for r in records:
        if scores is not None and r.get("malignancy") not in set(scores):
            continue
        if malignant is not None and r.get("malignant") != int(malignant):
            continue
        if splits is not None and r.get("split") not in set(splits):
            continue
        if diameter_mm is not None:
            d = r.get("diameter_mm")
            if d is None or not diameter_mm[0] <= float(d) <= diameter_mm[1]:
                continue
        if model_correct is not None:
            got = (correct_by_case or {}).get(r.get("case_id"))
            if got is None or got != model_correct:
                continue
        out.append(dict(r))
    return out


def library_rows(records: Iterable[Mapping], correct_by_case: Mapping[str, bool] | None = None) -> list[dict]:
    """One display row per record (for a table), in the order given."""
    rows = []
    for r in records:
        verdict = (correct_by_case or {}).get(r.get("case_id"))
        d = r.get("diameter_mm")
        rows.append({
            "case": r.get("case_id"),
            "split": r.get("split"),
            "panel score": r.get("malignancy"),
            "panel": {1: "malignant", 0: "benign"}.get(r.get("malignant"), "-"),
            "reader scores": reader_spread(r.get("reader_scores")),
            "diameter (mm)": None if d is None else round(float(d), 1),
            "slices": r.get("n_slices"),
            "label check": r.get("label_check"),
            "model on test": "-" if verdict is None else ("correct" if verdict else "wrong"),
        })
    return rows


def characteristic_rows(characteristics: Mapping[str, float]) -> list[dict]:
    """The readers' characteristics (panel medians, as text: "5", "3.5") with the LIDC scale each is rated on."""
    return [{"characteristic": k, "panel median": f"{float(v):g}", "scale": CHARACTERISTIC_SCALES.get(k, "")}
            for k, v in characteristics.items()]


#: LIDC-IDRI scans were usually read by four radiologists.
MAX_LIDC_READERS = 4


def reader_count_note(n_readers: int | None) -> str | None:
    """What a nodule with more ratings than LIDC's usual four readers means (11 nodules of the slices set)."""
    if n_readers is None or int(n_readers) <= MAX_LIDC_READERS:
        return None
    return (f"{int(n_readers)} ratings, more than the {MAX_LIDC_READERS} readers of a usual LIDC scan: the source "
            "data attached more reader marks than that to this nodule. The panel score is the median of all of them.")


def label_check_note(label_check: str | None) -> str | None:
    """What a label check other than ``ok`` means for trusting the case's labels; None for ``ok`` or none."""
    if not label_check or label_check == "ok":
        return None
    if label_check == "zextent_mismatch":
        return ("Label check `zextent_mismatch`: this nodule's slices do not match the readers' outlined slices "
                "one for one, so its labels were attached to it less surely than usual.")
    return f"Label check `{label_check}`: the labels of this nodule were not attached as usual; read them with care."


def same_patient_cases(records: Sequence[Mapping], case_or_patient: str) -> set[str]:
    """The case ids of every library record of one patient, given a case id or a patient id (empty if unknown)."""
    patient = next((r.get("patient_id") for r in records if r.get("case_id") == case_or_patient), case_or_patient)
    return {str(r["case_id"]) for r in records if patient and r.get("patient_id") == patient}


def similar_cases(index, query: np.ndarray, k: int = 5, root: Path | None = None,
                  exclude: set[str] | None = None, atlas: Atlas | None = None) -> list[dict]:
    """The ``k`` library cases nearest a ``(D,)`` query embedding, most similar first: each record with
    ``similarity``, ``thumbnail`` (:func:`case_picture`: the data folder's middle slice, else the atlas's; None when
    neither has it) and ``thumbnail_source`` added."""
    hits = index.search(np.asarray(query, np.float32)[None], k, exclude)[0]
    out = []
    for sim, rec in hits:
        picture, source = case_picture(rec, root, atlas)
        out.append({**rec, "similarity": float(sim), "thumbnail": picture, "thumbnail_source": source})
    return out


def mask_outline(image: np.ndarray, mask: np.ndarray, threshold: float = 0.5,
                 color: tuple[int, int, int] = (255, 215, 0)) -> np.ndarray:
    """The readers' outline (mask >= ``threshold``, e.g. half the readers) drawn on an image -> ``(H, W, 3) uint8``.

    ``image``: ``(H, W)`` grey in [0, 1] or ``(H, W, 3) uint8`` (an overlay); ``mask``: ``(h, w)`` reader fraction,
    resized to the image when the sizes differ.
    """
    img = np.asarray(image)
    if img.ndim == 2:
        rgb = np.repeat(np.round(np.clip(img.astype(np.float32), 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 3:
        rgb = img.astype(np.uint8).copy()
    else:
        raise LungvizError(f"the image has shape {tuple(img.shape)}; a grey or RGB image is expected.")
    m = np.asarray(mask, np.float32)
    if m.ndim != 2 or m.size == 0:
        raise LungvizError(f"the mask has shape {tuple(m.shape)}; a 2D mask is expected.")
    if m.shape != rgb.shape[:2]:
        m = resize(m, rgb.shape[:2])
    inside = m >= threshold
    rgb[find_boundaries(inside, mode="inner") & inside] = np.asarray(color, np.uint8)
    return rgb
