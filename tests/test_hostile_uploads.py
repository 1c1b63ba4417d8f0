"""The crafted uploads of issue 30: small files claiming huge images, malformed DICOM values, absurd geometry.

Each file is built in code (:mod:`tests.hostile_files`). The readers refuse it with a LungvizError naming the field
or the limit, or, for an implausible pixel spacing, read it with the spacing unknown and a note. The slow tests
measure the peak memory of reading each one in a fresh process and run it through ``python -m lungviz predict``.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lungviz.data import io as lio
from lungviz.data import limits
from lungviz.data.preprocess import view_from_context
from lungviz.data.upload import from_loaded, from_series
from lungviz.errors import LungvizError
from tests import hostile_files as hf
from tests.conftest import make_dicom
from tests.test_predict import weights  # noqa: F401  (module-scoped tiny bundles fixture)

#: (file name, builder, words the refusal must contain): the issue's files and the claims just inside the side limit.
CRAFTED: list[tuple[str, Callable[[], bytes], str]] = [
    ("deflated-16384.dcm", lambda: hf.deflated_dicom(16384), "deflated DICOM inflates to more than 144 MB"),
    ("rle-16384.dcm", lambda: hf.rle_dicom(16384), "16384 x 16384 pixels; the largest accepted side is 8192"),
    ("rle-8192.dcm", lambda: hf.rle_dicom(8192), "256 MB of memory once decoded.*decompression bomb"),
    ("short-8192.dcm", lambda: hf.short_dicom(8192), "256 MB of memory once decoded.*decompression bomb"),
    ("claims-60000x60000.npy", lambda: hf.npy_header_only((60000, 60000)), "60000 x 60000 pixels"),
    ("claims-8192x8192.npy", lambda: hf.npy_header_only((8192, 8192)), "truncated: its header claims 8192 x 8192"),
    ("bzip2-600mb.zip", hf.bzip2_zip, "'series/big.dcm' in the zip inflates to 572 MB, as the zip declares; .* 144 MB"),
    ("lying-size.zip", hf.lying_zip, "'series/a.dcm' in the zip cannot be extracted"),
    ("blank-60x2048.zip", hf.blank_slices_zip, "the series would take .* decompression bomb"),
    ("empty-200k.zip", hf.empty_entries_zip, "more than 10,000 files"),
    ("deflated-padded.zip", hf.padded_deflated_zip, "the zip inflates to more than 1.0 GB in all; lungviz reads"),
]

#: Seconds a crafted file may take to be refused where that takes inflating it up to a limit (the padded zip's data
#: sets inflate 1 GiB, the zip's total, before it is refused: about 2.5 s on one core); the others take 5 at most.
SECONDS_TO_REFUSE = {"deflated-padded.zip": 15.0}

#: (DICOM field, raw text it holds, words the refusal must contain)
MALFORMED: list[tuple[str, str, str]] = [
    ("RescaleSlope", "abc", "RescaleSlope is 'abc', not a number"),
    ("RescaleIntercept", "inf", "RescaleIntercept is 'inf', not a finite number"),
    ("PixelSpacing", "0.7", "PixelSpacing holds 1 value .*2 numbers are expected"),
    ("PixelSpacing", "abc\\def", "PixelSpacing is 'abc', not a number"),
    ("ImagePositionPatient", "1\\2", "ImagePositionPatient holds 2 values .*3 numbers are expected"),
    ("ImagePositionPatient", "a\\b\\c", "ImagePositionPatient is 'a', not a number"),
    ("InstanceNumber", "x", "InstanceNumber is 'x', not a number"),
    ("SliceThickness", "x", "SliceThickness is 'x', not a number"),
]
IMPLAUSIBLE_SPACINGS = [0.002, 0.0001]


def _malformed_name(keyword: str, text: str) -> str:
    return f"{keyword}-{''.join(c if c.isalnum() else '_' for c in text)}.dcm"


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> Callable[[str], Path]:
    """``crafted(name)``: the path of a crafted file, built on first use; also small valid warm-up files."""
    folder = tmp_path_factory.mktemp("crafted")
    builders = {name: build for name, build, _ in CRAFTED}
    builders.update({_malformed_name(k, t): (lambda k=k, t=t: hf.dicom_with_text({k: t})) for k, t, _ in MALFORMED})
    builders.update({f"spacing-{s:g}.dcm": (lambda s=s: _spacing_slice(s)) for s in IMPLAUSIBLE_SPACINGS})
    warm_dicom = make_dicom(np.full((16, 16), 1000, np.int16))
    buf = io.BytesIO()
    np.save(buf, np.zeros((16, 16), np.float32))
    builders.update({"warm.dcm": lambda: warm_dicom, "warm.npy": buf.getvalue, "warm.zip": lambda: _zip(warm_dicom)})

    def path(name: str) -> Path:
        target = folder / name
        if not target.exists():
            target.write_bytes(builders[name]())
        return target

    return path


def _spacing_slice(spacing: float) -> bytes:
    """A 512 x 512 CT slice (a nodule-like blob on lung) whose PixelSpacing is ``spacing`` mm."""
    yy, xx = np.mgrid[:512, :512]
    raw = np.where((yy - 256) ** 2 + (xx - 256) ** 2 < 100, 1024 + 40, 1024 - 800).astype(np.int16)
    return make_dicom(raw, spacing=(spacing, spacing))


def _zip(*members: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for k, data in enumerate(members):
            zf.writestr(f"series/s{k}.dcm", data)
    return buf.getvalue()


def _read(path: Path):
    return (lio.read_series if path.suffix == ".zip" else lio.load_image)(path)


# ------------------------------------------------------------------------------------------------ library


@pytest.mark.parametrize("name, build, words", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_a_small_file_claiming_a_huge_image_is_refused_before_decoding(crafted, name, build, words):
    path = crafted(name)
    t0 = time.perf_counter()
    with pytest.raises(LungvizError, match=words) as info:
        _read(path)
    assert time.perf_counter() - t0 < SECONDS_TO_REFUSE.get(name, 5.0)  # from what it claims, not once decoded
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize("keyword, text, words", MALFORMED, ids=[_malformed_name(k, t) for k, t, _ in MALFORMED])
def test_a_malformed_dicom_value_is_refused_naming_the_file_and_the_field(crafted, keyword, text, words):
    path = crafted(_malformed_name(keyword, text))
    with pytest.raises(LungvizError, match=f"^{path}: the DICOM field {words}"):
        lio.load_image(path)
    with pytest.raises(LungvizError, match=f"^series.zip:series/s0.dcm: the DICOM field {words}"):
        lio.read_series(_zip(path.read_bytes()), name="series.zip")


@pytest.mark.parametrize("spacing", IMPLAUSIBLE_SPACINGS)
def test_an_implausible_spacing_is_read_as_unknown_with_a_note(crafted, spacing):
    path = crafted(f"spacing-{spacing:g}.dcm")
    image = lio.load_image(path)
    assert image.pixel_spacing_mm is None and image.is_hu and image.pixels.shape == (512, 512)
    assert len(image.notes) == 1 and "PixelSpacing says" in image.notes[0] and "unknown" in image.notes[0]
    case = from_loaded(image, centre_rc=(256.0, 256.0))
    assert case.spacing_mm is None and image.notes[0] in case.notes
    t0 = time.perf_counter()
    view = view_from_context(case.context, "nodule", 64, case.spacing_mm)  # cut at the default spacing
    assert view.shape == (64, 64) and time.perf_counter() - t0 < 1
    series = lio.read_series(_zip(path.read_bytes()), name="series.zip")
    assert np.isnan(series[0].pixel_spacing_mm).all() and "PixelSpacing" in series[0].notes[0]
    assert from_series(series, 0, (256.0, 256.0)).notes[0] == series[0].notes[0]


# ------------------------------------------------------------------------------------------------ processes

REFUSED = [c[0] for c in CRAFTED] + [_malformed_name(k, t) for k, t, _ in MALFORMED]


@pytest.mark.slow
@pytest.mark.parametrize("name", [c[0] for c in CRAFTED])
def test_the_peak_memory_of_a_crafted_upload_stays_bounded(crafted, name):
    result = hf.read_peak(crafted("warm" + Path(name).suffix), crafted(name))
    assert result["outcome"].startswith(str(crafted(name)))  # refused
    assert result["extra_mb"] < 2 * limits.MAX_DECODED_BYTES / limits.MIB  # the bound
    assert result["extra_mb"] < 256, result  # refused before its claim is decoded: far under that bound


@pytest.mark.slow
@pytest.mark.parametrize("name", REFUSED)
def test_the_cli_refuses_a_crafted_upload_in_one_line(crafted, weights, name):  # noqa: F811
    path = crafted(name)
    run = hf.run_lungviz(["predict", "--slice", str(path), "--weights", str(weights), "--json"])
    assert run.code == 2 and run.out == "" and "Traceback" not in run.err
    lines = run.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}") and run.seconds < 60


@pytest.mark.slow
def test_the_cli_predicts_with_an_implausible_spacing_taken_as_unknown(crafted, weights):  # noqa: F811
    path = crafted("spacing-0.0001.dcm")
    run = hf.run_lungviz(["predict", "--slice", str(path), "--centre", "256,256", "--weights", str(weights), "--json"])
    assert run.code == 0 and "Traceback" not in run.err, run.err
    notes = json.loads(run.out)["notes"]
    assert any("PixelSpacing says 0.0001 x 0.0001 mm" in n for n in notes)
