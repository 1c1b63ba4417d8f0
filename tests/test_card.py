"""The model card is generated from the spec files, numbers and figures included."""

from __future__ import annotations

import json

import numpy as np

from training.card import members_text, write_card


def _rep(auroc: float, n_classes: int) -> dict:
    y = [0, 1] * 5
    return {"n": 10, "auroc": auroc, "auprc_weighted": 0.7, "f1_weighted": 0.66, "f1_macro": 0.6,
            "f1_malignant": 0.5, "qwk": 0.61, "ece": 0.04, "ece_raw": 0.12, "ci95": {"auroc": [auroc - 0.1, 0.99]},
            "confusion": np.eye(n_classes, dtype=int).tolist(),
            "reliability_malignant": [{"n": 5, "mean_p": 0.2, "observed": 0.2}, {"n": 5, "mean_p": 0.8,
                                                                                  "observed": 0.8}],
            "reliability": [{"n": 10, "confidence": 0.7, "accuracy": 0.7}], "y": y,
            "readers": {"n_pairs": 12, "reader_auroc": 0.73, "model_auroc": 0.88,
                        "ci95": {"reader_auroc": [0.6, 0.8], "model_auroc": [0.8, 0.95]}}}


def _binary_spec() -> dict:
    return {"arch": "tf_efficientnet_lite0", "view": "nodule", "task": "binary", "classes": ["benign", "malignant"],
            "input_size": 64, "temperature": 1.3, "preprocessing": {"aggregate": "mean logit"},
            "split_fingerprint": "abc", "training": {"pretrained": True, "device": "cpu", "train_seconds": 600,
                                                    "images_per_second": 40, "best_epoch": 7},
            "metrics": {"test": _rep(0.931, 2), "val": _rep(0.9, 2), "test_single_slice": _rep(0.9, 2)}}


def test_card_lists_every_model_with_its_figures(tmp_path):
    (tmp_path / "nodule-binary.json").write_text(json.dumps(_binary_spec()))
    (tmp_path / "retrieval.json").write_text(json.dumps({"n": 2236, "index": "index-nodule.faiss", "model": "nodule",
                                                         "precision_at_5_test_vs_train": 0.81, "n_test_queries": 332,
                                                         "precision_at_5_val_vs_train": 0.82, "n_val_queries": 336,
                                                         "chance_precision_at_5": 0.67,
                                                         "atlas": "index-nodule-atlas.png", "atlas_bytes": 3_880_000}))
    card = write_card(tmp_path).read_text()
    assert "Research and education use only" in card
    assert "| nodule-binary | 10 | 0.931 [0.831, 0.990]" in card
    assert "0.120 → 0.040" in card and "AUROC 0.730 [0.600, 0.800]" in card
    assert "test queries **0.810** (n = 332), validation 0.820 (n = 336); chance 0.670" in card
    assert "Thumbnail atlas `index-nodule-atlas.png` (3.9 MB" in card and "Creative Commons Attribution 3.0" in card
    assert "How much of the ECE is chance" not in card  # no band recorded: no section
    spec = _binary_spec()
    spec["metrics"]["test"]["ece_if_calibrated"] = {"median": 0.031, "p95": 0.052, "p_value": 0.4}
    (tmp_path / "nodule-binary.json").write_text(json.dumps(spec))
    card = write_card(tmp_path).read_text()
    assert "How much of the ECE is chance" in card and "| nodule-binary | 10 | 0.040 | 0.031 [0.052] | 0.40 |" in card
    assert "stored float16 weights" not in card  # this spec does not say its figures came from the stored weights
    spec["metrics_of"] = "the stored (float16) weights"
    (tmp_path / "nodule-binary.json").write_text(json.dumps(spec))
    assert "Every figure is measured with the stored float16 weights" in write_card(tmp_path).read_text()
    assert (tmp_path / "figures" / "nodule-binary-confusion.png").stat().st_size > 1000
    assert "figures/nodule-binary-reliability.png" in card


def test_card_sets_the_fused_model_beside_the_image_measured_size(tmp_path):
    fused = {"kind": "fusion", "view": "fused", "task": "binary", "classes": ["benign", "malignant"],
             "components": ["slice-binary", "nodule-binary"], "split_fingerprint": "abc",
             "fusion": {"views": ["slice", "nodule"], "weights": [0.1, 0.6], "bias": [1.0, -1.0],
                        "features": ["log_diameter_mm"], "feature_weights": [[-0.5, 0.5]]},
             "training": {"val_score": 0.888, "val_score_views_only": 0.866},
             "metrics": {"test": _rep(0.831, 2), "val": _rep(0.888, 2)},
             "size_only_auroc": {"val": {"n": 336, "auroc": 0.88, "ci95": {"auroc": [0.83, 0.92]}},
                                 "test": {"n": 332, "auroc": 0.849, "ci95": {"auroc": [0.797, 0.896]}}}}
    (tmp_path / "fused-binary.json").write_text(json.dumps(fused))
    card = write_card(tmp_path).read_text()
    assert "test AUROC 0.849 [0.797, 0.896] on 332 nodules, validation 0.880" in card
    assert "the two image views do not add to the measured size" in card and "scored 0.888 against 0.880" in card
    fused["size_only_auroc"]["test"]["auroc"] = 0.80  # below the fused model: no such warning
    (tmp_path / "fused-binary.json").write_text(json.dumps(fused))
    card = write_card(tmp_path).read_text()
    assert "AUROC 0.800" in card and "do not add to the measured size" not in card


def test_card_lists_what_else_was_tried_on_validation(tmp_path):
    ablation = {"setup": {"view": "nodule", "task": "binary", "epochs": 30, "epoch_samples": 1536, "stages": [2, 10]},
                "results": [{"variant": "recipe", "overrides": {}, "val_auroc": 0.8634, "val_auroc_ci95": [0.81, 0.91],
                             "val_f1_malignant": 0.6, "val_ece": 0.04, "best_epoch": 23, "seconds": 480},
                            {"variant": "nodule view 48 mm", "overrides": {"field_mm": 48.0}, "val_auroc": 0.822,
                             "val_auroc_ci95": None,
                             "val_f1_malignant": None, "val_ece": 0.05, "best_epoch": 19, "seconds": 420}]}
    (tmp_path / "ablation.json").write_text(json.dumps(ablation))
    card = write_card(tmp_path).read_text()
    assert "## What else was tried (nodule-binary, validation split only)" in card
    assert "| recipe | 0.863 [0.810, 0.910] | 0.600 | 0.040 | 23 | 8.0 |" in card
    assert "| nodule view 48 mm | 0.822 | – | 0.050 | 19 | 7.0 |" in card
    assert "30 epochs of 1536 samples" in card and "span" not in card  # no shipped model to compare the seeds with
    assert "The val ECE column: top-class ECE measured with the earlier calibration" in card  # no calibration key
    (tmp_path / "ablation.json").write_text(json.dumps(ablation | {"calibration": "prior-after-temperature"}))
    assert "earlier calibration" not in write_card(tmp_path).read_text()
    spec = _binary_spec()  # validation AUROC 0.900
    spec["training"].update(epochs=30, epoch_samples=1536)
    (tmp_path / "nodule-binary.json").write_text(json.dumps(spec))
    card = write_card(tmp_path).read_text()
    assert "(the shipped nodule-binary included, validation AUROC 0.900) span 0.863-0.900" in card
    spec["training"].update(epochs=60, epoch_samples=3072)  # shipped from another recipe: not one of its seeds
    (tmp_path / "nodule-binary.json").write_text(json.dumps(spec))
    assert "span" not in write_card(tmp_path).read_text()
    (tmp_path / "ablation.json").unlink()
    assert "What else was tried" not in write_card(tmp_path).read_text()


def test_card_reports_the_outliner_and_names_the_fused_models_size_source(tmp_path):
    rep = {"n": 332, "dice": 0.76, "ci95": {"dice": [0.74, 0.78]}, "ratio_to_readers_median": 0.71,
           "size_auroc": {"n": 332, "auroc": 0.842, "ci95": {"auroc": [0.79, 0.89]}}}
    outliner = {"arch": "tf_efficientnet_lite0+fpn", "input_size": 96, "task": "outline", "classes": ["nodule"],
                "preprocessing": {"field_mm": 48.0, "target": "union", "threshold": 0.5},
                "training": {"device": "cpu", "train_seconds": 840, "images_per_second": 45, "best_epoch": 18,
                             "epochs": 20},
                "metrics": {"val": {**rep, "n": 336}, "test": rep}}
    (tmp_path / "outliner.json").write_text(json.dumps(outliner))
    fused = {"kind": "fusion", "view": "fused", "task": "binary", "classes": ["benign", "malignant"],
             "components": ["slice-binary", "nodule-binary"], "split_fingerprint": "abc",
             "fusion": {"views": ["slice", "nodule"], "weights": [0.1, 0.6], "bias": [1.0, -1.0],
                        "features": ["log_diameter_mm"], "feature_weights": [[-0.5, 0.5]], "size_source": "outliner"},
             "training": {"val_score": 0.9, "val_score_views_only": 0.866},
             "metrics": {"test": _rep(0.85, 2), "val": _rep(0.9, 2)},
             "size_only_auroc": {"test": {"n": 332, "auroc": 0.842, "ci95": {"auroc": [0.79, 0.89]}}}}
    (tmp_path / "fused-binary.json").write_text(json.dumps(fused))
    card = write_card(tmp_path).read_text()
    assert "## Nodule outliner (segmentation and measured size)" in card
    assert "| test | 332 | 0.760 [0.740, 0.780] | 71% | 0.842 [0.790, 0.890] |" in card
    assert "| validation | 336 |" in card and "best epoch 18 of 20" in card
    assert "the diameter measured by the nodule outliner" in card
    assert "size as the nodule outliner measures it on the image" in card


def test_card_reports_the_recipe_search_and_the_shipped_settings(tmp_path):
    from training.experiments import summarise_search

    spec = _binary_spec()
    spec["preprocessing"]["field_mm"] = 24.0
    spec["training"].update(epochs=60, epoch_samples=3072, seed=1, device="cuda",
                            trained_on="trained on a GPU from a WebP copy of the images")
    (tmp_path / "nodule-binary.json").write_text(json.dumps(spec))
    rows = [{"model": "nodule-binary", "recipe": "64 px", "seed": s, "val_auroc": v} for s, v in enumerate((0.8, 0.84))]
    rows.append({"model": "nodule-binary", "recipe": "128 px, 4x training", "seed": 0, "val_auroc": 0.87})
    search = {"setup": "each recipe overrides the recipe {}", "selection": "validation split", "run_on": "one H100",
              "results": rows, "summary": summarise_search(rows)}
    (tmp_path / "search.json").write_text(json.dumps(search))
    card = write_card(tmp_path).read_text()
    assert "## Recipe search (validation split only)" in card and "Run on one H100." in card
    # best mean first; the 64 px recipe's two seeds give their mean and range
    assert card.index("| nodule-binary | 128 px, 4x training | 1 | 0.870 | 0.870 - 0.870 |") < card.index(
        "| nodule-binary | 64 px | 2 | 0.820 | 0.800 - 0.840 |")
    assert "| nodule-binary | 64 px | 24 mm | 60 x 3072 | 1 | cuda | AUROC 0.900 |" in card
    assert "compressed copy" not in card  # no figure on a training copy recorded
    spec["training"]["val_on_training_copy"] = 0.92
    (tmp_path / "nodule-binary.json").write_text(json.dumps(spec))
    card = write_card(tmp_path).read_text()
    assert "| AUROC 0.900 (on the copy: 0.920) |" in card and "score -0.020 (nodule-binary) against the copy" in card
    assert "the seeds of one recipe differ by up to 0.040" in card
    assert "Trained on a GPU from a WebP copy of the images." in card


def test_card_describes_a_fused_views_ensemble_and_what_it_added(tmp_path):
    (tmp_path / "nodule-binary.json").write_text(json.dumps(_binary_spec()))
    member = _binary_spec()
    member["training"].update(epochs=30, epoch_samples=1536, ema=0.99, seed=3)
    member["preprocessing"]["field_mm"] = 32.0
    (tmp_path / "nodule-binary-64-ema.json").write_text(json.dumps(member))
    fused = {"kind": "fusion", "view": "fused", "task": "binary", "classes": ["benign", "malignant"],
             "components": ["slice-binary", "nodule-binary"], "split_fingerprint": "abc",
             "members": {"nodule-binary": ["nodule-binary-64-ema"]},
             "fusion": {"views": ["slice", "nodule"], "weights": [0.2, 0.7], "bias": [1.0, -1.0]},
             "training": {"val_score": 0.91},
             "without_members": {"val": 0.898, "test": 0.864, "test_difference_ci95": [-0.038, 0.006]},
             "metrics": {"test": _rep(0.851, 2), "val": _rep(0.91, 2)}}
    (tmp_path / "fused-binary.json").write_text(json.dumps(fused))
    card = write_card(tmp_path).read_text()
    assert "Its `nodule` view is the mean of the calibrated logits of 2 networks" in card
    assert ("| nodule-binary-64-ema | 64 px, 32 mm | 30 epochs of 1536 samples, weight averaging (EMA 0.99) "
            "| cpu, 10 min, seed 3 | 0.900 |") in card and "| val AUROC |" in card
    assert ("scores 0.898 on validation and 0.864 on test (AUROC), against 0.910 and 0.851 with the ensemble (test "
            "difference -0.013, patient bootstrap 95% interval [-0.038, +0.006])") in card
    fused["members"]["nodule-binary"].append("nodule-binary-gone")
    (tmp_path / "fused-binary.json").write_text(json.dumps(fused))
    card = write_card(tmp_path).read_text()
    assert "| nodule-binary-gone | not installed | – | – | – |" in card and "of 3 networks" in card
    del fused["members"], fused["without_members"]
    (tmp_path / "fused-binary.json").write_text(json.dumps(fused))
    assert "mean of the calibrated logits" not in write_card(tmp_path).read_text()


def test_a_score_views_ensemble_is_listed_with_each_networks_validation_kappa(tmp_path):
    member = _binary_spec() | {"task": "score"}
    member["training"]["seed"] = 4
    (tmp_path / "nodule-score-s4.json").write_text(json.dumps(member))
    text = members_text("nodule-score", ["nodule-score-s4"], tmp_path, "qwk")
    assert "| val kappa |" in text and "AUROC" not in text
    assert "| nodule-score | not installed |" in text and "| cpu, 10 min, seed 4 | 0.610 |" in text


def test_the_size_measure_is_chosen_on_validation_folds_and_reported_with_test(tmp_path):
    from lungviz.labels import get_scheme
    from training.fuse import size_measure_comparison

    rng = np.random.default_rng(0)

    def split(n: int, telling: str) -> dict:
        """``telling``: the size measure that separates malignant from benign on this split; the other is noise."""
        y = rng.integers(0, 2, n)
        noise = rng.normal(0, 1, (n, 2))
        logits = [np.stack([-x, x], 1) for x in (0.3 * (2 * y - 1) + noise[:, 0], 0.3 * (2 * y - 1) + noise[:, 1])]
        informative = np.exp(2.0 + 0.6 * y + rng.normal(0, 0.2, n))  # malignant nodules are larger
        sizes = {m: informative if m == telling else rng.uniform(4, 30, n) for m in ("circle", "long_axis")}
        return {"y": y, "groups": [f"P{i // 2}" for i in range(n)], "logits": logits, "sizes": sizes,
                "readers_mm": sizes["long_axis"] / 1.1}

    # The long axis tells on validation, the circle on test: the choice must follow validation.
    res = size_measure_comparison({"val": split(200, "long_axis"), "test": split(200, "circle")},
                                  get_scheme("binary"), seeds=3, n_boot=50)
    rows = {r["measure"]: r for r in res["results"]}
    assert res["chosen_on_validation"] == "long_axis"
    assert rows["circle"]["test_fused"]["auroc"] > rows["long_axis"]["test_fused"]["auroc"] + 0.1
    assert rows["long_axis"]["val_oof_auroc_mean"] > rows["circle"]["val_oof_auroc_mean"] + 0.05
    assert len(rows["circle"]["val_oof_auroc_range"]) == 2
    assert abs(rows["long_axis"]["test_vs_readers"][-1]["median"] - 1.1) < 1e-9  # every nodule, the last row
    (tmp_path / "size_measures.json").write_text(json.dumps({"shipped_measure": "circle", **res}))
    outliner = {"arch": "tf_efficientnet_lite0+fpn", "input_size": 96, "task": "outline", "classes": ["nodule"],
                "preprocessing": {"field_mm": 48.0}, "metrics": {}}
    (tmp_path / "outliner.json").write_text(json.dumps(outliner))
    card = write_card(tmp_path).read_text()
    assert "### Which size fused-binary uses" in card and "Chosen: **long axis**; shipped: same-area circle" in card
    assert f"| long axis | {rows['long_axis']['val_oof_auroc_mean']:.3f} (" in card and "| 110% |" in card


def test_card_reports_the_outline_feature_check_and_the_fused_models_outline_inputs(tmp_path):
    from lungviz.inventory import outline_features_note

    def row(candidate: str, features: list, val: float, higher: int | None, test: float, passes: bool,
            diff_ci: list | None = None) -> dict:
        readout = {"n": 332, "auroc": test, "ece": round(test - 0.8, 3), "ci95": {"auroc": [test - 0.05, test + 0.04]}}
        if diff_ci is not None:
            readout |= {"difference_from_size": round(test - 0.865, 3), "difference_ci95": diff_ci}
        middle = {**readout, "auroc": round(test - 0.002, 3), "ece": round(test - 0.79, 3)}
        return {"candidate": candidate, "features": features, "val_oof_auroc_mean": val,
                "val_oof_auroc_range": [val - 0.01, val + 0.01], "draws_higher_than_size": higher, "passes": passes,
                "val_oof_ece_mean": 0.03, "draws_lower_nll_than_size": None if higher is None else 11,
                "test_fused": readout, "test_middle_slice": middle}

    res = {"chosen_on_validation": "grey levels", "chosen_features": ["mean_inside", "std_inside", "contrast"],
           "n_val": 336, "n_test": 332, "draws": 20, "selection": "out-of-fold validation AUROC (test rule)",
           "results": [row("size", [], 0.889, None, 0.865, False),
                       row("shape", ["roundness", "solidity", "compactness"], 0.883, 3, 0.880, False, [-0.01, 0.04]),
                       row("grey levels", ["mean_inside", "std_inside", "contrast"], 0.894, 20, 0.850, True,
                           [-0.04, 0.01])],
           "val_feature_alone_auroc": {"contrast": 0.683, "compactness": 0.22}}
    (tmp_path / "outline_features.json").write_text(json.dumps(res))
    (tmp_path / "outliner.json").write_text(json.dumps({
        "arch": "tf_efficientnet_lite0+fpn", "input_size": 96, "task": "outline", "classes": ["nodule"],
        "preprocessing": {"field_mm": 48.0}, "metrics": {}}))
    fused = {"kind": "fusion", "view": "fused", "task": "binary", "classes": ["benign", "malignant"],
             "components": ["slice-binary", "nodule-binary"], "split_fingerprint": "abc",
             "fusion": {"views": ["slice", "nodule"], "weights": [0.4, 0.5], "bias": [1.0, -1.0],
                        "features": ["log_diameter_mm", "contrast"], "feature_weights": [[-0.7, 0.7], [-0.2, 0.3]],
                        "size_source": "outliner", "feature_centre": [0.0, 0.3], "feature_scale": [1.0, 0.1]},
             "training": {"val_score": 0.905, "val_score_views_only": 0.879, "val_score_size_without_outline": 0.898},
             "metrics": {"test": _rep(0.85, 2), "val": _rep(0.9, 2)},
             "size_only_auroc": {"test": {"n": 332, "auroc": 0.842, "ci95": {"auroc": [0.79, 0.89]}}}}
    (tmp_path / "fused-binary.json").write_text(json.dumps(fused))
    card = write_card(tmp_path).read_text()
    assert "### Which outline features fused-binary uses" in card and "Chosen on validation: **grey levels**." in card
    assert ("| size and grey levels | 0.894 (0.884 - 0.904) | 20 of 20 | 0.030 | 0.850 [0.800, 0.890] | "
            "-0.015 [-0.040, +0.010] | 0.050 | 0.848, -0.015 [-0.040, +0.010], 0.060 |") in card
    assert "| size | 0.889 (0.879 - 0.899) | – | 0.030 | 0.865 [0.815, 0.905] | – | 0.065 | 0.863, –, 0.075 |" in card
    assert "moved fused-binary's AUROC by -0.015 [-0.040, +0.010] (paired patient bootstrap): test can neither " \
        "confirm nor rule out a gain or a loss; its top-class ECE went from 0.065 to 0.050" in card
    assert "On test 'size' and 'size and shape' scored higher than what ships, but they did not" in card  # the rows
    assert "contrast with its surroundings 0.68" in card and "not HU" in card
    assert "its outline's contrast with its surroundings (+0.50)" in card and "0.898 with the size alone" in card
    assert "(views + size and the outline's grey levels)" in card
    assert "measured on the image by the nodule outliner and the outline's grey levels." in card
    note = outline_features_note(["contrast", "std_inside", "mean_inside"], tmp_path)
    assert "0.889 with the size alone, 0.894 with them" in note and "0.850 with them, 0.865 without" in note
    assert "cannot tell from chance" in note
    vetoed = {**res, "vetoed_on_test": True, "shipped": "size", "shipped_features": []}
    (tmp_path / "outline_features.json").write_text(json.dumps(vetoed))
    card = write_card(tmp_path).read_text()
    assert "Chosen on validation: **grey levels**; vetoed on test, shipped: **the size alone**." in card
    assert "Test vetoed it, so the size alone ships" in card and "added to the check after its test figures" in card
    assert "the interval ends at +0.0100; on the middle slice (what the app sees) the difference is -0.015 " \
        "[-0.040, +0.010], which would not veto" in card
    assert outline_features_note([], tmp_path) is None and outline_features_note(["contrast"], tmp_path) is None
    assert "On test 'size and shape' scored higher than what ships, but it did not win on validation" in card
    (tmp_path / "outline_features.json").write_text(json.dumps({**res, "chosen_on_validation": "size"}))
    assert "Chosen on validation: **the size alone**." in write_card(tmp_path).read_text()


def test_card_reports_the_fused_score_input_check(tmp_path):
    def row(candidate: str, features: list, val: float, higher: int | None, test: float, passes: bool,
            diff_ci: list | None = None) -> dict:
        readout = {"n": 332, "kappa": test, "ece": 0.07, "ci95": {"kappa": [test - 0.1, test + 0.1]}}
        if diff_ci is not None:
            readout |= {"difference_from_views": round(test - 0.611, 3), "difference_ci95": diff_ci}
        return {"candidate": candidate, "features": features, "val_oof_kappa_mean": val,
                "val_oof_kappa_range": [val - 0.02, val + 0.02], "draws_higher_than_views": higher, "passes": passes,
                "val_oof_ece_mean": 0.05, "draws_lower_nll_than_views": None if higher is None else 20,
                "test_fused": readout, "test_middle_slice": {**readout, "kappa": round(test - 0.02, 3)}}

    res = {"chosen_on_validation": "size", "chosen_features": ["log_diameter_mm"], "vetoed_on_test": False,
           "shipped": "size", "shipped_features": ["log_diameter_mm"], "n_val": 336, "n_test": 332, "draws": 20,
           "selection": "out-of-fold validation quadratic kappa (test rule)",
           "results": [row("views", [], 0.520, None, 0.611, False),
                       row("size", ["log_diameter_mm"], 0.533, 17, 0.609, True, [-0.076, 0.054]),
                       row("size, shape and grey levels", ["log_diameter_mm", "roundness"], 0.522, 13, 0.662, False,
                           [-0.029, 0.122])]}
    (tmp_path / "score_inputs.json").write_text(json.dumps(res))
    (tmp_path / "outliner.json").write_text(json.dumps({
        "arch": "tf_efficientnet_lite0+fpn", "input_size": 96, "task": "outline", "classes": ["nodule"],
        "preprocessing": {"field_mm": 48.0}, "metrics": {}}))
    card = write_card(tmp_path).read_text()
    assert "### Which measured inputs fused-score uses" in card and "Chosen on validation: **size**." in card
    assert "| none | 0.520 (0.500 - 0.540) | – | 0.050 | 0.611 [0.511, 0.711] | – | 0.070 | 0.591, –, 0.070 |" in card
    assert ("| size | 0.533 (0.513 - 0.553) | 17 of 20 | 0.050 | 0.609 [0.509, 0.709] | -0.002 [-0.076, +0.054] | "
            "0.070 | 0.589, -0.002 [-0.076, +0.054], 0.070 |") in card
    assert "the chosen inputs moved fused-score's kappa by -0.002 [-0.076, +0.054] (paired patient bootstrap): " \
        "test can neither confirm nor rule out a gain or a loss" in card
    assert "On test 'none' and 'size, shape and grey levels' scored higher than what ships, but they did not" in card
    (tmp_path / "score_inputs.json").write_text(json.dumps({**res, "chosen_on_validation": "views",
                                                            "shipped": "views"}))
    card = write_card(tmp_path).read_text()
    assert "Chosen on validation: **none**." in card and "moved fused-score's kappa" not in card


def test_card_reports_the_ordinal_call_check(tmp_path):
    def figs(k: float, f1: float, exact: float) -> dict:
        return {"kappa": k, "f1_weighted": f1, "exact": exact}

    def row(model: str, higher: int, adopt: bool, vetoed: bool = False) -> dict:
        return {"model": model, "n_val": 336, "n_test": 332, "draws": 20, "draws_higher_kappa": higher,
                "adopt_on_validation": adopt or vetoed, "vetoed_on_test": vetoed, "adopt": adopt,
                "val_oof": {"shipped": figs(0.528, 0.515, 0.577), "expected": figs(0.470, 0.458, 0.526)},
                "test": {"shipped": figs(0.633, 0.506, 0.563), "expected": figs(0.568, 0.459, 0.515)},
                "test_kappa_difference": -0.065, "test_kappa_difference_ci95": [-0.12, -0.017],
                "test_calls_changed": 0.232}

    res = {"selection": "out-of-fold validation quadratic kappa (test rule)", "adopted": [],
           "results": [row("nodule-score", 0, False), row("fused-score", 17, False, vetoed=True)]}
    (tmp_path / "ordinal_calls.json").write_text(json.dumps(res))
    card = write_card(tmp_path).read_text()
    assert "## Which score a score model calls (validation decides)" in card and "Adopted: none." in card
    assert ("| nodule-score | 0.528 → 0.470 | 0 of 20 | 0.515 → 0.458 | 0.577 → 0.526 | 0.633 → 0.568 | -0.065 "
            "[-0.120, -0.017] | 0.506 → 0.459 | 0.563 → 0.515 | 23% |") in card
    assert "| fused-score (vetoed on test) | 0.528 → 0.470 | 17 of 20 |" in card
    assert "validation favours the shipped call here. On test, read after, the expected-score call's kappa was lower " \
        "with 95% confidence for nodule-score, fused-score." in card


def test_card_reports_the_test_time_augmentation_check(tmp_path):
    from training.experiments import tta_decision

    def fig(plain: float, tta: float) -> dict:
        return {"n": 330, "plain": plain, "tta": tta, "difference_ci95": [-0.02, 0.03], "ece_plain": 0.02,
                "ece_tta": 0.03}

    rows = [{"model": m, "selection": "auroc" if m.endswith("binary") else "qwk", "val": fig(*v), "test": fig(*t)}
            for m, v, t in (("nodule-binary", (0.866, 0.861), (0.825, 0.835)),
                            ("slice-binary", (0.815, 0.822), (0.810, 0.808)),
                            ("nodule-score", (0.528, 0.540), (0.633, 0.647)),
                            ("slice-score", (0.407, 0.389), (0.415, 0.488)))]
    res = {"transforms": "8 dihedral", "selection": "validation", "adopted": tta_decision(rows), "results": rows}
    (tmp_path / "tta.json").write_text(json.dumps(res))
    card = write_card(tmp_path).read_text()
    assert "## Test-time augmentation (validation decides)" in card
    assert "Decision: binary: not adopted, score: not adopted." in card
    assert "| slice-score | qwk | 0.407 → 0.389 | [-0.020, +0.030] | 0.415 → 0.488 |" in card
    assert "The ECE columns: top-class ECE measured with the earlier calibration" in card  # no record of it
    for recorded in ("prior-after-temperature", {r["model"]: "prior-after-temperature" for r in rows}):
        (tmp_path / "tta.json").write_text(json.dumps(res | {"calibration": recorded}))
        assert "earlier calibration" not in write_card(tmp_path).read_text()
    (tmp_path / "tta.json").write_text(json.dumps(res | {"calibration": "mixed"}))
    assert "earlier calibration" in write_card(tmp_path).read_text()


def test_card_gives_the_calibration_of_the_malignant_probability_and_says_when_it_is_off(tmp_path):
    spec = _binary_spec()
    (tmp_path / "nodule-binary.json").write_text(json.dumps(spec))
    card = write_card(tmp_path).read_text()
    assert "**Calibration of the malignant probability.**" in card
    assert "| nodule-binary | test | 10 | 50.0% | 50.0% | 0.000 |" in card and "not well calibrated" not in card
    spec["metrics"]["test"]["reliability_malignant"] = [{"n": 5, "mean_p": 0.4, "observed": 0.2},
                                                        {"n": 5, "mean_p": 0.8, "observed": 0.6}]
    (tmp_path / "nodule-binary.json").write_text(json.dumps(spec))
    card = write_card(tmp_path).read_text()
    assert "| nodule-binary | test | 10 | 60.0% | 40.0% | 0.200 |" in card
    assert "nodule-binary's malignant probability is not well calibrated: it runs high (mean 60% against 40%" in card
    assert "Its temperature divides the prior correction" in card  # a spec without the calibration key
    assert "**Probabilities and calls.**" not in card


def test_card_says_how_each_network_calls_from_its_calibrated_probability(tmp_path):
    spec = _binary_spec() | {"calibration": "prior-after-temperature", "temperature": 3.0,
                             "prior_adjust": [0.46, -0.88]}
    spec["metrics"]["test"] |= {"sensitivity": 0.6, "specificity": 0.9,
                                "ci95": {"sensitivity": [0.5, 0.7], "specificity": [0.85, 0.95]}}
    spec["metrics"]["test"]["reliability_malignant"] = [{"n": 10, "mean_p": 0.4, "observed": 0.2}]
    (tmp_path / "nodule-binary.json").write_text(json.dumps(spec))
    card = write_card(tmp_path).read_text()
    assert "**Probabilities and calls.**" in card
    threshold = 1 / (1 + np.exp(-(1 - 1 / 3.0) * (-0.88 - 0.46)))
    assert (f"| nodule-binary | 3.00 | {threshold:.0%} | 0.600 [0.500, 0.700] | 0.900 [0.850, 0.950] |"
            in card)
    assert "not well calibrated" in card and "Its temperature divides the prior correction" not in card


def test_card_names_the_models_whose_top_class_ece_is_beyond_chance(tmp_path):
    spec = _binary_spec()
    spec["metrics"]["test"]["ece_if_calibrated"] = {"median": 0.02, "p95": 0.05, "p_value": 0.3}
    (tmp_path / "nodule-binary.json").write_text(json.dumps(spec))
    assert "is above the 95th percentile" not in write_card(tmp_path).read_text()  # ECE 0.04
    spec["metrics"]["test"]["ece_if_calibrated"]["p95"] = 0.03
    (tmp_path / "nodule-binary.json").write_text(json.dumps(spec))
    assert "- The top-class ECE of nodule-binary is above the 95th percentile" in write_card(tmp_path).read_text()


def test_card_reports_the_class_bias_check_and_names_it_among_the_limits(tmp_path):
    def row(model: str, lower: int, adopt: bool, test_nll: tuple[float, float]) -> dict:
        def fam(nll: float, tnll: float) -> dict:
            return {"val_oof_nll": nll, "val_oof_ece": 0.05, "test_nll": tnll, "test_ece": 0.07}
        return {"model": model, "n_val": 336, "n_test": 332, "draws_lower_nll": lower, "draws": 20, "adopt": adopt,
                "class_bias": [0.0, 0.2], "temperature_with_bias": 1.5,
                "temperature": fam(1.116, test_nll[0]), "temperature_bias": fam(1.127, test_nll[1])}

    res = {"selection": "out-of-fold validation NLL", "calibration": "prior-after-temperature", "adopted": [],
           "results": [row("nodule-score", 0, False, (1.141, 1.130)), row("nodule-binary", 1, False, (0.40, 0.41))]}
    (tmp_path / "class_bias.json").write_text(json.dumps(res))
    spec = _binary_spec()
    spec["metrics"]["test"]["ece_if_calibrated"] = {"median": 0.02, "p95": 0.03, "p_value": 0.01}
    (tmp_path / "nodule-binary.json").write_text(json.dumps(spec))
    card = write_card(tmp_path).read_text()
    assert "## Per-class calibration (validation decides)" in card and "Adopted: none." in card
    assert "| nodule-score | 336 | 1.116 → 1.127 | 0 of 20 | 0.050 → 0.050 | 1.141 → 1.130 | 0.070 → 0.070 |" in card
    assert "would have lowered both the NLL and the ECE" not in card  # nodule-score's ECE rose, slice-binary's NLL
    assert "| nodule-binary | 336 | 1.116 → 1.127 | 1 of 20 |" in card and "earlier calibration" not in card
    # the limits name only the models above the chance band that the check covered (nodule-score is within it)
    assert ("calibration suggests; for nodule-binary a per-class bias on top of the temperature was checked and "
            "validation did not support it") in card
    (tmp_path / "class_bias.json").unlink()
    card = write_card(tmp_path).read_text()
    assert "Per-class calibration" not in card and "- The top-class ECE of nodule-binary is above" in card


def test_card_gives_the_high_sensitivity_operating_points_beside_the_readers_diameter(tmp_path):
    def point(target: float, rule: str, threshold: float, sens: float, spec: float, reachable: bool = True) -> dict:
        figs = {"sensitivity": sens, "specificity": spec, "ppv": 0.4, "npv": 0.95, "called_positive": 0.4}
        return {"target_sensitivity": target, "rule": rule, "reachable": reachable, "threshold": threshold,
                "val": figs | {"sensitivity": target + 0.01}, "test": figs,
                "test_ci95": {"sensitivity": [sens - 0.1, sens + 0.05], "specificity": [0.6, 0.8]}}

    def row(model: str, score: str, pts: list[dict]) -> dict:
        return {"model": model, "score": score, "n_val": 336, "n_test": 332, "n_val_positive": 66,
                "test_positive_share": 0.214, "points": pts}

    prob = "malignant probability"
    res = {"selection": "chosen on validation", "calibration": "prior-after-temperature", "results": [
        row("nodule-binary", prob, [point(0.9, "point", 0.154, 0.79, 0.69),
                                    point(0.9, "lower-bound", 0.08, 0.93, 0.5)]),
        row("fused-binary", prob, [point(0.9, "point", 0.137, 0.82, 0.81),
                                   point(0.9, "lower-bound", 0.06, 0.9, 0.5)]),
        row("readers' diameter", "mm", [point(0.9, "point", 9.57, 0.83, 0.79),
                                        point(0.9, "lower-bound", 7.1, 0.97, 0.55, reachable=False)])]}
    (tmp_path / "operating_points.json").write_text(json.dumps(res))
    card = write_card(tmp_path).read_text()
    assert "## High-sensitivity operating points (threshold chosen on validation)" in card
    assert ("| nodule-binary | 90% | reached on validation | 15.4% | 91% | 0.79 [0.69, 0.84] | 0.69 [0.60, 0.80] | "
            "0.40 | 0.95 | 40% |") in card
    assert "| readers' diameter | 90% | 95% lower bound on validation (not reachable) | 7.1 mm |" in card
    assert ("*Reached on validation*: test sensitivity below the target in 3 of 3 rows (test minus target: -11 to "
            "-7") in card
    assert "*95% lower bound on validation*: test sensitivity below the target in 0 of 3 rows" in card
    # the fused model is compared, not whichever image model did best on test
    assert ("90%, reached on validation: fused-binary 0.82 / 0.81, the diameter 0.83 / 0.79 (neither better on "
            "both)") in card
    assert "fused-binary 0.90 / 0.50, the diameter 0.97 / 0.55 (the readers' diameter at least as good on both)" in card
    assert "malignant share (21%)" in card and "with 66 malignant validation nodules" in card
