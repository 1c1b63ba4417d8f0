"""The one evaluation routine: per-nodule logits (slices aggregated), calibration and every metric."""

from __future__ import annotations

import numpy as np
import torch

from lungviz import metrics
from lungviz.labels import LabelScheme
from lungviz.models import LungvizNet
from training.data import SliceStore, ViewConfig, make_input


@torch.inference_mode()
def nodule_logits(
    model: LungvizNet,
    store: SliceStore,
    case_indices: np.ndarray,
    vc: ViewConfig,
    device: torch.device,
    max_slices: int = 0,
    batch_size: int = 128,
) -> np.ndarray:
    """``(N, C)`` logits per nodule: the mean of its slices' logits (all slices, or ``max_slices`` spread)."""
    model.eval()
    owners, inputs = [], []
    for k, ci in enumerate(case_indices):
        for s in store.eval_slices(int(ci), max_slices):
            owners.append(k)
            inputs.append((int(ci), s))
    out = np.zeros((len(inputs), model.num_classes), np.float32)
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        x = torch.from_numpy(np.stack([make_input(store, ci, s, vc) for ci, s in chunk])).to(device)
        out[start : start + len(chunk)] = model(x).float().cpu().numpy()
    owners_a = np.asarray(owners)
    sums = np.zeros((len(case_indices), model.num_classes), np.float64)
    np.add.at(sums, owners_a, out)
    counts = np.bincount(owners_a, minlength=len(case_indices))[:, None]
    return (sums / np.maximum(counts, 1)).astype(np.float32)


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
