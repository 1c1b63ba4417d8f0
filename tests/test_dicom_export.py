"""Results as DICOM: the view -> slice outline mapping on tiny arrays, and the SR and SEG of real LIDC uploads read
back with highdicom and pydicom (references, measurements, characteristics, algorithm, mask)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lungviz.data.io import DicomSlice
from lungviz.data.preprocess import crop_around
from lungviz.data.upload import context_from_whole
from lungviz.errors import LungvizError
from lungviz.inference.nodule import RATING_HEADS, SliceReading, cut
from lungviz.present.dicom_export import (
    HEAD_CODES,
    SCHEME,
    ModelInfo,
    crop_origin,
    dicom_findings,
    outline_on_slice,
    segmentation,
    source_outlines,
    upload_slices,
    view_to_source,
)

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
SHIPPED = (WEIGHTS / "nodule.json").is_file()

# --------------------------------------------------------------------------------------------- tiny arrays

CROPS = [((5.0, 5.0), 4), ((5.0, 5.0), 5), ((4.4, 6.6), 3), ((0.2, 9.7), 6), ((-1.0, 3.0), 4)]


@pytest.mark.parametrize(("centre", "size"), CROPS)
def test_crop_origin_is_where_crop_around_starts(centre, size):
    image = np.arange(12 * 12, dtype=np.float32).reshape(12, 12) + 1.0
    cropped = crop_around(image, centre, size, fill=0.0)
    r0, c0 = crop_origin(centre, size)
    for i in range(size):
        for j in range(size):
            inside = 0 <= r0 + i < 12 and 0 <= c0 + j < 12
            assert cropped[i, j] == (image[r0 + i, c0 + j] if inside else 0.0)


MAPPINGS = [
    # view mask, origin, side, source shape, expected source mask
    (np.array([[1, 0], [0, 0]]), (1, 1), 4, (6, 6),
     np.pad(np.pad(np.ones((2, 2)), ((0, 2), (0, 2))), ((1, 1), (1, 1)))),  # 2 px view on 4 source px: each doubles
    (np.eye(6)[[1, 1, 2, 3, 1, 5]], (0, 0), 2, (3, 3),  # 6 px view on 2 source px: source centres at view 1.5, 4.5
     np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0]])),
    (np.array([[1, 1], [1, 0]]), (-1, 2), 2, (2, 3), np.array([[0, 0, 1], [0, 0, 0]])),  # partly outside the slice
]


@pytest.mark.parametrize(("view", "origin", "side", "shape", "expected"), MAPPINGS)
def test_view_to_source_on_tiny_arrays(view, origin, side, shape, expected):
    out = view_to_source(view.astype(bool), origin, side, shape)
    assert out.shape == shape and out.dtype == bool
    np.testing.assert_array_equal(out, expected.astype(bool))


def test_view_to_source_refuses_a_non_square_outline():
    with pytest.raises(LungvizError):
        view_to_source(np.ones((2, 3), bool), (0, 0), 4, (8, 8))


def _slice(hu: np.ndarray, spacing: float = 0.7) -> DicomSlice:
    return DicomSlice(hu, (spacing, spacing), 0.0, 1, "1.2.3", "1.2", "x.dcm")


def _reading(view: np.ndarray, field_mm: float, mm_per_px: float, centre=None, index=None) -> SliceReading:
    outline = view > 0.5
    return SliceReading(view=view, field_mm=field_mm, mm_per_px=mm_per_px, outline=outline, long_axis_mm=1.0,
                        short_axis_mm=1.0, area_mm2=float(outline.sum()) * mm_per_px**2, logits=np.zeros(47),
                        index=index, centre_rc=centre)


@pytest.mark.parametrize(("centre", "field_mm"), [((150.0, 90.0), 30.0), ((40.3, 210.6), 20.0), ((3.0, 250.0), 40.0)])
def test_an_outline_cut_as_the_model_cuts_it_lands_back_on_the_disc(centre, field_mm):
    """A bright disc on a whole slice, cut around (near) its centre exactly as a DICOM upload is (context, then the
    view), outlined in the view and mapped back: it covers the disc."""
    rr, cc = np.mgrid[0:256, 0:256]
    disc = (rr - centre[0] - 2.5) ** 2 + (cc - centre[1] + 1.5) ** 2 <= 6.0**2
    hu = np.where(disc, 40.0, -900.0).astype(np.float32)
    view, mmpx = cut(context_from_whole(hu, centre), (64.0, 64.0), field_mm, 0.7, 64)
    back = outline_on_slice(_reading(view, field_mm, mmpx), _slice(hu), centre)
    assert (back & disc).sum() / (back | disc).sum() > 0.85


def test_a_crop_sized_dicom_is_its_own_context():
    rr, cc = np.mgrid[0:100, 0:120]
    disc = (rr - 50) ** 2 + (cc - 60) ** 2 <= 8.0**2
    hu = np.where(disc, 40.0, -900.0).astype(np.float32)
    view, mmpx = cut((hu + 900.0) / 940.0, (50.0, 60.0), 25.0, 0.7, 64)
    back = outline_on_slice(_reading(view, 25.0, mmpx), _slice(hu), None)
    assert (back & disc).sum() / (back | disc).sum() > 0.85


def test_an_outline_of_another_scale_is_refused():
    view = np.zeros((64, 64), np.float32)
    with pytest.raises(LungvizError, match="scale"):
        outline_on_slice(_reading(view, 30.0, 0.123), _slice(np.zeros((256, 256), np.float32)), (128.0, 128.0))


def test_a_png_upload_gets_no_sr_or_seg(image_bytes):
    png = image_bytes(np.zeros((64, 64), np.uint8))
    with pytest.raises(LungvizError, match="DICOM uploads only"):
        upload_slices(png, "slice.png")


def test_slices_without_a_dicom_header_get_no_seg():
    sl = _slice(np.zeros((256, 256), np.float32))
    with pytest.raises(LungvizError, match="DICOM uploads only"):
        segmentation([sl], {0: np.ones((256, 256), bool)}, ModelInfo("m", "1"))


def test_an_empty_outline_gets_no_seg():
    sl = _slice(np.zeros((256, 256), np.float32))
    with pytest.raises(LungvizError, match="outlined nothing"):
        segmentation([sl], {0: np.zeros((256, 256), bool)}, ModelInfo("m", "1"))


# ------------------------------------------------------------------------------------------------- real LIDC


@pytest.fixture(scope="module")
def nodule_models():
    """The prediction path with the shipped nodule model alone (``predict`` reads the nodule with it)."""
    if not SHIPPED:
        pytest.skip("the shipped nodule model is not installed")
    from lungviz.inference.predict import ModelSet
    from lungviz.models import load_bundle

    return ModelSet(folder=WEIGHTS, nodule=load_bundle(WEIGHTS, "nodule", "cpu"))


def _nodules(folder: Path):
    from lungviz.data.dicom import find_nodules, read_patient

    series, marks, _ = read_patient(folder)
    return series, find_nodules(series, marks)[0]


def _file_of(folder: Path, sop_uid: str) -> Path:
    return next(p for p in sorted(folder.glob("*.dcm"))
                if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == sop_uid)


def _dciodvfy_errors(data: bytes, tmp_path: Path, name: str) -> list[str]:
    """The errors David Clunie's DICOM validator (Debian dicom3tools' ``dciodvfy``) finds in a file: each IOD's
    required modules, attributes, value representations and code sequences checked against the standard."""
    import shutil
    import subprocess

    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    path = tmp_path / name
    path.write_bytes(data)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def _group(sr):
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 1
    return groups[0]


def _value(group, code) -> float:
    (m,) = group.get_measurements(name=code)
    return float(m.value)


def _local(value: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, SCHEME, "x")


def _check_sr_against(sr, assessment, model: ModelInfo, sources: list[DicomSlice], seg) -> None:
    """The SR's references, measurements, characteristics and algorithm."""
    from pydicom.sr.codedict import codes

    src = sources[0].header
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == src.StudyInstanceUID
    referenced = {s.SeriesInstanceUID: {r.ReferencedSOPInstanceUID for r in s.ReferencedSOPSequence}
                  for s in evidence.ReferencedSeriesSequence}
    assert referenced[src.SeriesInstanceUID] == {sl.sop_uid for sl in sources}
    assert referenced[seg.SeriesInstanceUID] == {seg.SOPInstanceUID}
    group = _group(sr)
    assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert group.finding_type == codes.SCT.Nodule
    r = assessment.reading
    assert _value(group, codes.SCT.LongAxis) == pytest.approx(r.long_axis_mm, abs=0.01)
    assert _value(group, codes.SCT.ShortAxis) == pytest.approx(r.short_axis_mm, abs=0.01)
    assert _value(group, codes.SCT.Diameter) == pytest.approx(r.mean_axes_mm, abs=0.01)
    (mean,) = group.get_measurements(name=codes.SCT.Diameter)
    assert mean.derivation == codes.SCT.Mean and mean.unit == codes.UCUM.Millimeter
    assert _value(group, _local("PANELP")) == pytest.approx(assessment.probability, abs=1e-6)
    assert _value(group, _local("PANELSCORE")) == pytest.approx(r.ratings["malignancy"], abs=1e-4)
    evaluations = {e.name.value: e.value for e in group.get_qualitative_evaluations()}
    assert {HEAD_CODES[h] for h in RATING_HEADS} | {"BAND", "CALL"} <= set(evaluations)
    assert evaluations["CALL"].value == f"CALL-{assessment.call.upper()}"
    level = int(round(r.ratings["calcification"]))
    assert evaluations["CALCIF"].value == f"CALCIF-{level}" and evaluations["CALCIF"].scheme_designator == SCHEME
    items = [i for c in group for i in c.ContentSequence]
    texts = {i.ConceptNameCodeSequence[0].CodeValue: i.TextValue for i in items if i.ValueType == "TEXT"}
    assert (texts["111001"], texts["111003"]) == (model.name, model.version)  # DCM algorithm name and version


def _check_seg(seg, sources: list[DicomSlice], model: ModelInfo) -> np.ndarray:
    """The SEG's references and description; returns its masks, one per source slice, in order."""
    src = sources[0].header
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.SegmentationType == "BINARY"
    assert {(s, i) for _, s, i in seg.get_source_image_uids()} == {(src.SeriesInstanceUID, sl.sop_uid)
                                                                  for sl in sources}
    (desc,) = seg.SegmentSequence
    assert desc.SegmentLabel == "Nodule" and desc.SegmentAlgorithmType == "AUTOMATIC"
    algo = desc.SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == (model.name, model.version)
    masks = seg.get_pixels_by_source_instance([sl.sop_uid for sl in sources], segment_numbers=[1],
                                              skip_overlap_checks=True)[..., 0]
    assert masks.shape == (len(sources), *sources[0].hu.shape)
    return masks.astype(bool)


def _read_back(found):
    import highdicom as hd

    pydicom.dcmread(io.BytesIO(found.sr))  # each is a DICOM file
    pydicom.dcmread(io.BytesIO(found.seg))
    return hd.sr.srread(io.BytesIO(found.sr)), hd.seg.segread(io.BytesIO(found.seg))


def test_a_dicom_slice_upload_gets_its_findings_as_sr_and_seg(nodule_models, lidc_dicom_dir):
    """LIDC-IDRI-0001's nodule (33 mm) on the slice at its centre, uploaded as one .dcm, predicted as the app does."""
    from lungviz.data.io import load_image
    from lungviz.data.upload import from_loaded
    from lungviz.inference.predict import predict

    folder = lidc_dicom_dir / "LIDC-IDRI-0001"
    series, nodules = _nodules(folder)
    nodule = nodules[0]
    k = int(round(nodule.centre_z_index))
    path = _file_of(folder, series[k].sop_uid)
    data = path.read_bytes()
    centre = (round(nodule.centre_rc[0]), round(nodule.centre_rc[1]))  # as the page's centre picker gives it
    case = from_loaded(load_image(data, path.name), None, centre)
    assessment = predict(nodule_models, case.context, None, case.spacing_mm).assessment
    assert assessment is not None and assessment.reading.outlined
    model = ModelInfo.from_spec("nodule", nodule_models.nodule.spec)
    assert model.version == nodule_models.nodule.spec.weights_sha256

    sources = upload_slices(data, path.name)
    found = dicom_findings(sources, 0, case.centre_rc, assessment, model)
    sr, seg = _read_back(found)
    _check_sr_against(sr, assessment, model, sources, seg)
    assert not _group(sr).get_measurements(name=pydicom.sr.codedict.codes.SCT.Volume)  # one slice: no volume
    (mask,) = _check_seg(seg, sources, model)

    spacing = float(series[k].pixel_spacing_mm[0])
    rows, cols = np.nonzero(mask)
    assert np.hypot(rows.mean() - nodule.centre_rc[0], cols.mean() - nodule.centre_rc[1]) * spacing < 3.0
    area = mask.sum() * spacing**2
    assert area == pytest.approx(assessment.reading.slices[0].area_mm2, rel=0.05)
    readers = nodule.counts[nodule.slice_indices.index(k)] > 0
    assert (mask & readers).sum() / (mask | readers).sum() > 0.6  # it is the readers' nodule, where they drew it

    again = dicom_findings(sources, 0, case.centre_rc, assessment, model)  # the page builds each file on its own
    assert pydicom.dcmread(io.BytesIO(again.seg)).SOPInstanceUID == seg.SOPInstanceUID
    assert _group(hd_sr(again.sr)).referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID


def hd_sr(data: bytes):
    import highdicom as hd

    return hd.sr.srread(io.BytesIO(data))


def test_a_zipped_series_gets_the_followed_slices_in_its_seg(nodule_models, lidc_dicom_dir, tmp_path):
    """LIDC-IDRI-0006's 15 mm nodule (slices 19-22 of 40) in a zip of 16 slices around it, followed from its centre:
    the SEG holds the model's outline on each slice it followed, the SR the volume over them."""
    from pydicom.sr.codedict import codes

    from lungviz.inference.nodule import assess_series

    folder = lidc_dicom_dir / "LIDC-IDRI-0006"
    full, nodules = _nodules(folder)
    nodule = next(n for n in nodules if n.slice_indices == (19, 20, 21, 22))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for sl in full[13:29]:
            zf.write(_file_of(folder, sl.sop_uid), f"series/{sl.sop_uid}.dcm")
    series = upload_slices(buf.getvalue(), "series.zip")
    assert [s.sop_uid for s in series] == [s.sop_uid for s in full[13:29]]
    k = int(round(nodule.centre_z_index)) - 13
    centre = (round(nodule.centre_rc[0]), round(nodule.centre_rc[1]))
    assessment = assess_series(nodule_models.nodule, series, k, centre)
    followed = [r.index for r in assessment.reading.slices]
    assert len(followed) >= 2 and k in followed and assessment.reading.volume_mm3 is not None
    model = ModelInfo.from_spec("nodule", nodule_models.nodule.spec)

    found = dicom_findings(series, k, centre, assessment, model)
    sr, seg = _read_back(found)
    sources = [series[i] for i in followed]
    _check_sr_against(sr, assessment, model, sources, seg)
    assert _value(_group(sr), codes.SCT.Volume) == pytest.approx(assessment.reading.volume_mm3, rel=1e-4)
    masks = _check_seg(seg, sources, model)
    expected = source_outlines(assessment, series, k, centre)
    spacing = float(series[k].pixel_spacing_mm[0])
    for mask, reading, i in zip(masks, assessment.reading.slices, followed, strict=True):
        np.testing.assert_array_equal(mask, expected[i])
        assert mask.sum() * spacing**2 == pytest.approx(reading.area_mm2, rel=0.1, abs=3.0)
    rows, cols = np.nonzero(masks[followed.index(k)])
    assert np.hypot(rows.mean() - nodule.centre_rc[0], cols.mean() - nodule.centre_rc[1]) * spacing < 3.0
    outlined = {i for i, m in zip(followed, masks, strict=True) if m.any()}
    assert outlined & {i - 13 for i in nodule.slice_indices}  # on the readers' slices
    # both files conform to their IODs (Comprehensive 3D SR, Segmentation) as the standard's validator reads them
    assert _dciodvfy_errors(found.sr, tmp_path, "sr.dcm") == []
    assert _dciodvfy_errors(found.seg, tmp_path, "seg.dcm") == []
    broken = pydicom.dcmread(io.BytesIO(found.sr))
    del broken.ValueType  # a required attribute of the SR document: the validator must notice
    out = io.BytesIO()
    broken.save_as(out, enforce_file_format=True)
    assert _dciodvfy_errors(out.getvalue(), tmp_path, "broken.dcm")


def test_a_nodule_the_model_did_not_outline_gets_an_sr_without_a_seg(nodule_models, lidc_dicom_dir):
    """LIDC-IDRI-0002's nodule read from its readers' centre: the shipped model outlines nothing there, so the SR
    holds the estimate and characteristics without a size or an ROI, and there is no SEG."""
    import highdicom as hd

    from lungviz.inference.nodule import assess_series

    series, nodules = _nodules(lidc_dicom_dir / "LIDC-IDRI-0002")
    nodule = nodules[0]
    k = int(round(nodule.centre_z_index))
    assessment = assess_series(nodule_models.nodule, series, k, nodule.centre_rc)
    if assessment.reading.outlined:
        pytest.skip("the installed nodule model outlines this nodule")
    found = dicom_findings(series, k, nodule.centre_rc, assessment, ModelInfo.from_spec("nodule", None))
    assert found.seg is None
    sr = hd.sr.srread(io.BytesIO(found.sr))
    assert not sr.content.get_volumetric_roi_measurement_groups()
    (group,) = sr.content.get_image_measurement_groups()
    assert _value(group, _local("PANELP")) == pytest.approx(assessment.probability, abs=1e-6)
    assert {e.name.value for e in group.get_qualitative_evaluations()} >= {HEAD_CODES[h] for h in RATING_HEADS}


# ------------------------------------------------------------------------------------------------------- page


@pytest.fixture
def page_env(app_weights, tmp_path, monkeypatch):
    """The app's fixture weights with a tiny untrained nodule model, and a fresh home folder."""
    import shutil

    from conftest import build_nodule_weights

    weights = tmp_path / "w"
    shutil.copytree(app_weights, weights)
    build_nodule_weights(weights)
    monkeypatch.setenv("LUNGVIZ_WEIGHTS", str(weights))
    monkeypatch.setenv("LUNGVIZ_HOME", str(tmp_path / "home"))
    return weights


def _page_after(name: str, data: bytes):
    from streamlit.testing.v1 import AppTest

    app = str(Path(__file__).resolve().parent.parent / "streamlit_app.py")
    at = AppTest.from_file(app, default_timeout=120).run()
    at.file_uploader[0].set_value((name, data, "application/octet-stream"))
    return at.run()


@pytest.mark.slow
def test_the_inspect_page_offers_sr_and_seg_for_a_dicom_upload_and_says_why_not_for_a_png(page_env, lidc_dicom_dir,
                                                                                          image_bytes):
    dcm = sorted((lidc_dicom_dir / "LIDC-IDRI-0001").glob("*.dcm"))[8]
    at = _page_after(dcm.name, dcm.read_bytes())
    assert not at.exception and not at.error
    labels = {b.label for b in at.download_button}
    assert {"HTML report", "PDF report", "Findings as DICOM SR"} <= labels
    outlined = "Outline as DICOM SEG" in labels
    assert outlined or any("outlined nothing, so there is no DICOM SEG" in c.value for c in at.caption)
    assert all(b.proto.ignore_rerun for b in at.download_button)

    at = _page_after("slice.png", image_bytes(np.full((128, 128), 90, np.uint8)))
    assert not at.exception and not at.error
    assert {b.label for b in at.download_button} == {"HTML report", "PDF report"}
    assert any("DICOM SR and SEG are made for DICOM uploads only" in c.value for c in at.caption)
