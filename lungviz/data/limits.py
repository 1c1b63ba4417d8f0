"""Every limit an upload is checked against, in one place.

The readers (:mod:`lungviz.data.io`) compare what a file *claims* (its header, a zip's directory) with these
before they decode or allocate anything, so a small file that claims a huge image is refused cheaply. The
docs/app.md ("Upload limits") lists them for users.
"""

from __future__ import annotations

MIB = 1 << 20
GIB = 1 << 30

#: Largest image side accepted, in pixels (a CT slice is 512; large radiographs reach 4,000-5,000).
MAX_SIDE_PX = 8192
#: Smallest image side accepted, in pixels.
MIN_SIDE_PX = 16

#: Largest upload accepted as stored (a single image, or a whole zipped series).
MAX_UPLOAD_BYTES = 1 * GIB
#: Decoded pixels one upload may produce, counted as the arrays lungviz keeps (float32, every slice of a
#: series together).
MAX_DECODED_BYTES = 1 * GIB
#: Beyond :data:`EXPANSION_FREE_BYTES`, the decoded pixels may be at most this many times the bytes read:
#: lossless CT compresses a few times, a decompression bomb thousands of times.
MAX_EXPANSION = 64
#: Decoded bytes allowed whatever the ratio (a 4096 x 4096 float32 image).
EXPANSION_FREE_BYTES = 64 * MIB

#: Largest one file of a series (a DICOM slice, a zip member) may be as stored or once inflated: the largest
#: slice the side limit admits (8192 x 8192 at 16 bits) with room for its header.
MAX_FILE_BYTES = MAX_SIDE_PX * MAX_SIDE_PX * 2 + 16 * MIB
#: CT slices kept from one series.
MAX_SLICES = 2000
#: Files looked at in one series folder or zip (slices plus reports, DICOMDIR, thumbnails and the like).
MAX_SERIES_FILES = 10_000
#: Size of a zip's central directory (its list of members), read before any member.
MAX_ZIP_DIRECTORY_BYTES = 4 * MIB
#: Total bytes inflated while reading one series: a zip's members and the Deflated-syntax DICOM data sets in them (or
#: those of a series folder), each inflated once.
MAX_ZIP_INFLATED_BYTES = 1 * GIB
#: Zip members are inflated in pieces of this size, so reading stops as soon as a limit is passed.
ZIP_READ_CHUNK = 1 * MIB

#: DICOM bits per stored sample lungviz decodes.
DICOM_BITS_ALLOCATED = (8, 16, 32)

#: Largest RescaleSlope or RescaleIntercept magnitude read (CT uses about 1 and -1024).
MAX_RESCALE = 1e6

#: Plausible pixel spacing in millimetres; a value outside is treated as unknown.
SPACING_RANGE_MM = (0.05, 5.0)
#: Physical Hounsfield units after RescaleSlope/Intercept: scanners pad outside the scan field down to
#: -3024; extended-scale CT reaches about +30,000 in metal.
PHYSICAL_HU_RANGE = (-3100.0, 32000.0)


def describe_bytes(n: float) -> str:
    """A byte count for people: ``'806 bytes'``, ``'512 KB'``, ``'1.0 GB'``."""
    if n < 1024:
        return f"{n:.0f} bytes"
    if n < MIB:
        return f"{n / 1024:.0f} KB"
    if n < GIB:
        return f"{n / MIB:.0f} MB"
    return f"{n / GIB:.1f} GB"
