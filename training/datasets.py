"""Which cases a training command works on: the LIDC slices set or the histology folders."""

from __future__ import annotations

from pathlib import Path

from lungviz import paths
from lungviz.data.cases import Case, ImportReport
from lungviz.data.histology import import_class_folders
from lungviz.data.labels import HISTOLOGY_CLASSES
from lungviz.data.lidc import import_slices
from lungviz.errors import LungvizError


def load_cases(dataset: str = "lidc", data: str | Path = "") -> tuple[list[Case], ImportReport]:
    """Import ``lidc`` (a lidc-slices layout folder) or ``histology`` (folder-per-class) cases."""
    if dataset == "lidc":
        return import_slices(Path(data) if data else paths.lidc_slices_dir())
    if dataset == "histology":
        return import_class_folders(Path(data) if data else paths.histology_dir(), HISTOLOGY_CLASSES)
    raise LungvizError(f"unknown dataset '{dataset}'; choose lidc or histology.")
