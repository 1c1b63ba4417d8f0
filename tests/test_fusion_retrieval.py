"""Late fusion and similar-case retrieval on tiny hand-made inputs."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest

from lungviz.errors import LungvizError
from lungviz.fusion import SIZE_FEATURE, Fusion, fit_fusion, size_feature
from lungviz.metrics import nll
from lungviz.retrieval import build_index, load_index, normalise, precision_at_k


def test_fusion_learns_to_trust_the_informative_view():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    good = np.stack([np.zeros(400), (2 * y - 1) * 2.0 + rng.normal(0, 1, 400)], 1)
    noise = np.stack([np.zeros(400), rng.normal(0, 2, 400)], 1)
    f = fit_fusion(["slice", "nodule"], [noise, good], y)
    assert f.weights[1] > 2.0 and abs(f.weights[0]) < 0.25 * f.weights[1]  # true log-odds are 4x the good view
    assert nll(f.logits([noise, good]), y) < nll(good, y) + 1e-6
    again = Fusion.from_dict(f.to_dict())
    assert np.allclose(again.logits([noise, good]), f.logits([noise, good]))
    with pytest.raises(LungvizError):
        f.logits([good])


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


def test_fusion_weights_never_negative():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    good = np.stack([np.zeros(300), (2 * y - 1) * 2.0 + rng.normal(0, 1, 300)], 1)
    anti = np.stack([np.zeros(300), good[:, 1] * 1.5 - (2 * y - 1) * 2.0], 1)  # correlated, misleading view
    f = fit_fusion(["slice", "nodule"], [anti, good], y)
    assert (f.weights >= 0).all()


def test_fusion_with_a_size_feature():
    rng = np.random.default_rng(2)
    n = 400
    log_d = rng.normal(2.0, 0.5, n)  # log diameter (mm)
    y = (rng.random(n) < 1 / (1 + np.exp(-3.0 * (log_d - 2.0)))).astype(int)  # bigger = more often malignant
    weak = np.stack([np.zeros(n), rng.normal(0, 1, n) + 0.5 * (2 * y - 1)], 1)
    other = np.stack([np.zeros(n), rng.normal(0, 1, n)], 1)
    plain = fit_fusion(["slice", "nodule"], [other, weak], y)
    sized = fit_fusion(["slice", "nodule"], [other, weak], y, features=log_d[:, None], feature_names=[SIZE_FEATURE])
    fw = sized.feature_weights
    assert fw.shape == (1, 2) and fw[0, 1] - fw[0, 0] > 1.5  # size pushes towards malignant
    assert nll(sized.logits([other, weak], log_d[:, None]), y) < nll(plain.logits([other, weak]), y) - 0.05
    again = Fusion.from_dict(sized.to_dict())
    assert again.features == [SIZE_FEATURE] and again.size_source == "finder"  # the default, as older specs
    outlined = fit_fusion(["slice", "nodule"], [other, weak], y, features=log_d[:, None],
                          feature_names=[SIZE_FEATURE], size_source="outliner")
    assert outlined.to_dict()["size_source"] == "outliner" and Fusion.from_dict(outlined.to_dict()).size_source == \
        "outliner"
    legacy = {k: v for k, v in sized.to_dict().items() if k != "size_source"}  # written before the outliner
    assert Fusion.from_dict(legacy).size_source == "finder"
    assert np.allclose(again.logits([other, weak], log_d[:, None]), sized.logits([other, weak], log_d[:, None]))
    assert "features" not in plain.to_dict() and Fusion.from_dict(plain.to_dict()).features == []
    with pytest.raises(LungvizError, match="also needs log_diameter_mm"):
        sized.logits([other, weak])
    with pytest.raises(LungvizError, match="features of shape"):
        fit_fusion(["slice", "nodule"], [other, weak], y, features=log_d[:10, None], feature_names=[SIZE_FEATURE])
    assert size_feature(np.array([0.0, 1.0, np.e])).tolist() == pytest.approx([0.0, 0.0, 1.0])


def test_fusion_with_outline_features_standardises_them_and_counts_a_missing_one_at_its_mean():
    from lungviz.fusion import feature_row

    rng = np.random.default_rng(5)
    n = 500
    log_d = rng.normal(2.0, 0.5, n)
    contrast = rng.normal(0.3, 0.05, n)  # a small-valued feature that carries signal of its own
    y = (rng.random(n) < 1 / (1 + np.exp(-(2.0 * (log_d - 2.0) + 40.0 * (contrast - 0.3))))).astype(int)
    views = [np.zeros((n, 2)), np.stack([np.zeros(n), rng.normal(0, 1, n)], 1)]
    x = np.stack([log_d, contrast], 1)
    f = fit_fusion(["slice", "nodule"], views, y, features=x, feature_names=[SIZE_FEATURE, "contrast"],
                   size_source="outliner")
    assert f.feature_centre[0] == 0.0 and f.feature_scale[0] == 1.0  # the size is used as it is
    assert f.feature_centre[1] == pytest.approx(contrast.mean()) and f.feature_scale[1] == pytest.approx(contrast.std())
    assert f.feature_weights[1, 1] - f.feature_weights[1, 0] > 1.0  # brighter than its ring: more often malignant
    again = Fusion.from_dict(f.to_dict())
    assert np.allclose(again.logits(views, x), f.logits(views, x))
    missing = x[:1].copy()
    missing[0, 1] = np.nan  # nothing outlined: the feature counts at its mean
    at_mean = x[:1].copy()
    at_mean[0, 1] = f.feature_centre[1]
    assert np.allclose(f.logits([v[:1] for v in views], missing), f.logits([v[:1] for v in views], at_mean))
    with_gap = x.copy()
    with_gap[::7, 1] = np.nan  # a few cases where nothing was outlined still fit, on the others' mean
    assert np.isfinite(fit_fusion(["slice", "nodule"], views, y, features=with_gap, feature_names=[
        SIZE_FEATURE, "contrast"], size_source="outliner").feature_centre).all()
    with pytest.raises(LungvizError, match="not measured on any"):
        fit_fusion(["slice", "nodule"], views, y, features=np.stack([log_d, np.full(n, np.nan)], 1),
                   feature_names=[SIZE_FEATURE, "contrast"], size_source="outliner")
    unmeasured_size = x[:1].copy()
    unmeasured_size[0, 0] = np.nan  # the size has no mean to fall back on: refused, never silently 1 mm
    with pytest.raises(LungvizError, match="size could not be measured"):
        f.logits([v[:1] for v in views], unmeasured_size)
    row = feature_row([SIZE_FEATURE, "contrast", "solidity"], np.e, {"contrast": 0.4})
    assert row.shape == (1, 3) and row[0, :2] == pytest.approx([1.0, 0.4]) and np.isnan(row[0, 2])


@pytest.mark.parametrize(("spec", "message"), [
    ({"views": ["slice"], "weights": [1.0]}, "incomplete or damaged"),
    ({"views": ["slice", "nodule"], "weights": [1.0, 1.0], "bias": [0, 0], "features": [SIZE_FEATURE]},
     "incomplete or damaged"),
    ({"views": ["slice", "nodule"], "weights": [1.0, 1.0], "bias": [0, 0], "features": ["shape"],
      "feature_weights": [[0, 1]]}, "unknown feature"),
    ({"views": ["slice", "nodule"], "weights": [1.0, 1.0], "bias": [0, 0], "features": [SIZE_FEATURE],
      "feature_weights": [[0, 1, 2]]}, "do not match"),
    ({"views": ["slice", "nodule"], "weights": [1.0], "bias": [0, 0]}, "do not match"),
    ({"views": ["slice", "nodule"], "weights": [1.0, 1.0], "bias": [0, 0], "features": [SIZE_FEATURE],
      "feature_weights": [[0, 1]], "size_source": "ruler"}, "unknown tool"),
    ({"views": ["slice", "nodule"], "weights": [1.0, 1.0], "bias": [0, 0], "features": [SIZE_FEATURE, "contrast"],
      "feature_weights": [[0, 1], [0, 1]], "size_source": "finder"}, "need the nodule outliner"),
    ({"views": ["slice", "nodule"], "weights": [1.0, 1.0], "bias": [0, 0], "features": [SIZE_FEATURE, "contrast"],
      "feature_weights": [[0, 1], [0, 1]], "size_source": "outliner", "feature_centre": [0.0]}, "standardisation"),
    ({"views": ["slice", "nodule"], "weights": [1.0, 1.0], "bias": [0, 0], "features": [SIZE_FEATURE, "contrast"],
      "feature_weights": [[0, 1], [0, 1]], "size_source": "outliner"}, "standardisation"),
    ({"views": ["slice", "nodule"], "weights": [1.0, 1.0], "bias": [0, 0], "features": [SIZE_FEATURE, "contrast"],
      "feature_weights": [[0, 1], [0, 1]], "size_source": "outliner", "feature_centre": [0.0, 0.3],
      "feature_scale": [1.0, 0.0]}, "standardisation"),
])
def test_damaged_fusion_specs_are_clear_errors(spec, message):
    with pytest.raises(LungvizError, match=message):
        Fusion.from_dict(spec)


def test_fusion_components_and_their_ensemble_members():
    from lungviz.fusion import component_networks, mean_logits

    spec = {"components": ["slice-binary", "nodule-binary"],
            "members": {"nodule-binary": ["nodule-binary-64", "nodule-binary-b"]}}
    assert component_networks(spec) == {"slice-binary": ["slice-binary"],
                                        "nodule-binary": ["nodule-binary", "nodule-binary-64", "nodule-binary-b"]}
    assert component_networks({"components": ["a"]}) == {"a": ["a"]}
    for bad in ({"x": ["m"]}, {"a": "m"}, {"a": [""]}, ["m"], {"a": ["m", "m"]}, {"a": ["a"]}, {"a": [3]}):
        with pytest.raises(LungvizError, match="ensemble members"):
            component_networks({"components": ["a"], "members": bad})
    for bad in ("a", [], ["a", "a"], [""], None):
        with pytest.raises(LungvizError, match="list of views is damaged"):
            component_networks({"components": bad})
    assert np.allclose(mean_logits([np.array([[0.0, 2.0]]), np.array([[2.0, 1.0]])]), [[1.0, 1.5]])


def test_grouped_folds_keep_each_patient_whole_and_are_reproducible():
    from training.fuse import grouped_folds

    groups = [f"P{i // 3}" for i in range(60)] + ["P99"]  # 21 patients, most with 3 nodules
    fold = grouped_folds(groups, 5, seed=0)
    assert set(fold) == set(range(5))
    assert all(len({f for g, f in zip(groups, fold, strict=True) if g == p}) == 1 for p in set(groups))
    patients_per_fold = [len({g for g, f in zip(groups, fold, strict=True) if f == k}) for k in range(5)]
    assert max(patients_per_fold) - min(patients_per_fold) <= 1  # dealt round-robin
    assert np.array_equal(fold, grouped_folds(groups, 5, seed=0))
    assert not np.array_equal(fold, grouped_folds(groups, 5, seed=1))


def test_an_upload_is_embedded_as_its_library_case_was(tmp_path, real_lidc):
    """The index command and the app's query read a slice the same way (the nodule model's two passes, its pooled
    features), so a library slice uploaded again finds its own case at similarity 1."""
    from conftest import build_nodule_weights

    from lungviz.models import load_bundle
    from lungviz.predict import ModelSet, retrieval_query
    from training.data import SliceStore, central_slices
    from training.index import nodule_library

    bundle = load_bundle(build_nodule_weights(tmp_path), "nodule", device="cpu")
    cases = [c for c in real_lidc[0] if c.malignancy is not None][:3]
    store = SliceStore(cases, progress=False)
    middles = [c.middle_index() for c in cases]
    emb, views = nodule_library(bundle, store, middles, max_slices=1)
    assert emb.shape == (3, bundle.model.embed_dim) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert [v.shape for v in views] == [(32, 32)] * 3  # the model's own view of each middle slice
    models = ModelSet(bundles={}, fusions={}, folder=tmp_path, nodule=bundle)
    for ci, case in enumerate(cases):
        k = central_slices(store.n_slices(ci), 1, 0.5)[0]  # the one slice the library read
        query = retrieval_query(models, "nodule", store.slice01(ci, k), None, case.pixel_spacing_mm)
        assert float(query @ emb[ci]) > 0.9999
    with pytest.raises(LungvizError, match="not installed"):
        retrieval_query(models, "nodule-binary", store.slice01(0, 0), None, None)
