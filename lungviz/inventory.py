"""What is installed: the data folder's contents and the shipped model bundles (for the app and CLI)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lungviz import paths


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
    """The JSON specs of model bundles in the weights folder (weights are not loaded)."""
    root = Path(folder) if folder else paths.weights_dir()
    out = []
    for spec_path in sorted(root.glob("*.json")):
        try:
            spec = json.loads(spec_path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(spec, dict) and "arch" in spec:
            present = (root / f"{spec_path.stem}.safetensors").is_file()
            spec = {**spec, "_file": spec_path.name, "_weights_present": present}
            out.append(spec)
    return out
