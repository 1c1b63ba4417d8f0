"""Similar-case retrieval: a FAISS inner-product index over L2-normalised nodule embeddings, with metadata."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungviz.errors import LungvizError
from lungviz.files import atomic_write, replacing

INDEX_KIND = "lungviz-index"
#: The similar-case index the app loads from weights/ (built by ``python -m training index``), and its atlas beside it.
LIBRARY_INDEX = "index-nodule"
#: The FAISS index types lungviz builds (exact inner product; exact L2), by their four-byte tag.
FLAT_INDEX_TAGS = (b"IxFI", b"IxF2")
#: Tag, dimension (int32), rows (int64), two unused int64, trained flag (1 byte), metric (int32), float count (uint64).
_FLAT_HEADER = struct.Struct("<4siqqq?iQ")
#: Far beyond any case library, far below what a crafted header could make FAISS allocate.
MAX_INDEX_ROWS = 10_000_000
MAX_INDEX_DIM = 65_536
#: The types of the metadata fields the app reads from each record (when present; ``case_id`` always).
RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "case_id": (str,), "patient_id": (str,), "split": (str,), "malignancy": (int, type(None)),
    "malignant": (int, type(None)), "diameter_mm": (int, float, type(None)),
    "pixel_spacing_mm": (int, float, type(None)), "middle_index": (int,), "reader_scores": (list, type(None)),
    "images": (list,), "characteristics": (dict,),
}


def set_server_threads(n: int = 1) -> None:
    """Limit FAISS to ``n`` threads: a server answers many small queries, where one thread each is fastest."""
    import faiss

    faiss.omp_set_num_threads(max(1, n))


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as ``float32``."""
    x = np.asarray(x, np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


@dataclass
class CaseIndex:
    """A FAISS index and one metadata record per row (case id, split, labels, reader scores, diameter...)."""

    index: object  # faiss.Index
    records: list[dict]
    model: str
    dim: int

    def __len__(self) -> int:
        return len(self.records)

    def search(self, query: np.ndarray, k: int = 5, exclude: set[str] | None = None) -> list[list[tuple[float, dict]]]:
        """Top-``k`` records (cosine similarity, record) for each query row; ``exclude`` drops case ids."""
        q = normalise(np.atleast_2d(query))
        if q.shape[1] != self.dim:
            raise LungvizError(f"the query has {q.shape[1]} features but the index holds {self.dim}.")
        extra = len(exclude) if exclude else 0
        sims, ids = self.index.search(q, min(len(self), k + extra))  # type: ignore[attr-defined]
        out = []
        for srow, irow in zip(sims, ids, strict=True):
            hits = [(float(s), self.records[i]) for s, i in zip(srow, irow, strict=True)
                    if i >= 0 and not (exclude and self.records[i]["case_id"] in exclude)]
            out.append(hits[:k])
        return out

    def save(self, folder: Path, name: str) -> tuple[Path, Path]:
        """Write ``<name>.faiss`` and ``<name>.json`` (metadata), each whole or not at all."""
        import faiss

        folder.mkdir(parents=True, exist_ok=True)
        ipath, mpath = folder / f"{name}.faiss", folder / f"{name}.json"
        with replacing(ipath) as tmp:
            faiss.write_index(self.index, str(tmp))
        atomic_write(mpath, json.dumps({"kind": INDEX_KIND, "model": self.model, "dim": self.dim,
                                        "records": self.records}, indent=0))
        return ipath, mpath


def build_index(embeddings: np.ndarray, records: list[dict], model: str) -> CaseIndex:
    """An exact inner-product index (cosine on normalised rows); fine for thousands of cases."""
    import faiss

    x = normalise(embeddings)
    if len(x) != len(records):
        raise LungvizError(f"{len(x)} embeddings but {len(records)} metadata records.")
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return CaseIndex(index, list(records), model, int(x.shape[1]))


def check_index_file(path: Path) -> tuple[int, int]:
    """``(dimension, rows)`` of a FAISS file, read from its header before FAISS reads it: only the exact (flat)
    indexes lungviz builds are accepted, and their declared sizes must be sane and match the file's size, so a
    damaged or crafted header cannot make FAISS allocate more than the file holds."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(_FLAT_HEADER.size)
    if len(head) < _FLAT_HEADER.size:
        raise LungvizError(f"the index file is too short to be an index ({size} bytes).", source=path)
    tag, dim, rows, _, _, _, metric, floats = _FLAT_HEADER.unpack(head)
    if tag not in FLAT_INDEX_TAGS or metric not in (0, 1):
        raise LungvizError("the index file is not an exact (flat) FAISS index as lungviz builds them.", source=path)
    if not (0 < dim <= MAX_INDEX_DIM and 0 <= rows <= MAX_INDEX_ROWS):
        raise LungvizError(f"the index file declares {rows} cases of {dim} features, outside any plausible "
                           "library; it is damaged.", source=path)
    if floats != rows * dim or size != _FLAT_HEADER.size + 4 * floats:
        raise LungvizError(f"the index file declares {rows} cases of {dim} features but holds {size} bytes; it is "
                           "damaged or truncated.", source=path)
    return int(dim), int(rows)


def check_index_meta(meta: object, dim: int, rows: int, source: Path) -> tuple[str, list[dict]]:
    """``(model, records)`` of an index's metadata, checked against its FAISS file: a clear error instead of a
    KeyError or TypeError deep in the app when the JSON is damaged or belongs to another index."""
    def damaged(what: str) -> LungvizError:
        return LungvizError(f"the similar-case index's metadata is damaged: {what}.", source=source)

    if not isinstance(meta, dict):
        raise damaged("it is not a JSON object")
    if meta.get("kind", INDEX_KIND) != INDEX_KIND:
        raise damaged(f"it describes '{meta.get('kind')}', not a lungviz index")
    model, mdim, records = meta.get("model"), meta.get("dim"), meta.get("records")
    if not isinstance(model, str) or not model.strip():
        raise damaged("it names no model")
    if not isinstance(mdim, int) or isinstance(mdim, bool) or mdim != dim:
        raise damaged(f"it gives {mdim!r} features where the index holds {dim}")
    if not isinstance(records, list) or len(records) != rows:
        count = len(records) if isinstance(records, list) else "no"
        raise damaged(f"it lists {count} cases where the index holds {rows}")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("case_id"), str):
            raise damaged(f"case {i + 1} has no case id")
        for key, types in RECORD_TYPES.items():
            if key in rec and not isinstance(rec[key], types):
                raise damaged(f"case {rec['case_id']} has a {type(rec[key]).__name__} for '{key}'")
    return model, records


def load_index(folder: Path, name: str) -> CaseIndex:
    """Read an index written by :meth:`CaseIndex.save`, checking its header and metadata first."""
    import faiss

    ipath, mpath = Path(folder) / f"{name}.faiss", Path(folder) / f"{name}.json"
    if not ipath.is_file() or not mpath.is_file():
        raise LungvizError(f"the similar-case index '{name}' is not installed.", source=folder)
    try:
        dim, rows = check_index_file(ipath)
        meta = json.loads(mpath.read_text(encoding="utf-8"))
        model, records = check_index_meta(meta, dim, rows, mpath)
        index = faiss.read_index(str(ipath))
    except (OSError, ValueError, RuntimeError, RecursionError) as err:
        raise LungvizError(f"the similar-case index '{name}' is damaged ({err}).", source=folder) from err
    if (index.d, index.ntotal) != (dim, rows):
        raise LungvizError(f"the similar-case index '{name}' is damaged (FAISS read {index.ntotal} cases of "
                           f"{index.d} features; its header declares {rows} of {dim}).", source=folder)
    return CaseIndex(index, records, model, dim)


def precision_at_k(query_emb: np.ndarray, query_labels: np.ndarray, lib_emb: np.ndarray, lib_labels: np.ndarray,
                   k: int = 5) -> float:
    """Mean fraction of each query's top-``k`` library neighbours (cosine) that share its label."""
    q, lib = normalise(query_emb), normalise(lib_emb)
    sims = q @ lib.T
    top = np.argsort(-sims, axis=1)[:, :k]
    return float(np.mean(lib_labels[top] == np.asarray(query_labels)[:, None]))
