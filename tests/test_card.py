"""The model card: the shipped card matches its records, reads in ten minutes, and puts each record's figures in
the right table cell (or says "not measured" when a record is missing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lungviz.errors import LungvizError
from training.card import CARD_FILE, TABLES_FILE, check_card, render, table, write_card
from training.config import CardConfig

SHIPPED = Path(__file__).resolve().parents[1] / "weights"
CARD_WORD_LIMIT = 3000


def _section(text: str, title: str) -> str:
    """The body of the ``## title`` section of a markdown document."""
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end >= 0 else None]


def _single_reader(model: float, reader: float) -> dict:
    return {"n_pairs": 40, "n_nodules": 12, "model_qwk": model, "reader_qwk": reader, "model_mae": 0.5,
            "reader_mae": 0.6, "ci95": {"model_qwk": [model - 0.1, model + 0.1], "reader_qwk": [reader - 0.1,
                                                                                             reader + 0.1]}}


def _auroc(v: float) -> dict:
    return {"n": 30, "auroc": v, "ci95": {"auroc": [v - 0.1, v + 0.05]}}


def _call(threshold: float, sens: float, spec: float, rule: str) -> dict:
    rates = {"sensitivity": sens, "specificity": spec, "ppv": 0.4, "npv": 0.95, "called_positive": 0.5}
    return {"target_sensitivity": 0.9, "rule": rule, "threshold": threshold, "val": dict(rates), "test": rates,
            "test_ci95": {k: [v - 0.1, min(v + 0.05, 1.0)] for k, v in rates.items()}}


def _nodule_spec() -> dict:
    factors = {"factors": ["size", "image"], "fit": {"C": 0.3, "signs": {"size": 1, "image": 1}},
               "model": {"names": ["size", "image"], "coef": [1.5, 0.25], "centre": [1.7, -2.0], "intercept": -2.0},
               "auroc": _auroc(0.911), "ece": 0.044,
               "paired_vs_readers_diameter": {"minus_readers_diameter": 0.021,
                                              "ci95": {"minus_readers_diameter": [-0.012, 0.054]}},
               "call": _call(0.064, 0.875, 0.625, "lower-bound"), "call_point_rule": _call(0.137, 0.8, 0.81, "point")}
    test = {"n": 30,
            "outline": {"dice": 0.771, "readers_pairwise_dice": 0.702, "readers_pairwise_dice_n": 12,
                        "dice_same_nodules": 0.79, "ci95": {"dice": [0.7, 0.8]}},
            "size": {"n_not_outlined": 0, "mae_long_axis_mm": 2.25, "mae_mean_axes_mm": 3.5,
                     "by_band": [{"band_mm": [0.0, 6.0], "n": 10, "mae_long_axis_mm": 1.04, "mae_mean_axes_mm": 1.6},
                                 {"band_mm": [20.0, None], "n": 20, "mae_long_axis_mm": 6.66,
                                  "mae_mean_axes_mm": 9.1}]},
            "malignant": {"auroc": _auroc(0.855), "single_reader": {}},
            "ratings": {"malignancy": {"levels": 5, "n": 30, "qwk": 0.7, "mae": 0.5, "ece": 0.04,
                                       "single_reader": _single_reader(0.733, 0.588)},
                        "margin": {"levels": 5, "n": 30, "qwk": 0.5, "mae": 0.6, "ece": 0.05,
                                   "single_reader": _single_reader(0.611, 0.422)},
                        "sphericity": {"levels": 5, "n": 30, "qwk": 0.2, "mae": 0.6, "ece": 0.05,
                                       "single_reader": _single_reader(0.211, 0.355)}}}
    return {"arch": "tiny+nodule", "input_size": 64, "classes": ["benign", "malignant"],
            "preprocessing": {"field_factor": 3.0, "field_mm_range": [16.0, 64.0], "context_px": 128},
            "training": {"n_train": 100, "n_val": 30, "n_test": 30, "device": "cpu", "train_seconds": 600},
            "metrics": {"test": test,
                        "estimate": {"n_val": 30, "n_test": 30, "readers_diameter": _auroc(0.872), "factors": factors},
                        "diagnosis": {"n_patients": 7, "n_cancer": 5, "n_benign": 2, "estimate": _auroc(0.6),
                                      "readers_panel_score": _auroc(0.8), "readers_diameter": _auroc(0.7)}}}


def _slice_spec(task: str) -> dict:
    t = {"n": 30, "auroc": 0.777, "qwk": 0.444, "sensitivity": 0.6, "specificity": 0.8, "ece": 0.02, "ece_raw": 0.1,
         "ci95": {"auroc": [0.7, 0.85], "qwk": [0.3, 0.5]}, "confusion": [[10, 5], [5, 10]],
         "reliability": [{"lo": 0.5, "hi": 0.6, "n": 30, "confidence": 0.55, "accuracy": 0.5}]}
    if task == "score":
        t["readers"] = {"n_pairs": 40, "model_qwk": 0.41, "reader_qwk": 0.59, "model_exact": 0.4,
                        "reader_exact": 0.45}
    else:
        t["readers"] = {"n_pairs": 40, "model_auroc": 0.75, "reader_auroc": 0.74}
    return {"arch": "tiny", "input_size": 64, "task": task, "classes": ["benign", "malignant"], "temperature": 2.0,
            "metrics": {"test": t}}


def _cam() -> dict:
    def block(peak: float, prior: float) -> dict:
        return {"n": 28, "peak_inside": peak, "mass_inside": 0.6, "mask_area": 0.2, "nodule_cut_by_view": 3,
                "centre_prior": {"peak_inside": prior, "mass_inside": 0.4}}
    return {"shift": 0.25, "margin_mm": 3.0,
            "models": {"nodule": {"centred": block(0.9, 0.93), "shifted": block(0.81, 0.02)},
                       "nodule-binary": {"centred": block(0.17, 0.9), "shifted": block(0.23, 0.1)}}}


def _finder_specs() -> dict[str, dict]:
    pres = {"arch": "cnn4", "input_size": 48, "metrics": {"test": {"n": 60, "accuracy": 0.933, "auroc": 0.98}}}
    loc = {"arch": "cnn4", "metrics": {"test": {"n": 30, "centre_mae_mm": 1.61, "diameter_mae_mm": 1.52}}}
    res = {"crop_scan_test": {"n": 30, "top1_within_5mm": 0.8, "top3_within_5mm": 0.9,
                              "false_candidates_score_ge_0_5_per_crop": 1.3},
           "wholeslice": {"series": [{"patient_id": "P9"}], "hit_mm": 5.0, "variants": {
               "series": {"n_nodules": 7, "n_slices_all": 138, "best_within_5mm": 5 / 7, "top3_within_5mm": 1.0,
                          "false_per_slice_all_slices": 0.89, "outlined_slices_best_on_nodule": 33 / 63,
                          "n_outlined_slices": 63,
                          "froc_all_slices": {"0.5": 0.857, "1": 1.0, "2": 1.0, "4": 1.0},
                          "nodules": [{"patient_id": "P9", "slice_index": 8, "diameter_mm": 32.8, "n_readers": 4,
                                       "best_distance_mm": 2.5, "rank_within_5mm": 1}]}},
               "seconds_per_slice": {"slice": 0.46, "series": 0.16}}}
    return {"finder-presence.json": pres, "finder-locate.json": loc, "finder.json": res}


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """A tiny weights folder: every record the card reads, with round-trippable figures, and one retired spec."""
    files = {"nodule.json": _nodule_spec(), "slice-binary.json": _slice_spec("binary"),
             "slice-score.json": _slice_spec("score"), "cam_localisation.json": _cam(), **_finder_specs(),
             "splits/holdout.json": {"fingerprint": "f00d", "assignment": {"P1": "train", "P2": "val", "P3": "test"}},
             "index-nodule.json": {"model": "nodule", "records": [
                 {"patient_id": "P1", "split": "train", "malignant": 0, "n_readers": 4},
                 {"patient_id": "P3", "split": "test", "malignant": 1, "n_readers": 4}]},
             "index-nodule-binary.json": {"model": "old-embedding", "records": []},
             "retrieval.json": {"n_test_queries": 1, "precision_at_5_test_vs_train": 0.8,
                                "chance_precision_at_5": 0.6},
             "nodule-binary.json": {**_slice_spec("binary"), "arch": "retired-network"}}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(data))
    return tmp_path


# ------------------------------------------------------------------------------------------------ shipped card


def test_the_shipped_card_and_tables_match_their_records():
    assert check_card(SHIPPED) == []


def test_the_shipped_card_reads_in_under_ten_minutes():
    card = render(SHIPPED)[CARD_FILE]
    assert len(card.split()) <= CARD_WORD_LIMIT
    assert f"]({TABLES_FILE})" in card  # the long tables are linked, not dropped


# ------------------------------------------------------------------------------------------------ structure


def test_table_helper_writes_one_markdown_row_per_row():
    assert table(("a", "b"), [(1, "x"), (2.5, "")]) == "| a | b |\n| --- | --- |\n| 1 | x |\n| 2.5 |  |\n"


def test_nodule_model_figures_land_in_their_cells(weights: Path):
    docs = render(weights)
    nodule = _section(docs[CARD_FILE], "Nodule model")
    assert "| margin | 0.611 [0.511, 0.711] | 0.422 [0.322, 0.522] |" in nodule
    assert "| 1-5 malignancy score (the app's `nodule-score`) | 0.733 [0.633, 0.833] | 0.588 [0.488, 0.688] |" in nodule
    assert "Below the single reader: sphericity." in nodule  # margin and the score are above it
    assert "| the readers' diameter | 0.872 [0.772, 0.922] | – |" in nodule
    assert "| estimate by its factors (shipped) | 0.911 [0.811, 0.961] | +0.021 [-0.012, +0.054] |" in nodule
    assert "is level with (the paired interval holds 0) the readers' diameter" in nodule
    assert "found 88% [78-92%] of the malignant nodules and cleared 62% [52-68%] of the benign" in nodule
    assert "only 7 test patients have one (5 cancer, 2 not)" in nodule
    assert "| the readers' panel score | 0.800 [0.700, 0.850] |" in nodule
    assert "(validation sensitivity >= 90%, calling from 13.7%) had found 80% on test" in nodule
    assert "Dice 0.771 [0.700, 0.800]" in nodule and "readers agree with each other at 0.702" in nodule
    tables = _section(docs[TABLES_FILE], "Nodule model")
    assert "| >= 20 mm | 20 | 6.7 | 9.1 |" in tables and "| all | 30 | 2.2 | 3.5 |" in tables
    assert "| image | +0.250 | -2.000 | + |" in tables
    assert "| 0-6 mm | 10 | 1.0 | 1.6 |" in tables


def test_maps_slice_view_finder_and_similar_cases_show_their_records(weights: Path):
    card = render(weights)[CARD_FILE]
    maps = _section(card, "Maps: does the map point at the nodule?")
    assert "| nodule | shifted | 28 | 81% (2%) | 60% (40%) | 20% | 3 |" in maps
    assert "nodule-binary" not in card  # a retired record in the folder is ignored
    assert "| slice-binary | centred" not in maps and "| slice-binary | – | not measured |" in maps
    view = _section(card, "Slice view")
    assert "| slice-score | 30 | kappa 0.444 [0.300, 0.500] | kappa 0.410; single reader 0.590 | 0.020 |" in view
    assert "`slice-binary` ranks below the readers' diameter (0.777 against 0.872)" in view
    found = _section(card, "Nodule finder")
    assert "| presence: accuracy | 60 | 0.933 |" in found and "| diameter error (mm) | 30 | 1.52 |" in found
    assert "| series ranker as shipped: network + 3D Hessian blob/vessel (series) | 71% | 100% | 52% | 0.89 | " \
           "86% / 100% / 100% / 100% |" in found  # the whole-slice block, leave-one-series-out
    similar = _section(card, "Similar cases")
    assert "embedded with `nodule`" in similar and "80% of the five nearest" in similar  # index-nodule.json first


def test_missing_records_and_blocks_say_not_measured(weights: Path):
    spec = json.loads((weights / "nodule.json").read_text())
    del spec["metrics"]["diagnosis"]
    (weights / "nodule.json").write_text(json.dumps(spec))
    (weights / "cam_localisation.json").unlink()
    card = render(weights)[CARD_FILE]
    assert "**Against diagnosis truth**: not measured (no `diagnosis` block)." in card
    assert "**Outline.** Dice 0.771" in card  # the rest of the section still reads
    assert _section(card, "Maps: does the map point at the nodule?").endswith(
        "Not measured: `cam_localisation.json` is not installed.\n")
    assert "Not measured: `histology.json` is not installed." in _section(card, "Histology teaching model")


def test_card_check_fails_with_a_diff_until_the_card_is_written(weights: Path):
    from training.__main__ import cmd_card

    with pytest.raises(LungvizError, match="out of date") as err:
        cmd_card(CardConfig(weights=str(weights), check=True))
    assert "+| margin | 0.611" in str(err.value)  # the diff shows what the shipped card lacks
    write_card(weights)
    assert (weights / "figures" / "slice-binary-confusion.png").stat().st_size > 1000
    assert cmd_card(CardConfig(weights=str(weights), check=True)) == {"card": "up to date"}
    spec = json.loads((weights / "nodule.json").read_text())
    spec["metrics"]["test"]["outline"]["dice"] = 0.5
    (weights / "nodule.json").write_text(json.dumps(spec))
    assert any(line.startswith("+**Outline.** Dice 0.500") for line in check_card(weights))
