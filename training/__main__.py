"""``python -m training <command>``: import the LIDC data, split it by patient, train, calibrate, evaluate and
fuse the models, build the similar-case index and write the model card."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lungviz import paths
from lungviz.errors import LungvizError
from training.config import (
    CamlocConfig,
    CardConfig,
    ClassBiasConfig,
    EvalConfig,
    FuseConfig,
    IndexConfig,
    OperatingConfig,
    OrdinalCallsConfig,
    OutlierConfig,
    OutlineFeaturesConfig,
    OutlinerConfig,
    PackConfig,
    RefreshConfig,
    ScoreInputsConfig,
    SearchConfig,
    SizesConfig,
    SplitConfig,
    TtaConfig,
    add_config_args,
    config_from_args,
    save_config,
)
from training.finder import FinderConfig
from training.nodule import NoduleConfig
from training.train import TrainConfig


def cmd_splits(cfg: SplitConfig) -> dict:
    """Write the patient-level holdout and k-fold split files for the LIDC slices set."""
    from lungviz.splits import holdout_split, kfold_split
    from training.datasets import load_cases

    cases, report = load_cases("lidc", cfg.data)
    out = Path(cfg.out) if cfg.out else paths.weights_dir() / "splits"
    hold = holdout_split(cases, seed=cfg.seed)
    folds = kfold_split(cases, k=cfg.k, seed=cfg.seed)
    hold.save(out / "holdout.json")
    folds.save(out / f"kfold{cfg.k}.json")
    summary = {"import": report.summary(), "fingerprint": hold.fingerprint, "out": str(out)}
    for name in ("train", "val", "test"):
        sel = hold.select(cases, name)
        summary[name] = {"patients": len(hold.patients(name)), "nodules": len(sel),
                         "malignant": sum(c.malignant or 0 for c in sel)}
    return summary


def cmd_outliers(cfg: OutlierConfig) -> dict:
    """Embed every case with a pretrained backbone and flag outliers (PCA + Isolation Forest)."""
    from training.datasets import load_cases
    from training.outliers import embed_cases, find_outliers, pretrained_embedder, screen_image, write_outputs

    cases, report = load_cases(cfg.dataset, cfg.data)
    if cfg.limit:
        cases = cases[: cfg.limit]
    out = Path(cfg.out) if cfg.out else paths.runs_dir() / f"outliers-{cfg.dataset}"
    save_config(cfg, out / "config.json")
    embed = pretrained_embedder(cfg.arch)
    feats = embed_cases(cases, embed, lambda c: screen_image(c, cfg.view, cfg.input_size), cfg.batch_size)
    result = find_outliers(feats, [c.case_id for c in cases], cfg.contamination, cfg.pca_components, cfg.seed)
    files = write_outputs(result, cases, out, f"{cfg.dataset}: {cfg.arch} features, t-SNE "
                                              f"({result.n_flagged} of {len(cases)} flagged)")
    top = np.argsort(-result.scores)[:10]
    return {"import": report.summary(), "n": len(cases), "flagged": result.n_flagged,
            "pca_explained_variance": round(result.explained_variance, 3),
            "most_unusual": [result.case_ids[i] for i in top], **{k: str(v) for k, v in files.items()}}


def train_shipped(base: TrainConfig, names: list[str]) -> dict:
    """The named shipped models, each with its preset (SHIPPED); test figures of each."""
    import dataclasses

    from training.train import SHIPPED, train_model

    unknown = [n for n in names if n not in SHIPPED]
    if unknown:
        raise LungvizError(f"no shipped model called {', '.join(unknown)}; choose from {', '.join(SHIPPED)}.")
    done = {}
    for name in names:
        cfg = dataclasses.replace(base, all=False, shipped="", name=name, **SHIPPED[name])
        spec = train_model(cfg)
        done[name] = {k: spec["metrics"]["test"].get(k) for k in ("n", "auroc", "f1_weighted", "qwk", "ece")}
    return done


def train_all(base: TrainConfig) -> dict:
    """Every shipped model with its preset, then the two fused models, the nodule model and the similar-case index
    (which embeds with the nodule model)."""
    from training.fuse import train_fusion
    from training.index import INDEX_MODEL, build_library_index
    from training.train import SHIPPED, SHIPPED_FUSIONS

    for preset in SHIPPED_FUSIONS.values():  # fail now, not after hours of training
        if preset.get("size"):
            from lungviz.finder import load_finder
            from lungviz.outline import load_outliner

            load = load_outliner if preset.get("size_source") == "outliner" else load_finder
            load(Path(base.out) if base.out else None)
    done = train_shipped(base, list(SHIPPED))
    for task, preset in SHIPPED_FUSIONS.items():
        spec = train_fusion(task, base.out, **preset)
        done[f"fused-{task}"] = {k: spec["metrics"]["test"].get(k) for k in ("n", "auroc", "f1_weighted", "qwk")}
    from training.nodule import NoduleConfig, train_nodule

    nodule = train_nodule(NoduleConfig(out=str(Path(base.out) if base.out else paths.weights_dir())))
    done["nodule"] = {"dice": nodule["metrics"]["test"]["outline"]["dice"],
                      "estimate_auroc": nodule["metrics"]["estimate"]["factors"]["auroc"]["auroc"]}
    done["index"] = build_library_index(INDEX_MODEL)  # embeds with the nodule model, so after it
    return done


def cmd_train(cfg: TrainConfig) -> dict:
    """Train one model bundle (data, split, gradual fine-tuning, calibration, test report)."""
    from training.train import train_model

    if cfg.all:
        return train_all(cfg)
    if cfg.shipped:
        return train_shipped(cfg, [n.strip() for n in cfg.shipped.split(",") if n.strip()])
    spec = train_model(cfg)
    test = spec["metrics"]["test"]
    keys = ("n", "auroc", "auprc_weighted", "f1_weighted", "f1_macro", "f1_malignant", "qwk", "accuracy", "ece",
            "ece_raw")
    return {"name": cfg.name, "temperature": spec["temperature"], **{k: test[k] for k in keys if k in test},
            "train_seconds": spec["training"]["train_seconds"]}


def cmd_evaluate(cfg: EvalConfig) -> dict | str:
    """Evaluate a shipped model on a lidc-slices folder (all labelled nodules, or --split)."""
    from training.evaluate import evaluate_bundle, evaluation_text

    folder = Path(cfg.weights) if cfg.weights else paths.weights_dir()
    if cfg.task == "characteristics":
        from training.nodule import characteristics_text, evaluate_characteristics

        rep = evaluate_characteristics(folder, cfg.model or "nodule", cfg.data, cfg.split, cfg.predictions,
                                       cfg.n_boot, progress=not cfg.json)
        return rep if cfg.json else characteristics_text(rep)
    name = cfg.model or ("histology" if cfg.task == "histology" else f"{cfg.view}-{cfg.task}")
    rep = evaluate_bundle(folder, name, cfg.data, cfg.split, cfg.predictions, cfg.n_boot, cfg.max_slices,
                          progress=not cfg.json)
    return rep if cfg.json else evaluation_text(rep)


def cmd_index(cfg: IndexConfig) -> dict:
    """Embed every labelled library nodule with a shipped model (default the nodule model) into a FAISS index with
    its thumbnail atlas (weights/index-<model>.faiss, .json, -atlas.png) and measure its retrieval."""
    from training.index import build_library_index

    return build_library_index(cfg.model, cfg.data, cfg.out, cfg.max_slices)


def parse_members(text: str, shipped: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
    """``--members``: shipped (the preset's), none, or ``COMPONENT=NET[,NET][;COMPONENT=NET...]``."""
    text = text.strip()
    if text in ("shipped", "none", ""):
        return shipped if text == "shipped" else None
    out: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        comp, sep, nets = part.partition("=")
        names = [n.strip() for n in nets.split(",") if n.strip()]
        if not sep or not comp.strip() or not names:
            raise LungvizError(f"--members takes shipped, none or COMPONENT=NET[,NET]; got '{text}'.")
        out[comp.strip()] = names
    return out


def cmd_fuse(cfg: FuseConfig) -> dict:
    """Fit the two-view fused model (fused-<task>) on the validation split and report it on test."""
    from training.fuse import train_fusion
    from training.train import SHIPPED_FUSIONS

    choice = cfg.size.strip().lower()
    if choice not in ("shipped", "yes", "no"):
        raise LungvizError(f"--size takes shipped, yes or no, got '{cfg.size}'.")
    size = SHIPPED_FUSIONS.get(cfg.task, {}).get("size", False) if choice == "shipped" else choice == "yes"
    source = cfg.size_source or SHIPPED_FUSIONS.get(cfg.task, {}).get("size_source", "outliner")
    members = parse_members(cfg.members, SHIPPED_FUSIONS.get(cfg.task, {}).get("members"))
    spec = train_fusion(cfg.task, cfg.weights, cfg.n_boot, size=size, size_source=source, members=members,
                        outline=parse_outline(cfg.outline, SHIPPED_FUSIONS.get(cfg.task, {}).get("outline", ())))
    test = spec["metrics"]["test"]
    return {"name": f"fused-{cfg.task}", "fusion": spec["fusion"],
            **{k: test[k] for k in ("n", "auroc", "f1_weighted", "f1_malignant", "qwk", "ece") if k in test}}


def parse_outline(text: str, shipped: Sequence[str]) -> list[str]:
    """``--outline``: shipped (the preset's features) | none | a comma-separated list of outline features."""
    from lungviz.shape import OUTLINE_FEATURES

    choice = text.strip()
    if choice.lower() == "shipped":
        return list(shipped)
    if choice.lower() in ("none", ""):
        return []
    names = [n.strip() for n in choice.split(",") if n.strip()]
    unknown = [n for n in names if n not in OUTLINE_FEATURES]
    if unknown:
        raise LungvizError(f"unknown outline feature(s) {', '.join(unknown)}; choose from "
                           f"{', '.join(OUTLINE_FEATURES)}, or shipped or none.")
    return names


def input_check_summary(result: dict, figure: str, base: str) -> dict:
    """What a fusion-input check (:func:`training.experiments.fusion_input_check`) prints: its decision and, per
    candidate, its out-of-fold validation ``figure``, the draws it beat ``base`` on and its test figure."""
    return {"chosen_on_validation": result["chosen_on_validation"], "vetoed_on_test": result["vetoed_on_test"],
            "shipped": result["shipped"],
            **{r["candidate"]: {f"val_oof_{figure}": round(r[f"val_oof_{figure}_mean"], 4),
                                f"draws_higher_than_{base}": r[f"draws_higher_than_{base}"],
                                f"test_fused_{figure}": round(r["test_fused"][figure], 4)} for r in result["results"]}}


def cmd_outline_features(cfg: OutlineFeaturesConfig) -> dict:
    """Check the outline's shape and grey levels as fused-binary features beside its size (validation decides)."""
    from training.experiments import compare_outline_features

    return input_check_summary(compare_outline_features(cfg.weights, cfg.seeds, cfg.folds, cfg.n_boot, cfg.out),
                               "auroc", "size")


def cmd_score_inputs(cfg: ScoreInputsConfig) -> dict:
    """Check the outliner's size (and the outline's shape and grey levels) as fused-score inputs beside its views
    (validation decides)."""
    from training.experiments import compare_score_inputs

    return input_check_summary(compare_score_inputs(cfg.weights, cfg.seeds, cfg.folds, cfg.n_boot, cfg.out),
                               "kappa", "views")


def cmd_ordinal_calls(cfg: OrdinalCallsConfig) -> dict:
    """Check the expected-score call for each score model against its shipped call (validation decides)."""
    from training.experiments import compare_ordinal_calls

    result = compare_ordinal_calls(cfg.weights, cfg.seeds, cfg.folds, cfg.n_boot, cfg.out)
    return {"adopted": result["adopted"],
            **{r["model"]: {"draws_higher_kappa": r["draws_higher_kappa"], "vetoed_on_test": r["vetoed_on_test"],
                            "val_oof_kappa": [round(r["val_oof"][c]["kappa"], 4) for c in ("shipped", "expected")],
                            "test_kappa": [round(r["test"][c]["kappa"], 4) for c in ("shipped", "expected")]}
               for r in result["results"]}}


def cmd_sizes(cfg: SizesConfig) -> dict:
    """Compare the outliner's size measures as fused-binary's size input (chosen on validation; test after)."""
    from training.fuse import compare_size_measures

    result = compare_size_measures(cfg.weights, cfg.seeds, cfg.folds, cfg.n_boot, cfg.out)
    return {"chosen_on_validation": result["chosen_on_validation"],
            **{r["measure"]: {"val_oof_auroc": round(r["val_oof_auroc_mean"], 4),
                              "test_fused_auroc": round(r["test_fused"]["auroc"], 4)} for r in result["results"]}}


def cmd_tta(cfg: TtaConfig) -> dict:
    """Check test-time augmentation (8 dihedral transforms) on each shipped network (validation decides)."""
    from training.experiments import compare_tta

    result = compare_tta(cfg.weights, cfg.n_boot, cfg.out)
    return {"adopted": result["adopted"], **{r["model"]: {s: [round(r[s]["plain"], 4), round(r[s]["tta"], 4)]
                                                          for s in ("val", "test")} for r in result["results"]}}


def cmd_class_bias(cfg: ClassBiasConfig) -> dict:
    """Check a per-class bias on top of each shipped network's temperature (validation decides, test after)."""
    from training.experiments import compare_class_bias

    result = compare_class_bias(cfg.weights, cfg.seeds, cfg.folds, cfg.out)
    return {"adopted": result["adopted"],
            **{r["model"]: {"draws_lower_val_nll": f"{r['draws_lower_nll']}/{r['draws']}",
                            "test_ece": [round(r[f]["test_ece"], 4) for f in ("temperature", "temperature_bias")]}
               for r in result["results"]}}


def cmd_operating(cfg: OperatingConfig) -> dict:
    """Thresholds of the binary models for 90% and 95% sensitivity, chosen on validation and read on test."""
    from training.experiments import compare_operating_points

    result = compare_operating_points(cfg.weights, n_boot=cfg.n_boot, out=cfg.out)
    return {r["model"]: {f"{p['target_sensitivity']:.0%} {p['rule']}": {k: round(p["test"][k], 3)
                                                            for k in ("sensitivity", "specificity")}
                         for p in r["points"]} for r in result["results"]}


def cmd_refresh(cfg: RefreshConfig) -> dict:
    """Re-measure saved bundles' stored weights (calibration on validation, every figure of the spec); without
    --model, every shipped network and then the fused models built on them."""
    from training.fuse import train_fusion
    from training.train import SHIPPED, SHIPPED_FUSIONS, refresh_model

    folder = Path(cfg.weights) if cfg.weights else None
    keys = ("n", "auroc", "f1_weighted", "f1_malignant", "qwk", "ece")
    done = {}
    for name in [cfg.model] if cfg.model else list(SHIPPED):
        spec = refresh_model(name, folder, n_boot=cfg.n_boot)
        done[name] = {"temperature": spec["temperature"],
                      **{k: spec["metrics"]["test"][k] for k in keys if k in spec["metrics"]["test"]}}
    if not cfg.model:
        for task, preset in SHIPPED_FUSIONS.items():
            spec = train_fusion(task, cfg.weights, cfg.n_boot, **preset)
            done[f"fused-{task}"] = {k: spec["metrics"]["test"][k] for k in keys if k in spec["metrics"]["test"]}
    return done


def cmd_screen(cfg: TrainConfig) -> dict:
    """Backbone screen (cnn4, Lite0, Lite2) of a setup on a short budget; compared on validation."""
    from training.experiments import screen_backbones

    return screen_backbones(cfg)


def cmd_cv(cfg: TrainConfig) -> dict:
    """5-fold patient-level cross-validation of a setup (writes weights/cv.json)."""
    from training.experiments import cross_validate

    return cross_validate(cfg)


def cmd_ablate(cfg: TrainConfig) -> dict:
    """Variations of a setup (training.experiments.ABLATIONS) against it, on validation (weights/ablation.json)."""
    from training.experiments import ablate

    return ablate(cfg)


def cmd_search(cfg: SearchConfig) -> dict:
    """Train every recipe of training.experiments.SEARCH with its seeds; compare on validation (weights/search.json)."""
    from training.experiments import search

    return search(TrainConfig(data=cfg.data), cfg.workers, out=cfg.out, run_on=cfg.run_on)["summary"]


def cmd_pack(cfg: PackConfig) -> dict:
    """Pack the lidc-slices set into parts small enough for the GPU machine's link (see training.devicepack)."""
    from training.devicepack import pack_slices

    src = Path(cfg.data) if cfg.data else paths.lidc_slices_dir()
    archives = pack_slices(src, Path(cfg.out), cfg.parts, cfg.quality)
    return {"parts": {a.name: a.stat().st_size for a in archives}, "pretrained": str(Path(cfg.out) / "site")}


def cmd_unpack(cfg: PackConfig) -> dict:
    """On the GPU machine: rebuild the lidc-slices layout from the parts carried so far."""
    from training.devicepack import unpack_slices

    n = unpack_slices(Path(cfg.out), Path(cfg.dest))
    return {"files": n, "data": cfg.dest, "use": f"LUNGVIZ_DATA={cfg.dest} PYTHONPATH=.:{cfg.out}/site"}


def cmd_card(cfg: CardConfig) -> dict:
    """Regenerate the model card weights/README.md and its figures from the shipped files."""
    from training.card import write_card

    path = write_card(Path(cfg.weights) if cfg.weights else None)
    return {"card": str(path)}


def cmd_camloc(cfg: CamlocConfig) -> dict | str:
    """Does each model's Grad-CAM find the nodule? Peak and mass inside the readers' outline on centred and shifted
    views, beside a centre prior, on any lidc-slices folder (the shipped record: --split test --out
    weights/cam_localisation.json)."""
    from training.cam_eval import LIDC_MODELS, cam_localisation, localisation_text

    models = tuple(m.strip() for m in cfg.models.split(",") if m.strip()) or LIDC_MODELS
    rep = cam_localisation(models, cfg.data, cfg.split, cfg.method, cfg.choose_layer, cfg.shift, cfg.seed, cfg.out,
                           progress=not cfg.json, weights=cfg.weights)
    return rep if cfg.json else localisation_text(rep)


def cmd_nodule(cfg: NoduleConfig) -> dict:
    """Train the nodule model (outline, size, malignancy and the readers' characteristics from one network) and
    report it on test."""
    from training.nodule import train_nodule

    spec = train_nodule(cfg)
    test = spec["metrics"]["test"]
    return {"bundle": cfg.name, "dice": test["outline"]["dice"], "size": test["size"],
            "malignant_auroc": test["malignant"]["auroc"],
            "ratings_qwk": {h: r["qwk"] for h, r in test["ratings"].items()}}


def cmd_outliner(cfg: OutlinerConfig) -> dict:
    """Train the nodule outliner (a segmenter of the readers' outline that measures the nodule) and report it."""
    from training.outliner import train_outliner

    spec = train_outliner(cfg)
    keys = ("n", "dice", "ratio_to_readers_median", "ratio_to_target_median")
    return {split: {**{k: rep[k] for k in keys}, "size_auroc": rep.get("size_auroc", {}).get("auroc")}
            for split, rep in spec["metrics"].items()}


def cmd_finder(cfg: FinderConfig) -> dict:
    """Train the nodule finder (presence classifier + localiser) and scan the DICOM test series."""
    from training.finder import train_finder

    return train_finder(cfg)


COMMANDS = {
    "splits": (cmd_splits, SplitConfig),
    "outliers": (cmd_outliers, OutlierConfig),
    "train": (cmd_train, TrainConfig),
    "evaluate": (cmd_evaluate, EvalConfig),
    "refresh": (cmd_refresh, RefreshConfig),
    "index": (cmd_index, IndexConfig),
    "fuse": (cmd_fuse, FuseConfig),
    "sizes": (cmd_sizes, SizesConfig),
    "outline-features": (cmd_outline_features, OutlineFeaturesConfig),
    "score-inputs": (cmd_score_inputs, ScoreInputsConfig),
    "ordinal-calls": (cmd_ordinal_calls, OrdinalCallsConfig),
    "tta": (cmd_tta, TtaConfig),
    "class-bias": (cmd_class_bias, ClassBiasConfig),
    "operating-points": (cmd_operating, OperatingConfig),
    "screen": (cmd_screen, TrainConfig),
    "ablate": (cmd_ablate, TrainConfig),
    "search": (cmd_search, SearchConfig),
    "cv": (cmd_cv, TrainConfig),
    "card": (cmd_card, CardConfig),
    "camloc": (cmd_camloc, CamlocConfig),
    "finder": (cmd_finder, FinderConfig),
    "outliner": (cmd_outliner, OutlinerConfig),
    "nodule": (cmd_nodule, NoduleConfig),
    "pack": (cmd_pack, PackConfig),
    "unpack": (cmd_unpack, PackConfig),
}


def setup_logging(command: str) -> Path:
    """Log to the console and to runs/logs/<command>-<time>.log."""
    import time

    path = paths.runs_dir() / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    logger = logging.getLogger("training")
    logger.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(path)):
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, cls) in COMMANDS.items():
        summary = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())
        p = sub.add_parser(name, help=summary.replace("%", "%%"))  # argparse formats help with %
        add_config_args(p, cls)
    args = parser.parse_args(argv)
    fn, cls = COMMANDS[args.command]
    log_path = setup_logging(args.command)
    logging.getLogger("training").info("python -m training %s (log: %s)", " ".join(argv or sys.argv[1:]), log_path)
    try:
        result = fn(config_from_args(cls, args))
    except LungvizError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result if isinstance(result, str) else json.dumps(json_safe(result), indent=1, allow_nan=False))
    return 0


def json_safe(value: object) -> object:
    """``value`` with every non-finite number (an AUROC of one class, say) as None: JSON has no NaN or Infinity."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


if __name__ == "__main__":
    sys.exit(main())
