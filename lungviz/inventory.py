"""What is installed: the data folder's contents, the shipped model bundles, their reference predictions and the
model card (for the app and CLI)."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from lungviz import paths
from lungviz.errors import LungvizError
from lungviz.fusion import SIZE_FEATURE, SIZE_SOURCES, component_networks, fused_models_words
from lungviz.shape import feature_groups_text


@dataclass(frozen=True)
class DataStatus:
    """Which data sets were found in the data folder."""

    folder: Path
    exists: bool
    lidc_slices_patients: int
    lidc_labels: bool
    lidc_dicom_series: int
    histology_images: int


def data_status(folder: Path | None = None) -> DataStatus:
    """Count what the data folder holds, cheaply (no image is read)."""
    root = Path(folder) if folder else paths.data_dir()
    slices = root / "lidc-slices"
    dicom = root / "lidc-dicom"
    hist = root / "chest-ct-histology"
    return DataStatus(
        folder=root,
        exists=root.is_dir(),
        lidc_slices_patients=sum(1 for d in slices.glob("LIDC-IDRI-*") if d.is_dir()) if slices.is_dir() else 0,
        lidc_labels=(slices / "labels.csv").is_file(),
        lidc_dicom_series=sum(1 for d in dicom.iterdir() if d.is_dir()) if dicom.is_dir() else 0,
        histology_images=sum(1 for p in hist.rglob("*") if p.is_file()) if hist.is_dir() else 0,
    )


def installed_models(folder: Path | None = None) -> list[dict]:
    """The JSON specs of model bundles and fusion specs (``fused-*.json``, ``"kind": "fusion"``) in the weights
    folder, weights not loaded. Each gets ``_file``, ``_kind`` ("bundle" or "fusion") and ``_weights_present``
    (a fusion's: every component's weights)."""
    root = Path(folder) if folder else paths.weights_dir()
    out = []
    for spec_path in sorted(root.glob("*.json")):
        try:
            spec = json.loads(spec_path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(spec, dict):
            continue
        if "arch" in spec:
            present = (root / f"{spec_path.stem}.safetensors").is_file()
            out.append({**spec, "_file": spec_path.name, "_kind": "bundle", "_weights_present": present})
        elif spec.get("kind") == "fusion":
            try:
                nets = component_networks(spec)
            except LungvizError:  # damaged: listed, never usable
                nets = {}
            parts = [n for group in nets.values() for n in group]
            present = bool(parts) and all((root / f"{c}.safetensors").is_file() for c in parts)
            out.append({**spec, "_file": spec_path.name, "_kind": "fusion", "_weights_present": present,
                        "_networks": nets})
    return out


@dataclass(frozen=True)
class ReferencePredictions:
    """A model's saved predictions on its held-out test nodules (``weights/reference/<model>-<split>.csv``)."""

    model: str
    split: str
    classes: tuple[str, ...]
    rows: tuple[dict, ...]  # case_id, patient_id, nodule, probs {class: p}, prediction, truth

    def probabilities(self, cls: str = "malignant") -> list[float]:
        """Each nodule's probability of ``cls``, in file order."""
        return [r["probs"][cls] for r in self.rows]

    def truths(self) -> list[str]:
        return [r["truth"] for r in self.rows]

    def correct_by_case(self) -> dict[str, bool]:
        """``{case_id: prediction == truth}``."""
        return {r["case_id"]: r["prediction"] == r["truth"] for r in self.rows}


def reference_predictions(model: str = "fused-binary", split: str = "test",
                          folder: Path | None = None) -> ReferencePredictions | None:
    """Read the predictions ``python -m training evaluate --predictions`` wrote; None when not installed."""
    root = Path(folder) if folder else paths.weights_dir()
    path = root / "reference" / f"{model}-{split}.csv"
    if not path.is_file():
        return None
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            classes = tuple(c[2:] for c in columns if c.startswith("p_"))
            missing = [c for c in ("patient_id", "nodule", "prediction", "truth") if c not in columns]
            if missing or not classes:
                lacking = ", ".join(missing or ["p_<class>"])
                raise LungvizError(f"the reference predictions lack the column(s) {lacking}.", source=path)
            rows = tuple(
                {"case_id": f"{r['patient_id']}/{r['nodule']}", "patient_id": r["patient_id"], "nodule": r["nodule"],
                 "probs": {c: float(r[f"p_{c}"]) for c in classes}, "prediction": r["prediction"],
                 "truth": r["truth"]}
                for r in reader
            )
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, TypeError) as err:
        raise LungvizError(f"the reference predictions cannot be read ({err}).", source=path) from err
    return ReferencePredictions(model, split, classes, rows)


_MD_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def card_parts(markdown: str, base: Path) -> list[tuple[str, str]]:
    """Split a model card into ``("markdown", text)`` and ``("image", path)`` parts, in order.

    Streamlit's markdown cannot show a local image, so each ``![alt](figures/x.png)`` becomes its own part with
    the path resolved against ``base`` (the weights folder); a missing figure becomes a ``("missing", path)`` part.
    """
    parts: list[tuple[str, str]] = []
    pos = 0
    for m in _MD_IMAGE.finditer(markdown):
        text = markdown[pos : m.start()]
        if text.strip():
            parts.append(("markdown", text))
        target = m.group(2)
        path = (Path(base) / target).resolve()
        if target.startswith(("http://", "https://")):
            parts.append(("markdown", m.group(0)))
        else:
            parts.append(("image" if path.is_file() else "missing", str(path)))
        pos = m.end()
    if markdown[pos:].strip():
        parts.append(("markdown", markdown[pos:]))
    return parts


def model_card(folder: Path | None = None) -> list[tuple[str, str]] | None:
    """The weights folder's model card (``README.md``) as :func:`card_parts`; None when there is none."""
    root = Path(folder) if folder else paths.weights_dir()
    path = root / "README.md"
    if not path.is_file():
        return None
    return card_parts(path.read_text(encoding="utf-8"), root)


def read_result(name: str, folder: Path | None = None) -> dict | None:
    """A result file a training command wrote into the weights folder (``retrieval.json``, ``cam_localisation.json``,
    ``screen.json``, ``cv.json``), or None when it is missing or unreadable."""
    path = (Path(folder) if folder else paths.weights_dir()) / name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


#: Bundle names as the page calls the models where they differ.
MODEL_WORDS = {"nodule": "nodule model's"}


def map_localisation_note(model: str, folder: Path | None = None, layer: str | None = "") -> str | None:
    """One sentence on how well ``model``'s Grad-CAM finds the nodule on the test split (from ``camloc``: centred
    and shifted views), or None; also None when ``layer`` (the model's current CAM layer; "" = do not check) is not
    the layer measured."""
    r = ((read_result("cam_localisation.json", folder) or {}).get("models") or {}).get(model)
    keys = ("n", "peak_inside", "mass_inside", "mask_area")
    if not isinstance(r, dict) or not all(isinstance(r.get(v), dict) and all(k in r[v] for k in keys)
                                          for v in ("centred", "shifted")):
        return None
    if layer != "" and r.get("layer") != layer:
        return None
    c, s = r["centred"], r["shifted"]
    prior_c, prior_s = c["centre_prior"]["peak_inside"], s["centre_prior"]["peak_inside"]
    label = MODEL_WORDS.get(model, model)
    return (f"On {c['n']} test nodules the {label} Grad-CAM peaked inside the readers' outline in "
            f"{c['peak_inside']:.0%}, and in {s['peak_inside']:.0%} with the nodule moved off the view's centre "
            f"(a map fixed at the centre: {prior_c:.0%} and {prior_s:.0%}): read the map as the region the model "
            "used, not as the nodule's outline.")


def map_localisation_text(folder: str | Path, models, views: list[str]) -> str:
    """How well each shown view's Grad-CAM found the nodule on the test split (for the layer its binary network of
    ``models``, a :class:`lungviz.predict.ModelSet`, uses now), one sentence per view; "" when none was measured."""
    notes = []
    for view in views:
        b = models.bundle(view, "binary")
        if b is not None and (note := map_localisation_note(b.name, Path(folder), getattr(b, "cam_layer", ""))):
            notes.append(note)
    return " ".join(notes)


def fused_inputs(specs: list[dict]) -> dict[str, str]:
    """Per task of the fusion specs among ``specs`` that weigh image measurements, what they weigh in words:
    ``{"binary": "the nodule's diameter measured by the nodule outliner and its outline's shape and grey levels"}``."""
    out = {}
    for spec in specs:
        fusion = spec.get("fusion") if isinstance(spec, dict) else None
        features = [str(f) for f in (fusion or {}).get("features") or []] if isinstance(fusion, dict) else []
        if not features:
            continue
        by = SIZE_SOURCES.get(str(fusion.get("size_source", "finder")), "a measuring model")
        groups = feature_groups_text(features)
        out[str(spec.get("task"))] = ((f"the nodule's diameter measured by {by}" if SIZE_FEATURE in features else "")
                                      + (" and " if SIZE_FEATURE in features and groups else "")
                                      + (f"its outline's {groups}" if groups else ""))
    return out


def fused_inputs_text(specs: list[dict]) -> str | None:
    """One sentence saying which fused models weigh what the image measures (None when none does)."""
    parts = [f"{fused_models_words([t])} weighs {what}" for t, what in fused_inputs(specs).items()]
    if not parts:
        return None
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


def size_users(specs: list[dict], source: str | None) -> list[str]:
    """The tasks of the fusion specs among ``specs`` that weigh the size measured by ``source`` (a key of
    :data:`lungviz.fusion.SIZE_SOURCES`)."""
    return [str(s.get("task")) for s in specs if isinstance(s, dict) and isinstance(s.get("fusion"), dict)
            and SIZE_FEATURE in (s["fusion"].get("features") or [])
            and s["fusion"].get("size_source", "finder") == source]


def size_only_note(folder: Path | None = None) -> str | None:
    """One sentence comparing fused-binary with the image-measured size alone on the test split (from ``fuse``), or
    None when either figure is missing."""
    spec = read_result("fused-binary.json", folder) or {}
    size = ((spec.get("size_only_auroc") or {}).get("test")) or {}
    fused = ((spec.get("metrics") or {}).get("test") or {}).get("auroc")
    if not isinstance(size.get("auroc"), (int, float)) or not isinstance(fused, (int, float)):
        return None
    ci = (size.get("ci95") or {}).get("auroc") or ()
    interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if len(ci) == 2 else ""
    compare = ("as well as the fused benign/malignant model or better" if size["auroc"] >= fused
               else "less well than the fused benign/malignant model")
    return (f"On {size.get('n', '?')} test nodules this measured size alone separated benign from malignant "
            f"{compare} (AUROC {size['auroc']:.2f}{interval} against {fused:.2f}).")


def outline_features_note(features: list[str], folder: Path | None = None) -> str | None:
    """One sentence on what the outline ``features`` a fused model weighs were worth, from the check
    (``outline_features.json``) that measured that very set, or None when it did not (or they are none)."""
    res = read_result("outline_features.json", folder) or {}
    rows = {r.get("candidate"): r for r in res.get("results") or [] if isinstance(r, dict)}
    chosen = next((r for r in rows.values() if sorted(r.get("features") or []) == sorted(features)), None)
    size = rows.get("size")
    if not features or not chosen or not size or chosen is size:
        return None
    try:
        with_them, without = chosen["test_fused"]["auroc"], size["test_fused"]["auroc"]
        ci = chosen["test_fused"].get("difference_ci95") or (-1.0, 1.0)
        verdict = ("a gain test confirms" if ci[0] > 0 else "a loss on test" if ci[1] < 0
                   else "a difference test cannot tell from chance")
        return (f"They were chosen on validation (out-of-fold AUROC {size['val_oof_auroc_mean']:.3f} with the size "
                f"alone, {chosen['val_oof_auroc_mean']:.3f} with them); on {chosen['test_fused']['n']} test nodules "
                f"the fused model scored AUROC {with_them:.3f} with them, {without:.3f} without ({verdict}).")
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def diameter_note(folder: Path | None = None) -> str | None:
    """One sentence on how the fused model's measured diameter compares with the readers' on the test split, or
    None when not measured."""
    return diameter_sentence((read_result("fused-binary.json", folder) or {}).get("size_vs_readers_test"))


def diameter_sentence(size_vs_readers: list | None) -> str | None:
    """The sentence of :func:`diameter_note` from a fused spec's ``size_vs_readers_test`` bands."""
    bands = [b for b in size_vs_readers or [] if isinstance(b, dict) and b.get("n")]
    if not bands:
        return None

    def where(b: dict) -> str:
        if b.get("hi") is None:
            return "overall" if not b.get("lo") else f"above {b['lo']:.0f} mm"
        return f"below {b['hi']:.0f} mm" if not b.get("lo") else f"at {b['lo']:.0f}-{b['hi']:.0f} mm"

    overall = next((b for b in bands if b.get("hi") is None and not b.get("lo")), None)
    by_size = [b for b in bands if b is not overall]
    parts = ", ".join(f"{b['median']:.0%} {where(b)}" for b in by_size)
    head = f"On {overall['n']} test nodules its measurement was a median {overall['median']:.0%}" if overall else \
        "On the test nodules its measurement was a median"
    ratio = (overall or bands[0])["median"]
    verdict = "it reads small" if ratio < 0.9 else "it reads large" if ratio > 1.1 else "it reads about right"
    if len(by_size) > 1 and abs(by_size[-1]["median"] - by_size[0]["median"]) > 0.1:
        if verdict.endswith("about right"):  # right overall: say which sizes it misjudges
            off = [f"{'small' if b['median'] < 1 else 'large'} {where(b)}" for b in (by_size[0], by_size[-1])
                   if abs(b["median"] - 1.0) > 0.1]
            verdict += " overall" + (f", but {' and '.join(off)}" if off else "")
        else:
            verdict += ", most for large nodules" if (by_size[-1]["median"] < by_size[0]["median"]) == (ratio < 1) \
                else ", most for small nodules"
    return f"{head} of the readers' longest diameter ({parts}): {verdict}."
