"""The nodule model's findings as DICOM, for a DICOM upload: a Structured Report (TID 1500 measurement report) and the
outline as a Segmentation (SEG), both referencing the source series, written with highdicom.

The SEG is BINARY with one segment, "Nodule" (SCT 49755003 morphologically abnormal structure / SCT 27925004
nodule), made by an AUTOMATIC algorithm named with the model's name and weights' SHA-256. It covers the slices the
nodule was followed through: the model's outline on each, mapped from its view back onto the slice's pixel grid
(:func:`view_to_source`).

The SR holds one measurement group (TID 1411 volumetric ROI referencing the SEG's segment, or TID 1501 without an ROI
when the model outlined nothing): finding SCT 27925004 nodule in SCT 39607008 lung, the algorithm, and

- long axis SCT 103339001, short axis SCT 103340004, mean diameter SCT 81827009 derived by SCT 373098007 mean (mm),
  volume SCT 118565006 (mm3) when several slices were read;
- in the local coding scheme :data:`SCHEME` (no standard code says what these are): the probability that the LIDC
  readers' panel rates the nodule malignant (``PANELP``, 0-1; it is not a probability of cancer), the expected
  panel score (``PANELSCORE``, 1-5), each characteristic's expected rating on its LIDC scale (``<head>`` numeric) and
  its level as a qualitative evaluation (``<head>`` = ``<head>-<level>``, meaning the readers' word for the level),
  the risk band (``BAND``) and the call (``CALL``).
"""

from __future__ import annotations

import hashlib
import io as _io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lungviz.data.io import DicomSlice, is_dicom_bytes, read_dicom, read_series
from lungviz.data.preprocess import SLICE_CROP_PX, mm_to_px, spacing_or_default, valid_spacing
from lungviz.errors import LungvizError
from lungviz.inference.nodule import LEVEL_WORDS, NOMINAL_HEADS, RATING_HEADS, Assessment, SliceReading
from lungviz.models import ModelSpec

#: The coding scheme designator of lungviz's own concepts (DICOM's "99" prefix marks a private scheme).
SCHEME = "99LUNGVIZ"
MANUFACTURER = "lungviz"
#: The code of each characteristic (at most 16 characters, as DICOM code values).
HEAD_CODES = {"malignancy": "PANELSCORE", "subtlety": "SUBTLETY", "internalStructure": "INTSTRUCT",
              "calcification": "CALCIF", "sphericity": "SPHERICITY", "margin": "MARGIN", "lobulation": "LOBULATION",
              "spiculation": "SPICULATION", "texture": "TEXTURE"}
HEAD_NAMES = {"malignancy": "Expected LIDC panel malignancy score", "subtlety": "LIDC subtlety",
              "internalStructure": "LIDC internal structure", "calcification": "LIDC calcification",
              "sphericity": "LIDC sphericity", "margin": "LIDC margin", "lobulation": "LIDC lobulation",
              "spiculation": "LIDC spiculation", "texture": "LIDC texture"}
#: SR and SEG series numbers (a viewer lists them after the CT's).
SR_SERIES_NUMBER, SEG_SERIES_NUMBER = 9901, 9902


@dataclass(frozen=True)
class ModelInfo:
    """The algorithm named in the SR and SEG: the model's name and version (its weights' SHA-256)."""

    name: str
    version: str

    @classmethod
    def from_spec(cls, name: str, spec: ModelSpec | None) -> ModelInfo:
        """From a bundle's name and spec (its architecture and weights' SHA-256)."""
        label = f"lungviz {name} ({spec.arch})" if spec is not None else f"lungviz {name}"
        return cls(name=label[:64], version=(spec.weights_sha256 if spec is not None else None) or "unknown")


@dataclass(frozen=True)
class DicomFindings:
    """The SR and (when the model outlined the nodule) the SEG of one finding, as DICOM files' bytes."""

    sr: bytes
    seg: bytes | None


# ---------------------------------------------------------------------------------------------------- geometry


def crop_origin(centre_rc: tuple[float, float], size: int) -> tuple[int, int]:
    """The first row and column of the ``size`` window :func:`lungviz.data.preprocess.crop_around` cuts at
    ``centre_rc``."""
    return (int(np.floor(centre_rc[0] - size / 2.0 + 0.5)), int(np.floor(centre_rc[1] - size / 2.0 + 0.5)))


def view_to_source(outline: np.ndarray, origin_rc: tuple[int, int], side_px: int,
                   shape: tuple[int, int]) -> np.ndarray:
    """A view's ``(S, S)`` mask on the source grid ``shape``: the view shows the ``side_px`` square of source pixels
    from ``origin_rc`` resized to ``S``; each source pixel takes the view pixel its centre falls in (parts outside
    the source are dropped). Returns ``(H, W) bool``."""
    mask = np.asarray(outline, bool)
    s = mask.shape[0]
    if mask.ndim != 2 or mask.shape[1] != s or side_px < 1:
        raise LungvizError(f"an outline of shape {mask.shape} cannot be placed on a {side_px}-pixel field.")
    local = np.minimum(np.floor((np.arange(side_px) + 0.5) * s / side_px).astype(int), s - 1)
    out = np.zeros(shape, bool)
    r0, c0 = origin_rc
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + side_px, shape[0]), min(c0 + side_px, shape[1])
    if re > rs and ce > cs:
        out[rs:re, cs:ce] = mask[np.ix_(local[rs - r0 : re - r0], local[cs - c0 : ce - c0])]
    return out


def slice_spacing(sl: DicomSlice) -> float | None:
    """The pixel spacing the models read a DICOM slice at (as :func:`lungviz.data.upload.from_series`)."""
    return valid_spacing(float(np.mean(sl.pixel_spacing_mm)))


def outline_on_slice(reading: SliceReading, sl: DicomSlice, centre_rc: tuple[float, float] | None) -> np.ndarray:
    """The nodule model's outline of ``reading`` on the slice it read, ``(H, W) bool`` in the slice's pixels.

    The view was cut as :mod:`lungviz.data.upload` and :func:`lungviz.inference.nodule.cut` cut it: on a whole
    slice, the 128 px context around the nodule centre (the reading's own centre when the series was followed, else
    ``centre_rc``), then the view's field around the context's middle; a crop-sized image is its own context."""
    from lungviz.data.upload import is_whole_slice

    spacing = slice_spacing(sl)
    side = mm_to_px(reading.field_mm, spacing)
    size = reading.outline.shape[0]
    if not np.isclose(side * spacing_or_default(spacing) / size, reading.mm_per_px, rtol=1e-6):
        raise LungvizError("the outline does not belong to this slice (its scale differs); it cannot be exported.")
    h, w = sl.hu.shape
    if is_whole_slice(sl.hu):
        centre = reading.centre_rc or centre_rc or (h / 2.0, w / 2.0)
        context, inner = crop_origin(centre, SLICE_CROP_PX), (SLICE_CROP_PX / 2.0, SLICE_CROP_PX / 2.0)
    else:
        context, inner = (0, 0), (h / 2.0, w / 2.0)
    view = crop_origin(inner, side)
    return view_to_source(reading.outline, (context[0] + view[0], context[1] + view[1]), side, (h, w))


def source_outlines(assessment: Assessment, series: Sequence[DicomSlice], index: int,
                    centre_rc: tuple[float, float] | None) -> dict[int, np.ndarray]:
    """Per series slice the nodule was read on, its outline in that slice's pixels: the slices a followed series
    reached (each reading knows its slice), else the one slice ``index`` that was read around ``centre_rc``."""
    readings = assessment.reading.slices
    if readings and all(r.index is not None for r in readings):
        placed = [(int(r.index), r) for r in readings]
    elif len(readings) == 1:
        placed = [(index, readings[0])]
    else:
        raise LungvizError("the slices the nodule model read are not known, so its outline cannot be exported.")
    if not all(0 <= k < len(series) for k, _ in placed):
        raise LungvizError("the nodule model's reading refers to a slice this series does not have.")
    return {k: outline_on_slice(r, series[k], centre_rc) for k, r in placed}


# ----------------------------------------------------------------------------------------------------- DICOM


def reference_headers(slices: Sequence[DicomSlice]) -> list:
    """The slices' reference headers; a slice read without one, or from another series, is refused."""
    if any(sl.header is None for sl in slices):
        raise LungvizError("DICOM SR and SEG are made for DICOM uploads only: this image carries no DICOM header "
                           "(patient, study and series) for them to refer to.")
    headers = [sl.header for sl in slices]
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
               if not all(str(h.get(k, "")).strip() for h in headers)]
    if missing:
        raise LungvizError(f"the DICOM lacks {', '.join(missing)}, which a DICOM SR or SEG must refer to.")
    if len({str(h.SeriesInstanceUID) for h in headers}) > 1:
        raise LungvizError("the slices come from more than one DICOM series.")
    return headers


def _uid(kind: str, *parts: object) -> str:
    """A UID derived from what the object holds, so the SR and the SEG it references agree however often either is
    made."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[kind, *map(str, parts)])


def _code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, SCHEME, meaning[:64])


def _level_meaning(head: str, level: int) -> str:
    """The readers' word for a level of a head's LIDC scale, or its place between the named levels."""
    words = LEVEL_WORDS.get(head, {})
    if level in words:
        return f"{level} {words[level]}"
    below = max((k for k in words if k < level), default=None)
    above = min((k for k in words if k > level), default=None)
    if below is not None and above is not None:
        return f"{level} (between {words[below]} and {words[above]})"
    return str(level)


def _algorithm_sequence(model: ModelInfo):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(name=model.name, family=codes.DCM.ArtificialIntelligence,
                                              version=model.version[:64])


def segmentation(series: Sequence[DicomSlice], outlines: Mapping[int, np.ndarray], model: ModelInfo):
    """A BINARY ``highdicom.seg.Segmentation`` of the nodule ("Nodule", AUTOMATIC by ``model``) on the slices of
    ``series`` in ``outlines`` (series index -> ``(H, W) bool``), referencing them; slices outlined nowhere are left
    out."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    keys = sorted(outlines)
    if not keys or not any(np.asarray(outlines[k]).any() for k in keys):
        raise LungvizError("the nodule model outlined nothing, so there is no outline to export.")
    slices = [series[k] for k in keys]
    headers = reference_headers(slices)
    masks = np.stack([np.asarray(outlines[k], bool) for k in keys])
    if masks.shape[1:] != (int(headers[0].get("Rows", 0)), int(headers[0].get("Columns", 0))):
        raise LungvizError("the outline's size differs from the DICOM image's, so it cannot be exported.")
    sops = [str(h.SOPInstanceUID) for h in headers]
    digest = hashlib.sha256(np.packbits(masks).tobytes()).hexdigest()
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Nodule",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm_sequence(model), tracking_uid=_uid("nodule", *sops[:1], model.version),
        tracking_id="Nodule 1")
    try:
        return hd.seg.Segmentation(
            source_images=headers, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description], series_instance_uid=_uid("seg-series", *sops, model.version, digest),
            series_number=SEG_SERIES_NUMBER, sop_instance_uid=_uid("seg", *sops, model.version, digest),
            instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=model.name,
            software_versions=model.version[:64], device_serial_number="none",
            series_description="lungviz nodule outline (research use)", content_label="NODULE",
            content_description="Nodule outline by lungviz (research use, not for diagnosis)")
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise LungvizError(f"the outline could not be written as DICOM SEG: the DICOM header does not allow it "
                           f"({err}).") from err


def _measurements(assessment: Assessment, algorithm) -> list:
    """TID 300 measurements: the size (when outlined), the estimate and each characteristic's expected rating."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    r = assessment.reading
    out = []

    def add(name, value: float, unit, **kw) -> None:
        out.append(hd.sr.Measurement(name=name, value=round(float(value), 6), unit=unit, algorithm_id=algorithm, **kw))

    if r.outlined:
        add(codes.SCT.LongAxis, r.long_axis_mm, codes.UCUM.Millimeter)
        add(codes.SCT.ShortAxis, r.short_axis_mm, codes.UCUM.Millimeter)
        add(codes.SCT.Diameter, r.mean_axes_mm, codes.UCUM.Millimeter, derivation=codes.SCT.Mean)
    if r.volume_mm3 is not None and np.isfinite(r.volume_mm3):
        add(codes.SCT.Volume, r.volume_mm3, codes.UCUM.CubicMillimeter)
    add(_code("PANELP", "Probability of a malignant LIDC panel rating (4-5)"), assessment.probability,
        codes.UCUM.NoUnits)
    for head in RATING_HEADS:
        if head not in NOMINAL_HEADS:
            add(_code(HEAD_CODES[head], HEAD_NAMES[head]), r.ratings[head], codes.UCUM.NoUnits)
    return out


def _evaluations(assessment: Assessment) -> list:
    """TID 1500 qualitative evaluations: each characteristic's level in the readers' words, the band and the call."""
    import highdicom as hd

    out = []
    for head in RATING_HEADS:
        level = int(np.clip(round(assessment.reading.ratings[head]), 1, len(assessment.reading.probabilities[head])))
        code = HEAD_CODES[head]
        out.append(hd.sr.QualitativeEvaluation(_code(code, HEAD_NAMES[head]),
                                               _code(f"{code}-{level}", _level_meaning(head, level))))
    band = assessment.risk_band.split(" ", 1)[0]
    out.append(hd.sr.QualitativeEvaluation(_code("BAND", "Risk band"), _code(f"BAND-{band.upper()}", band)))
    call = assessment.call
    meaning = "malignant (panel score 4-5)" if call == "malignant" else "benign (panel score 1-3)"
    out.append(hd.sr.QualitativeEvaluation(_code("CALL", "Model call"), _code(f"CALL-{call.upper()}", meaning)))
    return out


def measurement_report(series: Sequence[DicomSlice], indices: Sequence[int], assessment: Assessment,
                       model: ModelInfo, seg=None):
    """A ``highdicom.sr.Comprehensive3DSR`` TID 1500 measurement report of ``assessment`` on slices ``indices`` of
    ``series``: a volumetric ROI group referencing segment 1 of ``seg`` when given, else a group without an ROI."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    headers = reference_headers([series[k] for k in indices])
    sops = [str(h.SOPInstanceUID) for h in headers]
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version[:64])
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=_uid("device", model.name, model.version),
                                                      name=model.name, manufacturer_name=MANUFACTURER,
                                                      model_name=model.name)
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(codes.DCM.Device, device))
    tracking = hd.sr.TrackingIdentifier(uid=_uid("nodule", *sops[:1], model.version), identifier="Nodule 1")
    common = {"tracking_identifier": tracking, "finding_type": codes.SCT.Nodule, "algorithm_id": algorithm,
              "finding_sites": [hd.sr.FindingSite(codes.SCT.Lung)],
              "measurements": _measurements(assessment, algorithm), "qualitative_evaluations": _evaluations(assessment)}
    try:
        if seg is not None:
            segment = hd.sr.ReferencedSegment(  # (ReferencedSegment.from_segmentation misreads a one-segment SEG)
                sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID), segment_number=1,
                source_images=[hd.sr.SourceImageForSegmentation.from_source_image(h) for h in headers])
            group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=segment, **common)
        else:
            group = hd.sr.MeasurementsAndQualitativeEvaluations(**common)
        report = hd.sr.MeasurementReport(observation_context=context,
                                         procedure_reported=hd.sr.CodedConcept("24627-2", "LN", "Chest CT"),
                                         imaging_measurements=[group])
        content_id = [*sops, model.version, f"{assessment.probability:.6f}", str(getattr(seg, "SOPInstanceUID", ""))]
        return hd.sr.Comprehensive3DSR(
            evidence=[*headers, *([seg] if seg is not None else [])], content=report,
            series_instance_uid=_uid("sr-series", *content_id), series_number=SR_SERIES_NUMBER,
            sop_instance_uid=_uid("sr", *content_id), instance_number=1, manufacturer=MANUFACTURER,
            is_complete=True, series_description="lungviz nodule findings (research use)")
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise LungvizError(f"the findings could not be written as a DICOM SR: the DICOM header does not allow it "
                           f"({err}).") from err


def to_bytes(ds) -> bytes:
    """A DICOM dataset as the bytes of a DICOM file (preamble and file meta), for a download."""
    from pydicom import dcmwrite

    buf = _io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def dicom_findings(series: Sequence[DicomSlice], index: int, centre_rc: tuple[float, float] | None,
                   assessment: Assessment, model: ModelInfo) -> DicomFindings:
    """The SR and SEG of the nodule model's finding on a DICOM upload (a series, or one slice as a series of one):
    ``index`` is the slice the nodule was chosen on and ``centre_rc`` its centre there (None on a crop)."""
    outlines = source_outlines(assessment, series, index, centre_rc)
    indices = sorted(outlines)
    seg = segmentation(series, outlines, model) if any(m.any() for m in outlines.values()) else None
    sr = measurement_report(series, indices, assessment, model, seg)
    return DicomFindings(sr=to_bytes(sr), seg=None if seg is None else to_bytes(seg))


def upload_slices(data: bytes, name: str) -> list[DicomSlice]:
    """The DICOM slices of an upload (a DICOM file, or a zip of a series) with their headers; any other upload is
    refused in one sentence."""
    if name.lower().endswith(".zip") or data[:2] == b"PK":
        return read_series(data, name)
    if is_dicom_bytes(data) or name.lower().endswith((".dcm", ".dicom")):
        return [read_dicom(data, name)]
    raise LungvizError("DICOM SR and SEG are made for DICOM uploads only: this image carries no patient, study or "
                       "series for them to refer to.", source=name)
