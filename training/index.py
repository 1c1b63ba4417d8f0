"""Build the similar-case library index from a shipped model's penultimate layer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lungviz import paths
from lungviz.cases import Case
from lungviz.models import load_bundle
from lungviz.retrieval import build_index, precision_at_k
from lungviz.splits import Split
from training.data import SliceStore, view_config_from_spec
from training.datasets import load_cases
from training.evaluate import nodule_outputs


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


def build_library_index(model: str = "nodule-binary", data: str = "", out: str = "", max_slices: int = 5,
                        progress: bool = True) -> dict:
    """Embed every labelled nodule with ``model``; save ``index-<model>`` in weights/; report precision@5."""
    folder = paths.weights_dir()
    bundle = load_bundle(folder, model)
    cases, report = load_cases("lidc", data)
    cases = [c for c in cases if c.malignancy is not None]
    split = Split.load(folder / "splits" / "holdout.json")
    split.check(cases)
    store = SliceStore(cases, progress=progress)
    vc = view_config_from_spec(bundle.spec)
    _, emb = nodule_outputs(bundle.model, store, np.arange(len(cases)), vc, bundle.device, max_slices)
    root = Path(data) if data else paths.lidc_slices_dir()
    records = [case_record(c, split.assignment[c.patient_id], root, c.middle_index()) for c in cases]
    index = build_index(emb, records, model)
    out_dir = Path(out) if out else folder
    ipath, mpath = index.save(out_dir, f"index-{model}")
    sp = np.array([r["split"] for r in records])
    lab = np.array([r["malignant"] for r in records])
    p5 = precision_at_k(emb[sp == "test"], lab[sp == "test"], emb[sp == "train"], lab[sp == "train"], 5)
    base = float(np.mean(lab[sp == "train"] == 1) ** 2 + np.mean(lab[sp == "train"] == 0) ** 2)
    result = {"model": model, "n": len(records), "dim": index.dim, "index": ipath.name, "metadata": mpath.name,
              "n_test_queries": int((sp == "test").sum()), "n_train_library": int((sp == "train").sum()),
              "precision_at_5_test_vs_train": p5, "chance_precision_at_5": base}
    (out_dir / "retrieval.json").write_text(json.dumps(result, indent=1) + "\n")
    return {"import": report.summary(), **result}
