"""Backbone screening, k-fold cross-validation, ablations, the recipe search and the test-time augmentation check,
for the model card."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lungviz import paths
from lungviz.calibration import PRIOR_AFTER_T, Calibration, shared_order
from lungviz.errors import LungvizError
from lungviz.fusion import SIZE_FEATURE
from lungviz.labels import LabelScheme
from lungviz.shape import GREY_FEATURES, OUTLINE_FEATURES, SHAPE_FEATURES
from lungviz.splits import Split
from training.train import LONGER, RECIPE_64, TrainConfig, fold_split, train_model

log = logging.getLogger("training.experiments")

PUBLISHED_SCREEN = ("cnn4", "tf_efficientnet_lite0", "tf_efficientnet_lite2")


def _slug(label: str) -> str:
    """A folder name for a row label: letters and digits kept, everything else a dash."""
    return "".join(ch if ch.isalnum() else "-" for ch in label.lower()).strip("-")


def screen_backbones(base: TrainConfig, archs: tuple[str, ...] = PUBLISHED_SCREEN, out: str = "") -> dict:
    """Train ``base`` once per backbone; compare on the validation split only (test stays untouched)."""
    rows = []
    for arch in archs:
        cfg = dataclasses.replace(base, name=f"screen-{arch}", arch=arch, pretrained=arch != "cnn4",
                                  runs=str(paths.runs_dir() / "screen" / arch), n_boot=200)
        t0 = time.perf_counter()
        spec = train_model(cfg, save=False)
        val = spec["metrics"]["val"]
        rows.append({"arch": arch, "pretrained": cfg.pretrained, "val_auroc": val["auroc"],
                     "val_auroc_ci95": val["ci95"].get("auroc"), "val_f1_malignant": val.get("f1_malignant"),
                     "best_epoch": spec["training"]["best_epoch"], "seconds": time.perf_counter() - t0,
                     "images_per_second": spec["training"]["images_per_second"]})
    result = {"setup": {k: v for k, v in dataclasses.asdict(base).items() if k not in ("name", "arch", "runs")},
              "selection": "validation split AUROC", "results": rows}
    path = Path(out) if out else paths.weights_dir() / "screen.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def cv_fold(base: TrainConfig, r: int, k: int = 5) -> dict:
    """Round ``r`` of the patient-level k-fold CV: train on the other folds, report on fold ``r``."""
    folds = Split.load(paths.weights_dir() / "splits" / f"kfold{k}.json")
    cfg = dataclasses.replace(base, name=f"cv-{r}", runs=str(paths.runs_dir() / "cv" / str(r)), n_boot=200)
    t0 = time.perf_counter()
    spec = train_model(cfg, split=fold_split(folds, r), save=False)
    test = spec["metrics"]["test"]
    return {"fold": r, "n_test": test["n"], "auroc": test["auroc"], "f1_malignant": test.get("f1_malignant"),
            "f1_weighted": test["f1_weighted"], "ece": test["ece"], "seconds": time.perf_counter() - t0,
            "device": spec["training"]["device"]}


def cv_result(base: TrainConfig, k: int, rows: list[dict]) -> dict:
    """The CV record: setup, each fold's row and the mean and spread of its figures."""
    summary = {m: {"mean": float(np.mean([r[m] for r in rows])), "sd": float(np.std([r[m] for r in rows], ddof=1))}
               for m in ("auroc", "f1_malignant", "f1_weighted", "ece")}
    return {"setup": {kk: v for kk, v in dataclasses.asdict(base).items() if kk not in ("name", "runs")},
            "k": k, "folds": rows, "summary": summary, "calibration": PRIOR_AFTER_T}


def cross_validate(base: TrainConfig, k: int = 5, out: str = "") -> dict:
    """Patient-level k-fold CV: each fold is the test set once (the next fold validates)."""
    result = cv_result(base, k, [cv_fold(base, r, k) for r in range(k)])
    path = Path(out) if out else paths.weights_dir() / "cv.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


#: Variations of one recipe tried against it on the validation split (``python -m training ablate``); each is a set of
#: :class:`TrainConfig` overrides. ``seed 1`` repeats the recipe itself, to show how much one seed moves the figures.
ABLATIONS: dict[str, dict] = {
    "recipe": {},
    "recipe, seed 1": {"seed": 1},
    "weight average (EMA 0.99)": {"ema": 0.99},
    "readers' votes as soft targets": {"soft_labels": 1.0},
    "regress the readers' characteristics (weight 0.5)": {"attr_weight": 0.5},
    "nodule view 24 mm": {"field_mm": 24.0},
    "nodule view 48 mm": {"field_mm": 48.0},
}


def ablate(base: TrainConfig, variants: dict[str, dict] | None = None, out: str = "") -> dict:
    """Train ``base`` and each variation of it; compare on the validation split only (test stays untouched)."""
    rows: list[dict] = []
    result = {"setup": {k: v for k, v in dataclasses.asdict(base).items() if k not in ("name", "runs")},
              "selection": "validation split, one training seed per row", "results": rows,
              "calibration": PRIOR_AFTER_T}
    path = Path(out) if out else paths.weights_dir() / "ablation.json"
    for label, overrides in (ABLATIONS if variants is None else variants).items():
        slug = _slug(label)
        cfg = dataclasses.replace(base, **overrides, name=f"ablate-{slug}",
                                  runs=str(paths.runs_dir() / "ablate" / slug), n_boot=200)
        t0 = time.perf_counter()
        spec = train_model(cfg, save=False)
        val = spec["metrics"]["val"]
        rows.append({"variant": label, "overrides": overrides, "val_auroc": val.get("auroc"),
                     "val_auroc_ci95": val["ci95"].get("auroc"), "val_f1_malignant": val.get("f1_malignant"),
                     "val_qwk": val.get("qwk"), "val_ece": val.get("ece"),
                     "best_epoch": spec["training"]["best_epoch"], "seconds": time.perf_counter() - t0})
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")  # after each row: an hour-long run
    return result


#: The GPU search behind the shipped networks (``python -m training search``, weights/search.json): per model, each
#: recipe's overrides of :data:`RECIPE_64` and the seeds it was trained with. Recipes that competed for shipping
#: ran with three seeds, so a recipe is judged by its mean, not by one lucky seed.
SEARCH: dict[str, dict[str, tuple[dict, tuple[int, ...]]]] = {
    "nodule-binary": {
        "64 px": ({}, (0, 1, 2)),
        "96 px": ({"input_size": 96}, (0,)),
        "128 px": ({"input_size": 128}, (0, 1, 2)),
        "128 px, readers' mask as auxiliary target": ({"input_size": 128, "mask_weight": 0.5}, (0,)),
        "128 px, 48 mm field": ({"input_size": 128, "field_mm": 48.0}, (0,)),
        "128 px, 24 mm field": ({"input_size": 128, "field_mm": 24.0}, (0, 1, 2)),
        "64 px, 4x training": (LONGER, (0, 1, 2)),
        "128 px, 4x training": ({"input_size": 128, **LONGER}, (0, 1, 2)),
        "128 px, 24 mm field, 4x training": ({"input_size": 128, "field_mm": 24.0, **LONGER}, (0, 1, 2)),
        "64 px, 24 mm field, 4x training": ({"field_mm": 24.0, **LONGER}, (0,)),
    },
    "slice-binary": {
        "64 px": ({}, (0,)),
        "128 px": ({"input_size": 128}, (0, 1, 2)),
        "128 px, 4x training": ({"input_size": 128, **LONGER}, (0, 1, 2)),
    },
    "nodule-score": {
        "64 px": ({}, (0, 1, 2)),
        "128 px": ({"input_size": 128}, (0, 1)),
        "64 px, 4x training": (LONGER, (0, 1)),
        "64 px, 24 mm field": ({"field_mm": 24.0}, (0,)),
        "128 px, 24 mm field": ({"input_size": 128, "field_mm": 24.0}, (0,)),
        "128 px, 24 mm field, 4x training": ({"input_size": 128, "field_mm": 24.0, **LONGER}, (0,)),
    },
    "slice-score": {
        "128 px": ({"input_size": 128}, (0, 1, 2)),
        "128 px, 4x training": ({"input_size": 128, **LONGER}, (0, 1, 2)),
    },
}


def search_runs(base: TrainConfig, grid: dict | None = None, recipe: dict | None = None
                ) -> list[tuple[str, str, TrainConfig]]:
    """Every (model, recipe, settings) of the search, one per seed: ``base`` with ``recipe`` (default
    :data:`RECIPE_64`) and the recipe's overrides; bundles go to runs/search/<model>/<recipe>-seed<n>."""
    recipe = RECIPE_64 if recipe is None else recipe
    runs = []
    for model, recipes in (SEARCH if grid is None else grid).items():
        view, task = model.split("-")
        for label, (overrides, seeds) in recipes.items():
            slug = _slug(label)
            for seed in seeds:
                folder = paths.runs_dir() / "search" / model / f"{slug}-seed{seed}"
                cfg = dataclasses.replace(base, name=model, view=view, task=task, **{**recipe, **overrides},
                                          seed=seed, n_boot=200, out=str(folder), runs=str(folder))
                runs.append((model, label, cfg))
    return runs


def selection_figure(model: str) -> str:
    """The validation figure a model is chosen by: AUROC for a binary model, quadratic kappa for a score model."""
    return "val_auroc" if model.endswith("binary") else "val_qwk"


def _search_row(job: tuple[str, str, TrainConfig, int]) -> dict:
    """Train one search run (in a worker process) and keep its validation figures only."""
    model, label, cfg, threads = job
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    spec = train_model(cfg, progress=False)  # the bundle is kept in runs/search, so a winner can be shipped as is
    val, tr = spec["metrics"]["val"], spec["training"]
    return {"model": model, "recipe": label, "seed": cfg.seed, "val_auroc": val.get("auroc"),
            "val_f1_malignant": val.get("f1_malignant"), "val_qwk": val.get("qwk"),
            "val_f1_weighted": val.get("f1_weighted"), "val_ece": val.get("ece"), "best_epoch": tr["best_epoch"],
            "train_seconds": tr["train_seconds"], "seconds": time.perf_counter() - t0, "device": tr["device"],
            "bundle": cfg.out}


def summarise_search(rows: list[dict]) -> dict:
    """Per model and recipe: the selection figure (:func:`selection_figure`) over seeds; runs without one skipped."""
    out: dict = {}
    for r in rows:
        value = r.get(selection_figure(r["model"]))
        if value is not None:
            out.setdefault(r["model"], {}).setdefault(r["recipe"], []).append(value)
    return {m: {label: {"n_seeds": len(v), "mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
                for label, v in recipes.items()} for m, recipes in out.items()}


def search(base: TrainConfig, workers: int = 1, grid: dict | None = None, out: str = "",
           recipe: dict | None = None, run_on: str = "") -> dict:
    """Run :data:`SEARCH` on the validation split, ``workers`` trainings at a time (16 suit one GPU and 16 cores;
    on a 2-core CPU use 1 and expect days). Each run also reports on test, as every training does, but only the
    validation figures are recorded and compared. ``run_on`` describes the machine for the record."""
    import concurrent.futures
    import multiprocessing
    import os

    workers = max(1, workers)
    runs = search_runs(base, grid, recipe)
    threads = max(1, (os.cpu_count() or 1) // workers)
    rows: list[dict] = []
    result = {"setup": "each recipe changes the base recipe " + json.dumps(RECIPE_64 if recipe is None else recipe),
              "selection": "validation split: AUROC (binary) or quadratic kappa (score); test not used to compare",
              "run_on": run_on or f"{workers} trainings at a time", "results": rows}
    path = Path(out) if out else paths.weights_dir() / "search.json"
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = sorted(runs, key=lambda r: -r[2].epochs * r[2].epoch_samples * r[2].input_size ** 2)  # longest first
        for row in pool.map(_search_row, [(m, label, cfg, threads) for m, label, cfg in jobs]):
            rows.append(row)
            result["summary"] = summarise_search(rows)
            path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


#: The networks test-time augmentation is judged on, per task family: a family adopts it only if every one of its
#: networks rises on validation (the fused model combines them, so its views should be treated alike).
TTA_FAMILIES = {"binary": ("nodule-binary", "slice-binary"), "score": ("nodule-score", "slice-score")}


def tta_figures(y: np.ndarray, plain: np.ndarray, tta: np.ndarray, scheme: LabelScheme, groups: list[str],
                n_boot: int, decision_bias: np.ndarray | None = None) -> dict:
    """One network on one split, from its calibrated logits: its selection figure (of its calls, ``decision_bias``)
    without and with TTA, a patient-bootstrap interval of the paired difference (TTA minus plain) and the ECE both
    ways."""
    from lungviz import metrics
    from training.evaluate import selection_score

    def score(i: np.ndarray, logits: np.ndarray) -> float:
        return selection_score(y[i], logits[i], scheme, decision_bias)

    every = np.arange(len(y))
    diff = metrics.bootstrap_ci(lambda i: {"d": score(i, tta) - score(i, plain)}, len(y), groups, n_boot)
    return {"n": len(y), "plain": float(score(every, plain)), "tta": float(score(every, tta)),
            "difference_ci95": diff.get("d"),
            "ece_plain": metrics.ece(y, metrics.softmax(plain)),
            "ece_tta": metrics.ece(y, metrics.softmax(tta))}


def tta_decision(rows: list[dict]) -> dict[str, bool]:
    """Per family of :data:`TTA_FAMILIES`: adopt TTA only if every network of it rises on validation."""
    by_model = {r["model"]: r for r in rows}
    return {family: all(by_model[m]["val"]["tta"] > by_model[m]["val"]["plain"] for m in models)
            for family, models in TTA_FAMILIES.items() if all(m in by_model for m in models)}


def compare_tta(weights: str = "", n_boot: int = 500, out: str = "", progress: bool = True) -> dict:
    """Would test-time augmentation (each slice's logits averaged over its 8 dihedral transforms) help the shipped
    networks? Per network, validation and test with the spec's own calibration, without and with it; the decision
    (:func:`tta_decision`) reads validation only. Writes ``tta.json`` next to the weights (or to ``out``)."""
    from lungviz.labels import get_scheme
    from training.datasets import load_cases
    from training.evaluate import calibrated_logits, read_any_spec
    from training.fuse import split_logits

    folder = Path(weights) if weights else paths.weights_dir()
    cases, _ = load_cases("lidc")
    rows = []
    for name in [m for models in TTA_FAMILIES.values() for m in models]:
        spec = read_any_spec(folder, name)
        scheme = get_scheme(spec["task"])
        row: dict = {"model": name, "selection": selection_figure(name).removeprefix("val_")}
        for split in ("val", "test"):
            kept, y, store, per_net = split_logits(cases, scheme, split, spec, folder,
                                                   {name: [name]}, progress)
            tta = calibrated_logits(folder, name, store, np.arange(len(kept)), tta=True)[0]
            row[split] = tta_figures(y, per_net[name][0], tta, scheme, [c.patient_id for c in kept],
                                     n_boot if split == "test" else 200, Calibration.from_spec(spec).decision_bias)
        rows.append(row)
        log.info("tta %s: val %.3f -> %.3f", name, row["val"]["plain"], row["val"]["tta"])
    result = {"transforms": "8 dihedral (quarter turns, each also mirrored), logits averaged per slice",
              "selection": "validation split: AUROC (binary) or quadratic kappa (score), shipped calibration",
              "calibration": shared_order(read_any_spec(folder, r["model"]) for r in rows),
              "adopted": tta_decision(rows), "results": rows}
    path = Path(out) if out else folder / "tta.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


#: A change decided on out-of-fold validation figures is adopted only if it does better on at least this share of the
#: fold draws: a network's per-class bias (lower NLL, :func:`class_bias_check`), fused-binary's outline features
#: (higher AUROC, :func:`outline_feature_check`).
DRAWS_RULE = 0.8


def enough_draws(count: int, seeds: int) -> bool:
    """Whether ``count`` of ``seeds`` fold draws meets :data:`DRAWS_RULE` (exactly: 16 of 20, 12 of 15)."""
    return count >= math.ceil(round(DRAWS_RULE * seeds, 9))


def class_bias_check(val: dict, test: dict, prior: np.ndarray | None, seeds: int = 20, k: int = 5) -> dict:
    """One network: its shipped calibration (temperature, ``softmax(z / T + b)``) against the same plus a per-class
    bias fitted with ``T`` (:func:`lungviz.metrics.fit_temperature_bias`; the call is unchanged). Out-of-fold on
    validation (``k`` patient-grouped folds, ``seeds`` fold draws) decides; both fitted on all of validation are then
    read on test. ``val``/``test``: raw per-case ``logits``, labels ``y`` and patient ``groups``."""
    from lungviz import metrics
    from training.fuse import grouped_folds

    b = np.zeros(val["logits"].shape[1]) if prior is None else np.asarray(prior, np.float64)

    def fitted(rows: np.ndarray) -> dict[str, tuple[float, np.ndarray]]:
        """Per family, ``(T, offset)`` of its calibrated logits ``z / T + offset``, fitted on the cases ``rows``."""
        t = Calibration.fit(val["logits"][rows], val["y"][rows], prior).temperature
        t2, c = metrics.fit_temperature_bias(val["logits"][rows], val["y"][rows], b)
        return {"temperature": (t, b), "temperature_bias": (t2, b + c)}

    def figures(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """NLL and top-class ECE of calibrated logits ``z``."""
        return metrics.nll(z, y), metrics.ece(y, metrics.softmax(z))

    draws: dict[str, list[tuple[float, float]]] = {f: [] for f in ("temperature", "temperature_bias")}
    for seed in range(seeds):
        fold = grouped_folds(list(val["groups"]), k, seed)
        oof = {f: np.zeros(val["logits"].shape) for f in draws}
        for f in range(k):
            for family, (t, offset) in fitted(fold != f).items():
                oof[family][fold == f] = val["logits"][fold == f] / t + offset
        for family, z in oof.items():
            draws[family].append(figures(z, val["y"]))
    lower = sum(with_bias[0] < plain[0] for with_bias, plain in zip(draws["temperature_bias"], draws["temperature"],
                                                                      strict=True))
    full = fitted(np.arange(len(val["y"])))
    out = {"n_val": len(val["y"]), "n_test": len(test["y"]), "draws_lower_nll": int(lower), "draws": seeds,
           "adopt": enough_draws(int(lower), seeds),
           "class_bias": [float(v) for v in full["temperature_bias"][1] - b],
           "temperature_with_bias": full["temperature_bias"][0]}
    for family, (t, offset) in full.items():
        test_nll, test_ece = figures(test["logits"] / t + offset, test["y"])
        out[family] = {"val_oof_nll": float(np.mean([d[0] for d in draws[family]])),
                       "val_oof_ece": float(np.mean([d[1] for d in draws[family]])),
                       "test_nll": test_nll, "test_ece": test_ece}
    return out


def compare_class_bias(weights: str = "", seeds: int = 20, k: int = 5, out: str = "", progress: bool = True) -> dict:
    """Would a per-class bias on top of the temperature calibrate the shipped networks better? Validation decides
    per network (:func:`class_bias_check`, :data:`DRAWS_RULE`); test is read after. Writes ``class_bias.json``
    next to the weights (or to ``out``)."""
    from lungviz.labels import get_scheme
    from training.datasets import load_cases
    from training.evaluate import read_any_spec
    from training.fuse import split_logits
    from training.train import SHIPPED

    folder = Path(weights) if weights else paths.weights_dir()
    specs = {name: read_any_spec(folder, name) for name in SHIPPED}
    older = [n for n, s in specs.items() if Calibration.from_spec(s).order != PRIOR_AFTER_T]
    if older:
        raise LungvizError(f"{', '.join(older)} still carry the earlier calibration; re-measure them with `python -m "
                           "training refresh` before checking a class bias on top of it.")
    cases: dict[str, list] = {}
    rows = []
    for name, spec in specs.items():
        scheme = get_scheme(spec["task"])
        dataset = spec.get("dataset", "lidc")
        if dataset not in cases:
            cases[dataset] = load_cases(dataset)[0]
        parts = {}
        for split in ("val", "test"):
            kept, y, _, per_net = split_logits(cases[dataset], scheme, split, spec, folder, {name: [name]}, progress)
            parts[split] = {"logits": per_net[name][1].astype(np.float64), "y": y,
                            "groups": [c.patient_id for c in kept]}
        rows.append({"model": name, **class_bias_check(parts["val"], parts["test"], spec.get("prior_adjust"),
                                                       seeds, k)})
        log.info("class bias %s: lower validation NLL on %d of %d draws", name, rows[-1]["draws_lower_nll"], seeds)
    result = {"selection": f"mean out-of-fold validation NLL, {k} patient-grouped folds of the validation split, "
                           f"{seeds} fold draws; adopted where lower on at least {DRAWS_RULE:.0%} of the draws",
              "calibration": PRIOR_AFTER_T, "adopted": [r["model"] for r in rows if r["adopt"]], "results": rows}
    path = Path(out) if out else folder / "class_bias.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


#: The outline feature sets tried beside fused-binary's size (:func:`outline_feature_check`), fixed before the check.
OUTLINE_CANDIDATES: dict[str, tuple[str, ...]] = {
    "size": (),
    "shape": SHAPE_FEATURES,
    "grey levels": GREY_FEATURES,
    "shape and grey levels": SHAPE_FEATURES + GREY_FEATURES,
}


def fusion_input_check(val: dict, test: dict, candidates: dict[str, tuple[str, ...]], base: str,
                       figure: str = "auroc", always: tuple[str, ...] = (), seeds: int = 20, k: int = 5,
                       n_boot: int = 1000) -> dict:
    """Which image-measured inputs should a fused model weigh beside its views? Each candidate (name -> features,
    beside the features ``always`` weighed) refits the fusion in ``k`` patient-grouped folds of the validation split
    (``seeds`` fold draws). A candidate passes if its out-of-fold ``figure`` (``auroc`` or the ordinal ``kappa`` of
    the calls) beats the ``base`` candidate's on at least :data:`DRAWS_RULE` of the draws; of those that pass, the
    highest mean is chosen (none: ``base`` stays). Test may veto the choice, never make one: a chosen candidate whose
    paired test difference from ``base`` is below zero with 95% confidence is not shipped (``shipped``). Test is
    read after: each candidate fitted on all of validation, its figure and ECE, and its paired patient-bootstrap
    difference from ``base``; on the nodules' middle slices too where ``test`` has ``middle`` (``logits`` and
    ``features`` measured on one slice, as the app sees a case). ``val``/``test``: ``y``, patient ``groups``, the
    views' calibrated ``logits`` and ``features`` (name -> value per nodule, for every feature named)."""
    from lungviz import metrics
    from lungviz.fusion import fit_fusion
    from training.fuse import oof_fusion_figures

    n_classes = val["logits"][0].shape[1]
    if figure not in ("auroc", "kappa") or (figure == "kappa" and n_classes < 3):
        raise LungvizError(f"a fusion-input check reads AUROC, or the kappa of ordinal calls (3 or more classes); "
                           f"got '{figure}' on {n_classes} classes.")

    def score(y: np.ndarray, p: np.ndarray) -> float:
        return float(metrics.auroc(y, p) if figure == "auroc" else metrics.quadratic_kappa(y, metrics.decide(p),
                                                                                            n_classes))

    def design(split: dict, extra: tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
        names = [*always, *extra]
        x = np.stack([np.asarray(split["features"][n], np.float64) for n in names], axis=1) if names else np.zeros(
            (len(split["y"]), 0))
        return x, names

    def read(split: dict, probs: dict[str, np.ndarray], c: str) -> dict:
        """A candidate's figure (with its interval), ECE and paired difference from ``base``."""
        y, p, q = np.asarray(split["y"]), probs[c], probs[base]
        out = {"n": len(y), figure: score(y, p), "ece": float(metrics.ece(y, p)),
               "ci95": metrics.bootstrap_ci(lambda i: {figure: score(y[i], p[i])}, len(y), split["groups"], n_boot)}
        if c != base:
            out[f"difference_from_{base}"] = out[figure] - score(y, q)
            out["difference_ci95"] = metrics.bootstrap_ci(
                lambda i: {"d": score(y[i], p[i]) - score(y[i], q[i])}, len(y), split["groups"], n_boot)["d"]
        return out

    on_val = {c: design(val, extra) for c, extra in candidates.items()}
    draws = {c: oof_fusion_figures(val, x, names, seeds, k) for c, (x, names) in on_val.items()}
    fused = {c: fit_fusion(["slice", "nodule"], val["logits"], val["y"], features=x, feature_names=names,
                           size_source="outliner") for c, (x, names) in on_val.items()}
    parts = {"test": test, **({"test_middle_slice": {**test["middle"], "y": test["y"], "groups": test["groups"]}}
                              if "middle" in test else {})}
    probs = {name: {c: metrics.softmax(fused[c].logits(sp["logits"], design(sp, extra)[0]))
                    for c, extra in candidates.items()} for name, sp in parts.items()}
    reference = np.asarray(draws[base][figure])
    rows = []
    for c, extra in candidates.items():
        got = np.asarray(draws[c][figure])
        higher = int(np.sum(got > reference))
        rows.append({"candidate": c, "features": list(extra), f"val_oof_{figure}_mean": float(np.mean(got)),
                     f"val_oof_{figure}_range": [float(np.min(got)), float(np.max(got))],
                     f"draws_higher_than_{base}": higher if c != base else None,
                     "passes": c != base and enough_draws(higher, seeds),
                     # calibration, reported beside the rule (which reads the figure only)
                     "val_oof_nll_mean": float(np.mean(draws[c]["nll"])),
                     "val_oof_ece_mean": float(np.mean(draws[c]["ece"])),
                     f"draws_lower_nll_than_{base}": int(np.sum(np.asarray(draws[c]["nll"]) < np.asarray(
                         draws[base]["nll"]))) if c != base else None,
                     **{"test_fused" if name == "test" else name: read(parts[name], probs[name], c) for name in parts}})
    passing = [r for r in rows if r["passes"]]
    chosen = max(passing, key=lambda r: r[f"val_oof_{figure}_mean"])["candidate"] if passing else base
    # Test may veto a change, never cause one: a chosen candidate whose paired test difference from the base is below
    # zero with 95% confidence does not ship.
    ci = next(r for r in rows if r["candidate"] == chosen)["test_fused"].get("difference_ci95")
    vetoed = bool(ci and ci[1] < 0)
    shipped = base if vetoed else chosen
    return {"chosen_on_validation": chosen, "chosen_features": list(candidates[chosen]),
            "vetoed_on_test": vetoed, "shipped": shipped, "shipped_features": list(candidates[shipped]),
            "n_val": len(val["y"]), "n_test": len(test["y"]), "draws": seeds, "results": rows}


def outline_feature_check(val: dict, test: dict, seeds: int = 20, k: int = 5, n_boot: int = 1000) -> dict:
    """Does fused-binary gain from the outline's shape and grey levels beside its size? :func:`fusion_input_check`
    of :data:`OUTLINE_CANDIDATES` (each beside the size) against the size alone, on AUROC; with each outline
    feature's own validation AUROC. ``val``/``test`` as there, with the size feature and every outline feature."""
    from lungviz import metrics

    out = fusion_input_check(val, test, OUTLINE_CANDIDATES, "size", "auroc", (SIZE_FEATURE,), seeds, k, n_boot)
    alone = {}
    for name in OUTLINE_FEATURES:
        v = np.asarray(val["features"][name], np.float64)
        filled = np.where(np.isnan(v), np.nanmean(v), v)
        alone[name] = metrics.score_auroc(np.asarray(val["y"]) == 1, filled, None, 0)["auroc"]
    return {**out, "val_feature_alone_auroc": alone}


def fusion_check_parts(task: str, folder: Path, progress: bool = True) -> dict[str, dict]:
    """Per split (validation, test) of fused-``task``'s views: labels ``y``, patient ``groups``, the views'
    calibrated ``logits`` and ``raw`` logits, and every fusion feature the outliner measures (``features``, name ->
    value per nodule);
    for test also ``middle``: views and features on the middle slice only, as the app sees a case."""
    from lungviz.fusion import FEATURES
    from lungviz.labels import get_scheme
    from training.datasets import load_cases
    from training.evaluate import ensemble_logits, fusion_features, read_any_spec
    from training.fuse import split_logits

    scheme = get_scheme(task)
    components = [f"slice-{task}", f"nodule-{task}"]
    fingerprint = read_any_spec(folder, components[0])["split_fingerprint"]
    cases, _ = load_cases("lidc")
    parts = {}
    for split in ("val", "test"):
        kept, y, store, per_net = split_logits(cases, scheme, split, {"split_fingerprint": fingerprint}, folder,
                                               {c: [c] for c in components}, progress)
        every = np.arange(len(kept))
        x = fusion_features(list(FEATURES), folder, store, every, source="outliner")
        parts[split] = {"y": y, "groups": [c.patient_id for c in kept], "logits": [per_net[c][0] for c in components],
                        "raw": [per_net[c][1] for c in components],
                        "features": {n: x[:, i] for i, n in enumerate(FEATURES)}}
        if split == "test":  # what the app sees: views and outline on the middle slice only
            one = fusion_features(list(FEATURES), folder, store, every, 0.0, source="outliner")
            parts[split]["middle"] = {
                "logits": [ensemble_logits(folder, [c], store, every, central=0.0)[0] for c in components],
                "features": {n: one[:, i] for i, n in enumerate(FEATURES)}}
    return parts


def run_fusion_check(task: str, weights: str, out: str, file: str, selection: str,
                     check: Callable[[dict, dict], dict], progress: bool = True) -> dict:
    """Gather fused-``task``'s views and measured features (:func:`fusion_check_parts`), run ``check(val, test)`` on
    them and write its result, described by ``selection``, as ``file`` next to the weights (or to ``out``)."""
    from training.evaluate import read_any_spec

    folder = Path(weights) if weights else paths.weights_dir()
    components = [f"slice-{task}", f"nodule-{task}"]
    parts = fusion_check_parts(task, folder, progress)
    result = {"task": task, "components": components, "selection": selection, **check(parts["val"], parts["test"]),
              "calibration": shared_order(read_any_spec(folder, n) for n in components)}
    path = Path(out) if out else folder / file
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def compare_outline_features(weights: str = "", seeds: int = 20, k: int = 5, n_boot: int = 1000, out: str = "",
                             progress: bool = True) -> dict:
    """Gather the views' calibrated logits and the outliner's features of every validation and test nodule and run
    :func:`outline_feature_check`. Writes ``outline_features.json`` next to the weights (or to ``out``)."""
    return run_fusion_check(
        "binary", weights, out, "outline_features.json",
        f"out-of-fold validation AUROC of fused-binary refitted in {k} patient-grouped folds of the validation split, "
        f"{seeds} fold draws; a feature set passes where higher than the size alone on at least {DRAWS_RULE:.0%} of "
        "the draws, the highest mean of those is chosen",
        lambda val, test: outline_feature_check(val, test, seeds, k, n_boot), progress)


#: The inputs tried beside fused-score's views (:func:`compare_score_inputs`), fixed before the check: the outliner's
#: size, and the size with the outline's shape and grey levels (the set fused-binary weighs).
SCORE_INPUT_CANDIDATES: dict[str, tuple[str, ...]] = {
    "views": (),
    "size": (SIZE_FEATURE,),
    "size, shape and grey levels": (SIZE_FEATURE, *SHAPE_FEATURES, *GREY_FEATURES),
}


def compare_score_inputs(weights: str = "", seeds: int = 20, k: int = 5, n_boot: int = 1000, out: str = "",
                         progress: bool = True) -> dict:
    """Would fused-score gain from the outliner's size (and the outline's shape and grey levels) beside its views?
    :func:`fusion_input_check` of :data:`SCORE_INPUT_CANDIDATES` against the views alone, on the ordinal kappa
    score models are chosen on. Writes ``score_inputs.json`` next to the weights (or to ``out``)."""
    return run_fusion_check(
        "score", weights, out, "score_inputs.json",
        f"out-of-fold validation quadratic kappa of fused-score refitted in {k} patient-grouped folds of the "
        f"validation split, {seeds} fold draws; a candidate passes where higher than the views alone on at least "
        f"{DRAWS_RULE:.0%} of the draws, the highest mean of those is chosen",
        lambda val, test: fusion_input_check(val, test, SCORE_INPUT_CANDIDATES, "views", "kappa", (), seeds, k,
                                             n_boot), progress)


#: A score model's call from its probabilities and the shipped call, for the rows ``rows`` of a split.
Predictor = Callable[[dict, np.ndarray], tuple[np.ndarray, np.ndarray]]


def ordinal_call_check(val: dict, test: dict, fold_predictor: Callable[[np.ndarray], Predictor], shipped: Predictor,
                       seeds: int = 20, k: int = 5, n_boot: int = 1000) -> dict:
    """Should a score model call the panel score nearest its expected score
    (:func:`lungviz.metrics.expected_score_call`) instead of its shipped call? ``fold_predictor(rows)`` fits what the
    model fits on validation (its temperature, or the fusion) on the validation ``rows`` and returns a
    :data:`Predictor`; out of fold in ``k`` patient-grouped folds of the validation split (``seeds`` draws), the
    expected-score call is adopted if its quadratic kappa is higher on :func:`enough_draws` of the draws. Test, read
    after with the ``shipped`` predictor, may veto (a paired kappa difference below zero with 95% confidence), never
    adopt. ``val``/``test``: labels ``y`` and patient ``groups`` (and whatever the predictors read)."""
    from lungviz import metrics
    from training.fuse import grouped_folds

    def figures(y: np.ndarray, calls: np.ndarray, n_classes: int) -> dict[str, float]:
        import sklearn.metrics as skm

        return {"kappa": metrics.quadratic_kappa(y, calls, n_classes),
                "f1_weighted": float(skm.f1_score(y, calls, average="weighted", zero_division=0)),
                "exact": float(np.mean(y == calls))}

    y_val = np.asarray(val["y"])
    draws: dict[str, list[dict[str, float]]] = {"shipped": [], "expected": []}
    n_classes = 0
    for seed in range(seeds):
        fold = grouped_folds(list(val["groups"]), k, seed)
        calls = {rule: np.zeros(len(y_val), int) for rule in draws}
        for f in range(k):
            P, shipped_calls = fold_predictor(np.flatnonzero(fold != f))(val, np.flatnonzero(fold == f))
            n_classes = P.shape[1]
            calls["shipped"][fold == f] = shipped_calls
            calls["expected"][fold == f] = metrics.expected_score_call(P)
        for rule in draws:
            draws[rule].append(figures(y_val, calls[rule], n_classes))
    higher = sum(e["kappa"] > s["kappa"] for e, s in zip(draws["expected"], draws["shipped"], strict=True))
    y = np.asarray(test["y"])
    P, shipped_calls = shipped(test, np.arange(len(y)))
    on_test = {"shipped": shipped_calls, "expected": metrics.expected_score_call(P)}
    diff = metrics.bootstrap_ci(
        lambda i: {"d": metrics.quadratic_kappa(y[i], on_test["expected"][i], n_classes)
                   - metrics.quadratic_kappa(y[i], on_test["shipped"][i], n_classes)}, len(y), test["groups"],
        n_boot)["d"]
    adopt_on_validation = enough_draws(int(higher), seeds)
    vetoed = bool(adopt_on_validation and diff[1] < 0)
    read = {rule: figures(y, c, n_classes) for rule, c in on_test.items()}
    return {"n_val": len(y_val), "n_test": len(y), "draws": seeds, "draws_higher_kappa": int(higher),
            "adopt_on_validation": adopt_on_validation, "vetoed_on_test": vetoed,
            "adopt": adopt_on_validation and not vetoed,
            "val_oof": {rule: {key: float(np.mean([d[key] for d in rows])) for key in rows[0]}
                        for rule, rows in draws.items()},
            "test": read, "test_kappa_difference": read["expected"]["kappa"] - read["shipped"]["kappa"],
            "test_kappa_difference_ci95": diff,
            "test_calls_changed": float(np.mean(on_test["expected"] != on_test["shipped"]))}


def compare_ordinal_calls(weights: str = "", seeds: int = 20, k: int = 5, n_boot: int = 1000, out: str = "",
                          progress: bool = True) -> dict:
    """Run :func:`ordinal_call_check` for nodule-score, slice-score (temperature refitted per fold) and fused-score
    (fusion refitted per fold, with its shipped inputs). Writes ``ordinal_calls.json`` next to the weights (or to
    ``out``)."""
    from lungviz import metrics
    from lungviz.fusion import Fusion, fit_fusion
    from training.evaluate import read_any_spec

    folder = Path(weights) if weights else paths.weights_dir()
    parts = fusion_check_parts("score", folder, progress)
    rows = []
    for name in ("nodule-score", "slice-score"):
        spec = read_any_spec(folder, name)
        shipped_cal = Calibration.from_spec(spec)
        view = 0 if name.startswith("slice") else 1  # fusion_check_parts keeps the views as [slice, nodule]

        def predictor(cal: Calibration, view: int = view) -> Predictor:
            def run(split: dict, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                P = cal.probabilities(np.asarray(split["raw"][view], np.float64)[idx])
                return P, cal.decide(P)
            return run

        def fold(fit_rows: np.ndarray, view: int = view, prior: tuple | None = shipped_cal.prior) -> Predictor:
            val = parts["val"]
            return predictor(Calibration.fit(np.asarray(val["raw"][view], np.float64)[fit_rows], val["y"][fit_rows],
                                             prior), view)

        rows.append({"model": name, **ordinal_call_check(parts["val"], parts["test"], fold, predictor(shipped_cal),
                                                         seeds, k, n_boot)})
    fused = read_any_spec(folder, "fused-score")
    names = list(fused["fusion"].get("features") or [])
    if names and fused["fusion"].get("size_source", "finder") != "outliner":
        raise LungvizError("the ordinal-call check measures fused-score's inputs with the nodule outliner, but its "
                           "spec measures them with another tool; refit it with `python -m training fuse --task "
                           "score`.")

    def design(split: dict) -> np.ndarray:
        return np.stack([np.asarray(split["features"][n], np.float64) for n in names], axis=1) if names else None

    def fusion_predictor(fusion: Fusion) -> Predictor:
        def run(split: dict, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            x = design(split)
            P = metrics.softmax(fusion.logits([lg[idx] for lg in split["logits"]], None if x is None else x[idx]))
            return P, P.argmax(axis=1)
        return run

    def fused_fold(fit_rows: np.ndarray) -> Predictor:
        val, x = parts["val"], design(parts["val"])
        return fusion_predictor(fit_fusion(["slice", "nodule"], [lg[fit_rows] for lg in val["logits"]],
                                           val["y"][fit_rows], features=None if x is None else x[fit_rows],
                                           feature_names=names, size_source="outliner"))

    rows.append({"model": "fused-score", **ordinal_call_check(
        parts["val"], parts["test"], fused_fold, fusion_predictor(Fusion.from_dict(fused["fusion"])), seeds, k,
        n_boot)})
    result = {"selection": f"out-of-fold validation quadratic kappa, {k} patient-grouped folds of the validation "
                           f"split, {seeds} fold draws (the temperature or the fusion refitted per fold); adopted "
                           f"where the expected-score call is higher on at least {DRAWS_RULE:.0%} of the draws",
              "adopted": [r["model"] for r in rows if r["adopt"]], "results": rows,
              "calibration": shared_order(read_any_spec(folder, n) for n in ("nodule-score", "slice-score"))}
    path = Path(out) if out else folder / "ordinal_calls.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


#: Sensitivities a high-sensitivity use of a binary model might aim for (:func:`compare_operating_points`).
SENSITIVITY_TARGETS = (0.90, 0.95)
#: The binary models whose operating points are measured; the readers' mean diameter is added as the baseline.
OPERATING_MODELS = ("nodule-binary", "slice-binary", "fused-binary")
READERS_DIAMETER = "readers' diameter"


def compare_operating_points(weights: str = "", targets: tuple[float, ...] = SENSITIVITY_TARGETS, n_boot: int = 1000,
                             out: str = "", progress: bool = True) -> dict:
    """Per binary model (and the readers' mean diameter alone, as a baseline): the malignant-probability threshold
    that reaches each target sensitivity on validation, by each rule of :data:`lungviz.metrics.SENSITIVITY_RULES`,
    read on test with patient-bootstrap intervals. Writes ``operating_points.json`` next to the weights (or to
    ``out``)."""
    from lungviz import metrics
    from lungviz.labels import get_scheme
    from training.datasets import load_cases
    from training.evaluate import read_any_spec
    from training.fuse import split_logits

    folder = Path(weights) if weights else paths.weights_dir()
    scheme = get_scheme("binary")
    specs = {n: read_any_spec(folder, n) for n in OPERATING_MODELS if (folder / f"{n}.json").is_file()}
    if not specs:
        raise LungvizError(f"no binary model ({', '.join(OPERATING_MODELS)}) is installed in {folder}.")
    trained_on = next(iter(specs.values()))
    if len({s.get("split_fingerprint") for s in specs.values()}) != 1:
        raise LungvizError("the binary models were trained on different splits; their operating points cannot be "
                           "read on one test split.")
    cases, _ = load_cases("lidc")
    data = {}
    for split in ("val", "test"):
        kept, y, _, per_net = split_logits(cases, scheme, split, trained_on, folder, {n: [n] for n in specs},
                                           progress)
        scores = {n: metrics.softmax(per_net[n][0])[:, scheme.positive_class] for n in specs}
        scores[READERS_DIAMETER] = np.array([c.diameter_mm if c.diameter_mm else np.nan for c in kept], float)
        data[split] = {"positive": y == scheme.positive_class, "scores": scores,
                       "groups": np.array([c.patient_id for c in kept])}
    rows = []
    for name in data["val"]["scores"]:
        v, t = ({"positive": d["positive"], "score": d["scores"][name], "groups": d["groups"]} for d in
                (data["val"], data["test"]))
        ok_v, ok_t = np.isfinite(v["score"]), np.isfinite(t["score"])
        rows.append({"model": name, "score": "mm" if name == READERS_DIAMETER else "malignant probability",
                     "n_val": int(ok_v.sum()), "n_test": int(ok_t.sum()),
                     "n_val_positive": int(v["positive"][ok_v].sum()),
                     "test_positive_share": float(t["positive"][ok_t].mean()),
                     "points": [metrics.operating_point(v["positive"][ok_v], v["score"][ok_v], t["positive"][ok_t],
                                                        t["score"][ok_t], target, list(t["groups"][ok_t]), n_boot,
                                                        rule)
                                for rule in metrics.SENSITIVITY_RULES for target in targets]})
    result = {"selection": "thresholds chosen on the validation split; test read with them, 95% patient-bootstrap "
                           "intervals of the test cases",
              "calibration": shared_order(s for s in specs.values() if s.get("kind") != "fusion"),
              "results": rows}
    path = Path(out) if out else folder / "operating_points.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result
