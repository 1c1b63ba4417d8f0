"""Train and evaluate the nodule finder: a presence classifier and a localiser on patches of the slices set.

Positives are patches centred (within ``pos_jitter_mm``) on the centroid of the readers' 50% consensus on
a slice; negatives are centred at least ``neg_margin_mm`` outside the nodule's outline, mostly in the lung
and most of those at the points the whole-slice scan itself would score (hard negatives: vessels).
The localiser sees the nodule up to ``loc_offset_mm`` off centre and regresses its offset and diameter.
Both use the one training loop (:func:`training.loop.fit`) with a patch batch function.

LIDC-IDRI-0001..0003 are left out of training: their DICOM series are the whole-slice test (LIDC-IDRI-0006, whose
series came later, is in the validation split of the networks). The candidate rankers and the whole-slice figures
come from :mod:`training.finder_eval`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from tqdm import tqdm

from lungviz import metrics, paths
from lungviz.data.cases import Case
from lungviz.data.preprocess import DEFAULT_SPACING_MM, to_model_input
from lungviz.data.splits import Split
from lungviz.inference.finder import (
    LOCATE,
    PRESENCE,
    Finder,
    candidate_points,
    load_finder,
    otsu,
    sample_patches,
    scan,
)
from lungviz.models import ModelSpec, create_model, load_bundle, resolve_device, save_bundle
from training.augment import AugmentConfig, augment
from training.data import SliceStore, centre_weights
from training.datasets import load_cases
from training.loop import LoopConfig, fit, seed_everything

log = logging.getLogger("training")

#: Patients whose DICOM series (``lidc-dicom/``) test the whole-slice scan; never trained on.
DICOM_TEST_PATIENTS = ("LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003")
#: The presence network's test figures kept in finder.json.
PRESENCE_FIGURES = ("n", "accuracy", "f1_nodule", "auroc", "ece", "ci95")
#: Intensity-only augmentation of a patch (geometry is applied while sampling it).
PATCH_AUG = AugmentConfig(rotate_deg=0.0, flip=False, shift_frac=0.0, scale=0.0)


@dataclass
class FinderConfig:
    """Settings of the two finder models; written next to the bundles."""

    data: str = ""
    arch: str = "cnn4"
    input_size: int = 48
    field_mm: float = 48.0
    channel_fields: str = ""  # e.g. "48,24,96": one field (mm) per input channel, first = field_mm; empty = one
    epochs: int = 40
    epoch_samples: int = 6144
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-2
    patience: int = 6
    pos_jitter_mm: float = 2.0
    neg_margin_mm: float = 5.0
    lung_negatives: float = 0.8  # share of negatives centred in lung (vessels, pleura), the rest anywhere
    hard_negatives: float = 0.85  # share of negatives at the scan's own candidate points (vessel cross-sections)
    loc_offset_mm: float = 10.0
    scale_jitter: float = 0.1
    seed: int = 0
    limit: int = 0  # only the first N patients (quick checks)
    n_boot: int = 500
    only: str = ""  # presence | locate: train one model only; "none": only re-run the scan evaluations;
    # "wholeslice": only fit the candidate rankers and measure the whole-slice/series scan on the DICOM series;
    # "mine": scan the training crops with the saved finder and fine-tune the presence model on its false candidates,
    # kept only when its validation crop-scan top-1 is at least the base model's
    mine_epochs: int = 15
    mined_share: float = 0.5  # share of negatives drawn from the mined false candidates while fine-tuning
    out: str = ""  # bundle folder; empty = weights/
    runs: str = ""  # empty = runs/finder


class PatchSource:
    """The slices set's nodule geometry per slice, and augmented positive, negative and offset patches."""

    def __init__(self, store: SliceStore, cfg: FinderConfig) -> None:
        self.store, self.cfg = store, cfg
        self.fields = fields_of(cfg)
        self.mined: list[tuple[int, int, np.ndarray]] = []  # (case, slice, centre) of the scan's false candidates
        self.slices: list[np.ndarray] = []  # per case: slice indices with an outline
        self.centre: list[np.ndarray] = []  # per case: (S, 2) centroid of the 50% consensus (row, col)
        self.diam_px: list[np.ndarray] = []  # per case: (S,) equivalent-circle diameter of the 50% consensus
        self.reach_px: list[np.ndarray] = []  # per case: (S,) farthest outline pixel from the centroid
        for case in store.cases:
            masks = case.load_masks()
            s = masks.shape[0] if masks is not None else 0
            cen, dia, reach, ok = np.zeros((s, 2)), np.zeros(s), np.zeros(s), np.zeros(s, bool)
            for k in range(s):
                union = masks[k] > 0
                if not union.any():
                    continue
                core = masks[k] >= 0.5
                core = core if core.any() else union
                cen[k] = np.argwhere(core).mean(axis=0)
                dia[k] = 2.0 * np.sqrt(core.sum() / np.pi)
                reach[k] = np.hypot(*(np.argwhere(union) - cen[k]).T).max() + 0.5
                ok[k] = True
            self.slices.append(np.flatnonzero(ok))
            self.centre.append(cen)
            self.diam_px.append(dia)
            self.reach_px.append(reach)

    def usable(self, ci: int) -> bool:
        return len(self.slices[ci]) > 0

    def spacing(self, ci: int) -> float:
        return float(self.store.cases[ci].pixel_spacing_mm or DEFAULT_SPACING_MM)

    def pick_slice(self, ci: int, rng: np.random.Generator | None) -> int:
        """A slice with an outline, favouring the nodule's middle; the largest outline when ``rng`` is None."""
        ks = self.slices[ci]
        if rng is None:
            return int(ks[np.argmax(self.diam_px[ci][ks])])
        return int(ks[rng.choice(len(ks), p=centre_weights(len(ks)))])

    def negative_centre(self, ci: int, k: int, rng: np.random.Generator) -> np.ndarray:
        """A point at least ``neg_margin_mm`` outside the nodule, in the lung for most draws."""
        img = self.store.slice01(ci, k)
        sp = self.spacing(ci)
        far = self.reach_px[ci][k] + self.cfg.neg_margin_mm / sp
        h, w = img.shape
        draw = rng.random()
        lungish = None
        if draw < max(self.cfg.lung_negatives, self.cfg.hard_negatives):
            low = (img < otsu(img)).astype(np.float32)
            lungish = ndimage.uniform_filter(low, size=max(3, int(round(15.0 / sp)))) >= 0.3
        if draw < self.cfg.hard_negatives:  # a point the whole-slice scan would score: mostly vessels
            pts = candidate_points(img, lungish, sp, is_hu=False).astype(float)
            pts = pts[np.hypot(*(pts - self.centre[ci][k]).T) >= far] if len(pts) else pts
            if len(pts):
                return pts[rng.integers(len(pts))]
        for _ in range(50):
            p = rng.uniform(0, [h - 1, w - 1])
            if np.hypot(*(p - self.centre[ci][k])) < far:
                continue
            if lungish is not None and not lungish[int(p[0]), int(p[1])]:
                continue
            return p
        # fall back: a corner point far from the nodule
        corners = np.array([[0, 0], [0, w - 1], [h - 1, 0], [h - 1, w - 1]], float)
        return corners[np.argmax(np.hypot(*(corners - self.centre[ci][k]).T))]

    def patch(self, ci: int, k: int, centre: np.ndarray, rng: np.random.Generator | None,
              ) -> tuple[np.ndarray, float, float, bool]:
        """One patch in [0, 1] around ``centre``, ``(S, S)`` or ``(C, S, S)`` with one field per channel; with
        ``rng`` randomly rotated, flipped, scaled and intensity-augmented. Returns the patch, the step of the
        first field (input px per patch px), angle and flip."""
        size = self.cfg.input_size
        zoom = 1.0
        angle, flip = 0.0, False
        if rng is not None:
            zoom = float(np.exp(rng.uniform(-self.cfg.scale_jitter, self.cfg.scale_jitter)))
            angle, flip = float(rng.uniform(0, 2 * np.pi)), bool(rng.random() < 0.5)
        img = self.store.slice01(ci, k)
        steps = [f / size / self.spacing(ci) * zoom for f in self.fields]
        p = np.concatenate([sample_patches(img, centre[None], st, size, np.array([angle]), np.array([flip]))[0]
                            for st in steps], axis=1)  # channels side by side: one intensity augmentation
        if rng is not None:
            p = augment(p, rng, PATCH_AUG)
        p = np.stack(np.split(p, len(steps), axis=1)) if len(steps) > 1 else p
        return p, steps[0], angle, flip

    def presence_sample(self, ci: int, positive: bool, rng: np.random.Generator | None,
                        k: int | None = None) -> np.ndarray:
        k = self.pick_slice(ci, rng) if k is None else k
        r = rng or np.random.default_rng(ci * 7919 + k * 31 + int(positive))
        if positive:
            jitter = _in_disc(r, self.cfg.pos_jitter_mm / self.spacing(ci))
            centre = self.centre[ci][k] + jitter
        elif rng is not None and self.mined and rng.random() < self.cfg.mined_share:
            mci, mk, cen = self.mined[int(rng.integers(len(self.mined)))]
            return self.patch(mci, mk, cen + _in_disc(rng, 1.0 / self.spacing(mci)), rng)[0]
        else:
            centre = self.negative_centre(ci, k, r)
        return self.patch(ci, k, centre, rng)[0]

    def locate_sample(self, ci: int, rng: np.random.Generator | None, k: int | None = None,
                      ) -> tuple[np.ndarray, np.ndarray]:
        """A patch with the nodule off centre and its target: (row, col) offset and diameter in patch px."""
        k = self.pick_slice(ci, rng) if k is None else k
        r = rng or np.random.default_rng(ci * 7919 + k * 31 + 5)
        offset = _in_disc(r, self.cfg.loc_offset_mm / self.spacing(ci))
        centre = self.centre[ci][k] + offset
        p, step, angle, flip = self.patch(ci, k, centre, rng)
        d = -offset / step  # nodule relative to the patch centre, in patch px of the unrotated grid
        # invert the sampling rotation and flip: input offset = R(angle) . F(u, v)
        ca, sa = np.cos(-angle), np.sin(-angle)
        u, v = ca * d[0] - sa * d[1], sa * d[0] + ca * d[1]
        if flip:
            v = -v
        return p, np.array([u, v, self.diam_px[ci][k] / step], np.float32)


def _in_disc(rng: np.random.Generator, radius: float) -> np.ndarray:
    a, r = rng.uniform(0, 2 * np.pi), radius * np.sqrt(rng.random())
    return np.array([r * np.cos(a), r * np.sin(a)])


def fields_of(cfg: FinderConfig) -> list[float]:
    """The field (mm) of each input channel."""
    if not cfg.channel_fields:
        return [cfg.field_mm]
    fields = [float(v) for v in str(cfg.channel_fields).split(",") if v.strip()]
    return [cfg.field_mm, *fields[1:]] if fields else [cfg.field_mm]


def _model_inputs(patches: list[np.ndarray], mean, std) -> np.ndarray:
    """Patches ``(S, S)`` (repeated over the channels) or ``(C, S, S)`` -> normalised model inputs."""
    if patches and patches[0].ndim == 3:
        m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
        s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
        return ((np.stack(patches) - m) / s).astype(np.float32)
    return np.stack([to_model_input(p, mean, std) for p in patches]).astype(np.float32)


def _central_outlined(src: PatchSource, ci: int, per_case: int) -> np.ndarray:
    """The ``per_case`` outlined slices of a nodule nearest its middle (the evaluation slices)."""
    ks = src.slices[ci]
    return ks[np.argsort(np.abs(np.arange(len(ks)) - (len(ks) - 1) / 2.0), kind="stable")[:per_case]]


def _fixed_presence_set(src: PatchSource, cases: np.ndarray, per_case: int, mean, std,
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic evaluation patches: ``per_case`` central outlined slices, one positive and one negative each."""
    xs, ys, owners = [], [], []
    for ci in cases:
        for k in _central_outlined(src, ci, per_case):
            for positive in (True, False):
                xs.append(src.presence_sample(int(ci), positive, None, int(k)))
                ys.append(int(positive))
                owners.append(int(ci))
    return _model_inputs(xs, mean, std), np.array(ys), np.array(owners)


def _fixed_locate_set(src: PatchSource, cases: np.ndarray, per_case: int, mean, std,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs, ts, owners = [], [], []
    for ci in cases:
        for k in _central_outlined(src, ci, per_case):
            p, t = src.locate_sample(int(ci), None, int(k))
            xs.append(p)
            ts.append(t)
            owners.append(int(ci))
    return _model_inputs(xs, mean, std), np.stack(ts), np.array(owners)


@torch.inference_mode()
def _forward(model: nn.Module, x: np.ndarray, device: torch.device, batch: int = 512) -> np.ndarray:
    model.eval()
    out = [model(torch.from_numpy(x[i : i + batch]).to(device)).float().cpu().numpy() for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def presence_report(y: np.ndarray, logits: np.ndarray, temperature: float, groups: list[str], n_boot: int) -> dict:
    """Accuracy, F1 (nodule class), AUROC with patient-bootstrap intervals; ECE after temperature."""
    P = metrics.softmax(logits, temperature)
    rep = metrics.evaluate_probabilities(y, P, positive_class=1, groups=groups, n_boot=n_boot)
    rep["f1_nodule"] = rep.pop("f1_malignant")
    rep["ci95"]["f1_nodule"] = rep["ci95"].pop("f1_malignant", None)
    rep["ece_raw"] = metrics.ece(y, metrics.softmax(logits))
    return rep


def locate_report(pred: np.ndarray, target: np.ndarray, step_mm: float, spacing_px_mm: np.ndarray,
                  groups: list[str], n_boot: int) -> dict:
    """Centre and diameter errors in patch px, in the slice's native px and in mm, with patient-bootstrap CIs."""
    err = np.abs(pred - target)  # patch px
    mm = err * step_mm
    native = mm / spacing_px_mm[:, None]

    def figures(i: np.ndarray) -> dict[str, float]:
        return {
            "centre_mae_mm": float(mm[i, :2].mean()),
            "centre_mae_px": float(native[i, :2].mean()),
            "centre_distance_mm": float(np.hypot(mm[i, 0], mm[i, 1]).mean()),
            "diameter_mae_mm": float(mm[i, 2].mean()),
            "diameter_mae_px": float(native[i, 2].mean()),
        }

    point = figures(np.arange(len(err)))
    return {"n": len(err), **point, "patch_px_mm": step_mm,
            "ci95": metrics.bootstrap_ci(figures, len(err), groups, n_boot),
            "centre_within_5mm": float(np.mean(np.hypot(mm[:, 0], mm[:, 1]) <= 5.0)),
            "diameter_true_mean_mm": float((target[:, 2] * step_mm).mean())}


def network_finder(folder: Path) -> Finder:
    """The saved finder networks without the candidate rankers: candidates ranked by the presence network alone."""
    return dataclasses.replace(load_finder(folder), rankers={})


def mine_false_candidates(folder: Path, src: PatchSource, cases: np.ndarray, top_k: int = 10,
                          ) -> list[tuple[int, int, np.ndarray]]:
    """Scan two outlined slices of each training crop with the saved finder (ranked by its presence network); keep
    the candidates that lie outside the nodule (its outline's reach + ``neg_margin_mm``): the scan's own false
    positives."""
    finder = network_finder(folder)
    rng = np.random.default_rng(src.cfg.seed + 1)
    mined = []
    for ci in tqdm(cases, desc="mining false candidates", unit="crop", leave=False):
        ci = int(ci)
        sp = src.spacing(ci)
        for k in {src.pick_slice(ci, None), src.pick_slice(ci, rng)}:
            far = src.reach_px[ci][k] + src.cfg.neg_margin_mm / sp
            cands, _ = scan(finder, src.store.slice01(ci, k), False, sp, top_k=top_k)
            mined += [(ci, k, np.array([c.y, c.x])) for c in cands
                      if np.hypot(c.y - src.centre[ci][k][0], c.x - src.centre[ci][k][1]) >= far]
    return mined


def crop_scan_report(folder: Path, src: PatchSource, cases: np.ndarray, top_k: int = 5) -> dict:
    """The whole scan on each nodule's slices-set crop (its largest outline), as on a whole slice, ranked by the
    presence network: is the best-ranked candidate within 5 mm of the readers' centre, and how many others score
    >= 0.5? (The candidate rankers are fitted on whole DICOM slices after the networks, and would make a crop's
    figure depend on which ranker file was present.)"""
    finder = network_finder(folder)
    hits, hits3, false, secs = [], [], [], []
    for ci in cases:
        k = src.pick_slice(int(ci), None)
        sp = src.spacing(int(ci))
        t0 = time.perf_counter()
        cands, _ = scan(finder, src.store.slice01(int(ci), k), False, sp, top_k=top_k)
        secs.append(time.perf_counter() - t0)
        dist = np.array([np.hypot(c.y - src.centre[ci][k][0], c.x - src.centre[ci][k][1]) * sp for c in cands])
        hits.append(bool(len(dist) and dist[0] <= 5.0))
        hits3.append(bool(len(dist) and (dist[:3] <= 5.0).any()))
        false.append(int(sum(1 for c, d in zip(cands, dist, strict=True) if c.score >= 0.5 and d > 5.0)))
    return {"n": len(hits), "top1_within_5mm": float(np.mean(hits)) if hits else None,
            "top3_within_5mm": float(np.mean(hits3)) if hits else None,
            "false_candidates_score_ge_0_5_per_crop": float(np.mean(false)) if false else None,
            "seconds_per_crop": float(np.median(secs)) if secs else None}


def wholeslice_only(cfg: FinderConfig, progress: bool = True) -> dict:
    """Fit the candidate rankers on the DICOM series and measure them leave-one-series-out; the result replaces
    the ``wholeslice`` block of ``finder.json`` (the other blocks are kept)."""
    from training.finder_eval import wholeslice_report

    out = Path(cfg.out) if cfg.out else paths.weights_dir()
    torch.set_num_threads(1)  # the rankers' figures include seconds per slice, measured as the app runs
    block = wholeslice_report(load_finder(out), out, progress)
    path = out / "finder.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.pop("dicom_scan", None)  # the network-only scan of three series, superseded by the whole-slice block
    results["wholeslice"] = block
    path.write_text(json.dumps(results, indent=1, default=float))
    v = block["variants"]
    log.info("whole slices (leave-one-series-out): best within 5 mm %.0f%% (slice ranker) / %.0f%% (series ranker); "
             "false candidates per slice %.2f / %.2f", 100 * v["slice"]["best_within_5mm"],
             100 * v["series"]["best_within_5mm"], v["slice"]["false_per_slice_all_slices"],
             v["series"]["false_per_slice_all_slices"])
    return results


def train_finder(cfg: FinderConfig, progress: bool = True) -> dict:
    """Train (or retrain one of) the presence classifier and the localiser; save both bundles and a report."""
    if cfg.only == "wholeslice":
        return wholeslice_only(cfg, progress)
    t_start = time.perf_counter()
    cases, report = load_cases("lidc", cfg.data)
    split = Split.load(paths.weights_dir() / "splits" / "holdout.json")
    split.check(cases)
    if cfg.limit:
        keep = set(sorted({c.patient_id for c in cases})[: cfg.limit])
        cases = [c for c in cases if c.patient_id in keep]
    cases = [c for c in cases if c.patient_id not in DICOM_TEST_PATIENTS and c.has_masks]
    parts = {n: split.select(cases, n) for n in ("train", "val", "test")}
    ordered: list[Case] = [c for n in ("train", "val", "test") for c in parts[n]]
    offsets = np.cumsum([0] + [len(parts[n]) for n in ("train", "val", "test")])
    store = SliceStore(ordered, progress=progress)
    src = PatchSource(store, cfg)
    idx = {n: np.array([i for i in range(offsets[j], offsets[j + 1]) if src.usable(i)])
           for j, n in enumerate(("train", "val", "test"))}
    log.info("finder: %s; train %d, val %d, test %d nodules (DICOM test patients left out)",
             report.summary(), *(len(idx[n]) for n in idx))
    device = resolve_device()
    out = Path(cfg.out) if cfg.out else paths.weights_dir()
    runs = Path(cfg.runs) if cfg.runs else paths.runs_dir() / "finder"
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    loop = LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                      stages=(0,), stage_groups=(0, 0), balance="none", epoch_samples=cfg.epoch_samples,
                      patience=cfg.patience, seed=cfg.seed, layer_decay=1.0)
    fields = fields_of(cfg)
    common = {"field_mm": cfg.field_mm, "channel_fields_mm": fields if len(fields) > 1 else None,
              "context_px": 128, "context_intensity": "minmax",
              "patch": "square patch of field_mm around a point, cut from the slice min-max scaled over "
                       "context_px native pixels around it"}
    in_chans = 3 if len(fields) == 1 else len(fields)
    results: dict = {}
    if cfg.only in ("", "presence", "mine"):
        if cfg.only == "mine":  # hard-negative mining round: start from the saved presence model
            base_files = {f: (out / f).read_bytes() for f in (f"{PRESENCE}.json", f"{PRESENCE}.safetensors")}
            base_scan = crop_scan_report(out, src, idx["val"])
            src.mined = mine_false_candidates(out, src, idx["train"])
            log.info("mined %d false candidates on %d training crops", len(src.mined), len(idx["train"]))
            base_training = json.loads((out / f"{PRESENCE}.json").read_text())["training"]
            model = load_bundle(out, PRESENCE, device).model.float()
            loop = dataclasses.replace(loop, epochs=cfg.mine_epochs, lr=cfg.lr / 4)
        else:
            base_training = None
            seed_everything(cfg.seed)  # the finder trains from scratch: its initialisation is seeded too
            model = create_model(cfg.arch, 2, drop_rate=0.3, in_chans=in_chans)
        mean, std = tuple(model.data_config["mean"]), tuple(model.data_config["std"])
        tr = idx["train"]
        items = np.concatenate([tr, tr])
        labels = np.concatenate([np.zeros(len(tr), int), np.ones(len(tr), int)])

        def presence_batch(chunk: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
            xs = [src.presence_sample(int(items[i]), bool(labels[i]), rng) for i in chunk]
            return _model_inputs(xs, mean, std), labels[chunk].astype(np.int64)

        xv, yv, ov = _fixed_presence_set(src, idx["val"], 3, mean, std)

        def validate(m) -> float:
            return metrics.auroc(yv, metrics.softmax(_forward(m, xv, device)))

        run = fit(model, None, np.arange(len(items)), labels, None, loop, device, validate, progress,
                  batch_fn=presence_batch)
        temperature = metrics.fit_temperature(_forward(model, xv, device), yv)
        xt, yt, ot = _fixed_presence_set(src, idx["test"], 3, mean, std)
        test = presence_report(yt, _forward(model, xt, device), temperature,
                               [ordered[i].patient_id for i in ot], cfg.n_boot)
        val = presence_report(yv, _forward(model, xv, device), temperature,
                              [ordered[i].patient_id for i in ov], 200)
        log.info("presence test: accuracy %.3f F1 %.3f AUROC %.3f", test["accuracy"], test["f1_nodule"],
                 test["auroc"])
        spec = ModelSpec.from_model(
            model, classes=["background", "nodule"], view="patch", task="presence", input_size=cfg.input_size,
            preprocessing=common, temperature=temperature, metrics={"test": test, "val": val},
            training={**dataclasses.asdict(cfg), **{k: v for k, v in run.items()},
                      "n_train": len(tr), "n_val": len(idx["val"]), "n_test": len(idx["test"]),
                      "mined_false_candidates": len(src.mined), "base_training": base_training,
                      "test_patches": "3 central outlined slices per nodule, one positive and one negative each"},
            split_fingerprint=split.fingerprint,
            extra={"dataset": "lidc", "left_out_patients": list(DICOM_TEST_PATIENTS)})
        save_bundle(model, spec, out, PRESENCE)
        results["presence"] = {k: test[k] for k in PRESENCE_FIGURES}
    if cfg.only in ("", "locate"):
        seed_everything(cfg.seed)
        model = create_model(cfg.arch, 3, drop_rate=0.1, in_chans=in_chans)
        mean, std = tuple(model.data_config["mean"]), tuple(model.data_config["std"])
        tr = idx["train"]

        def locate_batch(chunk: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
            pairs = [src.locate_sample(int(tr[i]), rng) for i in chunk]
            return _model_inputs([p for p, _ in pairs], mean, std), np.stack([t for _, t in pairs])

        xv, tv, _ = _fixed_locate_set(src, idx["val"], 3, mean, std)

        def validate_loc(m) -> float:
            return -float(np.abs(_forward(m, xv, device) - tv).mean())

        run = fit(model, None, np.arange(len(tr)), np.zeros(len(tr), int), None, loop, device, validate_loc,
                  progress, batch_fn=locate_batch, loss_fn=nn.SmoothL1Loss())
        step_mm = cfg.field_mm / cfg.input_size
        reps = {}
        for name, n_boot in (("test", cfg.n_boot), ("val", 200)):
            x, t, owners = _fixed_locate_set(src, idx[name], 3, mean, std)
            sp = np.array([src.spacing(int(o)) for o in owners])
            reps[name] = locate_report(_forward(model, x, device), t, step_mm, sp,
                                       [ordered[i].patient_id for i in owners], n_boot)
        log.info("locate test: centre MAE %.2f mm (%.2f px), diameter MAE %.2f mm", reps["test"]["centre_mae_mm"],
                 reps["test"]["centre_mae_px"], reps["test"]["diameter_mae_mm"])
        spec = ModelSpec.from_model(
            model, classes=["row_offset", "col_offset", "diameter"], view="patch", task="locate",
            input_size=cfg.input_size, preprocessing=common, metrics=reps,
            training={**dataclasses.asdict(cfg), **{k: v for k, v in run.items()},
                      "n_train": len(tr), "n_val": len(idx["val"]), "n_test": len(idx["test"]),
                      "outputs": "nodule centre offset (row, col) from the patch centre and diameter, in patch px",
                      "test_patches": f"3 central outlined slices per nodule, nodule up to {cfg.loc_offset_mm} mm "
                                      "off centre"},
            split_fingerprint=split.fingerprint,
            extra={"dataset": "lidc", "left_out_patients": list(DICOM_TEST_PATIENTS)})
        save_bundle(model, spec, out, LOCATE)
        results["locate"] = {k: reps["test"][k] for k in ("n", "centre_mae_mm", "centre_mae_px",
                                                            "diameter_mae_mm", "diameter_mae_px", "ci95")}
    for name in ("val", "test"):
        results[f"crop_scan_{name}"] = crop_scan_report(out, src, idx[name])
        log.info("crop scan %s: top-1 within 5 mm %.3f", name, results[f"crop_scan_{name}"]["top1_within_5mm"])
        if name == "val" and cfg.only == "mine":  # the mined model is kept only if it ranks better on validation
            mined, base = results["crop_scan_val"]["top1_within_5mm"], base_scan["top1_within_5mm"]
            results["mining"] = {"adopted": bool(mined >= base), "crop_scan_val_top1_mined": mined,
                                 "crop_scan_val_top1_base": base, "rule": "adopted when validation crop-scan "
                                 "top-1 is at least the base model's"}
            if mined < base:
                log.info("mining round not adopted: validation crop-scan top-1 %.3f < %.3f (base)", mined, base)
                for f, data in base_files.items():
                    (out / f).write_bytes(data)
                base_test = json.loads(base_files[f"{PRESENCE}.json"])["metrics"]["test"]
                results["presence"] = {k: base_test[k] for k in PRESENCE_FIGURES}
                results["crop_scan_val"] = base_scan
    if not cfg.limit:  # a quick check on a few patients skips the DICOM series (``--only wholeslice`` runs it)
        from training.finder_eval import wholeslice_report

        results["wholeslice"] = wholeslice_report(load_finder(out), out, progress)
    for name, bundle in (("presence", PRESENCE), ("locate", LOCATE)):
        if name not in results:  # not retrained: its test figures as saved
            test = json.loads((out / f"{bundle}.json").read_text())["metrics"]["test"]
            keys = [k for k in ("n", "accuracy", "f1_nodule", "auroc", "ece", "centre_mae_mm", "centre_mae_px",
                                "diameter_mae_mm", "diameter_mae_px", "ci95") if k in test]
            results[name] = {k: test[k] for k in keys}
    results["total_seconds"] = time.perf_counter() - t_start
    (out / "finder.json").write_text(json.dumps(results, indent=1, default=float))
    return results
