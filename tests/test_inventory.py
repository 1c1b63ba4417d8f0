"""What is installed: bundles and fusion specs, reference predictions, the model card and result files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lungviz.errors import LungvizError
from lungviz.present.inventory import (
    card_parts,
    installed_models,
    map_finds_nodule,
    map_localisation_note,
    model_card,
    read_result,
    reference_predictions,
)

REFERENCE = """patient_id,nodule,p_benign,p_malignant,prediction,truth
P1,nodule-0,0.9,0.1,benign,benign
P2,nodule-0,0.3,0.7,malignant,benign
P3,nodule-1,0.2,0.8,malignant,malignant
"""


def test_installed_models_lists_bundles_only(tmp_path: Path):
    (tmp_path / "nodule.json").write_text(json.dumps({"arch": "tf_efficientnet_lite0+nodule", "view": "nodule"}))
    (tmp_path / "nodule.safetensors").write_bytes(b"x")
    (tmp_path / "slice-binary.json").write_text(json.dumps({"arch": "cnn4", "view": "slice"}))
    (tmp_path / "index-nodule.json").write_text(json.dumps({"kind": "lungviz-index", "records": []}))
    (tmp_path / "retrieval.json").write_text(json.dumps({"n": 3}))
    (tmp_path / "broken.json").write_text("{")
    got = {m["_file"]: (m["_kind"], m["_weights_present"]) for m in installed_models(tmp_path)}
    assert got == {"nodule.json": ("bundle", True), "slice-binary.json": ("bundle", False)}


def test_reference_predictions(tmp_path: Path):
    assert reference_predictions("fused-binary", "test", tmp_path) is None  # not shipped: no error
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "fused-binary-test.csv").write_text(REFERENCE)
    ref = reference_predictions("fused-binary", "test", tmp_path)
    assert ref.classes == ("benign", "malignant") and len(ref.rows) == 3
    assert ref.probabilities("malignant") == [0.1, 0.7, 0.8]
    assert ref.truths() == ["benign", "benign", "malignant"]
    assert ref.correct_by_case() == {"P1/nodule-0": True, "P2/nodule-0": False, "P3/nodule-1": True}


@pytest.mark.parametrize(("text", "message"), [
    ("patient_id,nodule,prediction,truth\nP1,n,benign,benign\n", "p_<class>"),
    ("patient_id,p_benign,p_malignant,prediction,truth\nP1,0.1,0.9,m,m\n", "nodule"),
    ("patient_id,nodule,p_benign,p_malignant,prediction,truth\nP1,n,high,0.9,m,m\n", "cannot be read"),
])
def test_damaged_reference_predictions_are_a_user_error(tmp_path: Path, text: str, message: str):
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "m-test.csv").write_text(text)
    with pytest.raises(LungvizError, match=message):
        reference_predictions("m", "test", tmp_path)


def test_card_parts_split_out_local_figures(tmp_path: Path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(b"png")
    text = "# Card\n\nintro\n\n![confusion](figures/a.png) ![rel](figures/gone.png)\n\n![web](https://x/y.png)\nend\n"
    parts = card_parts(text, tmp_path)
    assert [k for k, _ in parts] == ["markdown", "image", "missing", "markdown", "markdown"]
    assert parts[1][1] == str((tmp_path / "figures" / "a.png").resolve())
    assert parts[3][1] == "![web](https://x/y.png)" and parts[4][1] == "\nend\n"
    assert card_parts("no figures", tmp_path) == [("markdown", "no figures")]


def test_model_card_and_result_files(tmp_path: Path):
    assert model_card(tmp_path) is None and read_result("retrieval.json", tmp_path) is None
    (tmp_path / "README.md").write_text("# Card\n")
    (tmp_path / "retrieval.json").write_text(json.dumps({"n": 5}))
    (tmp_path / "cv.json").write_text("[1, 2]")
    assert model_card(tmp_path) == [("markdown", "# Card\n")]
    assert read_result("retrieval.json", tmp_path) == {"n": 5}
    assert read_result("cv.json", tmp_path) is None  # not an object


def _camloc_entry(peak_centred: float, peak_shifted: float, layer: str | None = None) -> dict:
    def block(peak: float, prior: float) -> dict:
        return {"n": 325, "peak_inside": peak, "mass_inside": 0.3, "mask_area": 0.2,
                "centre_prior": {"peak_inside": prior, "mass_inside": 0.5}}

    return {**({"layer": layer} if layer else {}), "centred": block(peak_centred, 0.92),
            "shifted": block(peak_shifted, 0.09)}


def test_map_localisation_note(tmp_path: Path):
    assert map_localisation_note("nodule-binary", tmp_path) is None  # no camloc run yet
    result = {"models": {"nodule-binary": _camloc_entry(0.17, 0.24), "slice-binary": {"n": 3}}}
    (tmp_path / "cam_localisation.json").write_text(json.dumps(result))
    note = map_localisation_note("nodule-binary", tmp_path)
    assert note.startswith("On 325 test nodules the nodule-binary Grad-CAM peaked inside the readers' outline in 17%")
    assert "in 24% with the nodule moved off the view's centre" in note and "92% and 9%" in note
    assert map_localisation_note("slice-binary", tmp_path) is None  # incomplete entry
    result["models"]["nodule-binary"]["layer"] = "backbone.blocks.4"
    (tmp_path / "cam_localisation.json").write_text(json.dumps(result))
    assert map_localisation_note("nodule-binary", tmp_path, "backbone.blocks.4") == note
    assert map_localisation_note("nodule-binary", tmp_path, None) is None  # the app now maps another layer
    assert map_localisation_note("absent", tmp_path) is None


def test_map_finds_nodule_reads_the_shifted_views(tmp_path: Path):
    assert map_finds_nodule("nodule", tmp_path) is None  # not measured
    result = {"models": {"nodule": _camloc_entry(0.95, 0.87), "slice-binary": _camloc_entry(0.6, 0.0),
                         "edge": _camloc_entry(0.5, 0.5)}}
    (tmp_path / "cam_localisation.json").write_text(json.dumps(result))
    assert map_finds_nodule("nodule", tmp_path) is True and map_finds_nodule("slice-binary", tmp_path) is False
    assert map_finds_nodule("edge", tmp_path) is True  # from half the shifted views on
    assert map_finds_nodule("nodule", tmp_path, "another.layer") is None
