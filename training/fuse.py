"""Train the two-view fused model: late fusion of the shipped slice and nodule models, fitted on validation."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lungviz import metrics, paths
from lungviz.calibration import Calibration, shared_order
from lungviz.errors import LungvizError
from lungviz.fusion import SIZE_FEATURE, SIZE_SOURCES, check_networks, component_networks, fit_fusion, mean_logits
from lungviz.labels import LabelScheme, get_scheme
from training.data import SliceStore
from training.datasets import load_cases
from training.evaluate import (
    calibrated_logits,
    ensemble_logits,
    fusion_features,
    read_any_spec,
    report_from_logits,
    select_split,
    selection_score,
)


def split_logits(cases: list, scheme: LabelScheme, split: str, trained_on: dict, folder: Path,
                 nets: dict[str, list[str]], progress: bool = True,
                 ) -> tuple[list, np.ndarray, SliceStore, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The labelled nodules (or images) of one split of the split ``trained_on`` (a spec: its dataset and split
    fingerprint) names, their labels, their slices and every network's ``(calibrated, raw)`` per-case logits."""
    pairs = scheme.labelled(select_split(cases, split, trained_on, folder))
    kept = [c for c, _ in pairs]
    store = SliceStore(kept, progress=progress)
    per_net = {n: calibrated_logits(folder, n, store, np.arange(len(kept)))[:2]
               for group in nets.values() for n in group}
    return kept, np.array([y for _, y in pairs]), store, per_net


def train_fusion(task: str = "binary", weights: str = "", n_boot: int = 1000, progress: bool = True,
                 size: bool = True, size_source: str = "outliner", members: dict[str, list[str]] | None = None,
                 outline: Sequence[str] = ()) -> dict:
    """Fit ``fused-<task>`` from ``slice-<task>`` and ``nodule-<task>`` (and, with ``size``, the nodule's diameter
    measured on the image by ``size_source``: the outliner or the finder; ``outline`` names further
    :data:`lungviz.shape.OUTLINE_FEATURES` of the outliner's outline) on the validation split; test once.

    ``members`` names, per component, further networks of the task whose calibrated logits are averaged with the
    component's (a mean-logit ensemble for that view)."""
    if outline and (not size or size_source != "outliner"):
        raise LungvizError("the outline features come with the size the nodule outliner measures (--size yes "
                           "--size-source outliner).")
    folder = Path(weights) if weights else paths.weights_dir()
    scheme = get_scheme(task)
    components = [f"slice-{task}", f"nodule-{task}"]
    members = {c: list(m) for c, m in (members or {}).items() if m}
    head = {"kind": "fusion", "view": "fused", "task": task, "classes": list(scheme.classes),
            "components": components, **({"members": members} if members else {})}
    nets = component_networks(head)
    specs = {n: read_any_spec(folder, n) for group in nets.values() for n in group}
    fingerprint = specs[components[0]]["split_fingerprint"]
    check_networks(head | {"split_fingerprint": fingerprint}, specs)
    names = ([SIZE_FEATURE] if size else []) + list(outline)
    cases, _ = load_cases("lidc")
    parts, stores = {}, {}
    for split in ("val", "test"):
        kept, y, store, per_net = split_logits(cases, scheme, split, {"split_fingerprint": fingerprint}, folder, nets,
                                               progress)
        stores[split] = store
        cal = [mean_logits([per_net[n][0] for n in nets[c]]) for c in components]
        raw = [mean_logits([per_net[n][1] for n in nets[c]]) for c in components]
        feats = fusion_features(names, folder, store, np.arange(len(kept)), source=size_source) if names else None
        parts[split] = {"kept": kept, "y": y, "cal": cal, "raw": raw, "feats": feats,
                        "alone": [per_net[c][0] for c in components]}
    kept, y, cal, feats = (parts["val"][k] for k in ("kept", "y", "cal", "feats"))
    fusion = fit_fusion(["slice", "nodule"], cal, y, features=feats, feature_names=names, size_source=size_source)
    # What the features add, on validation (the split the choice is made on): the same fusion without them.
    views_only = fit_fusion(["slice", "nodule"], cal, y).logits(cal)
    val_views_only = float(selection_score(y, views_only, scheme))
    val_size_only = None
    if outline:
        plain = fit_fusion(["slice", "nodule"], cal, y, features=feats[:, :1], feature_names=names[:1],
                           size_source=size_source)
        val_size_only = float(selection_score(y, plain.logits(cal, feats[:, :1]), scheme))
    # What the ensemble members add: the same fusion fitted on each component alone, on validation and on test, and
    # a patient-bootstrap interval of the paired difference (with members minus without).
    without_members = {}
    if members:
        alone = fit_fusion(["slice", "nodule"], parts["val"]["alone"], y, features=feats, feature_names=names,
                           size_source=size_source)
        for split in ("val", "test"):
            sp = parts[split]
            a, b = fusion.logits(sp["cal"], sp["feats"]), alone.logits(sp["alone"], sp["feats"])
            without_members[split] = float(selection_score(sp["y"], b, scheme))
            without_members[f"{split}_difference_ci95"] = metrics.bootstrap_ci(
                lambda i, sp=sp, a=a, b=b: {"d": selection_score(sp["y"][i], a[i], scheme)
                                            - selection_score(sp["y"][i], b[i], scheme)},
                len(sp["y"]), [c.patient_id for c in sp["kept"]], n_boot if split == "test" else 200).get("d")
    reports = {}
    for split in ("val", "test"):
        kept, y, cal, raw, feats = (parts[split][k] for k in ("kept", "y", "cal", "raw", "feats"))
        reports[split] = report_from_logits(y, fusion.logits(cal, feats), np.mean(raw, axis=0), scheme,
                                            [c.patient_id for c in kept], [c.reader_scores for c in kept],
                                            n_boot if split == "test" else 200)
    # What the app sees: the middle slice only (views and size measured on it).
    kept, y = parts["test"]["kept"], parts["test"]["y"]
    every = np.arange(len(kept))
    single = [ensemble_logits(folder, nets[c], stores["test"], every, central=0.0) for c in components]
    feats = fusion_features(names, folder, stores["test"], every, 0.0, source=size_source) if names else None
    reports["test_single_slice"] = report_from_logits(y, fusion.logits([o[0] for o in single], feats),
                                                      np.mean([o[1] for o in single], axis=0), scheme,
                                                      [c.patient_id for c in kept], None, 200)
    # The image-measured size alone (no malignancy CNN), for binary: what the views add beyond it.
    size_only = {}
    if names and scheme.positive_class is not None:
        columns = {"val": parts["val"]["feats"], "test": parts["test"]["feats"], "test_single_slice": feats}
        for name, f in columns.items():
            split_kept, split_y = parts[name.split("_")[0]]["kept"], parts[name.split("_")[0]]["y"]
            size_only[name] = metrics.score_auroc(split_y == scheme.positive_class, f[:, 0],
                                                  [c.patient_id for c in split_kept], n_boot if name == "test" else 200)
    # The measurement against the readers' diameter (a label, never an input), on one middle slice as the app sees.
    size_vs_readers = metrics.ratio_by_band(np.exp(feats[:, 0]), np.array(
        [c.diameter_mm if c.diameter_mm else np.nan for c in parts["test"]["kept"]])) if names else []
    spec = {**head, "fusion": fusion.to_dict(), "split_fingerprint": fingerprint,
            "networks_sha256": {n: s.get("weights_sha256") for n, s in specs.items()},
            "networks_calibration": {n: Calibration.from_spec(s).to_spec() for n, s in specs.items()},
            "dataset": "lidc", "metrics": reports, "size_only_auroc": size_only,
            "size_vs_readers_test": size_vs_readers,
            **({"without_members": without_members} if members else {}),
            "training": {"method": "late fusion: per-view weight x calibrated logits"
                                   + (" (" + "; ".join(f"{c}: the mean of {len(m) + 1} networks' calibrated logits"
                                                       for c, m in members.items()) + ")" if members else "")
                                   + " + class bias"
                                   + (" + per-class weights x the log of the nodule diameter measured on the image "
                                      f"by {SIZE_SOURCES[size_source]} (central half of the slices)" if size else "")
                                   + (f" and x its outline's {', '.join(outline)} (standardised on validation)"
                                      if outline else "")
                                   + ", maximum likelihood on the validation split", "n_val": len(parts["val"]["y"]),
                         "n_test": len(parts["test"]["y"]), "features": names,
                         "val_score_views_only": val_views_only,
                         **({"val_score_size_without_outline": val_size_only} if outline else {}),
                         "val_score": float(selection_score(parts["val"]["y"], fusion.logits(
                             parts["val"]["cal"], parts["val"]["feats"]), scheme))}}
    path = folder / f"fused-{task}.json"
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return spec


def grouped_folds(groups: list[str], k: int, seed: int) -> np.ndarray:
    """A fold number per case, whole patients to a fold (patients shuffled by ``seed``, dealt round-robin)."""
    uniq = np.unique(np.asarray(groups))
    fold_of = dict(zip(np.random.default_rng(seed).permutation(uniq), np.arange(len(uniq)) % k, strict=True))
    return np.array([fold_of[g] for g in groups])


def oof_fusion_figures(val: dict, x: np.ndarray, names: list[str], seeds: int = 20, k: int = 5,
                       ) -> dict[str, list[float]]:
    """Per fold draw (``seeds`` of them), the out-of-fold validation ``auroc``, ``nll``, top-class ``ece`` and, for
    more than two (ordinal) classes, the quadratic ``kappa`` of the calls, of the fused model refitted with the
    features ``x`` ``(N, F)`` named ``names`` in ``k`` patient-grouped folds of ``val`` (``y``, ``groups``,
    ``logits``)."""
    C = val["logits"][0].shape[1]
    out: dict[str, list[float]] = {"auroc": [], "nll": [], "ece": [], **({"kappa": []} if C > 2 else {})}
    for seed in range(seeds):
        fold = grouped_folds(val["groups"], k, seed)
        oof = np.zeros((len(val["y"]), C))
        for f in range(k):
            fit, held = fold != f, fold == f
            fusion = fit_fusion(["slice", "nodule"], [lg[fit] for lg in val["logits"]], val["y"][fit],
                                features=x[fit], feature_names=names, size_source="outliner")
            oof[held] = fusion.logits([lg[held] for lg in val["logits"]], x[held])
        probs = metrics.softmax(oof)
        out["auroc"].append(float(metrics.auroc(val["y"], probs)))
        out["nll"].append(float(metrics.nll(oof, val["y"])))
        out["ece"].append(float(metrics.ece(val["y"], probs)))
        if C > 2:
            out["kappa"].append(metrics.quadratic_kappa(val["y"], metrics.decide(probs), C))
    return out


def fused_test_auroc(val: dict, test: dict, x_val: np.ndarray, x_test: np.ndarray, names: list[str],
                     n_boot: int = 1000) -> dict:
    """Fused-binary fitted on all of validation with the features ``names``, read on test: AUROC and its
    patient-bootstrap interval, and the top-class ECE."""
    fusion = fit_fusion(["slice", "nodule"], val["logits"], val["y"], features=x_val, feature_names=names,
                        size_source="outliner")
    probs = metrics.softmax(fusion.logits(test["logits"], x_test))
    return {"n": len(test["y"]), "auroc": float(metrics.auroc(test["y"], probs)),
            "ece": float(metrics.ece(test["y"], probs)),
            "ci95": metrics.bootstrap_ci(lambda i: {"auroc": metrics.auroc(test["y"][i], probs[i])},
                                         len(test["y"]), test["groups"], n_boot)}


def compare_size_measures(weights: str = "", seeds: int = 20, k: int = 5, n_boot: int = 1000, out: str = "",
                          progress: bool = True) -> dict:
    """Which of the outliner's sizes (:data:`lungviz.outline.SIZE_MEASURES`) serves fused-binary best as its size
    input. Chosen on validation only: out-of-fold AUROC of the fusion refitted in ``k`` patient-grouped folds of the
    validation split (``seeds`` fold draws); test, and the measurement against the readers' diameter, reported
    after. Writes ``size_measures.json`` next to the weights (or to ``out``)."""
    from lungviz.outline import SIZE_MEASURES, crops_sizes_mm, load_outliner
    from lungviz.preprocess import spacing_or_default

    folder = Path(weights) if weights else paths.weights_dir()
    scheme = get_scheme("binary")
    components = ["slice-binary", "nodule-binary"]
    nets = {c: [c] for c in components}
    specs = {c: read_any_spec(folder, c) for c in components}
    fingerprint = specs[components[0]]["split_fingerprint"]
    outliner = load_outliner(folder)
    cases, _ = load_cases("lidc")
    data = {}
    for split in ("val", "test"):
        kept, y, store, per_net = split_logits(cases, scheme, split, {"split_fingerprint": fingerprint}, folder, nets,
                                               progress)
        sizes = {m: [] for m in SIZE_MEASURES}
        for ci, case in enumerate(kept):
            got = crops_sizes_mm(outliner, [store.slice01(ci, s) for s in store.eval_slices(ci, 0, 0.5)],
                                 spacing_or_default(case.pixel_spacing_mm))
            for m in SIZE_MEASURES:
                sizes[m].append(float(np.mean(got[m])))
        data[split] = {"y": y, "groups": [c.patient_id for c in kept], "logits": [per_net[c][0] for c in components],
                       "sizes": {m: np.asarray(v) for m, v in sizes.items() if m != "short_axis"},  # not a size alone
                       "readers_mm": np.array([c.diameter_mm if c.diameter_mm else np.nan for c in kept])}
    result = {"task": "binary", "components": components, "shipped_measure": "circle",
              **size_measure_comparison(data, scheme, seeds, k, n_boot),
              "calibration": shared_order(read_any_spec(folder, n) for n in components)}
    path = Path(out) if out else folder / "size_measures.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def size_measure_comparison(data: dict[str, dict], scheme: LabelScheme, seeds: int = 20, k: int = 5,
                            n_boot: int = 1000) -> dict:
    """The choice :func:`compare_size_measures` makes, on its gathered data: per split ``y``, ``groups`` (patients),
    ``logits`` (the views' calibrated logits), ``sizes`` (measure -> mm per nodule) and, for test, ``readers_mm``."""
    from lungviz.fusion import size_feature

    val, test = data["val"], data["test"]
    measures = list(val["sizes"])

    def x(split: dict, measure: str) -> np.ndarray:
        return size_feature(split["sizes"][measure])[:, None]

    oof_auroc = {m: oof_fusion_figures(val, x(val, m), [SIZE_FEATURE], seeds, k)["auroc"] for m in measures}
    chosen = max(measures, key=lambda m: (np.mean(oof_auroc[m]), m == "circle"))  # a tie keeps the shipped one
    positive, rows = scheme.positive_class, []
    for m in measures:
        rows.append({
            "measure": m, "val_oof_auroc_mean": float(np.mean(oof_auroc[m])),
            "val_oof_auroc_range": [float(np.min(oof_auroc[m])), float(np.max(oof_auroc[m]))],
            "test_fused": fused_test_auroc(val, test, x(val, m), x(test, m), [SIZE_FEATURE], n_boot),
            "val_size_alone_auroc": metrics.score_auroc(val["y"] == positive, val["sizes"][m], None, 0)["auroc"],
            "test_size_alone": metrics.score_auroc(test["y"] == positive, test["sizes"][m], test["groups"], n_boot),
            "test_vs_readers": metrics.ratio_by_band(test["sizes"][m], test["readers_mm"])})
    return {"chosen_on_validation": chosen,
            "selection": f"mean out-of-fold validation AUROC of fused-binary refitted in {k} patient-grouped "
                         f"folds of the validation split ({seeds} fold draws)",
            "n_val": len(val["y"]), "n_test": len(test["y"]), "results": rows}
