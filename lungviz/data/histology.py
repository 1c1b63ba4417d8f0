"""Folder-per-class image sets (``train/ valid/ test/ <class>/``) -> case records.

Class folder names often differ between splits (``adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib`` in
``train/``, ``adenocarcinoma`` in ``test/``): :func:`normalise_class_name` maps both to one class.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lungviz.data.cases import Case, ImportReport
from lungviz.data.io import IMAGE_SUFFIXES
from lungviz.errors import LungvizError

SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "val", "val": "val", "validation": "val",
                 "test": "test", "testing": "test"}


def normalise_class_name(folder: str, known: Sequence[str] = ()) -> str:
    """``'Large cell carcinoma_left.hilum_T2'`` -> ``'large.cell.carcinoma'``; matched to ``known`` when given."""
    base = folder.split("_")[0].strip().lower()
    base = re.sub(r"[\s\-]+", ".", base).strip(".")
    if not base:  # '_x': no class before the first underscore; keep the whole name
        base = re.sub(r"[\s\-_]+", ".", folder.strip().lower()).strip(".")
    for k in known:  # whole words only: 'large' matches 'large.cell.carcinoma', 'a' or 'n' match nothing
        if base == k or base.startswith(k + ".") or k.startswith(base + "."):
            return k
    return base


def import_class_folders(root: Path, classes: Sequence[str] = ()) -> tuple[list[Case], ImportReport]:
    """Import a folder-per-class set. Split folders become ``split_hint``; each image is one case.

    Images carry no patient identity here, so each image is its own "patient"; the given split folders
    are the only safe split.
    """
    root = Path(root)
    if not root.is_dir():
        raise LungvizError("the image folder was not found.", source=root)
    split_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower() in SPLIT_ALIASES]
    layout = [(SPLIT_ALIASES[d.name.lower()], d) for d in split_dirs] or [(None, root)]
    cases: list[Case] = []
    skipped: list[tuple[str, str]] = []
    for split, sdir in layout:
        for cdir in sorted(d for d in sdir.iterdir() if d.is_dir()):
            label = normalise_class_name(cdir.name, classes)
            if classes and label not in classes:
                skipped.append((str(cdir), f"class folder '{cdir.name}' matches none of {', '.join(classes)}"))
                continue
            files = [p for p in sorted(cdir.iterdir()) if p.is_file()]
            stems = Counter(p.stem for p in files if p.suffix.lower() in IMAGE_SUFFIXES)
            for img in files:
                if img.suffix.lower() not in IMAGE_SUFFIXES:
                    skipped.append((str(img), f"not an image file ({img.suffix or 'no extension'})"))
                    continue
                # 'x.png' and 'x.jpg' side by side stay two cases with two ids
                ident = f"{split or 'all'}-{label}-{img.stem if stems[img.stem] == 1 else img.name}"
                cases.append(Case(patient_id=ident, nodule_id="image", source="class-folder",
                                  image_paths=(img,), histology=label, split_hint=split,
                                  extra={"class_folder": cdir.name}))
    if not cases:
        raise LungvizError("no images were found in class folders.", source=root)
    return cases, ImportReport(len(cases), tuple(skipped))


def average_hash(image: np.ndarray, size: int = 16) -> np.ndarray:
    """A perceptual hash: the ``size x size`` thumbnail thresholded at its median, as a flat bool vector."""
    from lungviz.data.preprocess import pad_to_square, resize

    thumb = resize(pad_to_square(np.asarray(image, np.float32)), size)
    return (thumb > np.median(thumb)).ravel()


def leaked_cases(cases: Sequence[Case], reference: Sequence[Case], max_distance: int = 8) -> set[str]:
    """Case ids in ``cases`` whose image nearly duplicates one in ``reference`` (hash Hamming distance
    <= ``max_distance`` of 256 bits): adjacent slices of one patient often sit in different folders of
    folder-per-class sets, which would inflate test figures."""
    if not cases or not reference:
        return set()
    a = np.array([average_hash(c.load_slice(0)) for c in cases])
    b = np.array([average_hash(c.load_slice(0)) for c in reference])
    dist = (a[:, None, :] != b[None, :, :]).sum(-1)
    return {c.case_id for c, d in zip(cases, dist.min(axis=1), strict=True) if d <= max_distance}
