"""Late fusion and similar-case retrieval on tiny hand-made inputs."""

from __future__ import annotations

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
