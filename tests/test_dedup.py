"""Near-duplicate detection between folder-per-class splits."""

from __future__ import annotations

import numpy as np

from lungviz.data.cases import Case
from lungviz.data.histology import average_hash, leaked_cases


def _case(name: str, img: np.ndarray) -> Case:
    return Case(patient_id=name, nodule_id="image", source="test", slices=img[None].astype(np.float32))


def test_near_duplicates_are_found_and_distinct_images_are_not():
    rng = np.random.default_rng(0)
    base = rng.random((64, 64))
    other = rng.random((64, 64))
    shifted = np.clip(base + rng.normal(0, 0.01, base.shape), 0, 1)  # an adjacent-slice-like copy
    train = [_case("t0", base), _case("t1", rng.random((64, 64)))]
    test = [_case("q0", shifted), _case("q1", other), _case("q2", base.T)]
    assert leaked_cases(test, train) == {"q0/image"}
    assert leaked_cases([], train) == set()


def test_average_hash_is_scale_invariant():
    img = np.zeros((32, 32))
    img[:, 16:] = 1.0
    big = np.kron(img, np.ones((4, 4)))
    assert np.array_equal(average_hash(img), average_hash(big))
