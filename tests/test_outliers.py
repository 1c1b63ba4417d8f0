"""Outlier screening flags planted anomalies and writes its CSV and plots."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from lungviz.data.cases import Case
from lungviz.errors import LungvizError
from training.outliers import find_outliers, write_outputs


def _cases(n: int) -> list[Case]:
    return [Case(patient_id=f"P{i:03d}", nodule_id="nodule-0", source="test", malignancy=1 + i % 5,
                 reader_scores=(1 + i % 5,)) for i in range(n)]


def test_planted_outliers_are_flagged_and_written(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 16))
    for i in range(3):  # three cases far from the rest, each in its own direction
        x[i, i] += 15.0
    cases = _cases(120)
    res = find_outliers(x, [c.case_id for c in cases], contamination=0.03, n_components=8, seed=0)
    assert set(np.argsort(-res.scores)[:3]) == {0, 1, 2}
    assert res.flagged[:3].all() and res.n_flagged <= 6
    assert res.tsne.shape == (120, 2)
    files = write_outputs(res, cases, tmp_path, "test")
    rows = list(csv.DictReader(files["csv"].open()))
    assert len(rows) == 120 and {r["patient_id"] for r in rows[:3]} == {"P000", "P001", "P002"}
    assert rows[0]["flagged"] == "1"
    assert files["png"].stat().st_size > 1000 and files["html"].read_text().count("P000") >= 1


def test_outliers_reject_mismatched_input():
    with pytest.raises(LungvizError):
        find_outliers(np.zeros((5, 3)), ["a"] * 4)
    with pytest.raises(LungvizError):
        find_outliers(np.zeros((5, 3)), ["a"] * 5)  # too few cases
