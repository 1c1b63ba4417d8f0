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
    """The JSON specs of the model bundles in the weights folder, weights not loaded. Each gets ``_file``,
    ``_kind`` ("bundle") and ``_weights_present``."""
    root = Path(folder) if folder else paths.weights_dir()
    out = []
    for spec_path in sorted(root.glob("*.json")):
        try:
            spec = json.loads(spec_path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(spec, dict) and "arch" in spec:
            present = (root / f"{spec_path.stem}.safetensors").is_file()
            out.append({**spec, "_file": spec_path.name, "_kind": "bundle", "_weights_present": present})
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
    ``finder.json``), or None when it is missing or unreadable."""
    path = (Path(folder) if folder else paths.weights_dir()) / name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


#: Bundle names as the page calls the models where they differ.
MODEL_WORDS = {"nodule": "nodule model's"}


#: A map is shown by default when its Grad-CAM peaked inside the readers' outline on at least this share of the
#: shifted test views (``camloc``); below it, the page hides it until asked.
MAP_SHOWN_FROM = 0.5


def _cam_record(model: str, folder: Path | None, layer: str | None) -> dict | None:
    """``model``'s record in ``cam_localisation.json`` when complete and measured at ``layer`` ("" = any)."""
    r = ((read_result("cam_localisation.json", folder) or {}).get("models") or {}).get(model)
    keys = ("n", "peak_inside", "mass_inside", "mask_area")
    if not isinstance(r, dict) or not all(isinstance(r.get(v), dict) and all(k in r[v] for k in keys)
                                          for v in ("centred", "shifted")):
        return None
    return r if layer == "" or r.get("layer") == layer else None


def map_finds_nodule(model: str, folder: Path | None = None, layer: str | None = "") -> bool | None:
    """Whether ``model``'s Grad-CAM peaked inside the readers' outline on at least :data:`MAP_SHOWN_FROM` of the
    shifted test views; None when not measured (for this layer)."""
    r = _cam_record(model, folder, layer)
    return None if r is None else bool(r["shifted"]["peak_inside"] >= MAP_SHOWN_FROM)


def map_hidden_note(label: str) -> str:
    """What the page says in place of a Grad-CAM that :func:`map_finds_nodule` judged to miss the nodule."""
    return f"The {label}'s Grad-CAM is hidden: it peaked on the nodule in under half of the test nodules."


def map_localisation_note(model: str, folder: Path | None = None, layer: str | None = "") -> str | None:
    """One sentence on how well ``model``'s Grad-CAM finds the nodule on the test split (from ``camloc``: centred
    and shifted views), or None; also None when ``layer`` (the model's current CAM layer; "" = do not check) is not
    the layer measured."""
    r = _cam_record(model, folder, layer)
    if r is None:
        return None
    c, s = r["centred"], r["shifted"]
    prior_c, prior_s = c["centre_prior"]["peak_inside"], s["centre_prior"]["peak_inside"]
    label = MODEL_WORDS.get(model, model)
    return (f"On {c['n']} test nodules the {label} Grad-CAM peaked inside the readers' outline in "
            f"{c['peak_inside']:.0%}, and in {s['peak_inside']:.0%} with the nodule moved off the view's centre "
            f"(a map fixed at the centre: {prior_c:.0%} and {prior_s:.0%}): read the map as the region the model "
            "used, not as the nodule's outline.")


def map_localisation_text(folder: str | Path, models, views: list[str]) -> str:
    """How well each shown view's Grad-CAM found the nodule on the test split (for the layer its network of
    ``models``, a :class:`lungviz.inference.predict.ModelSet`, uses now), one sentence per view; "" when none was
    measured."""
    notes = []
    for view in views:
        b = models.nodule if view == "nodule" else models.bundle(view, "binary")
        if b is not None and (note := map_localisation_note(b.name, Path(folder), getattr(b, "cam_layer", ""))):
            notes.append(note)
    return " ".join(notes)
