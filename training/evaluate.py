"""The one evaluation routine: per-nodule logits (slices aggregated), calibration and every metric."""

from __future__ import annotations

import numpy as np
import torch

from lungviz import metrics
from lungviz.labels import LabelScheme
from lungviz.models import LungvizNet
from training.data import SliceStore, ViewConfig, make_input


@torch.inference_mode()
def nodule_outputs(
    model: LungvizNet,
    store: SliceStore,
    case_indices: np.ndarray,
    vc: ViewConfig,
    device: torch.device,
    max_slices: int = 0,
    batch_size: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """Per nodule: the mean of its slices' logits ``(N, C)`` and the mean of their L2-normalised embeddings
    ``(N, D)`` (all slices, or ``max_slices`` spread through the nodule)."""
    model.eval()
    owners, inputs = [], []
    for k, ci in enumerate(case_indices):
        for s in store.eval_slices(int(ci), max_slices):
            owners.append(k)
            inputs.append((int(ci), s))
    logits = np.zeros((len(inputs), model.num_classes), np.float32)
    embeds = np.zeros((len(inputs), model.embed_dim), np.float32)
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        x = torch.from_numpy(np.stack([make_input(store, ci, s, vc) for ci, s in chunk])).to(device)
        e = model.embed(x)
        logits[start : start + len(chunk)] = model.head(e).float().cpu().numpy()
        embeds[start : start + len(chunk)] = torch.nn.functional.normalize(e.float(), dim=1).cpu().numpy()
    owners_a = np.asarray(owners)
    counts = np.maximum(np.bincount(owners_a, minlength=len(case_indices)), 1)[:, None]
    out = []
    for arr in (logits, embeds):
        sums = np.zeros((len(case_indices), arr.shape[1]), np.float64)
        np.add.at(sums, owners_a, arr)
        out.append((sums / counts).astype(np.float32))
    return out[0], out[1]


def nodule_logits(
    model: LungvizNet,
    store: SliceStore,
    case_indices: np.ndarray,
    vc: ViewConfig,
    device: torch.device,
    max_slices: int = 0,
) -> np.ndarray:
    """``(N, C)`` logits per nodule: the mean of its slices' logits."""
    return nodule_outputs(model, store, case_indices, vc, device, max_slices)[0]


def selection_score(y: np.ndarray, logits: np.ndarray, scheme: LabelScheme) -> float:
    """The validation figure early stopping maximises: AUROC (binary), kappa (score), macro F1 (other)."""
    P = metrics.softmax(logits)
    if scheme.positive_class is not None:
        return metrics.auroc(y, P)
    if scheme.ordinal:
        return metrics.quadratic_kappa(y, P.argmax(1), scheme.n_classes)
    return metrics.headline(y, P, None, False)["f1_macro"]


def adjusted_logits(logits: np.ndarray, prior_adjust: np.ndarray | None) -> np.ndarray:
    """Undo balanced sampling: add ``log(train prior / sampling prior)`` to the logits."""
    return logits if prior_adjust is None else logits + prior_adjust[None, :]


def full_report(
    y: np.ndarray,
    logits: np.ndarray,
    scheme: LabelScheme,
    temperature: float,
    prior_adjust: np.ndarray | None,
    groups: list[str],
    reader_scores: list[tuple[int, ...]] | None = None,
    n_boot: int = 1000,
) -> dict:
    """Every figure for one model on one set of nodules, before and after calibration."""
    adj = adjusted_logits(logits, prior_adjust)
    P_raw = metrics.softmax(logits)
    P = metrics.softmax(adj, temperature)
    rep = metrics.evaluate_probabilities(y, P, scheme.positive_class, scheme.ordinal, groups, n_boot)
    rep["ece_raw"] = metrics.ece(y, P_raw)
    rep["temperature"] = temperature
    if scheme.positive_class is not None:
        rep["reliability_malignant"] = metrics.binary_reliability(y == scheme.positive_class, P[:, 1])
    if reader_scores is not None and scheme.name in ("binary", "binary-no3", "score"):
        if scheme.name == "score":
            rep["readers"] = metrics.reader_comparison(reader_scores, P, "score", n_boot)
        else:
            rep["readers"] = metrics.reader_comparison(reader_scores, P, scheme.name, n_boot)
    return rep


def evaluate_bundle(
    bundle_folder,
    name: str,
    data: str = "",
    split: str = "",
    predictions: str = "",
    n_boot: int = 1000,
    max_slices: int = 0,
    progress: bool = True,
) -> dict:
    """Evaluate a shipped bundle on every labelled nodule of a lidc-slices folder (or one saved split of it)."""
    import csv
    from pathlib import Path

    from lungviz import paths
    from lungviz.errors import LungvizError
    from lungviz.labels import get_scheme
    from lungviz.models import load_bundle
    from lungviz.splits import Split
    from training.data import view_config_from_spec
    from training.datasets import load_cases

    bundle = load_bundle(Path(bundle_folder), name)
    spec = bundle.spec
    scheme = get_scheme(spec["task"])
    cases, report = load_cases(spec.get("dataset", "lidc"), data)
    if split:
        split_file = paths.weights_dir() / "splits" / "holdout.json"
        s = Split.load(split_file)
        if s.fingerprint != spec.get("split_fingerprint"):
            raise LungvizError("the saved split is not the one this model was trained with.", source=split_file)
        known = [c for c in cases if c.patient_id in s.assignment]
        if len(known) < len(cases):
            raise LungvizError(f"{len(cases) - len(known)} nodules belong to patients the split does not know.")
        cases = s.select(cases, split)
    pairs = scheme.labelled(cases)
    if not pairs:
        raise LungvizError(f"no nodule in {data or 'the data folder'} carries a label for task '{scheme.name}'.")
    kept = [c for c, _ in pairs]
    y = np.array([lab for _, lab in pairs])
    store = SliceStore(kept, progress=progress)
    vc = view_config_from_spec(spec)
    logits = nodule_logits(bundle.model, store, np.arange(len(kept)), vc, bundle.device, max_slices)
    prior = spec.get("prior_adjust")
    prior_adjust = None if prior is None else np.asarray(prior, np.float32)
    rep = full_report(y, logits, scheme, float(spec.get("temperature", 1.0)), prior_adjust,
                      [c.patient_id for c in kept], [c.reader_scores for c in kept], n_boot)
    rep = {"model": name, "task": scheme.name, "view": spec["view"], "data": data or "default",
           "split": split or "all", "import": report.summary(), **rep}
    if predictions:
        P = metrics.softmax(adjusted_logits(logits, prior_adjust), float(spec.get("temperature", 1.0)))
        out = Path(predictions)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["patient_id", "nodule", *[f"p_{c}" for c in scheme.classes], "prediction", "truth"])
            for c, p, t in zip(kept, P, y, strict=True):
                w.writerow([c.patient_id, c.nodule_id, *[f"{v:.5f}" for v in p], scheme.classes[int(np.argmax(p))],
                            scheme.classes[int(t)]])
    return rep
