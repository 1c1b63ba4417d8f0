"""Patient-level splits (holdout and k-fold) and label schemes."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from lungviz.data.cases import Case, by_patient, data_fingerprint
from lungviz.data.labels import HISTOLOGY_CLASSES, SCHEMES, get_scheme
from lungviz.data.splits import Split, holdout_split, patient_stratum
from lungviz.errors import LungvizError

SPLITS = ("train", "val", "test")


def _case(pid: str, nid: str = "n0", malignancy: int | None = None, histology: str | None = None) -> Case:
    scores = () if malignancy is None else (malignancy,)
    return Case(patient_id=pid, nodule_id=nid, source="test", malignancy=malignancy, reader_scores=scores,
                histology=histology)


def _synthetic(n_patients: int, seed: int = 0) -> list[Case]:
    """Patients with 1-4 nodules scored 1-5 at random."""
    rng = np.random.default_rng(seed)
    return [_case(f"P{p:03d}", f"n{k}", int(rng.integers(1, 6))) for p in range(n_patients)
            for k in range(int(rng.integers(1, 5)))]


def _malignant_rate(cases) -> float:
    return float(np.mean([c.malignant for c in cases]))


# ================================================================================================ holdout (real)


@pytest.fixture(scope="module")
def real_cases(real_lidc):
    return real_lidc[0]


@pytest.fixture(scope="module")
def real_split(real_cases):
    return holdout_split(real_cases)


def test_holdout_every_patient_in_exactly_one_split(real_cases, real_split):
    patients = {c.patient_id for c in real_cases}
    assert set(real_split.assignment) == patients
    assert set(real_split.assignment.values()) == set(SPLITS)
    sets = [real_split.patients(name) for name in SPLITS]
    assert sum(len(s) for s in sets) == len(patients)
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    selected = [real_split.select(real_cases, name) for name in SPLITS]
    assert sum(len(s) for s in selected) == len(real_cases)
    for name, cases in zip(SPLITS, selected, strict=True):
        assert {c.patient_id for c in cases} <= real_split.patients(name)  # no patient's nodules leak across


def test_holdout_sizes_are_70_15_15_by_patient(real_split):
    n = len(real_split.assignment)
    sizes = Counter(real_split.assignment.values())
    assert sizes["test"] == round(0.15 * n) and sizes["val"] == round(0.30 * n) - round(0.15 * n)
    for name, fraction in zip(SPLITS, (0.70, 0.15, 0.15), strict=True):
        assert abs(sizes[name] / n - fraction) < 0.005


@pytest.mark.parametrize("seed", [42, 0, 1, 2, 3])
def test_holdout_keeps_the_malignant_rate_and_score_mix(real_cases, seed):
    split = holdout_split(real_cases, seed=seed)
    overall = _malignant_rate(real_cases)
    overall_mix = np.bincount([c.malignancy for c in real_cases], minlength=6)[1:] / len(real_cases)
    for name in SPLITS:
        part = split.select(real_cases, name)
        assert abs(_malignant_rate(part) - overall) <= 0.03, (name, _malignant_rate(part), overall)
        mix = np.bincount([c.malignancy for c in part], minlength=6)[1:] / len(part)
        assert np.abs(mix - overall_mix).max() <= 0.07, (name, mix, overall_mix)  # each score's share, +-7 points
        # by patient, too: the share of patients with a malignant nodule
        groups = by_patient(part)
        share = np.mean([max(c.malignant for c in g) for g in groups.values()])
        overall_share = np.mean([max(c.malignant for c in g) for g in by_patient(real_cases).values()])
        assert abs(share - overall_share) <= 0.03


def test_holdout_is_deterministic(real_cases, real_split):
    again = holdout_split(list(reversed(real_cases)), seed=42)  # input order does not matter
    assert again.assignment == real_split.assignment
    other = holdout_split(real_cases, seed=7)
    changed = sum(other.assignment[p] != s for p, s in real_split.assignment.items())
    assert changed > 0.2 * len(real_split.assignment)


def test_split_save_load_round_trip(real_cases, real_split, tmp_path):
    path = real_split.save(tmp_path / "nested" / "split.json")
    loaded = Split.load(path)
    assert loaded.assignment == real_split.assignment
    assert (loaded.fingerprint, loaded.seed, loaded.kind, loaded.params) == (
        data_fingerprint(real_cases), 42, "holdout", {"fractions": [0.70, 0.15, 0.15]})
    loaded.check(real_cases)  # same data: no error
    assert json.loads(path.read_text())["fingerprint"] == real_split.fingerprint


def test_split_check_detects_other_data(real_cases, real_split):
    fewer = real_cases[1:]
    with pytest.raises(LungvizError, match="fingerprint"):
        real_split.check(fewer)
    relabelled = [Case(**{**c.__dict__, "malignancy": 1}) if i == 0 else c for i, c in enumerate(real_cases)]
    with pytest.raises(LungvizError, match=real_split.fingerprint):
        real_split.check(relabelled)


# ================================================================================================ holdout (synthetic)


@pytest.mark.parametrize("n_patients", [4, 10, 20, 37, 100])
def test_holdout_small_data_still_has_val_and_test(n_patients):
    cases = _synthetic(n_patients)
    sizes = Counter(holdout_split(cases).assignment.values())
    assert sum(sizes.values()) == n_patients
    for name, fraction in (("val", 0.15), ("test", 0.15)):
        assert abs(sizes[name] - fraction * n_patients) <= 1.0, sizes
        assert sizes[name] >= 1


def test_holdout_custom_fractions():
    cases = [_case(f"P{i:02d}", malignancy=1 + i % 5) for i in range(40)]
    sizes = Counter(holdout_split(cases, fractions=(0.5, 0.25, 0.25)).assignment.values())
    assert sizes == {"train": 20, "val": 10, "test": 10}
    assert Counter(holdout_split(cases, fractions=(1.0, 0.0, 0.0)).assignment.values()) == {"train": 40}


@pytest.mark.parametrize("fractions", [(0.7, 0.2, 0.2), (0.8, 0.3, -0.1), (0.5, 0.25, 0.2)])
def test_holdout_invalid_fractions(fractions):
    with pytest.raises(LungvizError, match="fractions"):
        holdout_split(_synthetic(10), fractions=fractions)


def test_select_refuses_unknown_patients():
    cases = _synthetic(10)
    split = holdout_split(cases)
    with pytest.raises(LungvizError, match="not in this split file"):
        split.select([*cases, _case("NEW")], "train")
    assert split.select(cases, ["train", "val", "test"]) == cases


STRATUM_CASES = [
    ([_case("p", malignancy=2), _case("p", malignancy=5)], 5),
    ([_case("p", malignancy=3)], 3),
    ([_case("p")], 0),
    ([_case("p", histology="normal")], None),  # a histology class: its own stratum >= 10
]


@pytest.mark.parametrize("cases, expected", STRATUM_CASES)
def test_patient_stratum(cases, expected):
    stratum = patient_stratum(cases)
    assert stratum == expected if expected is not None else stratum >= 10


# ================================================================================================ split files

SPLIT_FILE_INVALID = [
    ("not json", "not a lungviz split file"),
    ("[1, 2, 3]", "not a lungviz split file"),
    ('{"assignment": {}, "fingerprint": "x", "kind": "holdout"}', "not a lungviz split file"),
    ('{"assignment": [], "fingerprint": "x", "seed": 1, "kind": "holdout"}', "not a lungviz split file"),
]


@pytest.mark.parametrize("text, words", SPLIT_FILE_INVALID)
def test_split_load_invalid(tmp_path, text, words):
    path = tmp_path / "split.json"
    path.write_text(text)
    with pytest.raises(LungvizError, match=words) as info:
        Split.load(path)
    assert str(path) in str(info.value)


def test_split_load_missing_or_folder(tmp_path):
    with pytest.raises(LungvizError, match="not found"):
        Split.load(tmp_path / "absent.json")
    with pytest.raises(LungvizError, match="cannot be read"):
        Split.load(tmp_path)


# ================================================================================================ k-fold


# ================================================================================================ label schemes

SCORED = [_case(f"P{s}", malignancy=s) for s in (1, 2, 3, 4, 5)] + [_case("P-none")]

#: (scheme, expected label per case of SCORED: scores 1..5 then an unscored case)
SCHEME_CASES = [
    ("binary", [0, 0, 0, 1, 1, None]),
    ("binary-no3", [0, 0, None, 1, 1, None]),
    ("score", [0, 1, 2, 3, 4, None]),
    ("histology", [None] * 6),
]


@pytest.mark.parametrize("name, expected", SCHEME_CASES)
def test_label_schemes_on_scores(name, expected):
    scheme = get_scheme(name)
    assert [scheme.label_of(c) for c in SCORED] == expected
    kept = scheme.labelled(SCORED)
    assert [y for _, y in kept] == [y for y in expected if y is not None]
    assert [c.case_id for c, _ in kept] == [c.case_id for c, y in zip(SCORED, expected, strict=True) if y is not None]


def test_histology_scheme():
    scheme = get_scheme("histology")
    cases = [_case(f"H{i}", histology=h) for i, h in enumerate((*HISTOLOGY_CLASSES, "fibrosis", None))]
    assert [scheme.label_of(c) for c in cases] == [0, 1, 2, 3, None, None]
    assert scheme.classes == ("adenocarcinoma", "large.cell.carcinoma", "squamous.cell.carcinoma", "normal")


SCHEME_META = [
    ("binary", 2, ("benign", "malignant"), False, 1),
    ("binary-no3", 2, ("benign", "malignant"), False, 1),
    ("score", 5, ("1", "2", "3", "4", "5"), True, None),
    ("histology", 4, HISTOLOGY_CLASSES, False, None),
]


@pytest.mark.parametrize("name, n_classes, classes, ordinal, positive", SCHEME_META)
def test_scheme_metadata(name, n_classes, classes, ordinal, positive):
    scheme = SCHEMES[name]
    assert (scheme.name, scheme.n_classes, scheme.classes, scheme.ordinal, scheme.positive_class) == (
        name, n_classes, classes, ordinal, positive)


def test_binary_scheme_agrees_with_the_case_on_real_data(real_cases):
    labelled = get_scheme("binary").labelled(real_cases)
    assert len(labelled) == len(real_cases)
    assert sum(y for _, y in labelled) == 462
    no3 = get_scheme("binary-no3").labelled(real_cases)
    assert len(no3) == len(real_cases) - 1032
    assert Counter(y for _, y in get_scheme("score").labelled(real_cases)) == {0: 285, 1: 457, 2: 1032, 3: 300, 4: 162}


def test_unknown_scheme():
    with pytest.raises(LungvizError, match="unknown label scheme 'ternary'"):
        get_scheme("ternary")
