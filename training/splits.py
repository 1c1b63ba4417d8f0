"""The split each model trains and is measured on: by patient, the shipped one unless asked otherwise."""

from __future__ import annotations

from lungviz import paths
from lungviz.data.cases import Case, data_fingerprint
from lungviz.data.splits import Split, holdout_split


def split_for(cases: list[Case], dataset: str = "lidc", data: str = "", split_seed: int = 42) -> Split:
    """The split a model trains on: the histology set's own folders; for LIDC the shipped patient-level split
    (checked against this very data) unless another data folder or split seed is asked for."""
    if dataset == "histology":
        assignment = {c.patient_id: (c.split_hint or "train") for c in cases}
        return Split(assignment, data_fingerprint(cases), 0, "given", {"source": "folders"})
    saved = paths.weights_dir() / "splits" / "holdout.json"
    if saved.is_file() and not data:
        split = Split.load(saved)
        if split.seed == split_seed:
            split.check(cases)  # the shipped split must describe this very data
            return split
    return holdout_split(cases, seed=split_seed)


def without_train_duplicates(cases: list[Case], train_cases: list[Case]) -> list[Case]:
    """``cases`` less the images that nearly duplicate a training image (the histology set's folders share some)."""
    from lungviz.data.histology import leaked_cases

    leaked = leaked_cases(cases, train_cases)
    return [c for c in cases if c.case_id not in leaked]
