"""Train the nodule model (:class:`lungviz.models.NoduleNet`) and measure it honestly.

From the pixels of a nodule view alone it learns the readers' outline (their consensus mask), the benign/malignant
call, the 1-5 panel score and the eight LIDC characteristics; the readers' measurements stay labels, never inputs.
Training views are sized around the readers' diameter with a random error (at use, around the model's own first
measurement) and move the nodule off the view's centre, so the outline, and the heads pooled over it, follow it.
Targets mix the panel's rating with the readers' votes. Train fits, validation picks the epoch and each head's
temperature, test is reported once: Dice beside the readers' own agreement, size error by size band, each head
against a single reader on the same nodules, and the map's localisation on centred and shifted views.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lungviz import metrics, paths
from lungviz.data.cases import Case, round_half_up
from lungviz.data.preprocess import to_model_input
from lungviz.data.splits import Split
from lungviz.inference.factors import FACTORS, FactorModel, factor_values, fit_factor_model
from lungviz.inference.nodule import (
    RATING_HEADS,
    FieldRule,
    NoduleReading,
    SliceReading,
    aggregate,
    cut,
    predicted_rating,
    read_slices,
    split_logits,
)
from lungviz.inference.predict import ESTIMATE_NAME, SCORE_NAME
from lungviz.models import (
    NODULE_HEADS,
    Bundle,
    ModelSpec,
    NoduleNet,
    create_model,
    load_bundle,
    resolve_device,
    round_to_storage,
    save_bundle,
    update_spec,
)
from training.augment import AugmentConfig, augment_pair
from training.data import SliceStore, central_slices
from training.datasets import load_cases
from training.loop import LoopConfig, fit, seed_everything
from training.splits import split_for

log = logging.getLogger("training")

#: The size bands (mm, readers' diameter) the size error is reported in.
SIZE_BANDS = (0.0, 6.0, 10.0, 20.0, np.inf)


class OutlineLoss(nn.Module):
    """Binary cross-entropy + soft Dice of per-pixel logits ``(N, 1, S, S)`` against targets ``(N, S, S)``."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z = logits[:, 0].float()
        p = torch.sigmoid(z)
        inter = (p * target).sum(dim=(1, 2))
        dice = 1.0 - (2.0 * inter + 1.0) / (p.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + 1.0)
        return nn.functional.binary_cross_entropy_with_logits(z, target) + dice.mean()


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    p, t = np.asarray(pred, bool), np.asarray(target, bool)
    total = p.sum() + t.sum()
    return 1.0 if total == 0 else float(2.0 * (p & t).sum() / total)


def outlined_splits(data: str, what: str, progress: bool = True
                    ) -> tuple[Split, dict[str, list[Case]], dict[str, SliceStore]]:
    """The nodules with the readers' outlines, split by patient (the shipped split), and each split's slices and
    masks in memory."""
    cases, report = load_cases("lidc", data)
    split = split_for(cases, data=data)
    parts = {n: [c for c in split.select(cases, n) if c.has_masks] for n in ("train", "val", "test")}
    log.info("%s: %s; train %d, val %d, test %d nodules", what, report.summary(), *(len(parts[n]) for n in parts))
    return split, parts, {n: SliceStore(parts[n], progress=progress, masks=True) for n in parts}


@dataclass
class NoduleConfig:
    """The nodule model: outline, size, malignancy and the readers' characteristics from one network."""

    data: str = ""  # lidc-slices folder; empty = the configured data folder
    arch: str = "tf_efficientnet_lite0+nodule"
    pretrained: bool = True  # start the encoder from the ImageNet weights
    input_size: int = 64  # pixels per side the network sees
    epochs: int = 40  # at most; early stopping on validation ends sooner
    batch_size: int = 64
    epoch_samples: int = 1536  # training views per epoch
    lr: float = 2e-3  # AdamW peak learning rate (cosine schedule)
    layer_decay: float = 0.6  # each parameter group deeper than the heads learns this factor slower
    weight_decay: float = 1e-2
    patience: int = 8  # epochs without a better validation figure before early stopping
    shift: float = 0.28  # training views move the nodule's centre up to this share of the view's side
    field_factor: float = 3.0  # the view's field is this many times the nodule's long axis (within 16-64 mm)
    field_jitter: float = 0.2  # log-normal spread of the training field around the readers' diameter
    first_field_share: float = 0.2  # share of training views at the first pass's fixed fields (40 and 16 mm)
    reader_weight: float = 0.5  # soft targets: (1 - w) x the panel's rating + w x the readers' votes
    head_weight: float = 1.0  # weight of the heads' loss beside the outline's
    val_slices: int = 3  # slices per nodule read for early stopping
    central_fraction: float = 0.5  # a nodule's reading = mean logits over the central half of its slices
    seed: int = 0
    n_boot: int = 1000
    name: str = "nodule"  # bundle name
    out: str = ""  # bundle folder; empty = runs/<name>
    measure_only: bool = False  # re-measure the saved bundle in --out instead of training one


def panel_and_votes(case: Case, head: str, levels: int) -> tuple[int | None, list[int]]:
    """The panel's rating (1..levels; malignant: 1 benign, 2 malignant) and the readers' votes on ``head``."""
    if head == "malignant":
        votes = [2 if s >= 4 else 1 for s in case.reader_scores]
        return (None if case.malignant is None else case.malignant + 1), votes
    if head == "malignancy":
        return case.malignancy, [int(s) for s in case.reader_scores]
    votes = [int(np.clip(round(r[head]), 1, levels)) for r in case.reader_characteristics if head in r]
    median = case.characteristics.get(head)
    panel = None if median is None or not np.isfinite(median) else int(np.clip(round_half_up(median), 1, levels))
    return panel, votes


def head_targets(cases: list[Case], reader_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Soft targets ``(N, sum of levels)``: per head ``(1 - w)`` x the panel's one-hot + ``w`` x the readers' vote
    shares, and weights ``(N, heads)``: 1 where the head is labelled, else 0."""
    total = sum(NODULE_HEADS.values())
    targets = np.zeros((len(cases), total), np.float32)
    weights = np.zeros((len(cases), len(NODULE_HEADS)), np.float32)
    for i, case in enumerate(cases):
        start = 0
        for h, (head, levels) in enumerate(NODULE_HEADS.items()):
            panel, votes = panel_and_votes(case, head, levels)
            if panel is not None:
                t = np.eye(levels)[panel - 1]
                if votes:
                    t = (1.0 - reader_weight) * t + reader_weight * np.bincount(np.array(votes) - 1,
                                                                                minlength=levels)[:levels] / len(votes)
                targets[i, start : start + levels] = t
                weights[i, h] = 1.0
            start += levels
    return targets, weights


class NoduleLoss(nn.Module):
    """The outline's BCE + soft Dice, plus ``head_weight`` x the mean soft cross-entropy of the labelled heads.

    Targets come packed per sample as (outline mask ``S*S``, head targets, head weights)."""

    def __init__(self, input_size: int, head_weight: float) -> None:
        super().__init__()
        self.pixels = input_size * input_size
        self.outline = OutlineLoss()
        self.head_weight = float(head_weight)

    def forward(self, outputs: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        outline, logits = outputs
        side = outline.shape[-1]
        mask = target[:, : self.pixels].reshape(-1, side, side)
        total = sum(NODULE_HEADS.values())
        soft = target[:, self.pixels : self.pixels + total]
        weights = target[:, self.pixels + total :]
        loss = self.outline(outline.float(), mask)
        start, ce = 0, []
        for h, levels in enumerate(NODULE_HEADS.values()):
            logp = torch.log_softmax(logits[:, start : start + levels].float(), dim=1)
            per = -(soft[:, start : start + levels] * logp).sum(dim=1)
            ce.append((per * weights[:, h]).sum() / weights[:, h].sum().clamp(min=1.0))
            start += levels
        return loss + self.head_weight * torch.stack(ce).mean()


def training_view(store: SliceStore, ci: int, k: int, cfg: NoduleConfig, rng: np.random.Generator,
                  aug: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """One augmented training view and its outline target (consensus >= 50%): rotated, flipped, sized around the
    readers' diameter with a random error and moved off the centre by up to ``cfg.shift`` of its side."""
    case = store.cases[ci]
    img, mask = augment_pair(store.slice01(ci, k), store.mask01(ci, k), rng, aug)
    diameter = case.diameter_mm if case.diameter_mm and case.diameter_mm > 0 else 10.0
    rule = FieldRule(factor=cfg.field_factor)
    if rng.uniform() < cfg.first_field_share:  # as the first pass sees it, before the nodule is measured
        field = rule.first if rng.uniform() < 0.5 else rule.lo
    else:
        field = rule.field_for(diameter * float(np.exp(rng.normal(0.0, cfg.field_jitter))))
    radius, angle = cfg.shift * np.sqrt(rng.uniform()), rng.uniform(0.0, 2.0 * np.pi)
    spacing = case.pixel_spacing_mm or 0.7
    h, w = img.shape
    centre = (h / 2.0 + radius * np.sin(angle) * field / spacing, w / 2.0 + radius * np.cos(angle) * field / spacing)
    view, _ = cut(img, centre, field, case.pixel_spacing_mm, cfg.input_size)
    mview, _ = cut(mask, centre, field, case.pixel_spacing_mm, cfg.input_size)
    return view, (mview >= 0.5).astype(np.float32)


def as_bundle(model: nn.Module, spec: ModelSpec | dict, name: str, device: torch.device) -> Bundle:
    """A bundle around an in-memory model (for reading nodules during training)."""
    typed = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)
    return Bundle(model=model, spec=typed, name=name, folder=Path("."), device=device)  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class SplitReadings:
    """The nodule model's readings of one split, with what they are measured against."""

    cases: list[Case]
    logits: np.ndarray  # (N, sum of levels): mean raw logits over each nodule's read slices
    readings: list[NoduleReading]
    dice: np.ndarray  # (N,) mean Dice against the consensus >= 50% over the read slices
    reader_dice: np.ndarray  # (N,) the readers' own pairwise agreement on the same slices (from their counts)


def pairwise_reader_dice(counts: np.ndarray, n_readers: int) -> float:
    """The readers' mean pairwise Dice estimated from per-pixel counts ``c`` of ``n`` readers:
    ``sum c(c-1) / (n-1)  /  sum c`` (NaN with fewer than two readers or no outline)."""
    c = np.asarray(counts, np.float64)
    if n_readers < 2 or c.sum() <= 0:
        return float("nan")
    return float((c * (c - 1.0)).sum() / (n_readers - 1.0) / c.sum())


def read_split(bundle: Bundle, store: SliceStore, max_slices: int = 0, central: float = 0.5) -> SplitReadings:
    """Read every nodule of ``store`` over the central share of its slices (``central`` 0: the middle one)."""
    wanted = [(ci, k) for ci in range(len(store)) for k in central_slices(store.n_slices(ci), max_slices, central)]
    slices = read_slices(bundle, [store.slice01(ci, k) for ci, k in wanted],
                         [store.cases[ci].pixel_spacing_mm for ci, _ in wanted])
    per_case: dict[int, list[tuple[int, SliceReading]]] = {}
    for (ci, k), r in zip(wanted, slices, strict=True):
        per_case.setdefault(ci, []).append((k, r))
    logits, readings, dices, agree = [], [], [], []
    for ci, case in enumerate(store.cases):
        mine = [r for _, r in per_case[ci]]
        readings.append(aggregate(bundle, mine, case.slice_thickness_mm))
        logits.append(np.mean([r.logits for r in mine], axis=0))
        d, a = [], []
        for k, r in per_case[ci]:
            m = store.mask01(ci, k)
            target, _ = cut(m, (m.shape[0] / 2.0, m.shape[1] / 2.0), r.field_mm, case.pixel_spacing_mm,
                            bundle.input_size)
            d.append(dice(r.outline, target >= 0.5))
            a.append(pairwise_reader_dice(np.round(m * case.n_readers), case.n_readers))
        dices.append(float(np.mean(d)))
        agree.append(float(np.nanmean(a)) if np.isfinite(a).any() else float("nan"))
    return SplitReadings(cases=list(store.cases), logits=np.asarray(logits), readings=readings,
                         dice=np.asarray(dices), reader_dice=np.asarray(agree))


def _labels(cases: list[Case], head: str) -> np.ndarray:
    """The panel's class index per case on ``head`` (-1 where unlabelled)."""
    levels = NODULE_HEADS[head]
    return np.array([(p - 1) if (p := panel_and_votes(c, head, levels)[0]) is not None else -1 for c in cases])


def selection_score(r: SplitReadings) -> float:
    """Early stopping's figure: malignant AUROC + the score's kappa + the characteristics' mean kappa + Dice."""
    heads = split_logits(r.logits)
    y = _labels(r.cases, "malignant")
    keep = y >= 0
    score = metrics.auroc(y[keep], metrics.softmax(heads["malignant"][keep]))
    kappas = []
    for head in RATING_HEADS:
        y = _labels(r.cases, head)
        keep = y >= 0
        call = np.rint(predicted_rating(head, metrics.softmax(heads[head][keep]))).astype(int) - 1
        kappas.append(metrics.quadratic_kappa(y[keep], call, NODULE_HEADS[head]))
    return float(score + kappas[0] + np.mean(kappas[1:]) + np.mean(r.dice))


def fit_temperatures(r: SplitReadings) -> dict[str, float]:
    """Each head's temperature on validation (the panel's rating as the truth)."""
    heads = split_logits(r.logits)
    out = {}
    for head in NODULE_HEADS:
        y = _labels(r.cases, head)
        keep = y >= 0
        out[head] = metrics.fit_temperature(heads[head][keep], y[keep]) if keep.sum() > 10 else 1.0
    return out


def split_report(r: SplitReadings, temps: dict[str, float], n_boot: int) -> dict:
    """Every figure of one split: outline, size by band, malignant AUROC against the readers' diameter, and each
    rating head against a single reader on the same nodules."""
    groups = [c.patient_id for c in r.cases]
    heads = split_logits(r.logits)
    rep: dict = {"n": len(r.cases)}
    finite = np.isfinite(r.reader_dice)
    rep["outline"] = {"dice": float(np.mean(r.dice)), "readers_pairwise_dice": float(np.mean(r.reader_dice[finite])),
                      "readers_pairwise_dice_n": int(finite.sum()),
                      "dice_same_nodules": float(np.mean(r.dice[finite])) if finite.any() else None,
                      "ci95": metrics.bootstrap_ci(lambda i: {"dice": float(np.mean(r.dice[i]))}, len(r.cases),
                                                   groups, n_boot)}
    readers_d = np.array([c.diameter_mm if c.diameter_mm else np.nan for c in r.cases])
    measured = {"long_axis": np.array([x.long_axis_mm for x in r.readings]),
                "mean_axes": np.array([x.mean_axes_mm for x in r.readings])}
    outlined = np.isfinite(measured["long_axis"])
    known = np.isfinite(readers_d) & outlined
    bands = []
    for lo, hi in itertools.pairwise(SIZE_BANDS):
        sel = known & (readers_d >= lo) & (readers_d < hi)
        bands.append({"band_mm": [lo, None if not np.isfinite(hi) else hi], "n": int(sel.sum()),
                      **{f"mae_{k}_mm": float(np.mean(np.abs(v[sel] - readers_d[sel]))) if sel.any() else None
                         for k, v in measured.items()}})
    rep["size"] = {"vs": "the readers' diameter (labels.csv diameter_mm)", "n_not_outlined": int((~outlined).sum()),
                   **{f"mae_{k}_mm": float(np.mean(np.abs(v[known] - readers_d[known]))) for k, v in measured.items()},
                   "by_band": bands}
    y = _labels(r.cases, "malignant")
    keep = y >= 0
    P = metrics.softmax(heads["malignant"][keep], temps["malignant"])
    g = [grp for grp, k in zip(groups, keep, strict=True) if k]
    diam = readers_d[keep]
    rep["malignant"] = {
        "auroc": metrics.score_auroc(y[keep], P[:, 1], g, n_boot),
        "readers_diameter_auroc": metrics.score_auroc(y[keep][np.isfinite(diam)], diam[np.isfinite(diam)],
                                                      [x for x, f in zip(g, np.isfinite(diam), strict=True) if f],
                                                      n_boot),
        "ece": metrics.ece(y[keep], P),
        "single_reader": metrics.reader_comparison([c.reader_scores for c, k in zip(r.cases, keep, strict=True) if k],
                                                   P, "binary", n_boot, patients=g)}
    rep["ratings"] = {}
    for head in RATING_HEADS:
        levels = NODULE_HEADS[head]
        y = _labels(r.cases, head)
        keep = y >= 0
        P = metrics.softmax(heads[head], temps[head])
        rating = predicted_rating(head, P)
        call = np.clip(np.rint(rating).astype(int), 1, levels)
        if head == "malignancy":
            votes = [list(c.reader_scores) for c in r.cases]
        else:
            votes = [[rd[head] for rd in c.reader_characteristics if head in rd] for c in r.cases]
        rep["ratings"][head] = {
            "levels": levels, "n": int(keep.sum()),
            "qwk": metrics.quadratic_kappa(y[keep], call[keep] - 1, levels),
            "mae": float(np.mean(np.abs(rating[keep] - (y[keep] + 1)))),
            "ece": metrics.ece(y[keep], P[keep]),
            "single_reader": metrics.rating_comparison(votes, rating, levels, n_boot, patients=groups)}
    return rep


def factor_rows(r: SplitReadings, temps: dict[str, float]) -> list[dict[str, float]]:
    """Each nodule's factors (:func:`lungviz.inference.factors.factor_values`) from the nodule model's reading."""
    z = split_logits(r.logits)["malignant"]  # the mean raw logits over the central slices, as explain() reads them
    image = (z[:, 1] - z[:, 0]) / temps["malignant"]
    return [factor_values(x.mean_axes_mm, x.probabilities, float(v)) for x, v in zip(r.readings, image, strict=True)]


#: The estimates compared on test: the shipped one over every factor, and the size with the image alone.
ESTIMATES = {"factors": FACTORS, "size_and_image": ("size", "image")}


def estimate_report(val: SplitReadings, test: SplitReadings, temps: dict[str, float], n_boot: int,
                    sensitivity: float = 0.9) -> tuple[dict, dict]:
    """Fit the factor estimates on validation (patient-grouped CV picks the L2 strength), read them on test beside
    the readers' diameter (paired AUROC difference), and choose the call point on validation for ``sensitivity``.
    Returns the shipped estimate's description (model + call point) and the report."""
    y_val, y_test = _labels(val.cases, "malignant"), _labels(test.cases, "malignant")
    kv, kt = y_val >= 0, y_test >= 0
    rows_val = [r for r, k in zip(factor_rows(val, temps), kv, strict=True) if k]
    rows_test = [r for r, k in zip(factor_rows(test, temps), kt, strict=True) if k]
    g_val = [c.patient_id for c, k in zip(val.cases, kv, strict=True) if k]
    g_test = [c.patient_id for c, k in zip(test.cases, kt, strict=True) if k]
    diam = np.array([c.diameter_mm or np.nan for c, k in zip(test.cases, kt, strict=True) if k])
    yt = y_test[kt]
    rep: dict = {"n_val": int(kv.sum()), "n_test": int(kt.sum()),
                 "readers_diameter": metrics.score_auroc(yt, np.nan_to_num(diam), g_test, n_boot)}
    shipped: dict = {}
    for name, factors in ESTIMATES.items():
        model, choice = fit_factor_model(rows_val, y_val[kv], factors, g_val)
        p_val, p_test = model.probabilities(rows_val), model.probabilities(rows_test)

        def paired(i: np.ndarray, p: np.ndarray = p_test) -> dict[str, float]:
            est, ruler = metrics.score_auroc(yt[i], p[i], n_boot=0)["auroc"], metrics.score_auroc(
                yt[i], np.nan_to_num(diam[i]), n_boot=0)["auroc"]
            return {"minus_readers_diameter": est - ruler}

        # the conservative rule: the validation sensitivity's 95% lower bound reaches the target, so the call point
        # should hold on new patients; the point rule (validation sensitivity alone) tends to fall short of it
        point = metrics.operating_point(y_val[kv], p_val, yt, p_test, sensitivity, g_test, n_boot, "lower-bound")
        plain = metrics.operating_point(y_val[kv], p_val, yt, p_test, sensitivity, g_test, n_boot, "point")
        rep[name] = {"factors": list(factors), "fit": choice, "model": model.to_dict(),
                     "auroc": metrics.score_auroc(yt, p_test, g_test, n_boot),
                     "paired_vs_readers_diameter": {**paired(np.arange(len(yt))),
                                                    "ci95": metrics.bootstrap_ci(paired, len(yt), g_test, n_boot)},
                     "ece": metrics.ece(yt, np.stack([1 - p_test, p_test], axis=1)),
                     "call": point, "call_point_rule": plain}
        if name == "factors":
            shipped = {"model": model.to_dict(), "threshold": point["threshold"], "target_sensitivity": sensitivity,
                       "rule": point["rule"],
                       "test": point["test"], "test_ci95": point["test_ci95"]}
    return shipped, rep


def read_diagnoses(path: Path | None = None) -> dict[str, int]:
    """Patient -> 1 cancer (primary or metastatic), 0 benign or non-malignant disease, from LIDC's diagnosis list;
    patients of unknown diagnosis are left out ({} when the file is missing)."""
    import csv

    path = path or paths.lidc_diagnosis_csv()
    if not path.is_file():
        return {}
    out = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            code = (row.get("diagnosis") or "").strip()
            if code in ("1", "2", "3"):
                out[(row.get("patient_id") or "").strip()] = int(code != "1")
    return out


def diagnosis_report(cases: list[Case], estimate: np.ndarray, n_boot: int, diagnoses: dict[str, int]) -> dict:
    """Against what became of the patients: per patient with a known diagnosis, the most suspicious nodule by the
    estimate, by the readers' panel score and by the readers' diameter; each one's AUROC for cancer."""
    by_patient: dict[str, list[int]] = {}
    for i, c in enumerate(cases):
        if c.patient_id in diagnoses:
            by_patient.setdefault(c.patient_id, []).append(i)
    pids = sorted(by_patient)
    y = np.array([diagnoses[p] for p in pids])
    scores = {"estimate": [max(estimate[i] for i in by_patient[p]) for p in pids],
              "readers_panel_score": [max((cases[i].malignancy_median or 0.0) for i in by_patient[p]) for p in pids],
              "readers_diameter": [max((cases[i].diameter_mm or 0.0) for i in by_patient[p]) for p in pids]}
    rep: dict = {"n_patients": len(pids), "n_cancer": int(y.sum()), "n_benign": int(len(y) - y.sum())}
    if len(np.unique(y)) < 2:
        return {**rep, "note": "both cancer and benign patients are needed to rank them"}
    for name, s in scores.items():
        rep[name] = metrics.score_auroc(y, np.asarray(s, np.float64), None, n_boot)
    return rep


def train_nodule(cfg: NoduleConfig, progress: bool = True) -> dict:
    """Train, select on validation, calibrate each head on validation, report on test; save the bundle."""
    if cfg.measure_only:
        return remeasure_nodule(cfg, progress)
    t_start = time.perf_counter()
    split, parts, stores = outlined_splits(cfg.data, cfg.name, progress)
    device = resolve_device()
    seed_everything(cfg.seed)
    model = create_model(cfg.arch, NODULE_HEADS["malignant"], pretrained=cfg.pretrained)
    spec = ModelSpec.from_model(
        model, classes=["benign", "malignant"], view="nodule", task="nodule", input_size=cfg.input_size,
        preprocessing={"view": "nodule", "field": "follows the nodule", **FieldRule(factor=cfg.field_factor).to_spec(),
                       "context_px": 128,
                       "context_intensity": "minmax", "central_fraction": cfg.central_fraction},
        extra={"heads": dict(NODULE_HEADS), "cam_layer": "gated"})
    aug = dataclasses.replace(AugmentConfig(), shift_frac=0.0, scale=0.0)  # the field and shift are drawn apart
    loop = LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, layer_decay=cfg.layer_decay,
                      weight_decay=cfg.weight_decay, stages=(), stage_groups=(0,), balance="none",
                      epoch_samples=cfg.epoch_samples, patience=cfg.patience, seed=cfg.seed, aug=aug)
    train = stores["train"]
    targets, weights = head_targets(train.cases, cfg.reader_weight)

    def batch_fn(items: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for ci in items:
            ci = int(ci)
            view, mask = training_view(train, ci, train.train_slice(ci, rng), cfg, rng, aug)
            xs.append(to_model_input(view, spec.mean, spec.std, model.in_chans))
            ys.append(np.concatenate([mask.ravel(), targets[ci], weights[ci]]))
        return np.stack(xs), np.stack(ys).astype(np.float32)

    def validate(m: nn.Module) -> float:
        m.eval()
        score = selection_score(read_split(as_bundle(m, spec, cfg.name, device), stores["val"], cfg.val_slices,
                                           cfg.central_fraction))
        m.train()
        return score

    run = fit(model, None, np.arange(len(train)), np.zeros(len(train), int), None, loop, device, validate, progress,
              batch_fn=batch_fn, loss_fn=NoduleLoss(cfg.input_size, cfg.head_weight),
              forward=lambda m, x: m.outputs(x))
    round_to_storage(model)
    trained = ModelSpec.from_dict({
        **spec.to_dict(),
        "training": {**dataclasses.asdict(cfg), **{k: v for k, v in run.items() if k != "history"},
                     "history": run["history"], "total_seconds": time.perf_counter() - t_start,
                     "n_train": len(parts["train"]), "n_val": len(parts["val"]), "n_test": len(parts["test"])},
        "split_fingerprint": split.fingerprint})
    save_bundle(model, trained, _out(cfg), cfg.name)
    bundle = load_bundle(_out(cfg), cfg.name, device)  # every figure is that of the weights as the app loads them
    return update_spec(_out(cfg), cfg.name, **measure(bundle, stores, cfg))


def _out(cfg: NoduleConfig) -> Path:
    return Path(cfg.out) if cfg.out else paths.runs_dir() / cfg.name


def measure(bundle: Bundle, stores: dict[str, SliceStore], cfg: NoduleConfig) -> dict:
    """Each head's temperature and the factor estimate fitted on validation, then every test figure: the spec
    fields ``head_temperatures``, ``estimate`` and ``metrics``."""
    val = read_split(bundle, stores["val"], 0, cfg.central_fraction)
    temps = fit_temperatures(val)
    test = read_split(bundle, stores["test"], 0, cfg.central_fraction)
    reports = {"val": split_report(val, temps, 200), "test": split_report(test, temps, cfg.n_boot)}
    estimate, reports["estimate"] = estimate_report(val, test, temps, cfg.n_boot)
    test_p = FactorModel.from_dict(estimate["model"]).probabilities(factor_rows(test, temps))
    reports["diagnosis"] = diagnosis_report(test.cases, test_p, cfg.n_boot, read_diagnoses())
    for task, head_name in (("binary", ESTIMATE_NAME), ("score", SCORE_NAME)):
        reports[f"{task}_test"], rows = labelled_report(test, task, temps, estimate, cfg.n_boot)
        write_reference(bundle.folder, head_name, task, rows)
    return {"metrics": reports, "head_temperatures": temps, "estimate": estimate}


def labelled_report(r: SplitReadings, task: str, temps: dict[str, float], estimate: dict,
                    n_boot: int) -> tuple[dict, list[list]]:
    """The estimate's (``binary``) or the score head's (``score``) report on the nodules of ``r`` that carry the
    task's label, and the predictions rows."""
    from lungviz.data.labels import get_scheme

    scheme = get_scheme(task)
    keep = [i for i, c in enumerate(r.cases) if scheme.label_of(c) is not None]
    sub = subset(r, keep)
    y = np.array([scheme.label_of(c) for c in sub.cases])
    if task == "binary":
        return head_report(sub, y, sub.cases, temps, estimate, n_boot)
    return score_report(sub, y, sub.cases, temps, n_boot)


def subset(r: SplitReadings, keep: list[int]) -> SplitReadings:
    """The readings of the nodules ``keep`` (indices into ``r.cases``)."""
    return SplitReadings(cases=[r.cases[i] for i in keep], logits=r.logits[keep],
                         readings=[r.readings[i] for i in keep], dice=r.dice[keep], reader_dice=r.reader_dice[keep])


def write_reference(folder: Path, name: str, task: str, rows: list[list]) -> Path:
    """The test predictions the app places a case among: ``<folder>/reference/<name>-test.csv``."""
    import csv

    from lungviz.data.labels import get_scheme

    path = folder / "reference" / f"{name}-test.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(_csv_header(get_scheme(task)))
        w.writerows(rows)
    return path


def remeasure_nodule(cfg: NoduleConfig, progress: bool = True) -> dict:
    """Re-measure the saved nodule model in ``cfg.out`` (no training): temperatures, estimate, every figure."""
    from lungviz.errors import LungvizError

    folder = _out(cfg)
    bundle = load_bundle(folder, cfg.name)
    cases, _ = load_cases("lidc", cfg.data)
    split = split_for(cases, data=cfg.data)
    if split.fingerprint != bundle.spec.split_fingerprint:
        raise LungvizError(f"model '{cfg.name}' was trained on another split of the data; it cannot be re-measured.")
    stores = {n: SliceStore([c for c in split.select(cases, n) if c.has_masks], progress=progress, masks=True)
              for n in ("val", "test")}
    return update_spec(folder, cfg.name, **measure(bundle, stores, cfg))


def evaluate_characteristics(folder: Path, name: str = "nodule", data: str = "", split: str = "",
                             predictions: str = "", n_boot: int = 1000, progress: bool = True) -> dict:
    """Evaluate the nodule model's characteristics on a lidc-slices folder (or one split of its own): per
    characteristic the model's and a single reader's quadratic-weighted kappa against the rest of the panel on the
    same nodules (each reader left out in turn), the model's kappa and MAE against the panel; ``predictions`` writes
    each nodule's predicted ratings (expected rating on the LIDC scale)."""

    from lungviz.data.cases import CHARACTERISTICS
    from lungviz.errors import LungvizError
    from lungviz.inference.nodule import head_temperatures
    from training.evaluate import select_split

    if predictions and Path(predictions).is_dir():
        raise LungvizError(f"--predictions {predictions} is a folder; give a file name such as predictions.csv.")
    bundle = load_bundle(Path(folder), name)
    if not isinstance(bundle.model, NoduleNet):
        raise LungvizError(f"model '{name}' does not predict the characteristics; use the nodule model.")
    cases, report = load_cases("lidc", data)
    if split:
        cases = select_split(cases, split, bundle.spec, Path(folder))
    if not cases:
        raise LungvizError(f"no nodule in {data or 'the data folder'} ({report.summary()}).")
    store = SliceStore(cases, progress=progress)
    r = read_split(bundle, store, 0, float(bundle.spec.preprocessing.get("central_fraction", 0.5)))
    temps = head_temperatures(bundle)
    heads = split_logits(r.logits)
    groups = [c.patient_id for c in cases]
    ratings = {h: predicted_rating(h, metrics.softmax(heads[h], temps[h])) for h in CHARACTERISTICS}
    out: dict = {"model": name, "task": "characteristics", "data": data or "default", "split": split or "all",
                 "import": report.summary(), "n": len(cases), "characteristics": {}}
    for h in CHARACTERISTICS:
        levels = NODULE_HEADS[h]
        y = _labels(cases, h)
        keep = y >= 0
        call = np.clip(np.rint(ratings[h]).astype(int), 1, levels)
        votes = [[rd[h] for rd in c.reader_characteristics if h in rd] for c in cases]
        cmp_ = metrics.rating_comparison(votes, ratings[h], levels, n_boot, patients=groups)
        out["characteristics"][h] = {
            "levels": levels, "n": int(keep.sum()),
            "model_qwk_vs_panel": metrics.quadratic_kappa(y[keep], call[keep] - 1, levels) if keep.any() else None,
            "model_mae_vs_panel": float(np.mean(np.abs(ratings[h][keep] - (y[keep] + 1)))) if keep.any() else None,
            "single_reader": cmp_}
    _finish(out, cases, bundle, Path(folder), split, predictions, ["patient_id", "nodule", *CHARACTERISTICS],
            [[c.patient_id, c.nodule_id, *[f"{ratings[h][i]:.3f}" for h in CHARACTERISTICS]]
             for i, c in enumerate(cases)])
    return out


def _finish(rep: dict, cases: list[Case], bundle: Bundle, folder: Path, split: str, predictions: str,
            header: list[str], rows: list[list]) -> None:
    """Note the nodules the model has seen (unless the test split was asked for) and write the predictions CSV."""
    import csv

    from training.evaluate import seen_in_training

    if seen := (None if split == "test" else seen_in_training(cases, bundle.spec, folder)):
        rep["seen_in_training"], rep["notes"] = seen[0], [seen[1]]
    if predictions:
        path = Path(predictions)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)


def characteristics_text(rep: dict) -> str:
    """A readable table of :func:`evaluate_characteristics`' report."""
    lines = [f"{rep['model']}: the readers' characteristics on {rep['n']} nodules of {rep['data']} "
             f"(split: {rep['split']}); quadratic-weighted kappa against the rest of the panel, each reader left out "
             "in turn, model and single reader on the same pairs"]
    for h, r in rep["characteristics"].items():
        s = r["single_reader"]
        if not s.get("n_pairs"):
            lines.append(f"  {h:18s} no nodule with two readers")
            continue
        lines.append(f"  {h:18s} model {metrics.format_ci(s, 'model_qwk')}  single reader "
                     f"{metrics.format_ci(s, 'reader_qwk')}  ({s['n_pairs']} pairs)")
    return "\n".join([*lines, *rep.get("notes", [])])


def evaluate_estimate(folder: Path, name: str, data: str = "", split: str = "", predictions: str = "",
                      n_boot: int = 1000, progress: bool = True) -> dict:
    """The nodule model's estimate by its factors (benign/malignant, outside name ``fused-binary``) on a lidc-slices
    folder, reported as ``evaluate`` reports any binary model, plus its second-look call at the spec's call point;
    each nodule read over the central half of its slices. ``predictions`` writes one row per nodule."""
    return _evaluate_head(folder, name, "binary", data, split, predictions, n_boot, progress)


def evaluate_score(folder: Path, name: str, data: str = "", split: str = "", predictions: str = "",
                   n_boot: int = 1000, progress: bool = True) -> dict:
    """The nodule model's 1-5 panel score (outside name ``nodule-score``) on a lidc-slices folder, reported as
    ``evaluate`` reports any score model (kappa against the panel beside a single reader's)."""
    return _evaluate_head(folder, name, "score", data, split, predictions, n_boot, progress)


def _evaluate_head(folder: Path, name: str, task: str, data: str, split: str, predictions: str, n_boot: int,
                   progress: bool) -> dict:
    from lungviz.data.labels import get_scheme
    from lungviz.errors import LungvizError
    from lungviz.inference.nodule import head_temperatures
    from training.evaluate import select_split

    if predictions and Path(predictions).is_dir():
        raise LungvizError(f"--predictions {predictions} is a folder; give a file name such as predictions.csv.")
    bundle = load_bundle(Path(folder), name)
    if not isinstance(bundle.model, NoduleNet) or not bundle.spec.estimate:
        raise LungvizError(f"model '{name}' is not a nodule model with an estimate.")
    scheme = get_scheme(task)
    cases, report = load_cases("lidc", data)
    if split:
        cases = select_split(cases, split, bundle.spec, Path(folder))
    pairs = scheme.labelled(cases)
    if not pairs:
        raise LungvizError(f"no nodule in {data or 'the data folder'} carries a malignancy label ({report.summary()}).")
    kept, y = [c for c, _ in pairs], np.array([lab for _, lab in pairs])
    r = read_split(bundle, SliceStore(kept, progress=progress),
                   0, float(bundle.spec.preprocessing.get("central_fraction", 0.5)))
    temps = head_temperatures(bundle)
    if task == "binary":
        rep, rows = head_report(r, y, kept, temps, bundle.spec.estimate, n_boot)
    else:
        rep, rows = score_report(r, y, kept, temps, n_boot)
    rep = {"model": name, "task": task, "view": "nodule", "data": data or "default", "split": split or "all",
           "import": report.summary(), **rep}
    _finish(rep, kept, bundle, Path(folder), split, predictions, _csv_header(scheme), rows)
    return rep


def _csv_header(scheme) -> list[str]:
    return ["patient_id", "nodule", *[f"p_{c}" for c in scheme.classes], "prediction", "truth"]


def head_report(r: SplitReadings, y: np.ndarray, cases: list[Case], temps: dict[str, float], estimate: dict,
                n_boot: int) -> tuple[dict, list[list]]:
    """The factor estimate's report (as ``evaluate`` reports a binary model, with its second-look call) and its
    predictions rows, from a split's reading ``r`` and the labels ``y`` (0 benign, 1 malignant)."""
    from lungviz.data.labels import get_scheme
    from training.evaluate import report_from_logits

    scheme = get_scheme("binary")
    p = np.clip(FactorModel.from_dict(estimate["model"]).probabilities(factor_rows(r, temps)), 1e-9, 1 - 1e-9)
    logits = np.stack([np.zeros(len(p)), np.log(p / (1 - p))], axis=1)
    groups = [c.patient_id for c in cases]
    rep = report_from_logits(y, logits, logits, scheme, groups, [c.reader_scores for c in cases], n_boot)
    threshold = float(estimate.get("threshold", 0.5))
    rep["second_look_call"] = {
        "calls_malignant_from": threshold, **metrics.at_threshold(y == 1, p, threshold),
        "ci95": metrics.bootstrap_ci(lambda i: metrics.at_threshold(y[i] == 1, p[i], threshold), len(y), groups,
                                     n_boot)}
    rows = [[c.patient_id, c.nodule_id, f"{1 - q:.5f}", f"{q:.5f}", "malignant" if q >= threshold else "benign",
             scheme.classes[int(t)]] for c, q, t in zip(cases, p, y, strict=True)]
    return rep, rows


def score_report(r: SplitReadings, y: np.ndarray, cases: list[Case], temps: dict[str, float],
                 n_boot: int) -> tuple[dict, list[list]]:
    """The score head's report (as ``evaluate`` reports a score model) and its predictions rows."""
    from lungviz.data.labels import get_scheme
    from training.evaluate import report_from_logits

    scheme = get_scheme("score")
    raw = split_logits(r.logits)["malignancy"]
    cal = raw / temps["malignancy"]
    rep = report_from_logits(y, cal, raw, scheme, [c.patient_id for c in cases], [c.reader_scores for c in cases],
                             n_boot)
    P = metrics.softmax(cal)
    rows = [[c.patient_id, c.nodule_id, *[f"{v:.5f}" for v in q], scheme.classes[int(np.argmax(q))],
             scheme.classes[int(t)]] for c, q, t in zip(cases, P, y, strict=True)]
    return rep, rows
