"""The one evaluation routine: per-nodule logits (slices aggregated), calibration and every metric."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lungviz import metrics
from lungviz.calibration import Calibration, calibration_of
from lungviz.data.labels import LabelScheme
from lungviz.models import LungvizNet, ModelSpec, spec_dict
from training.data import SliceStore, ViewConfig, make_input


def dihedral_logits(model: LungvizNet, x: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation: the mean logits over the 8 dihedral transforms of a batch ``(B, C, S, S)`` (quarter
    turns, each also mirrored; all within the training augmentation's rotations and flips)."""
    total = None
    for mirrored in (x, torch.flip(x, dims=[3])):
        for quarter in range(4):
            out = model(torch.rot90(mirrored, quarter, dims=[2, 3])).float()
            total = out if total is None else total + out
    return total / 8.0


@torch.inference_mode()
def nodule_outputs(
    model: LungvizNet,
    store: SliceStore,
    case_indices: np.ndarray,
    vc: ViewConfig,
    device: torch.device,
    max_slices: int = 0,
    batch_size: int = 128,
    tta: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Per nodule: the mean of its slices' logits ``(N, C)`` and the mean of their L2-normalised embeddings
    ``(N, D)`` (all slices, or ``max_slices`` spread through the nodule). With ``tta``, each slice's logits are the
    mean over its 8 dihedral transforms (:func:`dihedral_logits`; the embeddings stay the untransformed slice's)."""
    model.eval()
    owners, inputs = [], []
    for k, ci in enumerate(case_indices):
        for s in store.eval_slices(int(ci), max_slices, vc.central_fraction):
            owners.append(k)
            inputs.append((int(ci), s))
    logits = np.zeros((len(inputs), model.num_classes), np.float32)
    embeds = np.zeros((len(inputs), model.embed_dim), np.float32)
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        x = torch.from_numpy(np.stack([make_input(store, ci, s, vc) for ci, s in chunk])).to(device)
        e = model.embed(x)
        out = dihedral_logits(model, x) if tta else model.head(e)
        logits[start : start + len(chunk)] = out.float().cpu().numpy()
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
    tta: bool = False,
) -> np.ndarray:
    """``(N, C)`` logits per nodule: the mean of its slices' logits (``tta``: see :func:`nodule_outputs`)."""
    return nodule_outputs(model, store, case_indices, vc, device, max_slices, tta=tta)[0]


def selection_score(y: np.ndarray, logits: np.ndarray, scheme: LabelScheme,
                    decision_bias: np.ndarray | None = None) -> float:
    """The validation figure early stopping maximises: AUROC (binary), kappa (score), macro F1 (other), of the calls
    ``argmax(logits + decision_bias)``."""
    P = metrics.softmax(logits)
    if scheme.positive_class is not None:
        return metrics.auroc(y, P)
    if scheme.ordinal:
        return metrics.quadratic_kappa(y, metrics.decide(P, decision_bias), scheme.n_classes)
    return metrics.headline(y, P, None, False, decision_bias)["f1_macro"]


def full_report(
    y: np.ndarray,
    logits: np.ndarray,
    scheme: LabelScheme,
    calibration: Calibration,
    groups: list[str],
    reader_scores: list[tuple[int, ...]] | None = None,
    n_boot: int = 1000,
) -> dict:
    """Every figure for one model on one set of nodules: its calibrated probabilities and its calls."""
    return _report(y, calibration.probabilities(logits), metrics.softmax(logits), scheme, calibration, groups,
                   reader_scores, n_boot)


def _report(y: np.ndarray, P: np.ndarray, P_raw: np.ndarray, scheme: LabelScheme, calibration: Calibration | None,
            groups: list[str], reader_scores: list[tuple[int, ...]] | None, n_boot: int) -> dict:
    """The figures of calibrated probabilities ``P``; ``calibration`` (None = an estimate with no network calibration
    of its own, such as the nodule model's: the call is the most probable class) sets the call."""
    bias = None if calibration is None else calibration.decision_bias
    rep = metrics.evaluate_probabilities(y, P, scheme.positive_class, scheme.ordinal, groups, n_boot,
                                         decision_bias=bias)
    rep["ece_raw"] = metrics.ece(y, P_raw)
    rep["temperature"] = 1.0 if calibration is None else calibration.temperature
    if scheme.positive_class is not None:
        rep["reliability_malignant"] = metrics.binary_reliability(y == scheme.positive_class, P[:, 1])
        rep = metrics.with_malignant_ece(rep)
        rep["decision_threshold"] = 0.5 if calibration is None else calibration.threshold(scheme.positive_class)
    if reader_scores is not None and scheme.name in ("binary", "binary-no3", "score"):
        rep["readers"] = metrics.reader_comparison(reader_scores, P, scheme.name, n_boot, decision_bias=bias,
                                                   patients=groups)
    return rep


def read_any_spec(folder: Path, name: str) -> dict:
    """The JSON spec of a network bundle, or the nodule model's for the outside names of its estimate and score
    (``fused-binary``, ``nodule-score``)."""
    from lungviz.inference.predict import NODULE_MODEL
    from lungviz.models import read_spec

    return read_spec(Path(folder), NODULE_MODEL if name in NODULE_ALIASES else name)


#: The outside names of the nodule model's estimate and 1-5 score.
NODULE_ALIASES = ("fused-binary", "nodule-score")


def calibrated_logits(
    folder: Path, name: str, store: SliceStore, case_indices: np.ndarray, max_slices: int = 0,
    central: float | None = None, tta: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(calibrated, raw)`` per-nodule logits of a shipped network and its spec.

    Calibrated logits give calibrated probabilities through a plain softmax. ``central`` overrides the share of
    each nodule's slices that is averaged (None = as the spec says; 0 = the middle slice, what the app sees).
    ``tta`` averages each slice's logits over its dihedral transforms, with the spec's calibration.
    """
    import dataclasses

    from lungviz.models import load_bundle
    from training.data import view_config_from_spec

    spec = read_any_spec(folder, name)
    bundle = load_bundle(Path(folder), name)
    vc = view_config_from_spec(spec)
    if central is not None:
        vc = dataclasses.replace(vc, central_fraction=float(central))
    logits = nodule_logits(bundle.model, store, case_indices, vc, bundle.device, max_slices, tta=tta)
    return Calibration.from_spec(spec).logits(logits).astype(np.float32), logits, spec


def report_from_logits(y: np.ndarray, calibrated: np.ndarray, raw: np.ndarray, scheme: LabelScheme,
                       groups: list[str], reader_scores: list[tuple[int, ...]] | None, n_boot: int,
                       calibration: Calibration | None = None) -> dict:
    """:func:`full_report` for logits that are already calibrated (``calibration``, the network's, sets the call;
    None for the nodule model's estimate and score, whose calls are the most probable class)."""
    return _report(y, metrics.softmax(calibrated), metrics.softmax(raw), scheme, calibration, groups, reader_scores,
                   n_boot)


SPLIT_NAMES = ("train", "val", "test")


def holdout_file(bundle_folder: Path | None = None) -> Path:
    """The holdout split file next to the model (``<folder>/splits/holdout.json``), else the shipped one."""
    from lungviz import paths

    local = Path(bundle_folder) / "splits" / "holdout.json" if bundle_folder else None
    return local if local and local.is_file() else paths.weights_dir() / "splits" / "holdout.json"


def is_models_split(split, spec: dict) -> bool:
    """Whether a loaded :class:`lungviz.data.splits.Split` can be the one the model was trained on: the spec's data
    fingerprint and split seed, where it records them, match it."""
    trained = spec.get("split") or {}
    return not ((spec.get("split_fingerprint") and split.fingerprint != spec["split_fingerprint"])
                or (trained.get("seed") is not None and int(trained["seed"]) != split.seed))


def select_split(cases: list, split: str, spec: ModelSpec | dict, bundle_folder: Path | None = None) -> list:
    """Restrict cases to one split of the split the model was trained on (the histology set's own folders, less the
    val/test images that nearly duplicate a training image, as training drops them; for LIDC the saved holdout next
    to the model, else the shipped one), refusing a split file that is not that one."""
    spec = spec_dict(spec)
    from lungviz.data.splits import Split
    from lungviz.errors import LungvizError
    from training.splits import split_for, without_train_duplicates

    if split not in SPLIT_NAMES:
        raise LungvizError(f"unknown split '{split}'; choose one of {', '.join(SPLIT_NAMES)}.")
    if spec.get("dataset") == "histology":  # its own folders, less the near duplicates of training images
        folders = split_for(cases, "histology")
        chosen = folders.select(cases, split)
        return chosen if split == "train" else without_train_duplicates(chosen, folders.select(cases, "train"))
    split_file = holdout_file(bundle_folder)
    s = Split.load(split_file)
    if not is_models_split(s, spec):
        raise LungvizError(f"the saved split is not the one this model was trained with (it was trained on the "
                           f"split drawn with seed {(spec.get('split') or {}).get('seed', '?')}; the file holds seed "
                           f"{s.seed}).", source=split_file)
    unknown = [c for c in cases if c.patient_id not in s.assignment]
    if unknown:
        raise LungvizError(f"{len(unknown)} nodules belong to patients the split does not know "
                           f"(e.g. {unknown[0].patient_id}); use the data folder the model was trained on.")
    chosen = s.select(cases, split)
    if cases and not chosen:
        raise LungvizError(f"none of the {len(cases)} nodules in the data folder belongs to a {split} patient.")
    return chosen


#: The figures the readable summary lists, in order, with their names.
SUMMARY_FIGURES = (("auroc", "AUROC"), ("auprc_weighted", "weighted AUPRC"), ("f1_weighted", "weighted F1"),
                   ("f1_macro", "macro F1"), ("f1_malignant", "malignant F1"), ("sensitivity", "sensitivity"),
                   ("specificity", "specificity"), ("qwk", "quadratic-weighted kappa"), ("accuracy", "accuracy"))


def evaluation_text(rep: dict) -> str:
    """The readable summary of an :func:`evaluate_bundle` report: the headline figures with their 95% intervals,
    calibration, the single-radiologist comparison and the notes."""
    what = "images" if rep.get("task") == "histology" else "nodules"
    lines = [f"{rep['model']} ({rep['task']}, {rep['view']} view) on {rep['n']} {what} of "
             f"{rep.get('data', 'default')} (split: {rep.get('split', 'all')}; {rep.get('import', '')})"]
    multi = isinstance(rep.get("confusion"), list) and len(rep["confusion"]) > 2
    names = {**dict(SUMMARY_FIGURES), **({"auroc": "AUROC (one class against the rest, weighted by support)"}
                                        if multi else {})}
    lines += [f"  {names[key]}: {text}" for key, _ in SUMMARY_FIGURES if (text := metrics.format_ci(rep, key)) != "–"]
    if (ece := metrics.format_ci(rep, "ece")) != "–":
        raw = metrics.format_ci(rep, "ece_raw")
        lines.append(f"  calibration error (top-class ECE): {ece}"
                     + (f" ({raw} before calibration)" if raw != "–" else ""))
    readers = rep.get("readers") or {}
    figure = "auroc" if "reader_auroc" in readers else "qwk" if "reader_qwk" in readers else None
    if figure and readers.get("n_pairs"):
        name = "AUROC" if figure == "auroc" else "quadratic-weighted kappa"
        reader, model = (metrics.format_ci(readers, f"{who}_{figure}") for who in ("reader", "model"))
        lines.append(f"  against one radiologist ({readers['n_pairs']} reader-panel pairs on {readers['n_nodules']} "
                     + (f"nodules): {name} of the reader {reader}, of the model {model}"
                        if "–" not in (reader, model) else
                        f"nodules): the {name} could not be measured (the panel's ratings on these pairs hold one "
                        "class only)"))
    lines.append(f"  [95% intervals: bootstrap over {'images' if what == 'images' else 'patients'}]")
    lines += [f"note: {n}" for n in rep.get("notes", [])]
    return "\n".join(lines)


def seen_in_training(cases: list, spec: ModelSpec | dict, bundle_folder: Path | None = None) -> tuple[dict, str] | None:
    """How many of ``cases`` the model has seen, and a note saying so, or None when none (or it cannot tell).

    LIDC: nodules of patients in the model's own split file (its fingerprint and seed must match the spec's) that
    are train or validation patients. Histology: images that nearly duplicate an image of the training folder the
    model was trained on (the histology data folder, checked by its fingerprint)."""
    spec = spec_dict(spec)
    from lungviz import paths
    from lungviz.data.splits import Split

    if spec.get("dataset") == "histology":
        from lungviz.data.cases import data_fingerprint
        from lungviz.data.histology import import_class_folders, leaked_cases
        from lungviz.data.labels import HISTOLOGY_CLASSES
        from lungviz.errors import LungvizError
        from training.splits import split_for

        try:
            trained_on, _ = import_class_folders(paths.histology_dir(), HISTOLOGY_CLASSES)
        except LungvizError:
            return None
        if data_fingerprint(trained_on) != spec.get("split_fingerprint"):
            return None
        n = len(leaked_cases(cases, split_for(trained_on, "histology").select(trained_on, "train")))
        if not n:
            return None
        return ({"near_duplicates_of_training_images": n},
                f"{n} of {len(cases)} images are, or nearly duplicate, images the model was trained on (the set's "
                "folders share neighbouring slices): figures on them are optimistic. --split test evaluates the test "
                "folder less those images.")
    split_file = holdout_file(bundle_folder)
    if not split_file.is_file():
        return None
    s = Split.load(split_file)
    if not spec.get("split_fingerprint") or not is_models_split(s, spec):
        return None
    where = [s.assignment.get(c.patient_id) for c in cases]
    seen = {"train": where.count("train"), "val": where.count("val")}
    if not any(seen.values()):
        return None
    return ({f"{k}_patients": v for k, v in seen.items()},
            f"{seen['train']} of {len(cases)} nodules are from patients the model was trained on and {seen['val']} "
            "from validation patients (early stopping and calibration used them, and the nodule model's estimate "
            "was fitted on them): figures on them are optimistic. --split test evaluates the held-out test "
            "patients only.")


def evaluate_bundle(
    bundle_folder: Path,
    name: str,
    data: str = "",
    split: str = "",
    predictions: str = "",
    n_boot: int = 1000,
    max_slices: int = 0,
    progress: bool = True,
) -> dict:
    """Evaluate a shipped model on every labelled nodule of a lidc-slices folder (or one saved split of it)."""
    import csv

    from lungviz.data.labels import get_scheme
    from lungviz.data.preprocess import DEFAULT_SPACING_MM, valid_spacing
    from lungviz.errors import LungvizError
    from training.datasets import load_cases

    if predictions and Path(predictions).is_dir():
        raise LungvizError(f"--predictions {predictions} is a folder; give a file name such as predictions.csv.")
    if max_slices < 0:
        raise LungvizError("--max-slices must be 0 (all of the central slices) or more.")
    spec = read_any_spec(Path(bundle_folder), name)
    if spec.get("task") == "nodule":
        raise LungvizError(f"'{name}' is the nodule model: evaluate its estimate as fused-binary, its score as "
                           "nodule-score, its characteristics with --task characteristics.")
    scheme = get_scheme(spec["task"])
    cases, report = load_cases(spec.get("dataset", "lidc"), data)
    if split:
        cases = select_split(cases, split, spec, Path(bundle_folder))
    pairs = scheme.labelled(cases)
    if not pairs:
        raise LungvizError(f"no nodule in {data or 'the data folder'} carries a label for task '{scheme.name}' "
                           f"({report.summary()}).")
    kept = [c for c, _ in pairs]
    y = np.array([lab for _, lab in pairs])
    store = SliceStore(kept, progress=progress)
    cal, raw, _ = calibrated_logits(Path(bundle_folder), name, store, np.arange(len(kept)), max_slices)
    calibration = calibration_of(spec)
    rep = report_from_logits(y, cal, raw, scheme, [c.patient_id for c in kept], [c.reader_scores for c in kept],
                             n_boot, calibration)
    rep = {"model": name, "task": scheme.name, "view": spec["view"], "data": data or "default",
           "split": split or "all", "import": report.summary(), **rep}
    notes = []
    unknown = [c for c in kept if valid_spacing(c.pixel_spacing_mm) is None]
    if unknown and spec.get("dataset", "lidc") == "lidc":
        notes.append(f"{len(unknown)} of {len(kept)} nodules have no pixel spacing in labels.csv (e.g. "
                     f"{unknown[0].case_id}): {DEFAULT_SPACING_MM} mm per pixel was assumed for them, which sets "
                     "the nodule view's field and the measured size.")
    seen = None if split == "test" else seen_in_training(kept, spec, Path(bundle_folder))
    if seen:
        rep["seen_in_training"] = seen[0]
        notes.append(seen[1])
    if notes:
        rep["notes"] = notes
    if predictions:
        P = metrics.softmax(cal)
        calls = metrics.decide(P, None if calibration is None else calibration.decision_bias)
        out = Path(predictions)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["patient_id", "nodule", *[f"p_{c}" for c in scheme.classes], "prediction", "truth"])
            for c, p, k, t in zip(kept, P, calls, y, strict=True):
                w.writerow([c.patient_id, c.nodule_id, *[f"{v:.5f}" for v in p], scheme.classes[int(k)],
                            scheme.classes[int(t)]])
    return rep
