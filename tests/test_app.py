"""The app's pages run under Streamlit's AppTest and show what is installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from lungviz import RESEARCH_NOTICE

APP = str(Path(__file__).resolve().parent.parent / "streamlit_app.py")


def test_models_page_reports_data_folder_and_models(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "lidc-slices" / "LIDC-IDRI-0001").mkdir(parents=True)
    (data / "lidc-slices" / "labels.csv").write_text("patient_id,nodule,n_readers,malignancy_readers\n")
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "nodule-binary.json").write_text(json.dumps({"arch": "cnn4", "view": "nodule", "task": "binary",
                                                           "input_size": 64}))
    monkeypatch.setenv("LUNGVIZ_DATA", str(data))
    monkeypatch.setenv("LUNGVIZ_WEIGHTS", str(weights))
    at = AppTest.from_file(APP).run(timeout=60)
    assert not at.exception
    assert at.title[0].value == "Models and data"
    assert str(data.resolve()) in [c.value for c in at.code]
    assert at.metric[0].value == "1"  # one patient folder
    table = at.dataframe[0].value
    assert list(table["model"]) == ["nodule-binary"] and not table["weights present"][0]
    assert any(RESEARCH_NOTICE in w.value for w in at.sidebar.warning)


def test_models_page_explains_missing_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LUNGVIZ_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("LUNGVIZ_WEIGHTS", str(tmp_path))
    at = AppTest.from_file(APP).run(timeout=60)
    assert not at.exception
    assert "does not exist" in at.error[0].value
    assert "No trained model bundles" in at.info[0].value


@pytest.mark.parametrize("var", ["LUNGVIZ_DATA", "LUNGVIZ_HOME"])
def test_paths_follow_environment(tmp_path, monkeypatch, var):
    from lungviz import paths

    monkeypatch.setenv(var, str(tmp_path / "x"))
    got = paths.data_dir() if var == "LUNGVIZ_DATA" else paths.home_dir()
    assert got == (tmp_path / "x").resolve() or got == tmp_path / "x"


def test_default_data_folder_is_shared_data_beside_repo(monkeypatch):
    from lungviz import paths

    monkeypatch.delenv("LUNGVIZ_DATA", raising=False)
    assert paths.data_dir() == (paths.REPO_ROOT.parent / "shared" / "data").resolve()
