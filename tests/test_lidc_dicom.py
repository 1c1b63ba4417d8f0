"""Tests for the LIDC DICOM + reader XML importer (lungviz.data.dicom).

The real-data tests use the named series of /work/shared/data/lidc-dicom (LIDC-IDRI-0001, -0002, -0003, -0006)
and check the import against the LIDC-IDRI-slices set (labels.csv, images/, consensus/) of the same patients.
Each test names the series and nodules it checks, so a series added to the folder changes no expectation.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from lungviz.data.dicom import (
    SOURCE,
    ReaderNodule,
    Roi,
    crop_hu,
    fill_outline,
    find_nodules,
    group_marks,
    import_dicom_case,
    import_dicom_cases,
    measure_mark,
    parse_reader_xml,
    rasterise_mark,
    reader_xml_series_uid,
    to_unit,
    whole_slice_and_crop,
)
from lungviz.data.io import DicomSlice, load_raw_gray, read_series
from lungviz.errors import LungvizError
from lungviz.paths import lidc_dicom_dir, lidc_slices_dir

# Each series the tests check, with its number of slices and the nodules the reader XML gives it.
SERIES: dict[str, tuple[int, tuple[str, ...]]] = {
    "LIDC-IDRI-0001": (17, ("nodule-0",)),
    "LIDC-IDRI-0002": (46, ("nodule-0",)),
    "LIDC-IDRI-0003": (35, ("nodule-0", "nodule-1", "nodule-2", "nodule-3")),
    "LIDC-IDRI-0006": (40, ("nodule-0", "nodule-1", "nodule-2", "nodule-3")),
}
PATIENTS = tuple(SERIES)
HAVE_DICOM = all((lidc_dicom_dir() / p).is_dir() for p in PATIENTS)
HAVE_SLICES = (lidc_slices_dir() / "labels.csv").is_file()
needs_dicom = pytest.mark.skipif(not HAVE_DICOM, reason="LIDC DICOM data not available")
needs_both = pytest.mark.skipif(not (HAVE_DICOM and HAVE_SLICES), reason="LIDC DICOM or slices data not available")

NS = "http://www.nih.gov"


# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imported():
    cases, report = import_dicom_cases()
    return cases, report


@pytest.fixture(scope="module")
def labels() -> list[dict[str, str]]:
    with open(lidc_slices_dir() / "labels.csv", newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["patient_id"] in PATIENTS]


def _match_labels(cases, labels) -> list[tuple[dict[str, str], object]]:
    """Pair every labels.csv row with the imported case nearest to its centroid (same patient)."""
    pairs = []
    for patient in PATIENTS:
        rows = [r for r in labels if r["patient_id"] == patient]
        same = [c for c in cases if c.patient_id == patient]

        def in_plane(row, case) -> float:
            dr, dc = np.array(case.extra["centre_rc"]) - (float(row["centroid_i"]), float(row["centroid_j"]))
            return float(np.hypot(dr, dc))

        # centroid_k indexes the full scan, our centre the shipped sub-series: estimate the constant offset first.
        offset = float(np.median([
            float(r["centroid_k"]) - min(same, key=lambda c, r=r: in_plane(r, c)).extra["centre_z_index"] for r in rows
        ]))
        for row in rows:
            k = float(row["centroid_k"]) - offset
            best = min(same, key=lambda c, row=row, k=k: in_plane(row, c) + abs(c.extra["centre_z_index"] - k))
            pairs.append((row, best))
    return pairs


def _series(k_z: list[float], shape=(32, 32)) -> list[DicomSlice]:
    return [
        DicomSlice(
            hu=np.full(shape, -1000.0, np.float32), pixel_spacing_mm=(0.5, 0.5), z_mm=z, instance_number=i,
            sop_uid=f"1.2.3.{i}", series_uid="1.2.3", name=f"s{i}", slice_thickness_mm=2.0,
        )
        for i, z in enumerate(k_z)
    ]


def _square_mark(reader: int, r0: int, c0: int, side: int, slices: list[tuple[str, float]], malignancy=3):
    pts = np.array(
        [(r0, c) for c in range(c0, c0 + side)] + [(r, c0 + side) for r in range(r0, r0 + side)]
        + [(r0 + side, c) for c in range(c0 + side, c0, -1)] + [(r, c0) for r in range(r0 + side, r0, -1)]
    )
    rois = tuple(Roi(z_mm=z, sop_uid=uid, inclusion=True, points_rc=pts) for uid, z in slices)
    return ReaderNodule(reader, f"r{reader}", f"n{reader}-{r0}", {"malignancy": malignancy, "texture": 5}, rois)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic: outlines, holes, slice matching, grouping, bad XML
# ----------------------------------------------------------------------------------------------------------------


def test_fill_outline_interior_and_boundary():
    square = np.array([(2, 2), (2, 6), (6, 6), (6, 2)])
    inner = fill_outline(square, (10, 10))
    outer = fill_outline(square, (10, 10), include_outline=True)
    assert inner.sum() == 9 and inner[3:6, 3:6].all()  # 3x3 inside the 5x5 outline
    assert outer.sum() == 25 and outer[2:7, 2:7].all()
    tiny = fill_outline(np.array([(4, 4)]), (10, 10))  # a single-point outline keeps its pixel
    assert tiny.sum() == 1 and tiny[4, 4]


def test_rasterise_matches_slice_by_uid_then_z_and_subtracts_holes():
    series = _series([0.0, 2.0, 4.0])
    big = np.array([(5, 5), (5, 20), (20, 20), (20, 5)])
    hole = np.array([(10, 10), (10, 14), (14, 14), (14, 10)])
    mark = ReaderNodule(
        0, "r", "n", {"malignancy": 4},
        (
            Roi(2.0, "1.2.3.1", True, big),  # by UID -> slice 1
            Roi(2.0, "1.2.3.1", False, hole),  # hole on slice 1
            Roi(4.1, "unknown-uid", True, big),  # by z (4.1 mm -> slice 2)
            Roi(40.0, "unknown-uid", True, big),  # on no shipped slice
        ),
    )
    masks, missing = rasterise_mark(mark, series)
    assert sorted(masks) == [1, 2] and missing == 1
    assert masks[2].sum() == 14 * 14
    assert masks[1].sum() == 14 * 14 - 5 * 5  # hole and its own line removed
    assert not masks[1][12, 12]


def test_group_marks_one_per_reader_and_by_distance():
    series = _series([0.0, 2.0, 4.0, 6.0], shape=(64, 64))
    s = [(sl.sop_uid, sl.z_mm) for sl in series]
    marks = [
        _square_mark(0, 10, 10, 8, s[1:3]),
        _square_mark(1, 11, 11, 8, s[1:3]),
        _square_mark(2, 10, 12, 8, s[0:3]),
        _square_mark(0, 12, 10, 8, s[2:4]),  # reader 0 again, close by: must not join the first nodule
        _square_mark(1, 45, 45, 8, s[1:3]),  # far away: its own nodule
    ]
    geoms = [measure_mark(m, series) for m in marks]
    groups = group_marks(geoms)
    assert sorted(len(g) for g in groups) == [1, 1, 3]
    for g in groups:
        readers = [geoms[i].mark.reader_index for i in g]
        assert len(readers) == len(set(readers))
    nodules, unplaced = find_nodules(series, marks)
    assert len(nodules) == 3 and not unplaced
    trio = next(nd for nd in nodules if nd.n_readers == 3)
    assert trio.reader_scores == (3, 3, 3) and trio.slice_indices == (0, 1, 2)
    assert trio.counts.max() == 3 and trio.diameter_mm == pytest.approx(8 * np.sqrt(2) * 0.5)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("broken.xml", "<LidcReadMessage xmlns='http://www.nih.gov'><readingSession>"),
        ("other.xml", "<root><readingSession/></root>"),
        ("empty.xml", f"<LidcReadMessage xmlns='{NS}'><ResponseHeader/></LidcReadMessage>"),
        (
            "badcoord.xml",
            f"<LidcReadMessage xmlns='{NS}'><readingSession><unblindedReadNodule><noduleID>1</noduleID>"
            "<roi><imageZposition>1</imageZposition><edgeMap><xCoord>a</xCoord><yCoord>2</yCoord></edgeMap>"
            "</roi></unblindedReadNodule></readingSession></LidcReadMessage>",
        ),
    ],
)
def test_bad_xml_raises_lungviz_error_naming_the_file(tmp_path, name, text):
    path = _write(tmp_path, name, text)
    with pytest.raises(LungvizError) as info:
        parse_reader_xml(path)
    assert name in str(info.value)


def test_missing_xml_and_empty_folder(tmp_path):
    with pytest.raises(LungvizError, match="not found"):
        parse_reader_xml(tmp_path / "nope.xml")
    (tmp_path / "LIDC-IDRI-9999").mkdir()
    cases, report = import_dicom_cases(tmp_path)
    assert cases == [] and report.n_skipped == 1 and report.skipped[0][0] == "LIDC-IDRI-9999"


@pytest.mark.parametrize("spacing", [None, (0.002, 0.002)], ids=["missing", "implausible"])
def test_a_series_without_a_plausible_spacing_is_not_imported(tmp_path, spacing):
    from tests.conftest import make_dicom

    folder = tmp_path / "LIDC-IDRI-9998"
    folder.mkdir()
    for k in range(2):
        (folder / f"{k}.dcm").write_bytes(make_dicom(z_mm=2.5 * k, spacing=spacing))
    with pytest.raises(LungvizError, match="no plausible pixel spacing \\(DICOM field PixelSpacing\\)"):
        import_dicom_case(folder)


def test_small_marks_and_non_nodules(tmp_path):
    text = (
        f"<LidcReadMessage xmlns='{NS}'><ResponseHeader><SeriesInstanceUid>9.9</SeriesInstanceUid></ResponseHeader>"
        "<readingSession><servicingRadiologistID>A</servicingRadiologistID>"
        "<unblindedReadNodule><noduleID>small</noduleID><roi><imageZposition>-1.5</imageZposition>"
        "<imageSOP_UID>x</imageSOP_UID><inclusion>TRUE</inclusion>"
        "<edgeMap><xCoord>7</xCoord><yCoord>9</yCoord></edgeMap></roi></unblindedReadNodule>"
        "<nonNodule><nonNoduleID>nn</nonNoduleID><imageZposition>0</imageZposition></nonNodule>"
        "</readingSession><readingSession/></LidcReadMessage>"
    )
    marks = parse_reader_xml(_write(tmp_path, "ok.xml", text))
    assert len(marks) == 1 and marks[0].is_small and marks[0].malignancy is None
    assert marks[0].rois[0].points_rc.tolist() == [[9, 7]]  # (row=y, col=x)
    assert reader_xml_series_uid(tmp_path / "ok.xml") == "9.9"


# ----------------------------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------------------------


@needs_dicom
def test_xml_counts_per_file():
    rated = {"LIDC-IDRI-0001": 4, "LIDC-IDRI-0002": 2, "LIDC-IDRI-0003": 13, "LIDC-IDRI-0006": 8}
    for patient in PATIENTS:
        (xml,) = sorted((lidc_dicom_dir() / patient).glob("*.xml"))
        marks = parse_reader_xml(xml)
        assert len({m.reader_index for m in marks}) == 4, patient  # four reading sessions
        assert sum(not m.is_small for m in marks) == rated[patient], patient
        assert all(set(m.characteristics) >= {"malignancy", "texture"} for m in marks if not m.is_small)
        assert all(r.points_rc.shape[1] == 2 for m in marks for r in m.rois)


@needs_dicom
@pytest.mark.parametrize("patient", PATIENTS)
def test_hu_and_z_order(imported, patient):
    n_slices, _ = SERIES[patient]
    series = read_series(lidc_dicom_dir() / patient)
    zs = [s.z_mm for s in series]
    assert zs == sorted(zs) and len(set(zs)) == len(zs) == n_slices
    hu = series[len(series) // 2].hu
    assert abs(float(np.median(hu[5:40, 236:276])) + 1000.0) < 30.0  # air in front of the chest
    cases, _ = imported
    for case in (c for c in cases if c.patient_id == patient):
        r, c = (round(v) for v in case.extra["centre_rc"])
        whole = case.extra["whole_slice_hu"]
        core = float(np.median(whole[r - 2 : r + 3, c - 2 : c + 3]))
        lung = float(np.median(whole[r - 25 : r + 26, c - 25 : c + 26]))
        if case.diameter_mm < 10.0:
            # A nodule under 10 mm on 2.5 mm slices is partial-volumed: LIDC-IDRI-0006/nodule-0, rated solid
            # by its one reader, is 7 mm wide and its centre reads about -400 HU. It is still denser than its lung.
            assert core > lung + 150.0, case.case_id
        elif case.n_readers < 2:
            continue  # one reader's texture is not a consensus: LIDC-IDRI-0006/nodule-2 'ground glass' reads -235 HU
        elif case.characteristics["texture"] >= 4:  # solid: soft tissue
            assert -200.0 < core < 200.0, case.case_id
        elif case.characteristics["texture"] <= 2:  # ground glass: between air and tissue
            assert -850.0 < core < -300.0, case.case_id


@needs_dicom
@pytest.mark.parametrize("patient", PATIENTS)
def test_import_produces_cases(imported, patient):
    cases, report = imported
    assert report.n_skipped == 0
    mine = [c for c in cases if c.patient_id == patient]
    assert tuple(c.nodule_id for c in mine) == SERIES[patient][1]
    for case in mine:
        assert case.source == SOURCE
        assert case.slices.shape == case.masks.shape == (case.n_slices, 128, 128)
        assert case.slices.min() >= 0.0 and case.slices.max() <= 1.0
        assert case.masks.max() == pytest.approx(1.0) and case.masks.min() == 0.0
        assert case.extra["whole_slice_hu"].shape == (512, 512)
        assert list(case.extra["slice_z_mm"]) == sorted(case.extra["slice_z_mm"])
        assert case.malignancy is not None and case.label_check == "ok"
        whole, crop = whole_slice_and_crop(case, 32.0)
        assert whole.shape == (512, 512) and crop.shape[0] == round(32.0 / case.pixel_spacing_mm)
        assert whole_slice_and_crop(case, 32.0, input_size=64)[1].shape == (64, 64)


@needs_dicom
def test_import_one_series():
    single, rep = import_dicom_case(lidc_dicom_dir() / "LIDC-IDRI-0002")
    assert [c.case_id for c in single] == ["LIDC-IDRI-0002/nodule-0"] and rep.n_skipped == 0


@needs_both
def test_grouping_matches_labels_csv(imported, labels):
    cases, _ = imported
    for patient in PATIENTS:
        assert sum(c.patient_id == patient for c in cases) == sum(r["patient_id"] == patient for r in labels)
    pairs = _match_labels(cases, labels)
    assert len({id(c) for _, c in pairs}) == len(pairs)  # one case per labels row
    offsets: dict[str, list[float]] = {}
    for row, case in pairs:
        where = f"{row['patient_id']}/{row['nodule']}"
        assert np.allclose(case.extra["centre_rc"], (float(row["centroid_i"]), float(row["centroid_j"])), atol=0.06)
        offsets.setdefault(case.patient_id, []).append(float(row["centroid_k"]) - case.extra["centre_z_index"])
        assert case.nodule_id == row["nodule"], where  # ascending z gives the slices set's order here
        assert case.n_readers == int(row["n_readers"]), where
        assert case.reader_scores == tuple(int(s) for s in row["malignancy_readers"].split()), where
        assert case.malignancy_median == float(row["malignancy_median"]), where
        assert case.malignancy == int(row["malignancy"]) and case.malignant == int(row["malignant"]), where
        assert case.n_slices == int(row["n_slices"]), where
        assert case.diameter_mm == pytest.approx(float(row["diameter_mm"]), abs=0.011), where
        assert case.volume_mm3 == pytest.approx(float(row["volume_mm3"]), abs=0.11), where
        assert case.slice_thickness_mm == float(row["slice_thickness_mm"]), where
        assert case.pixel_spacing_mm == pytest.approx(float(row["pixel_spacing_mm"]), abs=1e-4), where
        for name, value in case.characteristics.items():
            assert value == float(row[f"{name}_median"]), (where, name)
    for patient, offs in offsets.items():  # centroid_k = index in the full scan = our index + a constant
        assert max(offs) - min(offs) < 0.11 and abs(offs[0] - round(offs[0])) < 0.11, (patient, offs)


def _r(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@needs_both
def test_crops_and_masks_match_slices_set(imported, labels):
    """slice-n.png is the n-th outlined slice (ascending z), 128 native px at the importer's crop centre.

    Pearson r between our lung-windowed (W1500/L-600) crop and the PNG is above 0.95 on every slice of the
    four series; the PNGs are the crop's
    own HU min-max scaled to 0..255, and reproducing that matches every pixel within 1 grey level. The
    consensus PNGs equal our reader-count masks pixel for pixel. Controls: for every PNG the true slice
    correlates best of all slices in the series (margin >= 0.005) and beats the crop moved by 2 px (>= 0.018).
    """
    cases, _ = imported
    series_cache = {p: read_series(lidc_dicom_dir() / p) for p in PATIENTS}
    lows = []
    for row, case in _match_labels(cases, labels):
        folder = lidc_slices_dir() / row["patient_id"] / row["nodule"]
        series = series_cache[case.patient_id]
        centre = case.extra["crop_centre_rc"]
        assert np.hypot(centre[0] - float(row["centroid_i"]), centre[1] - float(row["centroid_j"])) < 3.0
        rs = []
        for n, k in enumerate(case.extra["slice_indices"]):
            png = load_raw_gray(folder / "images" / f"slice-{n}.png").astype(np.float64)
            lung = to_unit(crop_hu(series[k].hu, centre), "lung")
            assert np.array_equal(lung, case.slices[n])
            r = _r(lung, png)
            rs.append(r)
            same = to_unit(crop_hu(series[k].hu, centre), "minmax") * 255.0
            assert np.abs(same - png).max() <= 1.0, (case.case_id, n)
            consensus = load_raw_gray(folder / "consensus" / f"slice-{n}.png").astype(np.float32)
            assert np.array_equal(np.round(case.masks[n] * case.n_readers), consensus), (case.case_id, n)
            by_slice = [_r(to_unit(crop_hu(s.hu, centre), "lung"), png) for s in series]
            assert int(np.argmax(by_slice)) == k, (case.case_id, n)
            for dr, dc in ((2, 0), (-2, 0), (0, 2), (0, -2)):
                moved = to_unit(crop_hu(series[k].hu, (centre[0] + dr, centre[1] + dc)), "lung")
                assert _r(moved, png) < r, (case.case_id, n, dr, dc)
        print(f"{case.case_id}: lung-window r min {min(rs):.4f} mean {np.mean(rs):.4f} over {len(rs)} slices")
        lows.append(min(rs))
        assert min(rs) > 0.95, (case.case_id, rs)
    assert len(lows) == len(labels) == sum(len(nodules) for _, nodules in SERIES.values())
