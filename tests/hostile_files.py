"""Crafted uploads that claim more than they hold, or hold malformed values, built in code (issue 30).

Each builder returns the file's bytes. The large claims cost little to build: zeros streamed through a
compressor, headers written without the pixels they announce.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.conftest import make_dicom

SERIES_UID = "1.2.826.0.1.3680043.8.498.30"
REPO = Path(__file__).resolve().parent.parent


def _header(rows: int, cols: int, transfer_syntax: str, bits: int = 16):
    """A CT data set without pixel data claiming ``rows x cols`` at ``bits`` bits in ``transfer_syntax``."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(make_dicom(with_pixels=False, series_uid=SERIES_UID)))
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def _to_bytes(ds) -> bytes:
    import pydicom

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _deflated_file(ds, before: bytes, zeros: int, after: bytes = b"") -> bytes:
    """``ds``'s file meta in Deflated Explicit VR Little Endian, then its data set followed by ``before``, ``zeros``
    zero bytes and ``after``, deflated as one stream (the zeros streamed through the compressor, about 1,000:1)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflate.compress(body.getvalue() + before)]
    block = bytes(1 << 20)
    for start in range(0, zeros, len(block)):
        parts.append(deflate.compress(block[: zeros - start]))
    parts += [deflate.compress(after), deflate.flush()]
    return head.getvalue() + b"".join(parts)


def _element_header(group: int, element: int, vr: bytes, length: int) -> bytes:
    """An explicit VR little endian element header with a 4-byte length (OB, OW)."""
    return struct.pack("<HH2sHI", group, element, vr, 0, length)


def deflated_dicom(side: int = 16384) -> bytes:
    """A Deflated-syntax DICOM whose ``side x side`` 16-bit zero pixels are in the file (about 1,000:1 deflated)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    n_bytes = side * side * 2
    ds = _header(side, side, DeflatedExplicitVRLittleEndian)
    return _deflated_file(ds, _element_header(0x7FE0, 0x0010, b"OW", n_bytes), n_bytes)


def padded_deflated_dicom(pad: int) -> bytes:
    """A valid 16 x 16 Deflated-syntax CT slice carrying, before its pixels, a private field of ``pad`` zero bytes."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(make_dicom(np.full((16, 16), 1000, np.int16), series_uid=SERIES_UID)))
    pixels = ds.PixelData
    del ds.PixelData
    creator = struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 4) + b"XX  "  # private creator of group 0009
    return _deflated_file(ds, creator + _element_header(0x0009, 0x1010, b"OB", pad), pad,
                          _element_header(0x7FE0, 0x0010, b"OW", len(pixels)) + pixels)


def padded_deflated_zip(pad: int = 130 << 20, n: int | None = None) -> bytes:
    """A stored zip of ``n`` copies of :func:`padded_deflated_dicom` (about 130 KB each), by default enough that
    their data sets inflate past the zip's total inflation limit."""
    from lungviz.data import limits

    member = padded_deflated_dicom(pad)
    n = limits.MAX_ZIP_INFLATED_BYTES // pad + 2 if n is None else n
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for k in range(n):
            zf.writestr(f"series/s{k:03d}.dcm", member)
    return buf.getvalue()


def rle_dicom(side: int) -> bytes:
    """An RLE Lossless DICOM of a few hundred bytes whose header claims ``side x side`` 8-bit pixels."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    ds = _header(side, side, RLELossless, bits=8)
    segment = b"\x81\x00" * 16  # PackBits: 16 runs of 128 zeros
    frame = struct.pack("<16I", 1, 64, *([0] * 14)) + segment
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return _to_bytes(ds)


def short_dicom(side: int) -> bytes:
    """An uncompressed DICOM claiming ``side x side`` 16-bit pixels but holding 512 bytes of them."""
    from pydicom.uid import ExplicitVRLittleEndian

    ds = _header(side, side, ExplicitVRLittleEndian)
    ds.PixelData = bytes(512)
    ds["PixelData"].VR = "OW"
    return _to_bytes(ds)


def npy_header_only(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    """An NPY file whose header claims ``shape`` of ``descr`` and that holds a few bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + bytes(64)


def bzip2_zip(n_bytes: int = 600_000_000) -> bytes:
    """A zip holding one ``n_bytes`` member of zeros, bzip2-compressed (a few hundred bytes)."""
    buf = io.BytesIO()
    zeros = bytes(1_000_000)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_BZIP2) as zf, zf.open("series/big.dcm", "w", force_zip64=True) as fh:
        for _ in range(n_bytes // len(zeros)):
            fh.write(zeros)
    return buf.getvalue()


def lying_zip(n_bytes: int = 300_000_000, declared: int = 1000) -> bytes:
    """A zip whose one deflated member inflates to ``n_bytes`` but whose headers declare ``declared`` bytes."""
    buf = io.BytesIO()
    zeros = bytes(1_000_000)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("series/a.dcm", "w") as fh:
        for _ in range(n_bytes // len(zeros)):
            fh.write(zeros)
    data = bytearray(buf.getvalue())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    data[local + 22 : local + 26] = struct.pack("<I", declared)  # uncompressed size, local header
    data[central + 24 : central + 28] = struct.pack("<I", declared)  # and in the central directory
    return bytes(data)


def blank_slices_zip(n: int = 60, side: int = 2048) -> bytes:
    """A deflated zip of ``n`` blank ``side x side`` CT slices (about 8 KB each)."""
    buf = io.BytesIO()
    blank = np.zeros((side, side), np.int16)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for k in range(n):
            zf.writestr(f"series/s{k:03d}.dcm", make_dicom(blank, z_mm=2.5 * k, instance=k + 1))
    return buf.getvalue()


def empty_entries_zip(n: int = 200_000) -> bytes:
    """A zip of ``n`` empty members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k in range(n):
            zf.writestr(f"e{k}", b"")
    return buf.getvalue()


def with_transfer_syntax(data: bytes, uid: str) -> bytes:
    """A DICOM file whose file meta names transfer syntax ``uid`` while its data set stays as it was written."""
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
    start = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    meta.TransferSyntaxUID = uid
    head = DicomBytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=False)
    return head.getvalue() + data[start:]


def dicom_with(pixels: np.ndarray | None = None, **attributes) -> bytes:
    """A small CT slice (:func:`make_dicom`) with DICOM ``attributes`` set to the (well-typed) values given."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(make_dicom(np.full((16, 16), 1000, np.int16) if pixels is None else pixels)))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return _to_bytes(ds)


def dicom_with_text(values: dict[str, str], **make_kwargs) -> bytes:
    """A small valid CT slice whose fields in ``values`` hold the given raw text instead (e.g. "abc")."""
    import pydicom
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(io.BytesIO(make_dicom(np.full((16, 16), 1000, np.int16), **make_kwargs)))
    for keyword, text in values.items():
        tag = Tag(tag_for_keyword(keyword))
        raw = text.encode("latin-1")
        raw += b" " * (len(raw) % 2)
        ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
    return _to_bytes(ds)


# ------------------------------------------------------------------------------------------------ processes


@dataclass
class Run:
    """One child process: exit code (negative when killed at the timeout), output, wall time, peak memory (MB)."""

    code: int
    out: str
    err: str
    seconds: float
    peak_mb: float


#: Runs ``python ARGV[2:]`` as a fork of this small interpreter and writes the child's peak memory (KB) to ARGV[1].
#: On Linux a process started by exec keeps its parent's peak in ``ru_maxrss`` (here the test process's, hundreds of
#: MB); a process forked from a fresh interpreter starts from that interpreter's own few MB instead.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_python(argv: list[str], timeout: float = 60.0) -> Run:
    """``python ARGV`` in the repository, its process group killed after ``timeout`` s, with its own peak memory."""
    with (open(os.devnull, "rb") as stdin, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err,
          tempfile.NamedTemporaryFile("r") as peak):
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, peak.name, *argv], cwd=REPO, stdin=stdin, stdout=out,
                                stderr=err, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        peak_kb = float(peak.read() or "nan")
        return Run(proc.returncode, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"),
                   seconds, peak_kb / 1024)


def run_lungviz(argv: list[str], timeout: float = 60.0) -> Run:
    """``python -m lungviz ARGV`` in its own process (see :func:`run_python`)."""
    return run_python(["-m", "lungviz", *argv], timeout)


#: Reads ``sys.argv[2]`` as an upload after warming up on the small file ``sys.argv[1]`` of the same kind (so the
#: imports and decoders are loaded) and prints the peak memory the upload added to that baseline, in MB.
PROBE = """
import json, resource, sys
from lungviz.data import io as lio
from lungviz.errors import LungvizError

def read(path):
    try:
        (lio.read_series if path.endswith(".zip") else lio.load_image)(path)
        return "read"
    except LungvizError as err:
        return str(err)

read(sys.argv[1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcome = read(sys.argv[2])
extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps({"extra_mb": extra / 1024, "baseline_mb": base / 1024, "outcome": outcome}))
"""


def read_peak(warm_up: Path, upload: Path) -> dict:
    """``{"extra_mb", "baseline_mb", "outcome"}`` of reading ``upload`` in a fresh process (see :data:`PROBE`)."""
    run = run_python(["-c", PROBE, str(warm_up), str(upload)])
    assert run.code == 0, run.err
    return json.loads(run.out)
