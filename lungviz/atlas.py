"""The thumbnail atlas shipped with the similar-case index: one small grey picture of each library case's nodule view,
so the similar cases and the case library show pictures on a machine without the data folder.

One lossless PNG beside the index (``<index name>-atlas.png``): a sprite sheet of ``(S, S)`` tiles, row by row,
``columns`` to a row, in the order of its ``case_ids``; those, the tile size, what the pictures are and the source's
licence and attribution are JSON in the PNG's ``lungviz-atlas`` text chunk (the attribution also in ``Copyright``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungviz.data.preprocess import resize
from lungviz.errors import LungvizError
from lungviz.files import atomic_write

ATLAS_KIND = "lungviz-atlas"
#: The side of each thumbnail (px): big enough to recognise a nodule, small enough for a few MB in all.
ATLAS_PX = 64
#: What the atlas's pictures come from, with the licence under which they may be shipped.
ATTRIBUTION = ("Thumbnails derived from LIDC-IDRI, The Cancer Imaging Archive, licensed under Creative Commons "
               "Attribution 3.0 (CC BY 3.0). Armato SG III et al., The Lung Image Database Consortium (LIDC) and "
               "Image Database Resource Initiative (IDRI): a completed reference database of lung nodules on CT "
               "scans, Medical Physics 38:915-931, 2011; data doi:10.7937/K9/TCIA.2015.LO9QL9SX. Changes: each is "
               "one axial slice cropped around the nodule and scaled down.")
#: Tiles per row of the sheet (a near-square sheet for the 2,236 library cases).
ATLAS_COLUMNS = 48
#: Far beyond any case library; a damaged file cannot make the app allocate more.
MAX_ATLAS_CASES = 200_000


def atlas_path(folder: Path, index_name: str) -> Path:
    """Where the atlas of index ``index_name`` lives: beside it, in the weights folder."""
    return Path(folder) / f"{index_name}-atlas.png"


def to_thumbnail(view01: np.ndarray, size: int = ATLAS_PX) -> np.ndarray:
    """``(H, W) float in [0, 1]`` -> ``(size, size) uint8`` (resized when the sides differ, rounded)."""
    v = np.asarray(view01, np.float32)
    if v.ndim != 2:
        raise LungvizError(f"a thumbnail is cut from a 2D view, not shape {tuple(v.shape)}.")
    if v.shape != (size, size):
        v = resize(v, size)
    return np.round(np.clip(v, 0.0, 1.0) * 255.0).astype(np.uint8)


@dataclass(frozen=True)
class Atlas:
    """One ``(S, S) uint8`` thumbnail per library case, looked up by case id."""

    case_ids: list[str]
    images: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.dtype != np.uint8 or len(self.images) != len(self.case_ids):
            raise LungvizError(f"an atlas holds one uint8 picture per case; got {len(self.case_ids)} cases and "
                               f"pictures of shape {tuple(self.images.shape)}, {self.images.dtype}.")
        object.__setattr__(self, "_row", {c: i for i, c in enumerate(self.case_ids)})

    def __len__(self) -> int:
        return len(self.case_ids)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._row  # type: ignore[attr-defined]

    def thumbnail(self, case_id: str) -> np.ndarray | None:
        """The case's thumbnail ``(S, S) float32 in [0, 1]``, or None when the atlas lacks it."""
        i = self._row.get(case_id)  # type: ignore[attr-defined]
        return None if i is None else self.images[i].astype(np.float32) / 255.0

    @property
    def attribution(self) -> str:
        return str(self.meta.get("attribution", ATTRIBUTION))


def build_atlas(case_ids: Sequence[str], views01: Sequence[np.ndarray], what: str, size: int = ATLAS_PX) -> Atlas:
    """An atlas of ``views01`` (one ``(H, W) float in [0, 1]`` per case); ``what`` says what each picture shows."""
    if len(case_ids) != len(views01):
        raise LungvizError(f"{len(case_ids)} cases but {len(views01)} pictures for the atlas.")
    images = np.stack([to_thumbnail(v, size) for v in views01]) if len(views01) else np.zeros((0, size, size),
                                                                                                np.uint8)
    return Atlas(list(case_ids), images, {"kind": ATLAS_KIND, "size_px": size, "what": what,
                                          "attribution": ATTRIBUTION})


def save_atlas(atlas: Atlas, path: Path, columns: int = ATLAS_COLUMNS) -> Path:
    """Write the atlas as one PNG sprite sheet with its metadata in text chunks, whole or not at all."""
    from PIL import Image, PngImagePlugin

    n, size = len(atlas), int(atlas.images.shape[1]) if len(atlas) else ATLAS_PX
    rows = max(1, -(-n // columns))
    sheet = np.zeros((rows * size, columns * size), np.uint8)
    for i, tile in enumerate(atlas.images):
        r, c = divmod(i, columns)
        sheet[r * size : (r + 1) * size, c * size : (c + 1) * size] = tile
    info = PngImagePlugin.PngInfo()
    info.add_itxt("lungviz-atlas", json.dumps({**atlas.meta, "kind": ATLAS_KIND, "size_px": size, "columns": columns,
                                               "case_ids": list(atlas.case_ids)}), zip=True)
    info.add_itxt("Copyright", atlas.attribution)
    buf = io.BytesIO()
    Image.fromarray(sheet, mode="L").save(buf, "PNG", pnginfo=info, optimize=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), buf.getvalue())
    return Path(path)


def load_atlas(path: Path) -> Atlas:
    """Read an atlas written by :func:`save_atlas`, checking its metadata against the sheet's size before decoding
    it; a clear error when it is damaged."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise LungvizError("the thumbnail atlas is not installed.", source=path)
    try:
        with Image.open(path) as img:
            meta = json.loads(img.text.get("lungviz-atlas", "null"))  # type: ignore[attr-defined]
            if not isinstance(meta, dict) or meta.get("kind") != ATLAS_KIND:
                raise ValueError("it is not a lungviz thumbnail atlas")
            ids, size, columns = meta.pop("case_ids", None), meta.get("size_px"), meta.get("columns")
            if not isinstance(ids, list) or not all(isinstance(c, str) for c in ids) or len(ids) > MAX_ATLAS_CASES:
                raise ValueError("its list of cases is damaged")
            if not all(isinstance(v, int) and 0 < v <= 1024 for v in (size, columns)):
                raise ValueError(f"it gives tiles of {size!r} px, {columns!r} to a row")
            rows = max(1, -(-len(ids) // columns))
            if img.mode != "L" or img.size != (columns * size, rows * size):
                raise ValueError(f"its sheet is {img.size[0]} x {img.size[1]} {img.mode}, not {len(ids)} grey tiles "
                                 f"of {size} px, {columns} to a row")
            sheet = np.asarray(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise LungvizError(f"the thumbnail atlas is damaged ({err}).", source=path) from err
    tiles = sheet.reshape(rows, size, columns, size).transpose(0, 2, 1, 3).reshape(rows * columns, size, size)
    return Atlas([str(c) for c in ids], np.ascontiguousarray(tiles[: len(ids)]), meta)
