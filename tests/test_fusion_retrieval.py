"""Late fusion and similar-case retrieval on tiny hand-made inputs."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest

from lungviz.errors import LungvizError
from lungviz.retrieval import build_index, load_index, normalise, precision_at_k


def test_index_search_save_load_and_exclude(tmp_path):
    emb = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    recs = [{"case_id": f"P{i}/n0", "malignant": int(i < 2)} for i in range(4)]
    idx = build_index(emb, recs, "m")
    hits = idx.search(np.array([1.0, 0.05, 0.0]), k=2)[0]
    assert [r["case_id"] for _, r in hits] == ["P0/n0", "P1/n0"] and hits[0][0] == pytest.approx(0.9988, abs=1e-3)
    assert [r["case_id"] for _, r in idx.search(np.array([1.0, 0, 0]), k=1, exclude={"P0/n0"})[0]] == ["P1/n0"]
    idx.save(tmp_path, "index-m")
    back = load_index(tmp_path, "index-m")
    assert len(back) == 4 and back.search(emb[2], 1)[0][0][1]["case_id"] == "P2/n0"
    with pytest.raises(LungvizError):
        back.search(np.ones(5), 1)
    with pytest.raises(LungvizError):
        load_index(tmp_path, "absent")


def _saved_index(folder) -> tuple:
    emb = np.eye(4, 3, dtype=np.float32) + 0.1
    build_index(emb, [{"case_id": f"P{i}/n0", "split": "train"} for i in range(4)], "m").save(folder, "ix")
    return folder / "ix.faiss", folder / "ix.json"


def _with_header(raw: bytes, dim: int | None = None, rows: int | None = None, floats: int | None = None) -> bytes:
    """``raw`` (a flat FAISS file) with its declared dimension, row count and float count replaced."""
    tag, d, n, a, b, trained, metric, f = struct.unpack_from("<4siqqq?iQ", raw)
    head = struct.pack("<4siqqq?iQ", tag, d if dim is None else dim, n if rows is None else rows, a, b, trained,
                       metric, f if floats is None else floats)
    return head + raw[len(head):]


@pytest.mark.parametrize(("change", "message"), [
    (lambda raw: _with_header(raw, rows=60_000_000_000, floats=180_000_000_000), "outside any plausible library"),
    (lambda raw: _with_header(raw, dim=2**30), "outside any plausible library"),
    (lambda raw: _with_header(raw, rows=1_000_000, floats=3_000_000), "holds 93 bytes"),  # 12 MB claimed
    (lambda raw: _with_header(raw, floats=2**40), "damaged or truncated"),  # rows x dim agree, the vector does not
    (lambda raw: raw[:-4], "damaged or truncated"),
    (lambda raw: raw + b"\0" * 4, "damaged or truncated"),
    (lambda raw: raw[:20], "too short"),
    (lambda raw: b"IxHN" + raw[4:], "not an exact (flat) FAISS index"),  # an HNSW tag: not what lungviz builds
    (lambda raw: b"PK\x03\x04" + raw[4:], "not an exact (flat) FAISS index"),
])
def test_a_crafted_index_header_is_refused_before_faiss_reads_it(tmp_path, monkeypatch, change, message):
    import faiss

    ipath, _ = _saved_index(tmp_path)
    ipath.write_bytes(change(ipath.read_bytes()))

    def refuse(*_args):
        raise AssertionError("FAISS must not read an index whose header was refused")

    monkeypatch.setattr(faiss, "read_index", refuse)
    with pytest.raises(LungvizError, match=re.escape(message)):
        load_index(tmp_path, "ix")


def _meta(folder) -> dict:
    return json.loads((folder / "ix.json").read_text())


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: [m], "is not a JSON object"),
    (lambda m: {**m, "kind": "something-else"}, "describes 'something-else', not a lungviz index"),
    (lambda m: {k: v for k, v in m.items() if k != "model"}, "names no model"),
    (lambda m: {**m, "model": 7}, "names no model"),
    (lambda m: {**m, "dim": "3"}, "gives '3' features where the index holds 3"),
    (lambda m: {**m, "dim": 5}, "gives 5 features where the index holds 3"),
    (lambda m: {**m, "records": m["records"][:3]}, "lists 3 cases where the index holds 4"),
    (lambda m: {**m, "records": {"a": 1}}, "lists no cases where the index holds 4"),
    (lambda m: {**m, "records": [*m["records"][:3], "P3/n0"]}, "case 4 has no case id"),
    (lambda m: {**m, "records": [*m["records"][:3], {"case_id": None}]}, "case 4 has no case id"),
    (lambda m: {**m, "records": [*m["records"][:3], {"case_id": "P3/n0", "diameter_mm": "big"}]},
     "case P3/n0 has a str for 'diameter_mm'"),
    (lambda m: {**m, "records": [*m["records"][:3], {"case_id": "P3/n0", "middle_index": 1.5}]},
     "case P3/n0 has a float for 'middle_index'"),
])
def test_damaged_index_metadata_is_a_clear_error(tmp_path, change, message):
    _, mpath = _saved_index(tmp_path)
    mpath.write_text(json.dumps(change(_meta(tmp_path))))
    with pytest.raises(LungvizError, match=f"metadata is damaged: (it )?{re.escape(message)}"):
        load_index(tmp_path, "ix")


@pytest.mark.parametrize("text", [b"{not json", b"\xff\xfe\x00garbage", b"[" * 100_000])
def test_unreadable_index_metadata_is_a_clear_error(tmp_path, text):
    _, mpath = _saved_index(tmp_path)
    mpath.write_bytes(text)
    with pytest.raises(LungvizError, match="is damaged"):
        load_index(tmp_path, "ix")


def test_index_and_metadata_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from lungviz import files

    ipath, mpath = _saved_index(tmp_path)
    before = ipath.read_bytes(), mpath.read_bytes()

    def disk_full(_fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        build_index(np.ones((2, 3), np.float32), [{"case_id": "a"}, {"case_id": "b"}], "m").save(tmp_path, "ix")
    assert (ipath.read_bytes(), mpath.read_bytes()) == before  # the old index is still whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix.faiss", "ix.json"]  # and no temporary file is left


def test_precision_at_k_and_normalise():
    lib = np.array([[1, 0], [0.8, 0.2], [0, 1], [0.1, 0.9]], np.float32)
    lab = np.array([1, 1, 0, 0])
    assert precision_at_k(np.array([[1, 0.1], [0.1, 1]]), np.array([1, 0]), lib, lab, k=2) == pytest.approx(1.0)
    assert precision_at_k(np.array([[1, 0.1]]), np.array([0]), lib, lab, k=2) == pytest.approx(0.0)
    assert np.allclose(np.linalg.norm(normalise(np.array([[3.0, 4.0]])), axis=1), 1.0)
