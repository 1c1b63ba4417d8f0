"""``python -m training <command>``: import the LIDC data, split it by patient, train, calibrate and evaluate the
models, build the similar-case index and write the model card."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from lungviz import paths
from lungviz.errors import LungvizError
from training.config import (
    CamlocConfig,
    CardConfig,
    EvalConfig,
    IndexConfig,
    OutlierConfig,
    PackConfig,
    RefreshConfig,
    SplitConfig,
    add_config_args,
    config_from_args,
    save_config,
)
from training.finder import FinderConfig
from training.nodule import NoduleConfig
from training.train import TrainConfig


def cmd_splits(cfg: SplitConfig) -> dict:
    """Write the patient-level holdout split file for the LIDC slices set."""
    from lungviz.data.splits import holdout_split
    from training.datasets import load_cases

    cases, report = load_cases("lidc", cfg.data)
    out = Path(cfg.out) if cfg.out else paths.weights_dir() / "splits"
    hold = holdout_split(cases, seed=cfg.seed)
    hold.save(out / "holdout.json")
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
    """Every shipped network and record the app loads: the nodule model, the slice view and the histology model
    (SHIPPED presets), the nodule finder, the similar-case index, the map localisation record and the model card.
    Uses the GPU when one is present (lungviz.models.resolve_device)."""
    from training.cam_eval import cam_localisation
    from training.card import write_card
    from training.finder import FinderConfig, train_finder
    from training.index import INDEX_MODEL, build_library_index
    from training.nodule import NoduleConfig, train_nodule
    from training.train import SHIPPED

    out = Path(base.out) if base.out else paths.weights_dir()
    nodule = train_nodule(NoduleConfig(out=str(out)))
    done: dict = {"nodule": {"dice": nodule["metrics"]["test"]["outline"]["dice"],
                             "estimate_auroc": nodule["metrics"]["estimate"]["factors"]["auroc"]["auroc"]}}
    done |= train_shipped(base, list(SHIPPED))
    train_finder(FinderConfig(out=str(out)))
    done["finder"] = train_finder(FinderConfig(out=str(out), only="mine"))  # one round of hard-negative mining
    done["index"] = build_library_index(INDEX_MODEL, out=str(out))  # embeds with the nodule model, so after it
    slice_view = tuple(n for n in SHIPPED if n.startswith("slice-"))
    cam_localisation(slice_view, split="val", choose=True, weights=str(out))  # their map layer, chosen on validation
    cam = cam_localisation(out=str(out / "cam_localisation.json"), split="test", weights=str(out))
    done["camloc"] = {m: r.get("shifted", {}).get("peak_inside") for m, r in cam.get("models", {}).items()}
    done["card"] = str(write_card(out))
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
    from training.evaluate import NODULE_ALIASES, evaluate_bundle, evaluation_text

    folder = Path(cfg.weights) if cfg.weights else paths.weights_dir()
    if cfg.task == "characteristics":
        from training.nodule import characteristics_text, evaluate_characteristics

        rep = evaluate_characteristics(folder, cfg.model or "nodule", cfg.data, cfg.split, cfg.predictions,
                                       cfg.n_boot, progress=not cfg.json)
        return rep if cfg.json else characteristics_text(rep)
    nodule = {"binary": "fused-binary", "score": "nodule-score"}  # the nodule model's outside names
    name = cfg.model or ("histology" if cfg.task == "histology" else nodule.get(cfg.task, f"nodule-{cfg.task}")
                         if cfg.view == "nodule" else f"{cfg.view}-{cfg.task}")
    if name in NODULE_ALIASES:  # the nodule model's estimate by its factors, or its 1-5 score
        from lungviz.inference.predict import NODULE_MODEL
        from training.nodule import evaluate_estimate, evaluate_score

        run = evaluate_score if name == "nodule-score" else evaluate_estimate
        rep = {**run(folder, NODULE_MODEL, cfg.data, cfg.split, cfg.predictions, cfg.n_boot, progress=not cfg.json),
               "model": name}
    else:
        rep = evaluate_bundle(folder, name, cfg.data, cfg.split, cfg.predictions, cfg.n_boot, cfg.max_slices,
                              progress=not cfg.json)
    return rep if cfg.json else evaluation_text(rep)


def cmd_index(cfg: IndexConfig) -> dict:
    """Embed every labelled library nodule with a shipped model (default the nodule model) into a FAISS index with
    its thumbnail atlas (weights/index-<model>.faiss, .json, -atlas.png) and measure its retrieval."""
    from training.index import build_library_index

    return build_library_index(cfg.model, cfg.data, cfg.out, cfg.max_slices)


def cmd_refresh(cfg: RefreshConfig) -> dict:
    """Re-measure saved bundles' stored weights (calibration on validation, every figure of the spec); without
    --model, every shipped network trained by ``train``."""
    from training.train import SHIPPED, refresh_model

    folder = Path(cfg.weights) if cfg.weights else None
    keys = ("n", "auroc", "f1_weighted", "f1_malignant", "qwk", "ece")
    done = {}
    for name in [cfg.model] if cfg.model else list(SHIPPED):
        spec = refresh_model(name, folder, n_boot=cfg.n_boot)
        done[name] = {"temperature": spec["temperature"],
                      **{k: spec["metrics"]["test"][k] for k in keys if k in spec["metrics"]["test"]}}
    return done


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
    """Regenerate the model card weights/README.md, its tables file and figures from the shipped files; with
    --check, only say whether the shipped card and tables file are up to date."""
    from training.card import TABLES_FILE, check_card, write_card

    folder = Path(cfg.weights) if cfg.weights else None
    if cfg.check:
        diff = check_card(folder)
        if diff:
            raise LungvizError("the model card is out of date (`python -m training card` rewrites it):\n"
                               + "\n".join(diff))
        return {"card": "up to date"}
    path = write_card(folder)
    return {"card": str(path), "tables": str(path.with_name(TABLES_FILE))}


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
    "card": (cmd_card, CardConfig),
    "camloc": (cmd_camloc, CamlocConfig),
    "finder": (cmd_finder, FinderConfig),
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
