"""Map localisation (training.cam_eval): shifted views, the centre prior and ``camloc --data`` on a small folder."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import build_nodule_weights

from training.cam_eval import LocView, centre_prior, cut_view, score_map, shift_direction
from training.data import ViewConfig

REPO = Path(__file__).resolve().parents[1]
NODULE_VC = ViewConfig("nodule", 32, (0.5,), (0.5,), field_mm=32.0)
SLICE_VC = ViewConfig("slice", 32, (0.5,), (0.5,))


def _disc_context(side: int = 128, radius: float = 6.0) -> np.ndarray:
    r = np.arange(side) - (side - 1) / 2.0
    return (r[:, None] ** 2 + r[None, :] ** 2 <= radius**2).astype(np.float32)


def _centre_of_mass(a: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(a > 0.5)
    return np.array([rows.mean(), cols.mean()])


@pytest.mark.parametrize("vc", [NODULE_VC, SLICE_VC], ids=["nodule", "slice"])
def test_shifted_view_moves_the_nodule_by_the_share_of_the_view(vc):
    ctx = _disc_context()
    centred = cut_view(ctx, vc, 0.5, (0.0, 0.0), fill=0.0)
    assert np.allclose(_centre_of_mass(centred), (vc.input_size - 1) / 2.0, atol=0.6)
    shifted = cut_view(ctx, vc, 0.5, (0.25, -0.25), fill=0.0)  # the window moves down-left: the nodule up-right
    moved = _centre_of_mass(shifted) - _centre_of_mass(centred)
    assert np.allclose(moved, (-0.25 * vc.input_size, 0.25 * vc.input_size), atol=1.0)
    assert shifted.sum() == pytest.approx(centred.sum(), rel=0.05)  # the nodule stays whole inside the view


def test_shift_direction_is_a_fixed_unit_vector_per_nodule_and_seed():
    a = shift_direction("LIDC-IDRI-0001/nodule-0")
    assert a == shift_direction("LIDC-IDRI-0001/nodule-0")
    assert np.hypot(*a) == pytest.approx(1.0)
    assert a != shift_direction("LIDC-IDRI-0001/nodule-1") and a != shift_direction("LIDC-IDRI-0001/nodule-0", 1)
    angles = [np.arctan2(*shift_direction(f"P/nodule-{i}")) for i in range(200)]
    assert np.histogram(angles, bins=4, range=(-np.pi, np.pi))[0].min() > 30  # every direction is drawn


def _view(outline: np.ndarray) -> LocView:
    return LocView("x", np.zeros(outline.shape, np.float32), outline, outline, 1.0)


def test_centre_prior_hits_a_centred_nodule_and_misses_a_shifted_one():
    prior = centre_prior(32)
    assert np.unravel_index(np.argmax(prior), prior.shape) in {(15, 15), (15, 16), (16, 15), (16, 16)}
    centred = np.zeros((32, 32), bool)
    centred[12:20, 12:20] = True
    shifted = np.roll(centred, (8, 8), axis=(0, 1))
    peak, mass, area = score_map(prior, _view(centred))
    assert peak == 1.0 and mass > area  # better than chance on a centred nodule
    assert score_map(prior, _view(shifted))[0] == 0.0
    follows = np.zeros((32, 32), np.float32)
    follows[shifted] = 1.0  # a map that follows the nodule hits it wherever it is
    assert score_map(follows, _view(shifted))[:2] == (1.0, 1.0)


def _small_folder(root: Path, lidc_slices_dir: Path, cases: list[str]) -> Path:
    """A lidc-slices folder holding a few real nodules (links to the data, a reduced labels.csv)."""
    with open(lidc_slices_dir / "labels.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [r for r in reader if f"{r['patient_id']}/{r['nodule']}" in cases]
        columns = reader.fieldnames
    root.mkdir(parents=True)
    for pid in {c.split("/")[0] for c in cases}:
        (root / pid).symlink_to(lidc_slices_dir / pid, target_is_directory=True)
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, columns)
        w.writeheader()
        w.writerows(rows)
    return root


def test_camloc_cli_on_a_small_folder(app_weights, lidc_slices_dir, tmp_path):
    data = _small_folder(tmp_path / "slices", lidc_slices_dir, ["LIDC-IDRI-0001/nodule-0", "LIDC-IDRI-0003/nodule-1",
                                                                "LIDC-IDRI-0003/nodule-2"])
    out = subprocess.run([sys.executable, "-m", "training", "camloc", "--data", str(data), "--weights",
                          str(app_weights), "--models", "nodule,slice-binary", "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert set(rep["models"]) == {"nodule", "slice-binary"} and rep["split"] == "all"
    for r in rep["models"].values():
        for key in ("centred", "shifted"):
            b = r[key]
            assert b["n"] == 3
            assert 0.0 <= b["peak_inside"] <= 1.0 and 0.0 <= b["mass_inside"] <= 1.0 and 0.0 < b["mask_area"] < 1.0
        # a map fixed at the centre hits most centred nodules and misses them once they move
        assert r["centred"]["centre_prior"]["peak_inside"] >= 2 / 3
        assert r["shifted"]["centre_prior"]["peak_inside"] < r["centred"]["centre_prior"]["peak_inside"]
    bad = subprocess.run([sys.executable, "-m", "training", "camloc", "--data", str(data), "--weights",
                          str(app_weights), "--models", "absent"], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert bad.returncode == 2 and "no model 'absent'" in bad.stderr


@pytest.mark.slow
def test_characteristics_evaluation_cli(lidc_slices_dir, tmp_path):
    weights = build_nodule_weights(tmp_path / "w")
    data = _small_folder(tmp_path / "slices", lidc_slices_dir, ["LIDC-IDRI-0001/nodule-0", "LIDC-IDRI-0003/nodule-1",
                                                                "LIDC-IDRI-0003/nodule-2"])
    csv_out = tmp_path / "chars.csv"
    out = subprocess.run([sys.executable, "-m", "training", "evaluate", "--task", "characteristics", "--data",
                          str(data), "--weights", str(weights), "--json", "--predictions", str(csv_out)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    from lungviz.data.cases import CHARACTERISTICS

    assert rep["n"] == 3 and list(rep["characteristics"]) == list(CHARACTERISTICS)
    for r in rep["characteristics"].values():
        s = r["single_reader"]
        assert s["n_pairs"] >= 6 and {"model_qwk", "reader_qwk", "model_mae", "reader_mae"} <= set(s)
    with open(csv_out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["patient_id", "nodule", *CHARACTERISTICS] and len(rows) == 3
    scale = {"calcification": 6, "internalStructure": 4}
    assert all(1.0 <= float(row[h]) <= scale.get(h, 5) for row in rows for h in CHARACTERISTICS)
    est = subprocess.run([sys.executable, "-m", "training", "evaluate", "--model", "fused-binary", "--data", str(data),
                          "--weights", str(weights), "--json", "--n-boot", "20", "--predictions",
                          str(tmp_path / "estimate.csv")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert est.returncode == 0, est.stderr
    rep = json.loads(est.stdout)
    assert rep["n"] == 3 and rep["task"] == "binary" and 0.0 <= rep["second_look_call"]["sensitivity"] <= 1.0
    assert rep["model"] == "fused-binary"  # the outside name of the nodule model's estimate
    assert rep["second_look_call"]["calls_malignant_from"] == 0.12  # the spec's call point
    with open(tmp_path / "estimate.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    called = ["malignant" if float(r["p_malignant"]) >= 0.12 else "benign" for r in rows]
    assert [r["prediction"] for r in rows] == called and len(rows) == 3
    score = subprocess.run([sys.executable, "-m", "training", "evaluate", "--model", "nodule-score", "--data",
                            str(data), "--weights", str(weights), "--json", "--n-boot", "20", "--predictions",
                            str(tmp_path / "score.csv")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert score.returncode == 0, score.stderr
    rep = json.loads(score.stdout)
    assert rep["model"] == "nodule-score" and rep["task"] == "score" and rep["n"] == 3 and "qwk" in rep
    with open(tmp_path / "score.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[2:7] == ["p_1", "p_2", "p_3", "p_4", "p_5"] and len(rows) == 3
    bare = subprocess.run([sys.executable, "-m", "training", "evaluate", "--model", "nodule", "--data", str(data),
                           "--weights", str(weights), "--json"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bare.returncode == 2 and "fused-binary" in bare.stderr  # the bundle itself: says which name to use
    loc = subprocess.run([sys.executable, "-m", "training", "camloc", "--data", str(data), "--weights", str(weights),
                          "--models", "nodule", "--json"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert loc.returncode == 0, loc.stderr
    assert json.loads(loc.stdout)["models"]["nodule"]["layer"] == "gated"
