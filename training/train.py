"""Train one model bundle end to end: data, split, loop, calibration on validation, test report, bundle."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lungviz import paths
from lungviz.calibration import Calibration
from lungviz.data.cases import Case
from lungviz.data.labels import LabelScheme, get_scheme
from lungviz.data.preprocess import VIEWS
from lungviz.data.splits import Split
from lungviz.models import (
    LungvizNet,
    ModelSpec,
    create_model,
    load_bundle,
    resolve_device,
    round_to_storage,
    save_bundle,
    stage_shapes,
    update_spec,
)
from training.augment import AugmentConfig
from training.data import (
    SliceStore,
    ViewConfig,
    attribute_targets,
    reader_targets,
    train_batch,
    train_batch_with_masks,
)
from training.datasets import load_cases
from training.evaluate import full_report, nodule_logits, selection_score
from training.loop import AttributeAuxLoss, LoopConfig, MaskAuxLoss, class_loss, fit, seed_everything
from training.splits import split_for, without_train_duplicates

log = logging.getLogger("training")


@dataclass
class TrainConfig:
    """Everything that defines a shipped model; written next to the bundle."""

    name: str = "slice-binary"  # the bundle's name: weights/<name>.json and .safetensors
    dataset: str = "lidc"  # lidc | histology
    data: str = ""  # the dataset's folder; empty = the configured data folder
    view: str = "slice"  # slice | nodule (a classifier on the fixed nodule view; the nodule model has its own command)
    task: str = "binary"  # binary | binary-no3 | score | histology
    arch: str = "tf_efficientnet_lite0"  # cnn4 | a timm backbone (ImageNet weights for the EfficientNet-Lites)
    pretrained: bool = True  # start from the ImageNet weights (tf_efficientnet_lite0 / lite2 only)
    input_size: int = 64  # pixels per side the network sees
    field_mm: float = 0.0  # 0 = the view's default field in mm
    drop_rate: float = 0.3  # dropout before the linear head
    epochs: int = 8  # at most; early stopping on validation ends sooner
    batch_size: int = 64
    lr: float = 2e-3  # AdamW peak learning rate (cosine schedule)
    layer_decay: float = 0.6  # each parameter group deeper than the head learns this factor slower
    weight_decay: float = 1e-2  # AdamW weight decay
    stages: tuple[int, ...] = (1, 4)  # epochs at which the next group of blocks is unfrozen (comma-separated)
    stage_groups: tuple[int, ...] = (1, 4, 0)  # parameter groups trainable in each stage, from the head (0 = all)
    balance: str = "upsample"  # upsample | weighted
    epoch_samples: int = 1536  # cap on the training samples per epoch (a uniform subsample of the class-balanced plan)
    patience: int = 4  # epochs without a better validation figure before early stopping
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    mask_weight: float = 0.0  # > 0: also learn the readers' mask from a stride-16 feature map (training only)
    # The three options below are off in every shipped recipe: none helped beyond the recipe's seed-to-seed spread
    # (docs/history.md).
    attr_weight: float = 0.0  # > 0: also regress the readers' characteristics and log diameter (training only)
    soft_labels: float = 0.0  # > 0: soft targets mixing the panel's class with the readers' votes (reader_targets)
    ema: float = 0.0  # > 0: keep an exponential moving average of the weights (decay per step), validated each epoch
    val_slices: int = 5  # slices per nodule scored for early stopping
    central_fraction: float = 0.5  # nodule prediction = mean logit over the central half of its slices
    seed: int = 0  # seeds initialisation, sampling and augmentation
    split_seed: int = 42  # seed of the patient-level split file
    limit: int = 0  # use only the first N patients (quick checks); 0 = all
    n_boot: int = 1000  # bootstrap resamples for the 95% intervals
    out: str = ""  # bundle folder; empty = weights/
    runs: str = ""  # logs and predictions; empty = runs/<name>
    all: bool = False  # every shipped network and record: nodule model, SHIPPED, finder, index, camloc, card
    shipped: str = ""  # train only these shipped models with their SHIPPED settings (comma-separated names)


#: The 64 px recipe: 30 epochs at most, blocks unfrozen at epochs 2 and 10, early stopping after 8 without gain.
RECIPE_64: dict = {"epochs": 30, "stages": (2, 10), "patience": 8}
#: The networks ``train --all`` trains with these presets (the nodule model and the finder have their own
#: commands): the slice view at 64 px, so that ``train --all`` fits 90 minutes on a 2-core CPU, and the histology
#: teaching model at 128 px, where the same 30-epoch schedule does best on its validation images.
SHIPPED: dict[str, dict] = {
    "slice-binary": {"view": "slice", "task": "binary", "input_size": 64, **RECIPE_64, "seed": 0},
    "slice-score": {"view": "slice", "task": "score", "input_size": 64, **RECIPE_64, "seed": 0},
    "histology": {"dataset": "histology", "view": "slice", "task": "histology", "input_size": 128, **RECIPE_64},
}


def mask_layer(model: nn.Module, input_size: int) -> tuple[str, int, int]:
    """The deepest ``backbone.blocks`` stage at stride 16 (4 x 4 at 64 px): its name, channels and grid side."""
    shapes = stage_shapes(model, input_size)
    side = max(1, input_size // 16)
    found = [n for n, shp in shapes.items() if shp[-1] == side]
    if not found:
        raise ValueError(f"no backbone stage has a {side} x {side} feature map at {input_size} px")
    return found[-1], int(shapes[found[-1]][1]), side


def _write_predictions(path: Path, cases: list[Case], P: np.ndarray, calls: np.ndarray, classes: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "nodule", *[f"p_{c}" for c in classes], "prediction"])
        for c, p, k in zip(cases, P, calls, strict=True):
            w.writerow([c.patient_id, c.nodule_id, *[f"{v:.5f}" for v in p], classes[int(k)]])


@dataclass
class Prepared:
    """The labelled nodules of one model's task, ordered train, val, test, with the split they come from."""

    scheme: LabelScheme
    cases: list[Case]
    labels: np.ndarray
    idx: dict[str, np.ndarray]
    split: Split
    leaks: dict[str, int]


def prepare(cfg: TrainConfig, split: Split | None = None) -> Prepared:
    """Import the data, split it by patient and keep the nodules labelled for ``cfg.task``."""
    scheme = get_scheme(cfg.task)
    all_cases, report = load_cases(cfg.dataset, cfg.data)
    split = split or split_for(all_cases, cfg.dataset, cfg.data, cfg.split_seed)
    if cfg.limit:
        keep = sorted({c.patient_id for c in all_cases})[: cfg.limit]
        all_cases = [c for c in all_cases if c.patient_id in set(keep)]
    parts = {name: scheme.labelled(split.select(all_cases, name)) for name in ("train", "val", "test")}
    leaks: dict[str, int] = {}
    if cfg.dataset == "histology":  # drop val/test images that nearly duplicate a training image
        train_cases = [c for c, _ in parts["train"]]
        for name in ("val", "test"):
            kept = {c.case_id for c in without_train_duplicates([c for c, _ in parts[name]], train_cases)}
            leaks[name] = len(parts[name]) - len(kept)
            parts[name] = [(c, y) for c, y in parts[name] if c.case_id in kept]
    cases = [c for name in ("train", "val", "test") for c, _ in parts[name]]
    labels = np.array([y for name in ("train", "val", "test") for _, y in parts[name]])
    offsets = np.cumsum([0] + [len(parts[n]) for n in ("train", "val", "test")])
    idx = {n: np.arange(offsets[k], offsets[k + 1]) for k, n in enumerate(("train", "val", "test"))}
    log.info("%s: %s; train %d, val %d, test %d nodules", cfg.name, report.summary(), *(len(idx[n]) for n in idx))
    return Prepared(scheme, cases, labels, idx, split, leaks)


def calibrate_and_report(model: LungvizNet, cfg: TrainConfig, prep: Prepared, store: SliceStore, vc: ViewConfig,
                         device: torch.device, runs_dir: Path) -> dict:
    """Calibrate on validation (a temperature, then the prior correction for balanced training; see
    :mod:`lungviz.calibration`) and measure val, test and the single
    middle slice the app sees; writes the test predictions. Returns the spec fields these decide."""
    scheme, labels, idx, cases = prep.scheme, prep.labels, prep.idx, prep.cases
    train_prior = np.bincount(labels[idx["train"]], minlength=scheme.n_classes) / len(idx["train"])
    prior_adjust = None
    if cfg.balance == "upsample":
        prior_adjust = (np.log(np.maximum(train_prior, 1e-6)) - np.log(1.0 / scheme.n_classes)).astype(np.float32)
    val_logits = nodule_logits(model, store, idx["val"], vc, device)
    calibration = Calibration.fit(val_logits, labels[idx["val"]], prior_adjust)
    groups = {n: [cases[i].patient_id for i in idx[n]] for n in idx}
    readers = {n: [cases[i].reader_scores for i in idx[n]] for n in idx}
    val_rep = full_report(labels[idx["val"]], val_logits, scheme, calibration, groups["val"], readers["val"],
                          n_boot=200)
    test_logits = nodule_logits(model, store, idx["test"], vc, device)
    test_rep = full_report(labels[idx["test"]], test_logits, scheme, calibration, groups["test"], readers["test"],
                           n_boot=cfg.n_boot)
    # What the app sees: one slice through the nodule's middle, no aggregation.
    single_vc = dataclasses.replace(vc, central_fraction=0.0)
    single_logits = nodule_logits(model, store, idx["test"], single_vc, device)
    single_rep = full_report(labels[idx["test"]], single_logits, scheme, calibration, groups["test"], None,
                             n_boot=200)
    P_test = calibration.probabilities(test_logits)
    _write_predictions(runs_dir / "test_predictions.csv", [cases[i] for i in idx["test"]], P_test,
                       calibration.decide(P_test), list(scheme.classes))
    return {**calibration.to_spec(), "metrics": {"test": test_rep, "val": val_rep, "test_single_slice": single_rep}}


def _runs_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.runs) if cfg.runs else paths.runs_dir() / cfg.name


def train_model(cfg: TrainConfig, progress: bool = True, split: Split | None = None, save: bool = True) -> dict:
    """Train, calibrate and evaluate one bundle; returns its spec (written to the bundle folder when ``save``).

    The weights are rounded to the precision the bundle stores before calibration, so the temperature and every
    figure in the spec are those of the shipped weights."""
    t_start = time.perf_counter()
    if sum(v > 0 for v in (cfg.mask_weight, cfg.attr_weight, cfg.soft_labels)) > 1:
        raise ValueError("choose one of mask_weight, attr_weight and soft_labels")
    prep = prepare(cfg, split)
    scheme, cases, labels, idx = prep.scheme, prep.cases, prep.labels, prep.idx
    device = resolve_device()
    seed_everything(cfg.seed)
    model = create_model(cfg.arch, scheme.n_classes, pretrained=cfg.pretrained, drop_rate=cfg.drop_rate)
    mean, std = tuple(model.data_config["mean"]), tuple(model.data_config["std"])
    field_mm = cfg.field_mm or VIEWS[cfg.view].field_mm
    vc = ViewConfig(cfg.view, cfg.input_size, mean, std, field_mm if cfg.view == "nodule" else None,
                    cfg.central_fraction)
    store = SliceStore(cases, progress=progress, masks=cfg.mask_weight > 0)
    loop_cfg = LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, layer_decay=cfg.layer_decay,
                          weight_decay=cfg.weight_decay,
                          stages=cfg.stages, stage_groups=cfg.stage_groups, balance=cfg.balance,
                          epoch_samples=cfg.epoch_samples, patience=cfg.patience,
                          label_smoothing=cfg.label_smoothing, seed=cfg.seed, ema=cfg.ema,
                          aug=AugmentConfig())

    def validate(m) -> float:
        return selection_score(labels[idx["val"]], nodule_logits(m, store, idx["val"], vc, device, cfg.val_slices),
                               scheme)

    batch_fn, aux = None, None
    if cfg.mask_weight > 0:
        layer, channels, grid = mask_layer(model, cfg.input_size)
        aux = MaskAuxLoss(model, layer, channels, cfg.mask_weight,
                          class_loss(loop_cfg, labels[idx["train"]], scheme.n_classes, device))

        def batch_fn(items: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
            return train_batch_with_masks(store, items, labels[items], vc, rng, loop_cfg.aug, grid)

    if cfg.attr_weight > 0:
        attrs, _ = attribute_targets(cases, idx["train"])
        aux = AttributeAuxLoss(model, attrs.shape[1], cfg.attr_weight,
                               class_loss(loop_cfg, labels[idx["train"]], scheme.n_classes, device))

        def batch_fn(items: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
            x = train_batch(store, items, vc, rng, loop_cfg.aug)
            return x, np.concatenate([labels[items, None].astype(np.float32), attrs[items]], axis=1)

    if cfg.soft_labels > 0:
        soft = reader_targets(cases, labels, scheme, cfg.soft_labels)

        def batch_fn(items: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
            return train_batch(store, items, vc, rng, loop_cfg.aug), soft[items]

    run = fit(model, store, idx["train"], labels[idx["train"]], vc, loop_cfg, device, validate, progress,
              batch_fn=batch_fn, loss_fn=aux)
    if aux is not None:
        aux.close()
    round_to_storage(model)
    runs_dir = _runs_dir(cfg)
    measured = calibrate_and_report(model, cfg, prep, store, vc, device, runs_dir)
    spec = ModelSpec.from_model(
        model, classes=list(scheme.classes), view=cfg.view, task=cfg.task, input_size=cfg.input_size,
        preprocessing={"view": cfg.view, "field_mm": vc.field_mm, "context_px": 128,
                       "context_intensity": "minmax",  # the slices set stores each crop min-max scaled from HU
                       "central_fraction": cfg.central_fraction,
                       "aggregate": f"mean logit over the central {cfg.central_fraction:.0%} of the nodule's slices"},
        temperature=measured["temperature"],
        metrics=measured["metrics"],
        training={**dataclasses.asdict(cfg), **{k: v for k, v in run.items() if k != "history"},
                  "history": run["history"], "total_seconds": time.perf_counter() - t_start,
                  "n_train": len(idx["train"]), "n_val": len(idx["val"]), "n_test": len(idx["test"])},
        split_fingerprint=prep.split.fingerprint,
        extra={"prior_adjust": measured["prior_adjust"], "calibration": measured["calibration"],
               "removed_near_duplicates_of_train": prep.leaks,
               "dataset": cfg.dataset, "label_scheme": scheme.name,
               "split": {"kind": prep.split.kind, "seed": prep.split.seed}},
    )
    (runs_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    if not save:
        return spec.to_dict()
    out = Path(cfg.out) if cfg.out else paths.weights_dir()
    return save_bundle(model, spec, out, cfg.name)


def config_of(spec: dict) -> TrainConfig:
    """The training settings a bundle's spec records, as a :class:`TrainConfig`."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {k: v for k, v in (spec.get("training") or {}).items() if k in fields}
    for key in ("stages", "stage_groups"):
        if key in settings:
            settings[key] = tuple(settings[key])
    return TrainConfig(**settings)


def refresh_model(name: str, folder: Path | None = None, progress: bool = True, n_boot: int = 1000) -> dict:
    """Re-measure a saved bundle's stored weights: refit its calibration on validation and recompute every figure
    of its spec (val, test, single slice), on the split it was trained with. The weights are not touched."""
    from lungviz.errors import LungvizError
    from training.data import view_config_from_spec

    folder = Path(folder) if folder else paths.weights_dir()
    bundle = load_bundle(folder, name)
    spec = bundle.spec.to_dict()
    cfg = dataclasses.replace(config_of(spec), n_boot=n_boot)
    prep = prepare(cfg)
    if prep.split.fingerprint != spec.get("split_fingerprint"):
        raise LungvizError(f"model '{name}' was trained on another split of the data; it cannot be re-measured here.")
    store = SliceStore(prep.cases, progress=progress)
    measured = calibrate_and_report(bundle.model, cfg, prep, store, view_config_from_spec(spec), bundle.device,
                                    _runs_dir(cfg))
    return update_spec(folder, name, **measured, metrics_of="the stored (float16) weights")
