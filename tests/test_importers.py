"""Importers: the LIDC slices layout (synthetic and real) and folder-per-class sets."""

from __future__ import annotations

import math
import os
import re
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import READER_MASKS, SIDE, label_row, write_labels, write_png

from lungviz.data.cases import data_fingerprint, round_half_up
from lungviz.data.histology import import_class_folders, normalise_class_name
from lungviz.data.labels import HISTOLOGY_CLASSES
from lungviz.data.lidc import import_slices, read_labels
from lungviz.errors import LungvizError

# ================================================================================================ LIDC (synthetic)


def _by_id(cases):
    return {c.case_id: c for c in cases}


def test_import_slices_synthetic_counts_and_skips(slices_tree):
    cases, report = import_slices(slices_tree)
    assert sorted(c.case_id for c in cases) == ["P-0001/nodule-0", "P-0001/nodule-1", "P-0002/nodule-0"]
    assert report.n_cases == 3 and report.n_skipped == 2
    reasons = dict(report.skipped)
    assert reasons["P-0003/nodule-0"] == "unmatched (no reader labels)"
    assert "no slice images" in reasons["P-0004/nodule-0"]
    assert report.summary().startswith("3 cases imported, 2 skipped")


def test_import_slices_orders_slices_numerically(slices_tree):
    case = _by_id(import_slices(slices_tree)[0])["P-0001/nodule-0"]
    assert [p.name for p in case.image_paths] == [f"slice-{i}.png" for i in range(11)]  # slice-10 after slice-9
    slices = case.load_slices()
    assert slices.shape == (11, SIDE, SIDE) and slices.dtype == np.float32
    np.testing.assert_allclose(slices[:, 0, 0], np.arange(11) * 20 / 255.0, atol=1e-6)
    np.testing.assert_allclose(case.load_slice(10), 200 / 255.0, atol=1e-6)


def test_import_slices_labels(slices_tree):
    cases = _by_id(import_slices(slices_tree)[0])
    a = cases["P-0001/nodule-0"]
    assert a.reader_scores == (5, 4, 4, 3) and a.n_readers == 4
    assert a.malignancy_median == 4.0 and a.malignancy == 4 and a.malignant == 1
    assert a.characteristics == {"texture": 5.0}
    assert a.diameter_mm == 12.5 and a.pixel_spacing_mm == 0.7 and a.slice_thickness_mm == 2.5
    assert a.extra == {"centroid_ijk": (10.0, 11.0, 12.0), "series_uid": "1.2.3"}
    assert a.source == "lidc-slices" and a.label_check == "ok" and a.reader_spread == "3, 4, 4, 5"
    b = cases["P-0001/nodule-1"]
    assert b.malignancy == 2 and b.malignant == 0
    c = cases["P-0002/nodule-0"]  # median and score columns empty: derived from the readers (3, 4, 4)
    assert c.malignancy_median == 4.0 and c.malignancy == 4 and c.label_check == "zextent_mismatch"


def test_consensus_masks_are_reader_fractions(slices_tree):
    case = _by_id(import_slices(slices_tree)[0])["P-0001/nodule-0"]
    masks = case.load_masks()
    assert case.mask_mode == "consensus" and masks.shape == (11, SIDE, SIDE) and masks.dtype == np.float32
    assert masks[:, 8, 8].tolist() == [1.0] * 11  # all 4 readers
    assert masks[:, 8, 9].tolist() == [0.5] * 11  # 2 of 4
    assert masks.sum() == pytest.approx(11 * 1.5)


def test_per_reader_masks_equal_the_consensus_form(slices_tree):
    cases = _by_id(import_slices(slices_tree)[0])
    per_reader, consensus = cases["P-0001/nodule-1"], cases["P-0002/nodule-0"]
    assert per_reader.mask_mode == "per-reader" and len(per_reader.reader_mask_paths) == 3
    assert consensus.mask_mode == "consensus"
    expected = READER_MASKS.sum(axis=0) / 3.0
    np.testing.assert_allclose(per_reader.load_masks(), expected, atol=1e-6)
    np.testing.assert_allclose(consensus.load_masks(), expected, atol=1e-6)
    assert per_reader.middle_index() == 0  # reader 2 drew only on slice 0: the larger area


def test_import_slices_strict_raises_naming_the_line(slices_tree):
    with pytest.raises(LungvizError, match="no slice images") as info:
        import_slices(slices_tree, strict=True)
    assert "labels.csv line 6" in str(info.value)


def _tree_with(slices_tree: Path, **row_values) -> Path:
    """The synthetic tree with one extra row for P-0001/nodule-0's images under another name."""
    import shutil

    shutil.copytree(slices_tree / "P-0001" / "nodule-0", slices_tree / "P-0009" / "nodule-0")
    rows = [label_row(patient_id="P-0009", nodule="nodule-0", n_readers=4, malignancy_readers="4 4 4 4",
                      label_check="ok") | {k: str(v) for k, v in row_values.items()}]
    write_labels(slices_tree / "labels.csv", rows)
    return slices_tree


#: (row values, words in the skip reason) for rows that must be skipped, not crash the import
BAD_ROWS = [
    ({"malignancy_readers": "4 x"}, "malignancy_readers"),
    ({"malignancy_readers": "4 7"}, "malignancy_readers"),
    ({"n_readers": "four"}, "n_readers"),
    ({"n_readers": "2.5"}, "n_readers"),
    ({"diameter_mm": "big"}, "diameter_mm"),
]


@pytest.mark.parametrize("values, words", BAD_ROWS)
def test_bad_label_rows_are_skipped_with_a_reason(slices_tree, values, words):
    root = _tree_with(slices_tree, **values)
    cases, report = import_slices(root)
    assert cases == [] and report.n_skipped == 1
    assert words in report.skipped[0][1]
    with pytest.raises(LungvizError, match=words) as info:
        import_slices(root, strict=True)
    assert "labels.csv line 2" in str(info.value)


def test_mask_count_mismatch_is_skipped(slices_tree):
    (slices_tree / "P-0001" / "nodule-0" / "consensus" / "slice-10.png").unlink()
    cases, report = import_slices(slices_tree)
    assert "P-0001/nodule-0" not in _by_id(cases)
    assert dict(report.skipped)["P-0001/nodule-0"] == "11 images but 10 consensus masks."


def test_unrelated_mask_folders_are_ignored(slices_tree):
    write_png(slices_tree / "P-0001" / "nodule-1" / "mask-extra" / "slice-0.png", np.zeros((SIDE, SIDE)))
    case = _by_id(import_slices(slices_tree)[0])["P-0001/nodule-1"]
    assert [d[0].parent.name for d in case.reader_mask_paths] == ["mask-0", "mask-1", "mask-2"]


def test_labels_with_a_byte_order_mark(slices_tree):
    labels = slices_tree / "labels.csv"
    labels.write_bytes(b"\xef\xbb\xbf" + labels.read_bytes())  # as a spreadsheet saves "CSV UTF-8"
    assert len(import_slices(slices_tree)[0]) == 3


LABELS_INVALID = [
    ("patient,nodule_name,readers\nP-0001,nodule-0,4\n", "lacks the column"),
    ("", "lacks the column"),
]


@pytest.mark.parametrize("text, words", LABELS_INVALID)
def test_labels_with_wrong_columns_raise_naming_the_file(slices_tree, text, words):
    labels = slices_tree / "labels.csv"
    labels.write_text(text)
    for call in (lambda: import_slices(slices_tree), lambda: read_labels(labels)):
        with pytest.raises(LungvizError, match=words) as info:
            call()
        assert str(labels) in str(info.value)


def test_labels_not_text_and_missing_folders(slices_tree, tmp_path):
    labels = slices_tree / "labels.csv"
    labels.write_bytes(b"\xff\xfe\x00\x81" * 50)
    with pytest.raises(LungvizError, match="not a text CSV") as info:
        import_slices(slices_tree)
    assert str(labels) in str(info.value)
    labels.unlink()
    with pytest.raises(LungvizError, match="labels file was not found"):
        import_slices(slices_tree)
    with pytest.raises(LungvizError, match="slices folder was not found"):
        import_slices(tmp_path / "absent")


# ================================================================================================ LIDC (real)

REAL_SCORE_COUNTS = {1: 285, 2: 457, 3: 1032, 4: 300, 5: 162}  # labels.csv class balance (data README)


def test_real_slices_counts(real_lidc):
    cases, report = real_lidc
    assert len(cases) == 2236 and report.n_cases == 2236
    assert report.n_skipped == 5 and {why for _, why in report.skipped} == {"unmatched (no reader labels)"}
    assert sum(c.malignant for c in cases) == 462
    assert Counter(c.malignancy for c in cases) == REAL_SCORE_COUNTS
    assert len({c.case_id for c in cases}) == 2236
    assert len({c.patient_id for c in cases}) == 745
    assert sum(c.n_slices for c in cases) <= 13207


def test_real_labels_match_labels_csv(real_lidc, real_labels):
    cases = _by_id(real_lidc[0])
    labelled = [r for r in real_labels if r["label_check"] != "unmatched"]
    assert len(labelled) == len(cases)
    for row in labelled:
        case = cases[f"{row['patient_id']}/{row['nodule']}"]
        scores = tuple(int(s) for s in row["malignancy_readers"].split())
        assert case.reader_scores == scores
        assert case.malignancy_median == float(row["malignancy_median"]) == statistics.median(scores)
        assert case.malignancy == int(row["malignancy"]) == math.floor(statistics.median(scores) + 0.5)
        assert case.malignant == int(row["malignant"]) == int(case.malignancy >= 4)
        assert case.n_readers == int(row["n_readers"]) and case.n_slices == int(row["n_slices"])
        assert case.pixel_spacing_mm == float(row["pixel_spacing_mm"])
        assert case.label_check == row["label_check"]


def test_real_slices_are_numerically_ordered(real_lidc):
    cases = real_lidc[0]
    for case in cases:
        indices = [int(re.match(r"slice-(\d+)\.png$", p.name).group(1)) for p in case.image_paths]
        assert indices == list(range(case.n_slices)), case.case_id
        assert [p.name for p in case.mask_paths] == [p.name for p in case.image_paths]
    long = next(c for c in cases if c.n_slices > 11)
    assert long.image_paths[10].name == "slice-10.png"


def test_real_masks_are_reader_fractions(real_lidc):
    cases = _by_id(real_lidc[0])
    first = cases["LIDC-IDRI-0001/nodule-0"]
    assert first.n_readers == 4
    masks, slices = first.load_masks(), first.load_slices()
    assert masks.shape == slices.shape == (first.n_slices, 128, 128)
    assert masks.min() == 0.0 and masks.max() == 1.0  # somewhere all four readers agree
    np.testing.assert_allclose(masks * 4, np.round(masks * 4), atol=1e-6)  # quarters only
    assert slices.min() >= 0.0 and slices.max() <= 1.0
    rng = np.random.default_rng(0)
    ids = sorted(cases)
    for i in rng.choice(len(ids), 15, replace=False):
        case = cases[ids[i]]
        m = case.load_masks()[case.middle_index()]
        assert m.min() >= 0.0 and m.max() <= 1.0 and m.max() > 0.0, case.case_id


def test_import_is_deterministic(real_lidc, lidc_slices_dir):
    again, _ = import_slices(lidc_slices_dir)
    assert data_fingerprint(again) == data_fingerprint(real_lidc[0])


def test_round_half_up():
    assert [round_half_up(v) for v in (1.0, 2.5, 3.5, 4.49, 4.5)] == [1, 3, 4, 4, 5]


# ================================================================================================ class folders

NORMALISE_CASES = [
    # (folder name, known classes, expected)
    ("adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib", (), "adenocarcinoma"),
    ("adenocarcinoma", (), "adenocarcinoma"),
    ("large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa", (), "large.cell.carcinoma"),
    ("Large cell carcinoma_left.hilum_T2", (), "large.cell.carcinoma"),
    ("Squamous-Cell-Carcinoma", (), "squamous.cell.carcinoma"),
    ("  Normal ", (), "normal"),
    ("squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa", HISTOLOGY_CLASSES, "squamous.cell.carcinoma"),
    ("large_cell_carcinoma", HISTOLOGY_CLASSES, "large.cell.carcinoma"),  # underscores as word breaks
    ("normal.lungs", HISTOLOGY_CLASSES, "normal"),
    ("a", HISTOLOGY_CLASSES, "a"),  # a fragment is no class
    ("n", HISTOLOGY_CLASSES, "n"),
    ("fibrosis", HISTOLOGY_CLASSES, "fibrosis"),
    ("_normal", HISTOLOGY_CLASSES, "normal"),
]


@pytest.mark.parametrize("folder, known, expected", NORMALISE_CASES)
def test_normalise_class_name(folder, known, expected):
    assert normalise_class_name(folder, known) == expected


def _walk_counts(root: Path) -> Counter:
    """(split folder, class folder) -> number of image files, counted with os.walk alone."""
    counts: Counter = Counter()
    for dirpath, _dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        if len(rel) == 2:
            counts[rel] += sum(f.lower().endswith((".png", ".jpg", ".jpeg")) for f in files)
    return counts


def test_real_histology_folders(histology_dir):
    walked = _walk_counts(histology_dir)
    per_split = Counter()
    per_split_class = Counter()
    for (split, folder), n in walked.items():
        per_split[{"valid": "val"}.get(split, split)] += n
        per_split_class[({"valid": "val"}.get(split, split), folder.split("_")[0])] += n
    assert sum(walked.values()) == 944
    assert per_split == {"train": 613, "val": 72, "test": 259}
    cases, report = import_class_folders(histology_dir, HISTOLOGY_CLASSES)
    assert len(cases) == 944 and report.n_skipped == 0
    assert Counter(c.split_hint for c in cases) == per_split
    assert Counter((c.split_hint, c.histology) for c in cases) == per_split_class
    assert {c.histology for c in cases} == set(HISTOLOGY_CLASSES)
    for split in ("train", "val", "test"):  # every split has every class under one name
        assert {c.histology for c in cases if c.split_hint == split} == set(HISTOLOGY_CLASSES)
    assert len({c.patient_id for c in cases}) == 944
    unguided, _ = import_class_folders(histology_dir)  # without the class list: the same four names
    assert Counter(c.histology for c in unguided) == Counter(c.histology for c in cases)


def test_class_folders_synthetic(tmp_path):
    img = np.full((SIDE, SIDE), 128)
    write_png(tmp_path / "train" / "Adenocarcinoma_left.lobe_T2" / "a.png", img)
    write_png(tmp_path / "train" / "normal" / "x.png", img)
    write_png(tmp_path / "Valid" / "normal" / "y.png", img)
    write_png(tmp_path / "test" / "adenocarcinoma" / "a.png", img)
    write_png(tmp_path / "test" / "adenocarcinoma" / "a.jpg", img)  # same stem, another file
    (tmp_path / "test" / "adenocarcinoma" / "notes.txt").write_text("not an image")
    write_png(tmp_path / "test" / "fibrosis" / "f.png", img)
    write_png(tmp_path / "other" / "normal" / "z.png", img)  # not a split folder: ignored
    cases, report = import_class_folders(tmp_path, HISTOLOGY_CLASSES)
    got = sorted((c.split_hint, c.histology, c.image_paths[0].name) for c in cases)
    assert got == [("test", "adenocarcinoma", "a.jpg"), ("test", "adenocarcinoma", "a.png"),
                   ("train", "adenocarcinoma", "a.png"), ("train", "normal", "x.png"), ("val", "normal", "y.png")]
    assert len({c.case_id for c in cases}) == 5
    reasons = [why for _, why in report.skipped]
    assert any("not an image file (.txt)" in r for r in reasons)
    assert any("'fibrosis' matches none" in r for r in reasons)
    assert cases[0].extra["class_folder"] and all(c.source == "class-folder" for c in cases)


def test_class_folders_without_split_folders(tmp_path):
    write_png(tmp_path / "normal" / "x.png", np.zeros((SIDE, SIDE)))
    cases, _ = import_class_folders(tmp_path)
    assert [(c.split_hint, c.histology, c.patient_id) for c in cases] == [(None, "normal", "all-normal-x")]


def test_class_folders_invalid(tmp_path):
    with pytest.raises(LungvizError, match="not found"):
        import_class_folders(tmp_path / "absent")
    (tmp_path / "train" / "normal").mkdir(parents=True)
    with pytest.raises(LungvizError, match="no images") as info:
        import_class_folders(tmp_path)
    assert str(tmp_path) in str(info.value)
