"""Similar-case retrieval: a FAISS inner-product index over L2-normalised nodule embeddings, with metadata."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungviz.errors import LungvizError


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
        """Write ``<name>.faiss`` and ``<name>.json`` (metadata)."""
        import faiss

        folder.mkdir(parents=True, exist_ok=True)
        ipath, mpath = folder / f"{name}.faiss", folder / f"{name}.json"
        tmp = ipath.with_name(ipath.name + ".tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, ipath)
        mpath.write_text(json.dumps({"kind": "lungviz-index", "model": self.model, "dim": self.dim,
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


def load_index(folder: Path, name: str) -> CaseIndex:
    """Read an index written by :meth:`CaseIndex.save`."""
    import faiss

    ipath, mpath = Path(folder) / f"{name}.faiss", Path(folder) / f"{name}.json"
    if not ipath.is_file() or not mpath.is_file():
        raise LungvizError(f"the similar-case index '{name}' is not installed.", source=folder)
    try:
        meta = json.loads(mpath.read_text())
        index = faiss.read_index(str(ipath))
    except (OSError, ValueError, RuntimeError) as err:
        raise LungvizError(f"the similar-case index '{name}' is damaged ({err}).", source=folder) from err
    if index.ntotal != len(meta["records"]):
        raise LungvizError(f"the index holds {index.ntotal} cases but its metadata {len(meta['records'])}.")
    return CaseIndex(index, meta["records"], meta["model"], int(meta["dim"]))


def precision_at_k(query_emb: np.ndarray, query_labels: np.ndarray, lib_emb: np.ndarray, lib_labels: np.ndarray,
                   k: int = 5) -> float:
    """Mean fraction of each query's top-``k`` library neighbours (cosine) that share its label."""
    q, lib = normalise(query_emb), normalise(lib_emb)
    sims = q @ lib.T
    top = np.argsort(-sims, axis=1)[:, :k]
    return float(np.mean(lib_labels[top] == np.asarray(query_labels)[:, None]))
