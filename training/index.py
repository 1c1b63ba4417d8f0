"""Build the similar-case library index (and its thumbnail atlas) from a shipped model, and measure its retrieval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lungviz import paths
from lungviz.atlas import atlas_path, build_atlas, save_atlas
from lungviz.data.cases import Case
from lungviz.data.splits import Split
from lungviz.inference.nodule import read_slices, reading_embedding
from lungviz.inference.predict import view_image
from lungviz.models import Bundle, NoduleNet, load_bundle
from lungviz.retrieval import build_index, precision_at_k
from training.data import SliceStore, central_slices, view_config_from_spec
from training.datasets import load_cases
from training.evaluate import nodule_outputs

#: The model the shipped index embeds with.
INDEX_MODEL = "nodule"


def index_name(model: str) -> str:
    """The index's file stem in weights/ (``index-<model>``)."""
    return f"index-{model}"


def case_record(case: Case, split: str, data_root: Path, middle_index: int) -> dict:
    """What the app shows about a library case (image paths relative to the data folder)."""
    rel = [str(Path(p).relative_to(data_root)) if Path(p).is_relative_to(data_root) else str(p)
           for p in case.image_paths]
    return {
        "case_id": case.case_id, "patient_id": case.patient_id, "nodule": case.nodule_id, "split": split,
        "malignancy": case.malignancy, "malignant": case.malignant, "malignancy_median": case.malignancy_median,
        "reader_scores": list(case.reader_scores), "n_readers": case.n_readers,
        "diameter_mm": case.diameter_mm, "pixel_spacing_mm": case.pixel_spacing_mm, "n_slices": case.n_slices,
        "characteristics": case.characteristics, "label_check": case.label_check, "images": rel,
        "middle_index": middle_index,
    }


def nodule_library(bundle: Bundle, store: SliceStore, middles: list[int], max_slices: int
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per case, the nodule model's retrieval embedding ``(N, D)`` over the central share of its slices (thinned to
    ``max_slices``) and its view of the middle slice ``(S, S)``, each slice read as the app reads an upload
    (:func:`lungviz.inference.nodule.read_slices`: the view's field follows the nodule)."""
    central = float(bundle.spec.preprocessing.get("central_fraction", 0.5))
    wanted = [(ci, k) for ci in range(len(store)) for k in central_slices(store.n_slices(ci), max_slices, central)]
    wanted += [(ci, k) for ci, k in enumerate(middles)]
    readings = read_slices(bundle, [store.slice01(ci, k) for ci, k in wanted],
                           [store.cases[ci].pixel_spacing_mm for ci, _ in wanted])
    n_central = len(wanted) - len(middles)
    per_case: dict[int, list] = {}
    for (ci, _), r in zip(wanted[:n_central], readings[:n_central], strict=True):
        per_case.setdefault(ci, []).append(r)
    emb = np.stack([reading_embedding(per_case[ci]) for ci in range(len(store))])
    return emb, [r.view for r in readings[n_central:]]


def classifier_library(bundle: Bundle, store: SliceStore, middles: list[int], max_slices: int
                       ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per case, a classifier's penultimate-layer embedding (mean over its central slices) and its view of the
    middle slice."""
    vc = view_config_from_spec(bundle.spec)
    _, emb = nodule_outputs(bundle.model, store, np.arange(len(store)), vc, bundle.device, max_slices)
    views = [view_image(bundle.spec, store.slice01(ci, k), None, store.cases[ci].pixel_spacing_mm)
             for ci, k in enumerate(middles)]
    return emb, views


def retrieval_figures(emb: np.ndarray, splits: np.ndarray, labels: np.ndarray, k: int = 5) -> dict:
    """Precision@``k`` (same benign/malignant panel label) of each held-out split's nodules queried against the
    train library, with the chance level (the train library's label mix) and the number of queries."""
    lib = splits == "train"
    chance = float(np.mean(labels[lib] == 1) ** 2 + np.mean(labels[lib] == 0) ** 2)
    out: dict = {"n_train_library": int(lib.sum()), f"chance_precision_at_{k}": chance}
    for split in ("val", "test"):
        q = splits == split
        out[f"n_{split}_queries"] = int(q.sum())
        out[f"precision_at_{k}_{split}_vs_train"] = precision_at_k(emb[q], labels[q], emb[lib], labels[lib], k)
    return out


def build_library_index(model: str = INDEX_MODEL, data: str = "", out: str = "", max_slices: int = 5,
                        progress: bool = True) -> dict:
    """Embed every labelled nodule with ``model``; save ``index-<model>`` and its thumbnail atlas in weights/ (or
    ``out``); write ``retrieval.json`` (precision@5 of validation and test queries against the train library)."""
    folder = Path(out) if out else paths.weights_dir()  # the model embeds from the folder the index is written to
    bundle = load_bundle(folder, model)
    cases, report = load_cases("lidc", data)
    cases = [c for c in cases if c.malignancy is not None]
    split_file = folder / "splits" / "holdout.json"
    split = Split.load(split_file if split_file.is_file() else paths.weights_dir() / "splits" / "holdout.json")
    split.check(cases)
    store = SliceStore(cases, progress=progress)
    middles = [c.middle_index() for c in cases]
    nodule = isinstance(bundle.model, NoduleNet)
    emb, views = (nodule_library if nodule else classifier_library)(bundle, store, middles, max_slices)
    root = Path(data) if data else paths.lidc_slices_dir()
    records = [case_record(c, split.assignment[c.patient_id], root, m) for c, m in zip(cases, middles, strict=True)]
    index = build_index(emb, records, model)
    out_dir = folder
    name = index_name(model)
    ipath, mpath = index.save(out_dir, name)
    apath = save_atlas(build_atlas([r["case_id"] for r in records], views,
                                   f"the {model} model's view of each case's middle slice (largest reader outline)"),
                       atlas_path(out_dir, name))
    embedding = ("the pooled features its heads read, gated by its own outline, L2-normalised per slice and averaged "
                 "over the central slices" if nodule else "penultimate layer, L2-normalised, averaged over the "
                 "central slices")
    result = {"model": model, "n": len(records), "dim": index.dim, "index": ipath.name, "metadata": mpath.name,
              "embedding": embedding, "atlas": apath.name, "atlas_bytes": apath.stat().st_size,
              **retrieval_figures(emb, np.array([r["split"] for r in records]),
                                  np.array([r["malignant"] for r in records]))}
    (out_dir / "retrieval.json").write_text(json.dumps(result, indent=1) + "\n")
    return {"import": report.summary(), **result}
