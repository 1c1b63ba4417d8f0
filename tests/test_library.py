"""The case library: index records, filters, display rows, thumbnails, the readers' outline and single-case loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungviz.atlas import ATLAS_PX, atlas_path, build_atlas, load_atlas, save_atlas, to_thumbnail
from lungviz.data.lidc import load_case
from lungviz.errors import LungvizError
from lungviz.library import (
    case_picture,
    characteristic_rows,
    diameter_range,
    filter_records,
    library_rows,
    mask_outline,
    record_image_path,
    same_patient_cases,
    similar_cases,
    thumbnail,
)
from lungviz.retrieval import build_index

RECORDS = [
    {"case_id": "P1/nodule-0", "split": "train", "malignancy": 5, "malignant": 1, "reader_scores": [5, 4, 5],
     "diameter_mm": 21.0, "n_slices": 3, "label_check": "ok", "images": ["P1/nodule-0/images/slice-0.png"] * 3,
     "middle_index": 1},
    {"case_id": "P2/nodule-0", "split": "test", "malignancy": 2, "malignant": 0, "reader_scores": [2, 1],
     "diameter_mm": 6.5, "n_slices": 1, "label_check": "ok", "images": ["P2/nodule-0/images/slice-0.png"],
     "middle_index": 0},
    {"case_id": "P3/nodule-0", "split": "test", "malignancy": 4, "malignant": 1, "reader_scores": [3, 4, 5, 5],
     "diameter_mm": None, "n_slices": 2, "label_check": "zextent_mismatch", "images": ["a.png", "b.png"],
     "middle_index": 1},
    {"case_id": "P4/nodule-1", "split": "val", "malignancy": 3, "malignant": 0, "reader_scores": [3],
     "diameter_mm": 12.0, "n_slices": 1, "label_check": "ok", "images": ["c.png"], "middle_index": 0},
]
CORRECT = {"P2/nodule-0": True, "P3/nodule-0": False}

FILTERS = [  # (filters, expected case ids)
    ({}, ["P1/nodule-0", "P2/nodule-0", "P3/nodule-0", "P4/nodule-1"]),
    ({"scores": [4, 5]}, ["P1/nodule-0", "P3/nodule-0"]),
    ({"malignant": False}, ["P2/nodule-0", "P4/nodule-1"]),
    ({"splits": ["test"]}, ["P2/nodule-0", "P3/nodule-0"]),
    ({"diameter_mm": (6.5, 12.0)}, ["P2/nodule-0", "P4/nodule-1"]),  # bounds included, unknown diameter out
    ({"model_correct": True}, ["P2/nodule-0"]),
    ({"model_correct": False}, ["P3/nodule-0"]),
    ({"scores": [2, 4], "model_correct": True}, ["P2/nodule-0"]),
    ({"scores": []}, []),
]


@pytest.mark.parametrize(("filters", "expected"), FILTERS)
def test_filter_records(filters, expected):
    got = filter_records(RECORDS, correct_by_case=CORRECT, **filters)
    assert [r["case_id"] for r in got] == expected


def test_filter_by_model_outcome_without_reference_keeps_nothing():
    assert filter_records(RECORDS, model_correct=True) == []


def test_library_rows_and_diameter_range():
    rows = library_rows(RECORDS, CORRECT)
    assert rows[0]["reader scores"] == "4, 5, 5" and rows[0]["panel"] == "malignant"
    assert [r["model on test"] for r in rows] == ["-", "correct", "wrong", "-"]
    assert rows[2]["diameter (mm)"] is None and rows[1]["diameter (mm)"] == 6.5
    assert diameter_range(RECORDS) == (6.5, 21.0)
    assert diameter_range([]) == (0.0, 0.0)


def test_record_image_path_defaults_to_middle_slice(tmp_path):
    rec = {**RECORDS[2]}
    assert record_image_path(rec, root=tmp_path) == tmp_path / "b.png"
    assert record_image_path(rec, 0, root=tmp_path) == tmp_path / "a.png"
    with pytest.raises(LungvizError, match="slice 5 does not exist"):
        record_image_path(rec, 5, root=tmp_path)
    with pytest.raises(LungvizError, match="lists no images"):
        record_image_path({"case_id": "x", "images": []}, root=tmp_path)
    assert thumbnail(rec, root=tmp_path) is None  # a missing file is no error, just no picture


def test_characteristic_rows_carry_the_lidc_scale():
    rows = characteristic_rows({"texture": 5.0, "spiculation": 1.5, "odd": 2})
    assert rows[0] == {"characteristic": "texture", "panel median": "5",
                       "scale": "1 non-solid (ground glass) … 3 part solid … 5 solid"}
    assert rows[1]["panel median"] == "1.5" and rows[2]["scale"] == ""


def test_similar_cases_attach_similarity_and_thumbnail(tmp_path):
    from conftest import write_png

    write_png(tmp_path / "P1/nodule-0/images/slice-0.png", np.full((16, 16), 255))
    emb = np.eye(4, 8, dtype=np.float32)
    index = build_index(emb, RECORDS, "nodule-binary")
    hits = similar_cases(index, emb[0] + 0.1 * emb[1], k=2, root=tmp_path)
    assert [h["case_id"] for h in hits] == ["P1/nodule-0", "P2/nodule-0"]
    assert hits[0]["similarity"] > hits[1]["similarity"]
    assert hits[0]["thumbnail"].shape == (16, 16) and hits[0]["thumbnail"].max() == 1.0
    assert hits[1]["thumbnail"] is None
    assert [h["case_id"] for h in similar_cases(index, emb[0], 1, tmp_path, exclude={"P1/nodule-0"})] == [
        "P2/nodule-0"]


def test_similar_cases_fall_back_to_the_atlas_where_the_data_folder_lacks_the_image(tmp_path):
    from conftest import write_png

    write_png(tmp_path / "P1/nodule-0/images/slice-0.png", np.full((16, 16), 255))
    emb = np.eye(4, 8, dtype=np.float32)
    index = build_index(emb, RECORDS, "nodule")
    small = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    atlas = build_atlas(["P2/nodule-0", "P4/nodule-1"], [small, np.zeros((32, 32))], "test")
    hits = similar_cases(index, emb[0] + 0.1 * emb[1] + 0.05 * emb[2], k=3, root=tmp_path, atlas=atlas)
    assert [h["thumbnail_source"] for h in hits] == ["data", "atlas", None]  # P1 on disk, P2 in the atlas, P3 neither
    assert hits[0]["thumbnail"].shape == (16, 16)
    assert np.abs(hits[1]["thumbnail"] - small).max() <= 0.5 / 255 + 1e-6  # the atlas's 8-bit copy of the view
    assert hits[2]["thumbnail"] is None
    empty = tmp_path / "empty"  # a machine without the data folder: every picture from the atlas
    picture, source = case_picture(RECORDS[0], empty, atlas)
    assert (picture, source) == (None, None)
    assert case_picture(RECORDS[3], empty, atlas)[1] == "atlas"


def test_atlas_round_trips_through_one_png_with_its_attribution(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    views = [rng.random((40, 40)).astype(np.float32) for _ in range(5)]
    ids = [f"P{i}/nodule-0" for i in range(5)]
    path = save_atlas(build_atlas(ids, views, "test views"), tmp_path / "ix-atlas.png", columns=2)
    back = load_atlas(path)
    assert back.case_ids == ids and back.images.shape == (5, ATLAS_PX, ATLAS_PX) and back.images.dtype == np.uint8
    for cid, v in zip(ids, views, strict=True):
        assert np.array_equal(back.images[ids.index(cid)], to_thumbnail(v))
    assert back.thumbnail("absent") is None and "P3/nodule-0" in back
    assert "CC BY 3.0" in back.attribution and "10.7937/K9/TCIA.2015.LO9QL9SX" in back.attribution
    with Image.open(path) as img:  # the licence travels in the picture file itself
        assert "Creative Commons Attribution 3.0" in img.text["Copyright"]


def _resaved(path: Path, out: Path, meta: dict | None = None, size: tuple[int, int] | None = None) -> Path:
    """The atlas at ``path`` saved again with other metadata or another sheet size."""
    import json

    from PIL import Image, PngImagePlugin

    with Image.open(path) as img:
        text = json.loads(img.text["lungviz-atlas"])
        sheet = img.copy() if size is None else img.resize(size)
    info = PngImagePlugin.PngInfo()
    info.add_itxt("lungviz-atlas", json.dumps({**text, **(meta or {})}))
    sheet.save(out, "PNG", pnginfo=info)
    return out


@pytest.mark.parametrize(("meta", "size", "message"), [
    ({"kind": "other"}, None, "not a lungviz thumbnail atlas"),
    ({"case_ids": "P1"}, None, "list of cases is damaged"),
    ({"size_px": 0}, None, "tiles of 0 px"),
    (None, (64, 64), "not 3 grey tiles of 64 px"),
    ({"case_ids": [f"P{i}" for i in range(49)]}, None, "not 49 grey tiles"),  # a second row of tiles
])
def test_a_damaged_atlas_is_a_clear_error(tmp_path, meta, size, message):
    path = save_atlas(build_atlas(["a", "b", "c"], [np.zeros((8, 8))] * 3, "t"), tmp_path / "a.png")
    with pytest.raises(LungvizError, match=message):
        load_atlas(_resaved(path, tmp_path / "b.png", meta, size))
    (tmp_path / "c.png").write_bytes(b"not a png")
    with pytest.raises(LungvizError, match="damaged"):
        load_atlas(tmp_path / "c.png")
    with pytest.raises(LungvizError, match="not installed"):
        load_atlas(tmp_path / "absent.png")


def test_the_shipped_atlas_matches_each_case_view_computed_from_the_real_data(lidc_slices_dir):
    """Every library case has a thumbnail, and a thumbnail is the nodule model's view of the case's middle slice,
    read as the app reads an upload."""
    from lungviz import paths
    from lungviz.data.lidc import load_case
    from lungviz.inference.nodule import read_slices
    from lungviz.models import load_bundle
    from lungviz.retrieval import LIBRARY_INDEX, load_index

    folder = paths.weights_dir()
    if not atlas_path(folder, LIBRARY_INDEX).is_file():
        pytest.skip("the shipped index is not installed")
    index, atlas = load_index(folder, LIBRARY_INDEX), load_atlas(atlas_path(folder, LIBRARY_INDEX))
    assert index.model == "nodule" and atlas.case_ids == [r["case_id"] for r in index.records]
    assert atlas_path(folder, LIBRARY_INDEX).stat().st_size < 5_000_000
    bundle = load_bundle(folder, index.model, device="cpu")
    for record in (index.records[0], index.records[len(index.records) // 2]):
        case = load_case(lidc_slices_dir, record["case_id"])
        view = read_slices(bundle, [case.load_slice(record["middle_index"])], case.pixel_spacing_mm)[0].view
        assert np.abs(atlas.images[atlas.case_ids.index(record["case_id"])].astype(int)
                      - to_thumbnail(view).astype(int)).max() <= 1


def test_same_patient_cases_from_a_case_or_a_patient_id():
    records = [{"case_id": "P1/nodule-0", "patient_id": "P1"}, {"case_id": "P1/nodule-2", "patient_id": "P1"},
               {"case_id": "P2/nodule-0", "patient_id": "P2"}]
    assert same_patient_cases(records, "P1/nodule-2") == same_patient_cases(records, "P1") == {
        "P1/nodule-0", "P1/nodule-2"}
    assert same_patient_cases(records, "P9") == set() and same_patient_cases(records, "") == set()


def test_mask_outline_draws_the_border_of_the_majority_region():
    img = np.zeros((20, 20), np.float32)
    mask = np.zeros((10, 10), np.float32)
    mask[3:7, 3:7] = 0.75
    mask[0, 0] = 0.25  # drawn by too few readers: not outlined
    out = mask_outline(img, mask, color=(255, 0, 0))
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    red = (out == [255, 0, 0]).all(axis=2)
    assert red.any() and not red[0:3, 0:3].any()
    assert not red[9:11, 9:11].any()  # the inside stays as it was: only the border is drawn
    rgb = np.full((10, 10, 3), 7, np.uint8)
    drawn = mask_outline(rgb, mask)
    assert (drawn[3, 3] == [255, 215, 0]).all() and (drawn[0, 0] == 7).all()
    with pytest.raises(LungvizError):
        mask_outline(np.zeros((4, 4, 2)), mask)


# ----------------------------------------------------------------------------------------------- load_case


def test_load_case_from_a_slices_tree(slices_tree: Path):
    case = load_case(slices_tree, "P-0001/nodule-0")
    assert case.case_id == "P-0001/nodule-0" and case.n_slices == 11 and case.reader_scores == (5, 4, 4, 3)
    assert load_case(slices_tree, "P-0001/nodule-1").mask_mode == "per-reader"
    with pytest.raises(LungvizError, match="no reader labels"):
        load_case(slices_tree, "P-0003/nodule-0")
    with pytest.raises(LungvizError, match="not in the library"):
        load_case(slices_tree, "P-9999/nodule-0")


def test_load_case_reads_one_real_nodule(real_labels, lidc_slices_dir: Path):
    row = next(r for r in real_labels if (r["patient_id"], r["nodule"]) == ("LIDC-IDRI-0003", "nodule-1"))
    got = load_case(lidc_slices_dir, "LIDC-IDRI-0003/nodule-1")
    assert got.n_slices == int(row["n_slices"]) and got.malignancy == int(row["malignancy"])
    assert got.reader_scores == tuple(int(s) for s in row["malignancy_readers"].split())
    assert got.load_masks().shape == got.load_slices().shape


def test_series_split_matches_an_upload_to_the_librarys_scans(tmp_path):
    from lungviz.data.splits import Split
    from lungviz.library import series_split, series_split_note

    labels = tmp_path / "data" / "lidc-slices" / "labels.csv"
    labels.parent.mkdir(parents=True)
    labels.write_text("patient_id,nodule,n_readers,malignancy_readers,series_uid\n"
                      "LIDC-IDRI-0001,nodule-0,1,3,1.2.3\nLIDC-IDRI-0002,nodule-0,1,4,1.2.4\n")
    split = tmp_path / "holdout.json"
    Split({"LIDC-IDRI-0001": "train", "LIDC-IDRI-0002": "test"}, "fp", 42, "holdout", {}).save(split)
    assert series_split("1.2.3", tmp_path / "data", split) == ("LIDC-IDRI-0001", "train")
    assert series_split("1.2.4", tmp_path / "data", split) == ("LIDC-IDRI-0002", "test")
    assert series_split("9.9", tmp_path / "data", split) is None  # not a library scan
    assert series_split("", tmp_path / "data", split) is None  # not DICOM
    assert series_split("1.2.3", tmp_path / "nowhere", split) is None  # no labels
    assert series_split("1.2.3", tmp_path / "data", tmp_path / "missing.json") is None  # no split
    assert "trained on" in series_split_note("LIDC-IDRI-0001", "train")
    assert "never saw it" in series_split_note("LIDC-IDRI-0002", "test")


def test_the_real_dicom_series_are_found_in_the_library(lidc_dicom_dir):
    """LIDC-IDRI-0001..0003's series carry the UIDs of labels.csv, so the app can say which split they are in."""
    from lungviz.data.io import read_dicom
    from lungviz.library import series_split

    dcm = sorted((lidc_dicom_dir / "LIDC-IDRI-0001").glob("*.dcm"))[0]
    found = series_split(read_dicom(dcm).series_uid)
    assert found is not None and found[0] == "LIDC-IDRI-0001" and found[1] in ("train", "val", "test")


def test_library_slice_of_names_an_upload_that_is_a_library_slice_file(tmp_path):
    from conftest import write_png

    from lungviz.data.splits import Split
    from lungviz.library import library_slice_of, slice_file_table

    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (16, 16)) for _ in range(2))
    root = tmp_path / "lidc-slices"
    write_png(root / "P1" / "n0" / "images" / "slice-0.png", a)
    second = write_png(root / "P1" / "n0" / "images" / "slice-1.png", b)
    write_png(root / "P1" / "n0" / "consensus" / "slice-1.png", b * 0)  # masks are not slices
    table = slice_file_table(root)
    assert sorted(table.values()) == ["P1/n0/images/slice-0.png", "P1/n0/images/slice-1.png"]
    split = Split({"P1": "train"}, "fp", 42, "holdout", {}).save(tmp_path / "holdout.json")
    assert library_slice_of(second.read_bytes(), table, split) == ("P1/n0", "slice-1.png", "train")
    assert library_slice_of(second.read_bytes(), table, tmp_path / "none.json") == ("P1/n0", "slice-1.png", None)
    assert library_slice_of(second.read_bytes() + b"x", table, split) is None  # another file


def test_a_nodule_with_more_ratings_than_lidc_readers_says_so():
    from lungviz.library import reader_count_note

    assert reader_count_note(4) is None and reader_count_note(None) is None and reader_count_note(1) is None
    assert reader_count_note(8).startswith("8 ratings, more than the 4 readers of a usual LIDC scan")


def test_slice_spacings_read_labels_csv_and_skip_what_is_not_a_spacing(tmp_path):
    from conftest import label_row, write_labels

    from lungviz.library import slice_spacings

    write_labels(tmp_path / "labels.csv", [
        label_row(patient_id="LIDC-IDRI-0001", nodule="nodule-0", n_readers=1, malignancy_readers="4",
                  pixel_spacing_mm="0.82"),
        label_row(patient_id="LIDC-IDRI-0002", nodule="nodule-0", n_readers=0, malignancy_readers="",
                  pixel_spacing_mm="0.6", label_check="unmatched"),  # no reader labels: its spacing still counts
        label_row(patient_id="LIDC-IDRI-0003", nodule="nodule-0", n_readers=1, malignancy_readers="2",
                  pixel_spacing_mm=""),
        label_row(patient_id="LIDC-IDRI-0004", nodule="nodule-0", n_readers=1, malignancy_readers="2",
                  pixel_spacing_mm="-1")])
    assert slice_spacings(tmp_path) == {"LIDC-IDRI-0001/nodule-0": 0.82, "LIDC-IDRI-0002/nodule-0": 0.6}
    assert slice_spacings(tmp_path / "nowhere") == {}
