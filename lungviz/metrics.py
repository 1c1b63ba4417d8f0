"""One metrics module for training, evaluation, the model cards and the app.

Inputs are class indices ``y`` of shape ``(N,)`` and probabilities ``P`` of shape ``(N, C)`` (rows sum to 1).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
from sklearn import metrics as skm

from lungviz.data.cases import round_half_up


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0, offset: np.ndarray | None = None) -> float:
    """Mean negative log-likelihood of the true classes under ``softmax(logits / temperature + offset)``."""
    z = np.asarray(logits, np.float64) / float(temperature)
    if offset is not None:
        z = z + np.asarray(offset, np.float64)
    p = softmax(z)[np.arange(len(y)), np.asarray(y, int)]
    return float(-np.mean(np.log(np.clip(p, 1e-12, 1.0))))


def fit_temperature(logits: np.ndarray, y: np.ndarray, lo: float = 0.05, hi: float = 20.0,
                    offset: np.ndarray | None = None) -> float:
    """Temperature minimising the NLL of ``softmax(logits / T + offset)`` on held-out logits (golden-section search
    on log T)."""
    a, b = np.log(lo), np.log(hi)
    g = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    for _ in range(80):
        if nll(logits, y, np.exp(c), offset) < nll(logits, y, np.exp(d), offset):
            b, d = d, c
            c = b - g * (b - a)
        else:
            a, c = c, d
            d = a + g * (b - a)
    return float(np.exp((a + b) / 2.0))


def fit_temperature_bias(logits: np.ndarray, y: np.ndarray, offset: np.ndarray | None = None,
                         ridge: float = 1e-3) -> tuple[float, np.ndarray]:
    """Temperature ``T`` and per-class bias ``c`` (``c[0] = 0``; a bias common to every class changes nothing)
    minimising the NLL of ``softmax(logits / T + offset + c)`` on held-out logits, plus ``ridge * |c|^2`` so that a
    class missing from a small set keeps a finite bias (L-BFGS on ``(log T, c[1:])`` from ``T = 1, c = 0``)."""
    from scipy.optimize import minimize

    z = np.asarray(logits, np.float64)
    y = np.asarray(y, int)
    base = np.zeros(z.shape[1]) if offset is None else np.asarray(offset, np.float64)
    rows = np.arange(len(y))

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        t, c = np.exp(theta[0]), np.concatenate([[0.0], theta[1:]])
        L = z / t + base + c
        P = softmax(L)
        err = P.copy()
        err[rows, y] -= 1.0  # d(mean NLL)/dL, times N
        value = -np.mean(np.log(np.clip(P[rows, y], 1e-300, 1.0))) + ridge * float(c @ c)
        grad_t = -np.sum(err * z) / t / len(y)  # d/d(log T): dL/dlogT = -z / T
        grad_c = err.mean(axis=0)[1:] + 2.0 * ridge * c[1:]
        return value, np.concatenate([[grad_t], grad_c])

    res = minimize(objective, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B",
                   bounds=[(np.log(0.05), np.log(20.0))] + [(None, None)] * (z.shape[1] - 1))
    return float(np.exp(res.x[0])), np.concatenate([[0.0], res.x[1:]])


def decide(P: np.ndarray, decision_bias: np.ndarray | None = None) -> np.ndarray:
    """The called class of each row of probabilities: ``argmax(log P + decision_bias)`` (None = the most probable
    class; see :class:`lungviz.calibration.Calibration`)."""
    P = np.asarray(P, np.float64)
    if decision_bias is None:
        return P.argmax(axis=1)
    return (np.log(np.clip(P, 1e-300, 1.0)) + np.asarray(decision_bias, np.float64)[None, :]).argmax(axis=1)


def expected_rating(P: np.ndarray) -> np.ndarray:
    """The expected rating ``sum_k k p_k`` on a 1..levels scale, from ``(..., levels)`` probabilities."""
    P = np.asarray(P, np.float64)
    return (P * np.arange(1, P.shape[-1] + 1)).sum(axis=-1)


def expected_score_call(P: np.ndarray) -> np.ndarray:
    """Per row of ordinal class probabilities, the class ``j`` minimising the expected squared distance
    ``sum_k p_k (j - k)^2``: the class nearest the expected class index (ties to the lower class)."""
    P = np.asarray(P, np.float64)
    mean = P @ np.arange(P.shape[1]) / P.sum(axis=1)  # the cost (j - mean)^2 + variance is least at the nearest j
    return np.clip(np.ceil(mean - 0.5 - 1e-9), 0, P.shape[1] - 1).astype(int)


def decision_threshold(decision_bias: Sequence[float] | np.ndarray | None, positive: int = 1) -> float:
    """Two classes: the probability of class ``positive`` from which :func:`decide` calls it (0.5 without a bias)."""
    if decision_bias is None:
        return 0.5
    d = np.asarray(decision_bias, np.float64)
    if d.shape != (2,) or positive not in (0, 1):
        raise ValueError("a decision threshold needs two classes")
    # log p + d_pos > log(1 - p) + d_neg  <=>  logit(p) > d_neg - d_pos
    return float(1.0 / (1.0 + np.exp(-(d[1 - positive] - d[positive]))))


def _binned(score: np.ndarray, outcome: np.ndarray, n_bins: int, score_key: str, outcome_key: str) -> list[dict]:
    """Equal-width bins of ``score`` in [0, 1]: per bin the count, the mean score and the mean outcome."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(score, edges[1:-1], right=True), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        m = idx == b
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(m.sum()),
                    score_key: float(score[m].mean()) if m.any() else None,
                    outcome_key: float(np.mean(outcome[m])) if m.any() else None})
    return out


def reliability(y: np.ndarray, P: np.ndarray, n_bins: int = 10) -> list[dict]:
    """Top-label reliability: per confidence bin, the count, mean confidence and accuracy."""
    correct = (P.argmax(axis=1) == np.asarray(y)).astype(float)
    return _binned(P.max(axis=1), correct, n_bins, "confidence", "accuracy")


def ece(y: np.ndarray, P: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error (top label, equal-width bins)."""
    return binned_ece(reliability(y, P, n_bins), "confidence", "accuracy")


def binned_ece(bins: Sequence[dict], predicted: str = "mean_p", observed: str = "observed") -> float:
    """The ECE of a reliability table: the count-weighted mean gap between what was predicted and what was observed
    in each bin. With the defaults, of a :func:`binary_reliability` curve: the calibration of the malignant
    probability itself, which the top-label ECE can hide (a benign call at 66% and a malignant call at 66% share a
    bin, and their errors cancel)."""
    n = sum(int(b["n"]) for b in bins)
    return float(sum(b["n"] / n * abs(b[observed] - b[predicted]) for b in bins if b["n"])) if n else float("nan")


#: Above this ECE of its malignant-probability curve on test, a model's malignant probability is said to be off.
MALIGNANT_ECE_LIMIT = 0.05


def observed_rate(bins: Sequence[dict], observed: str = "observed") -> float:
    """The overall observed rate of a reliability table (its count-weighted mean outcome)."""
    n = sum(int(b["n"]) for b in bins)
    return float(sum(b["n"] * b[observed] for b in bins if b["n"]) / n) if n else float("nan")


#: What :func:`with_malignant_ece` adds to a binary report.
MALIGNANT_CALIBRATION_KEYS = ("ece_malignant", "mean_malignant_p", "observed_malignant_rate")


def with_malignant_ece(report: dict) -> dict:
    """A metrics report with ``ece_malignant`` (the ECE of its malignant-probability curve), ``mean_malignant_p``
    and ``observed_malignant_rate`` filled in from its ``reliability_malignant`` bins, where it has them and they
    are not there yet."""
    bins = report.get("reliability_malignant")
    if not bins or all(k in report for k in MALIGNANT_CALIBRATION_KEYS):
        return report
    return {**report, "ece_malignant": binned_ece(bins), "mean_malignant_p": observed_rate(bins, "mean_p"),
            "observed_malignant_rate": observed_rate(bins)}


#: How a miscalibrated malignant probability errs, in words (:func:`miscalibration_direction`).
MISCALIBRATION_WORDS = {"high": "runs high", "low": "runs low",
                        "both": "runs high in some probability ranges and low in others"}


def miscalibration_direction(bins: list[dict]) -> str:
    """``high`` | ``low`` | ``both``: which way reliability bins (``n``, ``mean_p``, ``observed``; empty ones are
    skipped) err. Of the case-weighted gaps above and below the diagonal that make up the ECE, one side at least
    twice the other names the direction, else ``both`` (a mean near the observed rate can hide errors that cancel)."""
    filled = [b for b in bins if b.get("n") and b.get("mean_p") is not None and b.get("observed") is not None]
    above = sum(b["n"] * max(b["mean_p"] - b["observed"], 0.0) for b in filled)
    below = sum(b["n"] * max(b["observed"] - b["mean_p"], 0.0) for b in filled)
    return "high" if above >= 2 * below and above > 0 else "low" if below >= 2 * above and below > 0 else "both"


def ece_if_calibrated(P: np.ndarray, y: np.ndarray | None = None, n_bins: int = 10, n_sims: int = 2000,
                      seed: int = 0) -> dict[str, float]:
    """What ECE a perfectly calibrated model with these confidences would show on this many cases.

    Under calibration each top-label prediction is right with probability equal to its confidence, so labels
    are redrawn as Bernoulli(confidence) (consistency resampling). Returns the median and 95th percentile of
    that ECE and, given ``y``, the share of draws at least as large as the observed ECE (a one-sided p-value).
    """
    conf = np.asarray(P, np.float64).max(axis=1)
    n = len(conf)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    onehot = np.eye(n_bins)[idx]  # (N, B)
    conf_sum = conf @ onehot
    draws = (np.random.default_rng(seed).random((n_sims, n)) < conf).astype(np.float64)
    sims = np.abs(draws @ onehot - conf_sum).sum(axis=1) / n
    out = {"median": float(np.median(sims)), "p95": float(np.quantile(sims, 0.95)), "n_sims": n_sims}
    if y is not None:
        out["p_value"] = float(np.mean(sims >= ece(y, P) - 1e-12))
    return out


def binary_reliability(y_pos: np.ndarray, p_pos: np.ndarray, n_bins: int = 10) -> list[dict]:
    """Reliability of a malignant probability: per probability bin, the count, mean p and observed rate."""
    return _binned(np.asarray(p_pos, float), np.asarray(y_pos, float), n_bins, "mean_p", "observed")


def quadratic_kappa(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Cohen's kappa with quadratic weights over ordinal classes ``0..n_classes-1``."""
    return float(skm.cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(n_classes))))


def auroc(y: np.ndarray, P: np.ndarray) -> float:
    """AUROC: of the positive class for 2 classes, else one-vs-rest weighted by support."""
    y = np.asarray(y)
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if P.shape[1] == 2:
        return float(skm.roc_auc_score(y, P[:, 1]))
    aucs, weights = [], []
    for c in present:
        aucs.append(skm.roc_auc_score(y == c, P[:, c]))
        weights.append(np.mean(y == c))
    return float(np.average(aucs, weights=weights))


def auprc_weighted(y: np.ndarray, P: np.ndarray) -> float:
    """Average precision per class (one-vs-rest), weighted by class support, as the published studies report."""
    y = np.asarray(y)
    scores, weights = [], []
    for c in range(P.shape[1]):
        if (y == c).any():
            scores.append(skm.average_precision_score(y == c, P[:, c]))
            weights.append(np.mean(y == c))
    return float(np.average(scores, weights=weights)) if scores else float("nan")


def headline(y: np.ndarray, P: np.ndarray, positive_class: int | None, ordinal: bool,
             decision_bias: np.ndarray | None = None) -> dict[str, float]:
    """The point estimates of every headline figure for one task; the decision figures score the model's call
    (:func:`decide`)."""
    y = np.asarray(y, int)
    n_classes = P.shape[1]
    pred = decide(P, decision_bias)
    labels = list(range(n_classes))
    out = {
        "auroc": auroc(y, P),
        "auprc_weighted": auprc_weighted(y, P),
        "f1_weighted": float(skm.f1_score(y, pred, average="weighted", labels=labels, zero_division=0)),
        "f1_macro": float(skm.f1_score(y, pred, average="macro", labels=labels, zero_division=0)),
        "precision": float(skm.precision_score(y, pred, average="weighted", labels=labels, zero_division=0)),
        "recall": float(skm.recall_score(y, pred, average="weighted", labels=labels, zero_division=0)),
        "accuracy": float(np.mean(pred == y)),
    }
    if positive_class is not None:
        pos_true, pos_pred = y == positive_class, pred == positive_class
        out["f1_malignant"] = float(skm.f1_score(pos_true, pos_pred, zero_division=0))
        out["sensitivity"] = float(pos_pred[pos_true].mean()) if pos_true.any() else float("nan")
        out["specificity"] = float((~pos_pred[~pos_true]).mean()) if (~pos_true).any() else float("nan")
    if ordinal:
        out["qwk"] = quadratic_kappa(y, pred, n_classes)
        out["within_one"] = float(np.mean(np.abs(pred - y) <= 1))
    return out


def bootstrap_ci(
    fn: Callable[[np.ndarray], dict[str, float]],
    n: int,
    groups: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every figure ``fn(indices)`` returns; resamples whole patients
    when ``groups`` is given (nodules of one patient are not independent)."""
    rng = np.random.default_rng(seed)
    if groups is not None:
        g = np.asarray(groups)
        uniq, inv = np.unique(g, return_inverse=True)
        members = [np.flatnonzero(inv == k) for k in range(len(uniq))]
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        if groups is not None:
            pick = rng.integers(0, len(members), len(members))
            idx = np.concatenate([members[k] for k in pick])
        else:
            idx = rng.integers(0, n, n)
        for k, v in fn(idx).items():
            if np.isfinite(v):
                draws.setdefault(k, []).append(v)
    return {k: (float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))) for k, v in draws.items()}


def score_auroc(
    y: np.ndarray, score: np.ndarray, groups: Sequence[str] | None = None, n_boot: int = 1000, seed: int = 0
) -> dict:
    """AUROC of one number per case (larger = more likely positive, e.g. a diameter) for binary ``y``, with a
    patient-bootstrap 95% interval: ``{"n", "auroc", "ci95": {"auroc": (lo, hi)}}``."""
    y = np.asarray(y, int)
    s = np.asarray(score, np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError("score_auroc takes one label and one score per case")
    P = np.stack([-s, s], axis=1)  # auroc() reads column 1 as the positive class's score
    ci = bootstrap_ci(lambda i: {"auroc": auroc(y[i], P[i])}, len(y), groups, n_boot, seed)
    return {"n": len(y), "auroc": auroc(y, P), "ci95": ci}


#: How :func:`threshold_for_sensitivity` reads a target: reached on the cases themselves ("point"), or by the lower
#: end of the 95% Wilson interval of their sensitivity ("lower-bound": a threshold that should hold on new cases).
SENSITIVITY_RULES = ("point", "lower-bound")


def threshold_for_sensitivity(positive: np.ndarray, score: np.ndarray, target: float,
                              rule: str = "point") -> tuple[float, bool]:
    """The highest threshold ``t`` at which calling ``score >= t`` finds ``target`` of the positives (``rule``: see
    :data:`SENSITIVITY_RULES`), and whether the target was reachable at all: when even calling every positive
    leaves the Wilson lower bound below the target, ``t`` is the lowest positive's score and the flag is False."""
    s = np.asarray(score, np.float64)
    pos = np.sort(s[np.asarray(positive, bool)])[::-1]
    if not len(pos) or not 0.0 < target <= 1.0 or rule not in SENSITIVITY_RULES:
        raise ValueError("a sensitivity target needs positive cases, a target in (0, 1] and a known rule")
    if not np.isfinite(s).all():
        raise ValueError("a sensitivity threshold needs a finite score for every case")
    n = len(pos)
    if rule == "point":
        return float(pos[int(np.ceil(target * n - 1e-9)) - 1]), True
    enough = [k for k in range(1, n + 1) if wilson_interval(k, n)[0] >= target]
    return float(pos[(enough[0] if enough else n) - 1]), bool(enough)


def at_threshold(positive: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, positive and negative predictive value and the share of cases called positive when
    ``score >= threshold`` is called positive (NaN where a figure has no cases to count)."""
    pos, called = np.asarray(positive, bool), np.asarray(score, np.float64) >= threshold

    def share(num: np.ndarray, den: np.ndarray) -> float:
        return float(np.sum(num & den) / np.sum(den)) if np.any(den) else float("nan")

    return {"sensitivity": share(called, pos), "specificity": share(~called, ~pos), "ppv": share(pos, called),
            "npv": share(~pos, ~called), "called_positive": float(np.mean(called)) if len(pos) else float("nan")}


def operating_point(val_positive: np.ndarray, val_score: np.ndarray, test_positive: np.ndarray,
                    test_score: np.ndarray, target: float, test_groups: Sequence[str] | None = None,
                    n_boot: int = 1000, rule: str = "point") -> dict:
    """A threshold chosen on validation for ``target`` sensitivity (``rule``: see :data:`SENSITIVITY_RULES`), then
    read on test with patient-bootstrap 95% intervals (of the test cases; the threshold stays the validation one)."""
    t, reachable = threshold_for_sensitivity(val_positive, val_score, target, rule)
    tp, ts = np.asarray(test_positive, bool), np.asarray(test_score, np.float64)
    return {"target_sensitivity": target, "rule": rule, "reachable": reachable, "threshold": t,
            "val": at_threshold(val_positive, val_score, t), "test": at_threshold(tp, ts, t),
            "test_ci95": bootstrap_ci(lambda i: at_threshold(tp[i], ts[i], t), len(tp), test_groups, n_boot)}


def ratio_by_band(measured: np.ndarray, reference: np.ndarray, edges: Sequence[float] = (10.0, 20.0)) -> list[dict]:
    """How a measurement compares with a reference (e.g. a diameter with the readers'), per band of the reference:
    ``[{"lo", "hi", "n", "median", "q25", "q75"}]`` of ``measured / reference``, then one row for all (finite
    pairs with a positive reference only; ``hi`` None = open-ended)."""
    m, r = np.asarray(measured, np.float64), np.asarray(reference, np.float64)
    ok = np.isfinite(m) & np.isfinite(r) & (r > 0)
    ratio, r = m[ok] / r[ok], r[ok]
    bounds = [0.0, *map(float, edges), None]
    rows = []
    for lo, hi in [*itertools.pairwise(bounds), (0.0, None)]:
        sel = ratio[(r >= lo) & (r < hi if hi is not None else True)]
        q = np.quantile(sel, [0.25, 0.5, 0.75]) if len(sel) else [float("nan")] * 3
        rows.append({"lo": lo, "hi": hi, "n": int(len(sel)), "median": float(q[1]), "q25": float(q[0]),
                     "q75": float(q[2])})
    return rows


def evaluate_probabilities(
    y: np.ndarray,
    P: np.ndarray,
    positive_class: int | None = None,
    ordinal: bool = False,
    groups: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    decision_bias: np.ndarray | None = None,
) -> dict:
    """Headline figures, 95% bootstrap intervals, the confusion matrix (of the model's calls, :func:`decide`), ECE
    and the reliability table."""
    y = np.asarray(y, int)
    P = np.asarray(P, np.float64)
    point = headline(y, P, positive_class, ordinal, decision_bias)
    ci = bootstrap_ci(lambda i: headline(y[i], P[i], positive_class, ordinal, decision_bias), len(y), groups,
                      n_boot, seed)
    return {
        "n": len(y),
        **point,
        "ci95": ci,
        "confusion": skm.confusion_matrix(y, decide(P, decision_bias), labels=list(range(P.shape[1]))).tolist(),
        "ece": ece(y, P),
        "ece_if_calibrated": ece_if_calibrated(P, y, seed=seed),
        "reliability": reliability(y, P),
    }


def reader_pairs(reader_scores: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    """Leave-one-reader-out pairs ``(case index, reader's score, others' rounded median)`` for cases with >= 2 reads."""
    pairs = []
    for i, scores in enumerate(reader_scores):
        if len(scores) < 2:
            continue
        for r in range(len(scores)):
            others = [s for j, s in enumerate(scores) if j != r]
            pairs.append((i, int(scores[r]), round_half_up(float(np.median(others)))))
    return pairs


def reader_comparison(
    reader_scores: Sequence[Sequence[int]], P: np.ndarray, task: str, n_boot: int = 1000, seed: int = 0,
    decision_bias: np.ndarray | None = None, patients: Sequence[str] | None = None,
) -> dict:
    """A single radiologist against the rest of the panel, and the model on the very same pairs.

    Each reader in turn is the predictor and the median of the other readers the truth. ``binary``:
    AUROC of the reader's 1-5 score vs the model's malignant probability for truth >= 4. ``score``:
    quadratic-weighted kappa and exact agreement of the reader's score vs the model's called score (:func:`decide`).
    The intervals resample whole patients (``patients``: each case's patient; None = each case on its own), as the
    model's own figures do: a patient's nodules, and a nodule's pairs, are not independent.
    """
    pairs = reader_pairs(reader_scores)
    if not pairs:
        return {"n_pairs": 0}
    idx = np.array([p[0] for p in pairs])
    reader = np.array([p[1] for p in pairs])
    truth = np.array([p[2] for p in pairs])
    out: dict = {"n_pairs": len(pairs), "n_nodules": len(np.unique(idx))}
    if task in ("binary", "binary-no3"):
        keep = truth != 3 if task == "binary-no3" else np.ones(len(truth), bool)
        y = (truth[keep] >= 4).astype(int)
        model_p = P[idx[keep], 1]
        rd = reader[keep].astype(float)

        def fig(i: np.ndarray) -> dict[str, float]:
            if len(np.unique(y[i])) < 2:
                return {"reader_auroc": float("nan"), "model_auroc": float("nan")}
            return {"reader_auroc": float(skm.roc_auc_score(y[i], rd[i])),
                    "model_auroc": float(skm.roc_auc_score(y[i], model_p[i]))}

        groups = idx[keep]
        n = int(keep.sum())
    else:
        model_pred = decide(P[idx], decision_bias) + 1

        def fig(i: np.ndarray) -> dict[str, float]:
            return {"reader_qwk": quadratic_kappa(truth[i] - 1, reader[i] - 1, 5),
                    "model_qwk": quadratic_kappa(truth[i] - 1, model_pred[i] - 1, 5),
                    "reader_exact": float(np.mean(truth[i] == reader[i])),
                    "model_exact": float(np.mean(truth[i] == model_pred[i]))}

        groups = idx
        n = len(pairs)
    out.update(fig(np.arange(n)))
    unit = [str(patients[g]) if patients is not None else str(g) for g in groups]
    out["ci95"] = bootstrap_ci(fig, n, unit, n_boot, seed)
    return out


def rating_comparison(
    reader_ratings: Sequence[Sequence[float]], predicted: np.ndarray, levels: int, n_boot: int = 1000, seed: int = 0,
    patients: Sequence[str] | None = None,
) -> dict:
    """A single reader against the rest of the panel on one rating scale 1..``levels`` (a characteristic, or the
    malignancy score), and the model's predicted rating ``(N,)`` on the very same pairs: each reader in turn is the
    predictor, the rounded median of the others the truth (as :func:`reader_comparison`). Quadratic-weighted kappa
    and mean absolute error of both, with patient-bootstrap intervals."""
    pairs = reader_pairs([[int(round(v)) for v in r] for r in reader_ratings])
    if not pairs:
        return {"n_pairs": 0}
    idx = np.array([p[0] for p in pairs])
    reader = np.clip(np.array([p[1] for p in pairs]), 1, levels)
    truth = np.clip(np.array([p[2] for p in pairs]), 1, levels)
    model = np.clip(np.rint(np.asarray(predicted, np.float64)[idx]).astype(int), 1, levels)

    def fig(i: np.ndarray) -> dict[str, float]:
        return {"reader_qwk": quadratic_kappa(truth[i] - 1, reader[i] - 1, levels),
                "model_qwk": quadratic_kappa(truth[i] - 1, model[i] - 1, levels),
                "reader_mae": float(np.mean(np.abs(truth[i] - reader[i]))),
                "model_mae": float(np.mean(np.abs(truth[i] - model[i])))}

    out: dict = {"n_pairs": len(pairs), "n_nodules": len(np.unique(idx)), **fig(np.arange(len(pairs)))}
    unit = [str(patients[g]) if patients is not None else str(g) for g in idx]
    out["ci95"] = bootstrap_ci(fig, len(pairs), unit, n_boot, seed)
    return out


def reliability_bin(bins: Sequence[dict], p: float) -> dict | None:
    """The bin of a reliability table (:func:`binary_reliability` or :func:`reliability`) that holds ``p``.

    Bins are ``(lo, hi]`` with the first one closed at 0, as those functions assign them; None for an empty table.
    """
    if not bins or p is None or not np.isfinite(p):
        return None
    upper = np.array([float(b["hi"]) for b in bins])
    return dict(bins[int(np.clip(np.digitize(float(p), upper[:-1], right=True), 0, len(bins) - 1))])


def wilson_interval(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion ``k / n``; (0, 1) when ``n`` is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = float(k) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def format_ci(report: dict, key: str, digits: int = 3) -> str:
    """``"0.812 [0.760, 0.861]"``: a figure of a metrics report with its 95% interval (``"–"`` when absent)."""
    value = report.get(key)
    if value is None or not np.isfinite(value):
        return "–"
    ci = (report.get("ci95") or {}).get(key)
    if ci and all(v is not None and np.isfinite(v) for v in ci):
        return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return f"{value:.{digits}f}"
