"""Shared fixtures: the real data folder (skipped when absent), tiny synthetic files and a synthetic slices tree."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungviz import paths

# ---------------------------------------------------------------------------------------------------------------
# Real data (../shared/data or LUNGVIZ_DATA); every fixture skips when its folder is missing.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real-data folder, resolved through :mod:`lungviz.paths` so ``LUNGVIZ_DATA`` applies."""
    root = paths.data_dir()
    if not root.is_dir():
        pytest.skip(f"real data folder not found: {root}")
    return root


def _sub(root: Path, name: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        pytest.skip(f"real data set not found: {folder}")
    return folder


@pytest.fixture(scope="session")
def lidc_slices_dir(data_dir: Path) -> Path:
    return _sub(data_dir, "lidc-slices")


@pytest.fixture(scope="session")
def lidc_dicom_dir(data_dir: Path) -> Path:
    return _sub(data_dir, "lidc-dicom")


@pytest.fixture(scope="session")
def histology_dir(data_dir: Path) -> Path:
    return _sub(data_dir, "chest-ct-histology")


@pytest.fixture(scope="session")
def real_lidc(lidc_slices_dir: Path):
    """``(cases, report)`` of the real slices set, imported once per test session (about 1 s)."""
    from lungviz.data.lidc import import_slices

    return import_slices(lidc_slices_dir)


@pytest.fixture(scope="session")
def real_labels(lidc_slices_dir: Path) -> list[dict[str, str]]:
    """The real ``labels.csv`` rows read with the csv module alone (an independent view of the labels)."""
    with (lidc_slices_dir / "labels.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------------------------
# Tiny synthetic files
# ---------------------------------------------------------------------------------------------------------------


def encode_image(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **kwargs) -> bytes:
    """Encode a numpy array with PIL (optionally converted to ``mode``) and return the file's bytes."""
    img = Image.fromarray(array)
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture
def image_bytes() -> Callable[..., bytes]:
    """Factory fixture: ``image_bytes(array, fmt="PNG", mode=None, **save_kwargs)`` -> encoded file bytes."""
    return encode_image


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_image(np.asarray(array, np.uint8)))
    return path


SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "SR": "1.2.840.10008.5.1.4.1.1.88.67",  # X-ray radiation dose report
    None: "1.2.840.10008.1.3.10",  # media storage directory (DICOMDIR)
}


def make_dicom(
    pixels: np.ndarray | None = None,
    *,
    modality: str | None = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    z_mm: float = 0.0,
    instance: int = 1,
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
    spacing: tuple[float, float] | None = (0.7, 0.7),
    with_pixels: bool = True,
    sop_class: str | None = None,
) -> bytes:
    """A complete DICOM file (preamble, file meta, dataset) built in memory with pydicom.

    The SOP class follows the modality (CT, MR, SR dose report; none = a DICOMDIR) unless given.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    raw = np.zeros((16, 16), np.int16) if pixels is None else np.asarray(pixels, np.int16)
    sop_class = sop_class or SOP_CLASSES.get(modality, CTImageStorage)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    if modality is not None:
        ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [-100.0, -120.0, z_mm]
    if spacing is not None:
        ds.PixelSpacing = list(spacing)
    ds.SliceThickness = 2.5
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if with_pixels:
        ds.Rows, ds.Columns = raw.shape
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = raw.tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def dicom_bytes() -> Callable[..., bytes]:
    """Factory fixture: ``dicom_bytes(pixels, modality=..., slope=..., ...)`` -> DICOM file bytes."""
    return make_dicom


# ---------------------------------------------------------------------------------------------------------------
# A synthetic LIDC-IDRI-slices tree
# ---------------------------------------------------------------------------------------------------------------

LABEL_COLUMNS = [
    "patient_id", "nodule", "n_slices", "n_readers", "malignancy_readers", "malignancy_median", "malignancy",
    "malignant", "subtlety_median", "internalStructure_median", "calcification_median", "sphericity_median",
    "margin_median", "lobulation_median", "spiculation_median", "texture_median", "diameter_mm", "volume_mm3",
    "pixel_spacing_mm", "slice_thickness_mm", "centroid_i", "centroid_j", "centroid_k", "series_uid", "label_check",
]

SIDE = 16  # the smallest side lungviz reads

#: Three readers' binary masks for the 2-slice nodule; the consensus counts are their sum.
READER_MASKS = np.zeros((3, 2, SIDE, SIDE), np.uint8)
READER_MASKS[0, :, 4:12, 4:12] = 1
READER_MASKS[1, :, 6:12, 6:12] = 1
READER_MASKS[2, 0, 6:10, 6:10] = 1


def label_row(**values) -> dict[str, str]:
    row = dict.fromkeys(LABEL_COLUMNS, "")
    row.update({k: str(v) for k, v in values.items()})
    return row


def write_labels(path: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> Path:
    columns = columns or LABEL_COLUMNS
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def slices_tree(tmp_path: Path) -> Path:
    """A tiny slices-layout tree.

    - ``P-0001/nodule-0``: 11 slices (slice-0 .. slice-10, pixel value 20 * index), 4 readers, consensus counts.
    - ``P-0001/nodule-1``: 2 slices, the three readers of :data:`READER_MASKS` as ``mask-0..2`` folders.
    - ``P-0002/nodule-0``: the same nodule with the merged ``consensus/`` counts of those three readers.
    - ``P-0003/nodule-0``: ``unmatched`` (no reader labels).
    - ``P-0004/nodule-0``: a labelled row whose ``images/`` folder is missing.
    """
    root = tmp_path / "lidc-slices"
    n0 = root / "P-0001" / "nodule-0"
    for i in range(11):  # written in an order unlike the numeric one
        write_png(n0 / "images" / f"slice-{i}.png", np.full((SIDE, SIDE), 20 * i))
        count = np.zeros((SIDE, SIDE), np.uint8)
        count[8, 8] = 4
        count[8, 9] = 2
        write_png(n0 / "consensus" / f"slice-{i}.png", count)
    for pid, per_reader in (("P-0001", True), ("P-0002", False)):
        folder = root / pid / ("nodule-1" if per_reader else "nodule-0")
        for s in range(2):
            write_png(folder / "images" / f"slice-{s}.png", np.full((SIDE, SIDE), 100 + s))
            if per_reader:
                for r in range(3):
                    write_png(folder / f"mask-{r}" / f"slice-{s}.png", READER_MASKS[r, s] * 255)
            else:
                write_png(folder / "consensus" / f"slice-{s}.png", READER_MASKS[:, s].sum(axis=0))
    (root / "P-0004" / "nodule-0").mkdir(parents=True)
    rows = [
        label_row(patient_id="P-0001", nodule="nodule-0", n_slices=11, n_readers=4, malignancy_readers="5 4 4 3",
                  malignancy_median=4.0, malignancy=4, malignant=1, texture_median=5.0, diameter_mm=12.5,
                  pixel_spacing_mm=0.7, slice_thickness_mm=2.5, centroid_i=10, centroid_j=11, centroid_k=12,
                  series_uid="1.2.3", label_check="ok"),
        label_row(patient_id="P-0001", nodule="nodule-1", n_slices=2, n_readers=3, malignancy_readers="1 2 3",
                  malignancy_median=2.0, malignancy=2, malignant=0, pixel_spacing_mm=0.6, label_check="ok"),
        label_row(patient_id="P-0002", nodule="nodule-0", n_slices=2, n_readers=3, malignancy_readers="3 4 4",
                  malignancy_median="", malignancy="", malignant="", label_check="zextent_mismatch"),
        label_row(patient_id="P-0003", nodule="nodule-0", n_slices=1, n_readers=0, malignancy_readers="",
                  label_check="unmatched"),
        label_row(patient_id="P-0004", nodule="nodule-0", n_slices=1, n_readers=1, malignancy_readers="2",
                  malignancy_median=2.0, malignancy=2, malignant=0, label_check="ok"),
    ]
    write_labels(root / "labels.csv", rows)
    return root


# ---------------------------------------------------------------------------------------------------------------
# Markdown that renders as something other than its text (an independent check of lungviz.present.text.plain_text)
# ---------------------------------------------------------------------------------------------------------------

#: A backslash before ASCII punctuation: CommonMark renders the character itself.
_ESCAPED = re.compile(r"\\([!-/:-@\[-`{-~])")
#: What a markdown parser (CommonMark, GFM, Streamlit's directives) makes live, searched with escapes removed.
LIVE_MARKUP = {
    "image or link": re.compile(r"!\[|\]\s*[(\[]"),
    "HTML tag or autolink": re.compile(r"<[A-Za-z/!?]"),
    "code span": re.compile(r"`"),
    "web or e-mail address": re.compile(r"(?i)https?://|www\.|\w@\w"),
    "Streamlit directive": re.compile(r":[a-z][a-z0-9-]*\["),
}
#: Shortcodes Streamlit replaces in the text after unescaping (emoji, its logo); its page icons are the page's own.
SHORTCODE = re.compile(r":(?!material/)[\w+-]+:")


def shown_text(markdown: str) -> str:
    """The characters a reader sees: escapes resolved, invisible word joiners dropped."""
    return _ESCAPED.sub(r"\1", markdown).replace("\u2060", "")


def live_markup(markdown: str) -> list[str]:
    """The kinds of live markup (links, images, HTML, code spans, web addresses, directives, shortcodes) that
    ``markdown`` would render; empty when it renders as plain text (bold and page icons aside)."""
    bare = _ESCAPED.sub("", markdown)
    found = [kind for kind, pattern in LIVE_MARKUP.items() if pattern.search(bare)]
    if SHORTCODE.search(_ESCAPED.sub(r"\1", markdown)):
        found.append("shortcode")
    return found


# ---------------------------------------------------------------------------------------------------------------
# A tiny weights folder for the app: untrained bundles and an index over a few real cases
# ---------------------------------------------------------------------------------------------------------------

#: Real library cases the app fixture indexes, with the split each is given.
APP_CASES = {
    "LIDC-IDRI-0001/nodule-0": "train", "LIDC-IDRI-0002/nodule-0": "train", "LIDC-IDRI-0003/nodule-0": "val",
    "LIDC-IDRI-0003/nodule-1": "test", "LIDC-IDRI-0003/nodule-2": "test", "LIDC-IDRI-0003/nodule-3": "test",
    "LIDC-IDRI-0005/nodule-0": "test", "LIDC-IDRI-0005/nodule-1": "train",
}
APP_INPUT_PX = 32


def _test_report(task: str, classes: list[str]) -> dict:
    """A held-out metrics report shaped as training writes it (values arbitrary but plausible)."""
    k = len(classes)
    rep = {"n": 40, "auroc": 0.71, "f1_weighted": 0.62, "ece": 0.05, "ece_raw": 0.2,
           "ci95": {"auroc": [0.6, 0.8], "f1_weighted": [0.5, 0.7]},
           "confusion": (np.eye(k, dtype=int) * 6 + 1).tolist(),
           "reliability": [{"lo": i / 10, "hi": (i + 1) / 10, "n": 4 if i >= 5 else 0,
                            "confidence": (i + 0.5) / 10 if i >= 5 else None,
                            "accuracy": (i + 0.5) / 10 if i >= 5 else None} for i in range(10)]}
    if task == "binary":
        rep.update({"f1_malignant": 0.45, "sensitivity": 0.5, "specificity": 0.8,
                    "reliability_malignant": [{"lo": i / 10, "hi": (i + 1) / 10, "n": 10 - i,
                                               "mean_p": (i + 0.5) / 10, "observed": 0.05 * i} for i in range(10)],
                    "readers": {"n_pairs": 30, "n_nodules": 12, "reader_auroc": 0.72, "model_auroc": 0.66,
                                "ci95": {"reader_auroc": [0.6, 0.8], "model_auroc": [0.5, 0.77]}}})
    else:
        rep.update({"qwk": 0.4, "within_one": 0.8, "ci95": {"qwk": [0.3, 0.5]}})
    return rep


def build_finder_weights(folder: Path, input_size: int = 16) -> Path:
    """Tiny untrained nodule-finder bundles (presence + localiser) with real specs, for wiring tests."""
    import torch

    from lungviz.inference.finder import LOCATE, PRESENCE
    from lungviz.models import ModelSpec, create_model, save_bundle

    folder.mkdir(parents=True, exist_ok=True)
    pre = {"field_mm": 48.0, "context_px": 128, "context_intensity": "minmax"}
    for name, classes, task in ((PRESENCE, ["background", "nodule"], "presence"),
                                (LOCATE, ["row_offset", "col_offset", "diameter"], "locate")):
        torch.manual_seed(3)
        model = create_model("cnn4", len(classes))
        spec = ModelSpec.from_model(model, classes=classes, view="patch", task=task, input_size=input_size,
                                    preprocessing=pre, split_fingerprint="fixture",
                                    metrics={"test": {"n": 10, "accuracy": 0.9}})
        save_bundle(model, spec, folder, name)
    return folder


def build_nodule_weights(folder: Path, input_size: int = 32) -> Path:
    """An untrained nodule model (NoduleNet) bundle, tiny, with head temperatures and a factor estimate, as
    `python -m training nodule` writes it."""
    import torch

    from lungviz.inference.factors import FACTORS, FactorModel
    from lungviz.models import ModelSpec, create_model, save_bundle

    torch.manual_seed(0)
    model = create_model("tf_efficientnet_lite0+nodule", 2)
    factors = FactorModel(names=FACTORS, coef=np.array([2.0, 0.5, 0.3, -0.2, 0.1, -1.0, 0.8]),
                          centre=np.array([2.2, 2.0, 2.0, 4.0, 4.5, 0.2, -1.0]), intercept=-1.4)
    spec = ModelSpec.from_model(model, classes=["benign", "malignant"], view="nodule", task="nodule",
                                input_size=input_size, preprocessing={"view": "nodule", "central_fraction": 0.5},
                                metrics={"binary_test": _test_report("binary", ["benign", "malignant"]),
                                         "score_test": _test_report("score", ["1", "2", "3", "4", "5"]),
                                         "test": {"n": 40, "outline": {"dice": 0.7, "ci95": {"dice": [0.6, 0.8]},
                                                                       "readers_pairwise_dice": 0.72},
                                                  "size": {"mae_long_axis_mm": 2.1},
                                                  "ratings": {"spiculation": {"single_reader": {
                                                      "n_pairs": 30, "model_qwk": 0.51, "reader_qwk": 0.44,
                                                      "ci95": {"model_qwk": [0.4, 0.6],
                                                               "reader_qwk": [0.3, 0.55]}}}}}},
                                extra={"head_temperatures": {"malignant": 1.2}, "cam_layer": "gated",
                                       "estimate": {"model": factors.to_dict(), "threshold": 0.12,
                                                    "test": {"sensitivity": 0.9, "specificity": 0.6},
                                                    "test_ci95": {"sensitivity": [0.8, 0.95]}}})
    save_bundle(model, spec, folder, "nodule")
    return folder


def build_app_weights(folder: Path, slices_root: Path) -> Path:
    """Everything the app loads from a weights folder, tiny: an untrained nodule model and two cnn4 slice-view
    bundles (32 px), a FAISS index over :data:`APP_CASES` (real images) with its thumbnail atlas, reference test
    predictions, a model card with a figure."""
    import json

    import torch

    from lungviz.atlas import atlas_path, build_atlas, save_atlas
    from lungviz.data.lidc import load_case
    from lungviz.inference.predict import load_models, predict, retrieval_query
    from lungviz.models import ModelSpec, create_model, save_bundle
    from lungviz.retrieval import LIBRARY_INDEX, build_index
    from training.index import case_record

    folder.mkdir(parents=True, exist_ok=True)
    tasks = {"binary": ["benign", "malignant"], "score": ["1", "2", "3", "4", "5"]}
    for task, classes in tasks.items():
        torch.manual_seed(0)
        model = create_model("cnn4", len(classes))
        spec = ModelSpec.from_model(
            model, classes=classes, view="slice", task=task, input_size=APP_INPUT_PX,
            preprocessing={"view": "slice", "field_mm": None}, temperature=1.5, split_fingerprint="fixture",
            metrics={"test": _test_report(task, classes), "val": {"n": 99, "auroc": 0.99}},
            extra={"prior_adjust": [0.2] + [-0.2] * (len(classes) - 1)})
        save_bundle(model, spec, folder, f"slice-{task}")
    build_nodule_weights(folder)
    models = load_models(folder, device="cpu")
    cases = [load_case(slices_root, cid) for cid in APP_CASES]
    emb = np.stack([retrieval_query(models, "nodule", c.load_slice(c.middle_index()), None, c.pixel_spacing_mm)
                    for c in cases])
    views = [predict(models, c.load_slice(c.middle_index()), None, c.pixel_spacing_mm).images["nodule"]
             for c in cases]
    records = [case_record(c, APP_CASES[c.case_id], slices_root, c.middle_index()) for c in cases]
    build_index(emb, records, "nodule").save(folder, LIBRARY_INDEX)
    save_atlas(build_atlas([c.case_id for c in cases], views, "fixture"), atlas_path(folder, LIBRARY_INDEX))
    from lungviz.data.splits import Split

    patients = {cid.split("/")[0]: split for cid, split in APP_CASES.items()}  # one split per patient
    Split(patients, "fixture", 42, "holdout", {}).save(folder / "splits" / "holdout.json")
    (folder / "retrieval.json").write_text(json.dumps({"model": "nodule", "n": len(cases), "dim": 256,
                                                       "precision_at_5_test_vs_train": 0.7,
                                                       "chance_precision_at_5": 0.6}))
    ref = folder / "reference"
    ref.mkdir(exist_ok=True)
    rows = ["patient_id,nodule,p_benign,p_malignant,prediction,truth"]
    for i, c in enumerate(c for c in cases if APP_CASES[c.case_id] == "test"):
        p = 0.2 + 0.2 * i
        truth = "malignant" if c.malignant else "benign"
        rows.append(f"{c.patient_id},{c.nodule_id},{1 - p:.5f},{p:.5f},{'malignant' if p >= 0.5 else 'benign'},"
                    f"{truth}")
    (ref / "fused-binary-test.csv").write_text("\n".join(rows) + "\n")
    build_finder_weights(folder)
    (folder / "figures").mkdir(exist_ok=True)
    write_png(folder / "figures" / "slice-binary-confusion.png", np.full((24, 24), 200))
    (folder / "README.md").write_text("# lungviz model card\n\nFixture card.\n\n"
                                      "![confusion](figures/slice-binary-confusion.png) "
                                      "![reliability](figures/missing.png)\n\n## Known limits\n")
    return folder


@pytest.fixture(scope="session")
def app_weights(tmp_path_factory, lidc_slices_dir: Path) -> Path:
    """A complete, tiny weights folder for the app (built once per session, about 2 s)."""
    return build_app_weights(tmp_path_factory.mktemp("app-weights"), lidc_slices_dir)


# ---------------------------------------------------------------------------------------------------------------
# Test tiers: `pytest -m "not slow"` is the everyday loop; the README's command runs everything
# ---------------------------------------------------------------------------------------------------------------

#: Whole modules in the slow tier: the app (AppTest), the real browser, training runs and the map localisation CLI.
SLOW_MODULES = {"test_app.py", "test_browser.py", "test_training.py", "test_camloc.py"}
#: Single tests in the slow tier: subprocess CLIs over real data, the shipped finder on whole series, two-process
#: stress, memory-bound checks and the real-browser download.
SLOW_TESTS = {
    "test_locate_cli_on_a_dicom_slice_and_a_series", "test_locate_cli_bad_input_exits_2_with_one_line",
    "test_fuzzed_uploads_through_the_cli",
    "test_train_finder_on_a_few_real_patients", "test_shipped_finder_ranks_each_confirmed_nodule_near_the_top",
    "test_two_processes_with_threads_lose_nothing",
    "test_the_cli_predicts_with_an_implausible_spacing_taken_as_unknown",
    "test_the_cli_refuses_a_crafted_upload_in_one_line", "test_the_peak_memory_of_a_crafted_upload_stays_bounded",
    "test_bad_input_in_a_real_process_prints_no_traceback",
    "test_inference_model_folds_batchnorm_with_the_same_outputs",
}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.path.name in SLOW_MODULES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
