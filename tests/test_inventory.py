"""What is installed: bundles and fusion specs, reference predictions, the model card and result files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lungviz.errors import LungvizError
from lungviz.inventory import (
    card_parts,
    diameter_note,
    installed_models,
    map_localisation_note,
    model_card,
    read_result,
    reference_predictions,
    size_only_note,
)

REFERENCE = """patient_id,nodule,p_benign,p_malignant,prediction,truth
P1,nodule-0,0.9,0.1,benign,benign
P2,nodule-0,0.3,0.7,malignant,benign
P3,nodule-1,0.2,0.8,malignant,malignant
"""


def test_installed_models_lists_bundles_and_fusion_specs(tmp_path: Path):
    (tmp_path / "nodule-binary.json").write_text(json.dumps({"arch": "cnn4", "view": "nodule"}))
    (tmp_path / "nodule-binary.safetensors").write_bytes(b"x")
    (tmp_path / "slice-binary.json").write_text(json.dumps({"arch": "cnn4", "view": "slice"}))
    (tmp_path / "fused-binary.json").write_text(json.dumps({"kind": "fusion", "components": ["slice-binary",
                                                                                              "nodule-binary"]}))
    (tmp_path / "index-nodule-binary.json").write_text(json.dumps({"kind": "lungviz-index", "records": []}))
    (tmp_path / "retrieval.json").write_text(json.dumps({"n": 3}))
    (tmp_path / "broken.json").write_text("{")
    got = {m["_file"]: (m["_kind"], m["_weights_present"]) for m in installed_models(tmp_path)}
    assert got == {"fused-binary.json": ("fusion", False),  # its slice component has no weights
                   "nodule-binary.json": ("bundle", True), "slice-binary.json": ("bundle", False)}
    (tmp_path / "slice-binary.safetensors").write_bytes(b"x")
    fused = {"kind": "fusion", "components": ["slice-binary", "nodule-binary"],
             "members": {"nodule-binary": ["nodule-binary-m"]}}
    (tmp_path / "fused-binary.json").write_text(json.dumps(fused))
    listed = {m["_file"]: m for m in installed_models(tmp_path)}["fused-binary.json"]
    assert listed["_networks"] == {"slice-binary": ["slice-binary"],
                                   "nodule-binary": ["nodule-binary", "nodule-binary-m"]}
    assert not listed["_weights_present"]  # a member without weights
    (tmp_path / "nodule-binary-m.safetensors").write_bytes(b"x")
    assert {m["_file"]: m for m in installed_models(tmp_path)}["fused-binary.json"]["_weights_present"]
    (tmp_path / "fused-binary.json").write_text(json.dumps(fused | {"members": {"nodule-binary": ["nodule-binary"]}}))
    damaged = {m["_file"]: m for m in installed_models(tmp_path)}["fused-binary.json"]
    assert not damaged["_weights_present"] and damaged["_networks"] == {}


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


def test_size_only_note(tmp_path: Path):
    assert size_only_note(tmp_path) is None  # no fused model
    spec = {"kind": "fusion", "metrics": {"test": {"auroc": 0.831}},
            "size_only_auroc": {"test": {"n": 332, "auroc": 0.849}}}
    (tmp_path / "fused-binary.json").write_text(json.dumps(spec))
    assert size_only_note(tmp_path) == ("On 332 test nodules this measured size alone separated benign from malignant "
                                        "as well as the fused benign/malignant model or better (AUROC 0.85 against "
                                        "0.83).")
    spec["size_only_auroc"]["test"]["ci95"] = {"auroc": [0.797, 0.896]}
    (tmp_path / "fused-binary.json").write_text(json.dumps(spec))
    assert "(AUROC 0.85 [0.80, 0.90] against 0.83)" in size_only_note(tmp_path)
    spec["size_only_auroc"]["test"]["auroc"] = 0.80
    (tmp_path / "fused-binary.json").write_text(json.dumps(spec))
    assert "less well than the fused benign/malignant model (AUROC 0.80 [0.80, 0.90] against 0.83)" in size_only_note(
        tmp_path)
    spec["size_only_auroc"]["test"]["auroc"] = 0.831
    (tmp_path / "fused-binary.json").write_text(json.dumps(spec))
    assert "as well as the fused benign/malignant model or better" in size_only_note(tmp_path)
    del spec["size_only_auroc"]  # a fusion without the size feature
    (tmp_path / "fused-binary.json").write_text(json.dumps(spec))
    assert size_only_note(tmp_path) is None


def test_diameter_note(tmp_path: Path):
    assert diameter_note(tmp_path) is None
    bands = [{"lo": 0.0, "hi": 10.0, "n": 231, "median": 0.70}, {"lo": 10.0, "hi": 20.0, "n": 68, "median": 0.61},
             {"lo": 20.0, "hi": None, "n": 33, "median": 0.42}, {"lo": 0.0, "hi": None, "n": 332, "median": 0.66}]
    (tmp_path / "fused-binary.json").write_text(json.dumps({"size_vs_readers_test": bands}))
    assert diameter_note(tmp_path) == ("On 332 test nodules its measurement was a median 66% of the readers' longest "
                                       "diameter (70% below 10 mm, 61% at 10-20 mm, 42% above 20 mm): it reads small, "
                                       "most for large nodules.")
    right = [{**b, "median": m} for b, m in zip(bands, (1.05, 0.92, 0.71, 0.98), strict=True)]
    (tmp_path / "fused-binary.json").write_text(json.dumps({"size_vs_readers_test": right}))
    assert diameter_note(tmp_path).endswith("(105% below 10 mm, 92% at 10-20 mm, 71% above 20 mm): it reads about "
                                            "right overall, but small above 20 mm.")
    (tmp_path / "fused-binary.json").write_text(json.dumps({"size_vs_readers_test": [{"n": 0}]}))
    assert diameter_note(tmp_path) is None


def test_fused_inputs_say_which_fused_model_weighs_what_the_image_measures():
    from lungviz.fusion import fused_models_words
    from lungviz.inventory import fused_inputs, fused_inputs_text, size_users

    binary = {"task": "binary", "fusion": {"features": ["log_diameter_mm", "roundness", "contrast"],
                                           "size_source": "outliner"}}
    score = {"task": "score", "fusion": {"features": ["log_diameter_mm"], "size_source": "outliner"}}
    plain = {"task": "score", "fusion": {"views": ["slice", "nodule"]}}
    network = {"task": "binary", "arch": "tf_efficientnet_lite0"}
    got = fused_inputs([binary, score, network])
    assert got == {"binary": "the nodule's diameter measured by the nodule outliner and its outline's shape and "
                             "grey levels",
                   "score": "the nodule's diameter measured by the nodule outliner"}
    assert fused_inputs_text([binary, score]) == (
        "The fused benign/malignant model weighs the nodule's diameter measured by the nodule outliner and its "
        "outline's shape and grey levels; the fused score model weighs the nodule's diameter measured by the nodule "
        "outliner.")
    assert fused_inputs([plain, network]) == {} and fused_inputs_text([plain]) is None
    assert fused_models_words(list(got)) == "the fused benign/malignant and score models"
    assert fused_models_words([]) == "no installed fused model"
    shape_only = {"task": "binary", "fusion": {"features": ["roundness"], "size_source": "outliner"}}
    assert fused_inputs([shape_only]) == {"binary": "its outline's shape"}
    finder = {"task": "score", "fusion": {"features": ["log_diameter_mm"]}}  # written before the outliner: the finder
    assert fused_inputs([finder]) == {"score": "the nodule's diameter measured by the nodule finder's localiser"}
    # Which fused models weigh the size a given tool measured (the Inspect caption names them).
    assert size_users([binary, score, shape_only, finder, network], "outliner") == ["binary", "score"]
    assert size_users([binary, score, finder], "finder") == ["score"] and size_users([plain], "outliner") == []
    assert fused_models_words(["binary"]) == "the fused benign/malignant model"
    from lungviz.report import outline_features_text

    both = outline_features_text({"roundness": 0.9}, ["binary", "score"])
    assert both.startswith("The fused benign/malignant and score models also weigh the outline's shape on this slice")
    assert outline_features_text({"roundness": 0.9}).startswith("The fused model also weighs")
