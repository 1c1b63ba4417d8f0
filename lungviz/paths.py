"""Where things live: the data folder, the shipped weights and the user's home folder.

Every path in lungviz resolves here. ``LUNGVIZ_DATA`` overrides the data folder (default
``../shared/data`` next to the repository) and ``LUNGVIZ_HOME`` the folder the app writes to
(default ``~/.lungviz``).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The real-data folder (read-only input)."""
    env = os.environ.get("LUNGVIZ_DATA")
    return Path(env).expanduser().resolve() if env else (REPO_ROOT.parent / "shared" / "data").resolve()


def lidc_slices_dir() -> Path:
    """The LIDC-IDRI-slices layout folder inside the data folder."""
    return data_dir() / "lidc-slices"


def lidc_dicom_dir() -> Path:
    """The folder of LIDC DICOM series with reader XML."""
    return data_dir() / "lidc-dicom"


def lidc_diagnosis_csv() -> Path:
    """LIDC's patient-level diagnosis list (pathology or follow-up) inside the data folder."""
    return data_dir() / "lidc-diagnosis.csv"


def histology_dir() -> Path:
    """The 4-class chest CT folder-per-class set."""
    return data_dir() / "chest-ct-histology"


def weights_dir() -> Path:
    """Shipped model bundles, the retrieval index and model cards (in the repository)."""
    env = os.environ.get("LUNGVIZ_WEIGHTS")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "weights"


def home_dir(create: bool = True) -> Path:
    """Folder for files the app writes (review log, reports); ``LUNGVIZ_HOME`` overrides."""
    env = os.environ.get("LUNGVIZ_HOME")
    path = Path(env).expanduser() if env else Path.home() / ".lungviz"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir(create: bool = True) -> Path:
    """Scratch output of training runs, screens and logs (git-ignored)."""
    env = os.environ.get("LUNGVIZ_RUNS")
    path = Path(env).expanduser() if env else REPO_ROOT / "runs"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path
